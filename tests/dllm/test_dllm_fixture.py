"""Parity with the official LLaDA / WINO code through the `shared/fixtures/llada-tiny` fixture (see its README)."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from genkit.dllm.decoding import decode_llada, decode_wino, wino_layout
from genkit.dllm.model import LLaDAModel

REPO = Path(__file__).resolve().parents[2]  # tests/dllm/<file> -> repository root
FIXTURE = REPO.parent / "shared" / "fixtures" / "llada-tiny"

pytestmark = pytest.mark.skipif(not (FIXTURE / "expected.json").is_file(),
                                reason=f"fixture folder {FIXTURE} is absent")


@pytest.fixture(scope="module")
def fx():
    from safetensors.torch import load_file

    return (LLaDAModel.from_pretrained(FIXTURE), load_file(str(FIXTURE / "expected.safetensors")),
            json.loads((FIXTURE / "expected.json").read_text()))


class Recorder(torch.nn.Module):
    """Wraps the model and keeps every input sequence it is given (the fixture's `step_inputs`)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config, self.inputs = model, model.config, []

    def forward(self, input_ids, **kw):
        self.inputs.append(input_ids.clone())
        return self.model(input_ids, **kw)


def sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def test_weights_load_bit_exact(fx):
    model, _, meta = fx
    state = model.state_dict()
    assert set(state) == set(meta["model"]["parameter_sha256"])
    for name, digest in meta["model"]["parameter_sha256"].items():
        assert sha256(state[name]) == digest, name


@pytest.mark.parametrize("name", ["std", "wino_W1_block0_first_step", "wino_W1_block1_first_step",
                                  "wino_W1_block0_step2"])
def test_forward_matches_official(fx, name):
    model, exp, meta = fx
    mask, pos = exp.get(f"{name}.attention_mask"), exp.get(f"{name}.position_ids")
    with torch.no_grad():
        out = model(exp[f"{name}.input_ids"], attention_mask=mask, position_ids=pos, output_hidden_states=True)
    hidden = torch.stack(out.hidden_states)  # (4, B, L, 16): embeddings, block 0, block 1, ln_f
    assert (hidden - exp[f"{name}.hidden_states"]).abs().max() <= 1e-5
    cols = exp["logit_columns"]
    assert (out.logits[..., cols] - exp[f"{name}.logits_at_columns"]).abs().max() <= 1e-5
    assert torch.equal(out.logits.argmax(-1), exp[f"{name}.logits_argmax"])
    assert (out.logits.max(-1).values - exp[f"{name}.logits_max"]).abs().max() <= 1e-5
    lse = torch.logsumexp(out.logits.double(), -1)
    assert (lse - exp[f"{name}.logits_logsumexp_f64"]).abs().max() <= 1e-5
    # Same ops in the same order as the official code: bit-identical on this CPU.
    assert sha256(out.logits) == meta["logits_tests"][name]["full_logits_sha256_float32_le"]
    assert sha256(hidden[3]) == meta["logits_tests"][name]["final_norm_hidden_sha256_float32_le"]


@pytest.mark.parametrize("block", [0, 1])
def test_wino_layout_matches_official(fx, block):
    _, exp, _ = fx
    mask, pos = wino_layout(prompt_length=8, gen_length=32, block_length=16, block=block)
    assert torch.equal(mask, exp[f"wino_W1_block{block}_first_step.attention_mask"])
    assert torch.equal(pos, exp[f"wino_W1_block{block}_first_step.position_ids"])


@pytest.mark.parametrize("run", ["W1_gsm8k_defaults", "W2_tau1_0.3", "W3_tau1_0.5_block8", "W4_single_block32"])
def test_wino_decoding_matches_official(fx, run):
    model, exp, meta = fx
    r, st = meta["wino_runs"][run], meta["wino_runs"][run]["settings"]
    rec = Recorder(model)
    res = decode_wino(rec, exp["prompt_ids"], gen_length=st["gen_length"], block_length=st["block_length"],
                      tau1=st["threshold"], tau2=st["threshold_back"], temperature=st["temperature"],
                      mask_id=st["mask_id"], trace=True)
    assert torch.equal(torch.cat(rec.inputs), exp[f"wino.{run}.step_inputs"])
    assert torch.equal(res.tokens, exp[f"wino.{run}.output_ids"])
    assert res.nfe == r["forward_passes"]
    assert res.extras["passes_per_block"] == r["forward_passes_per_block"]
    assert res.remasked == r["remasked_tokens_total"]
    P = st["prompt_len"]
    assert [sorted(p - P for p in t["accepted_positions"]) for t in r["trace"]] == [sorted(a) for a in res.trace[0]]
    assert [sorted(p - P for p in t["remasked_positions"]) for t in r["trace"]] == [
        sorted(a) for a in res.remask_trace[0]]


@pytest.mark.parametrize("run", ["L1_steps32_block16", "L2_steps12_block8", "L3_steps8_block32"])
def test_llada_decoding_matches_official(fx, run):
    model, exp, meta = fx
    r, st = meta["llada_runs"][run], meta["llada_runs"][run]["settings"]
    rec = Recorder(model)
    res = decode_llada(rec, exp["prompt_ids"], gen_length=st["gen_length"], block_length=st["block_length"],
                       steps=st["steps"], temperature=st["temperature"], cfg_scale=st["cfg_scale"],
                       remasking=st["remasking"], mask_id=st["mask_id"], trace=True)
    assert torch.equal(torch.cat(rec.inputs), exp[f"llada.{run}.step_inputs"])
    assert torch.equal(res.tokens, exp[f"llada.{run}.output_ids"])
    assert res.nfe == r["forward_passes"]
    P = st["prompt_len"]
    assert res.trace[0] == [[p - P for p in t["positions"]] for t in r["trace"]]  # commit order too
