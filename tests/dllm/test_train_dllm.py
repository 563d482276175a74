"""`genkit train-dllm`: the SFT loss, the saved model folder, exact resume, one-line errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genkit.cli import main
from genkit.dllm.io import load_dllm, sft_tensors
from genkit.dllm.model import LLaDAModel
from genkit.dllm.tokenizer import CharTokenizer
from genkit.dllm.train import LLaDASFTLoss

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.task=sudoku", "data.n_train=300", "data.n_test=8", "arch.d_model=32", "arch.n_layers=1",
        "arch.n_heads=2", "arch.mlp_hidden_size=64", "train.batch_size=8", "train.warmup_steps=2",
        "runtime.log_every=1", "runtime.threads=1", "eval.n=4"]


def test_sft_loss_masks_only_the_answer_and_weights_by_one_over_p():
    torch.manual_seed(0)
    loss = LLaDASFTLoss(mask_id=1, eps=1e-3)
    g = torch.Generator().manual_seed(0)
    p, masked = loss.corrupt(256, 12, 5, g)
    assert not masked[:, :7].any() and masked[:, 7:].any()
    assert bool(((p >= 1e-3) & (p <= 1)).all())
    frac = masked[:, 7:].float().mean(1)
    assert abs(float((frac - p).mean())) < 0.03  # each answer token is masked with probability p
    ps, _ = LLaDASFTLoss(1, t_sampling="stratified").corrupt(64, 12, 5, torch.Generator().manual_seed(1))
    t = (ps - 1e-3) / (1 - 1e-3)
    assert sorted((t * 64).floor().long().tolist()) == list(range(64))  # one t per interval of width 1/64

    class Uniform(torch.nn.Module):  # logits all equal: CE = log V for every token
        def forward(self, x, attention_mask=None, position_ids=None):
            return torch.zeros(*x.shape, 10)

    ids = torch.randint(2, 10, (3, 12))
    p = torch.tensor([0.5, 0.25, 1.0])
    masked = torch.zeros(3, 12, dtype=torch.bool)
    masked[0, 8:10] = True
    masked[2, 7:] = True
    per_row = loss(Uniform(), ids, p, masked, 5)
    log_v = torch.log(torch.tensor(10.0))
    assert torch.allclose(per_row, torch.stack([2 * log_v / 0.5 / 5, torch.tensor(0.0), 5 * log_v / 1.0 / 5]))


def test_sft_layout_left_pads_prompts_and_eos_pads_answers():
    tok = CharTokenizer.from_texts(["ab=", "ba"])
    ids, pad, P = sft_tensors(tok, [{"prompt": "ab=", "answer": "ba"}, {"prompt": "a=", "answer": "b"}], 4)
    assert P == 4 and pad.tolist() == [0, 1]
    assert tok.decode(ids[0, P:]) == "ba" and ids[0, P + 2:].tolist() == [tok.eos_id] * 2
    assert ids[1, 1] == tok.bos_id and tok.decode(ids[1, 2:P]) == "a="


def cli(capsys, *args) -> tuple[int, str, str]:
    """Run the CLI in this process (no interpreter start-up); returns (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_train_writes_a_loadable_model_folder(tmp_path, capsys):
    out = tmp_path / "run"
    rc, stdout, _ = cli(capsys, "train-dllm", *TINY, "train.steps=4", "--out", out, "-q")
    assert rc == 0 and "test accuracy" in stdout
    for f in ("config.yaml", "log.jsonl", "metrics.json", "data/train.jsonl", "data/test.jsonl", "model/config.json",
              "model/model.safetensors", "model/tokenizer.json", "model/genkit.json"):
        assert (out / f).is_file(), f
    model = LLaDAModel.from_pretrained(out / "model")  # the official-format folder
    m2, tok, info = load_dllm(out)  # a run folder works too
    assert tok.mask_id == model.config.mask_token_id == m2.mask_id
    assert info["gen_length"] == 24 and info["task"] == "sudoku"
    assert model.config.max_sequence_length >= info["prompt_length"] + 24
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 4 and m["test_n"] == 4 and m["seed"] == 0 and 0 <= m["test_accuracy"] <= 1


def test_resume_continues_exactly(tmp_path, capsys):
    args = [*TINY, "train.steps=6", "runtime.checkpoint_every=3", "eval.n=0"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    assert cli(capsys, "train-dllm", *args, "--out", ref, "-q")[0] == 0
    assert cli(capsys, "train-dllm", *args, "--out", cut, "-q")[0] == 0
    shutil.rmtree(cut / "checkpoints" / "step-00000006")  # as if killed after the step-3 checkpoint
    shutil.rmtree(cut / "model")
    assert cli(capsys, "train-dllm", *args, "--out", cut, "-q")[0] == 0
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(cut / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0


def test_bad_data_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n')
    rc, _, err = cli(capsys, "train-dllm", f"data.train_file={bad}", "--out", tmp_path / "o")
    assert rc == 2 and "without 'prompt' and 'answer'" in err and len(err.strip().splitlines()) == 1
    rc, _, err = cli(capsys, "train-dllm", "data.task=sudoku9", "--out", tmp_path / "o2")
    assert rc == 2 and "unknown task" in err
    rc, _, err = cli(capsys, "train-dllm", "--out", tmp_path / "o3")
    assert rc == 2 and "data.task" in err


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, capsys):
    import os
    import subprocess
    import sys

    args = [*TINY, "train.steps=3", "eval.n=0", "runtime.checkpoint_every=0"]
    one = tmp_path / "one"
    assert cli(capsys, "train-dllm", *args, "--out", one, "-q")[0] == 0
    two = tmp_path / "two"
    env = dict(os.environ)
    env.pop("GENKIT_DEBUG", None)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "genkit",
                    "train-dllm", *args, "--out", str(two), "-q"], cwd=REPO, env=env, check=True, timeout=600,
                   capture_output=True)
    a, b = load_file(str(one / "model" / "model.safetensors")), load_file(str(two / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


def test_prefix_cache_training_sees_the_prompt_as_encoded_with_the_answer_masked():
    """`train.prefix_cache`: the cached loss equals one pass over [prompt, masked answer, noisy answer] whose
    last segment attends to the prompt's entries of the first (computed without it) and to itself, at the
    answer's positions; and differs from the plain loss (the prompt's entries do depend on the answer)."""
    from genkit.dllm.model import LLaDAConfig

    torch.manual_seed(0)
    cfg = LLaDAConfig(d_model=32, n_heads=2, n_layers=2, mlp_hidden_size=64, vocab_size=12, mask_token_id=1,
                      max_sequence_length=64)
    model = LLaDAModel(cfg).init_weights(torch.Generator().manual_seed(0)).double()
    B, P, G = 3, 7, 5
    T = P + G
    ids = torch.randint(2, 12, (B, T))
    pad = torch.tensor([0, 2, 1])  # left padding of each row
    ar = torch.arange(T)
    keep = ar[None] >= pad[:, None]  # (B, T)
    pos = (ar[None] - pad[:, None]).clamp_min(0)  # (B, T)
    loss = LLaDASFTLoss(mask_id=1)
    p, masked = loss.corrupt(B, T, G, torch.Generator().manual_seed(3))
    masked[:, P] = True  # every row has a masked answer token
    cached = loss(model, ids, p, masked, G, keep, pos, cached=True)
    plain = loss(model, ids, p, masked, G, keep, pos)

    noisy = ids.masked_fill(masked, 1)
    start = ids.clone()
    start[:, P:] = 1
    x = torch.cat([start, noisy[:, P:]], 1)  # (B, T + G)
    q = torch.arange(T + G)
    seg = (q >= T).long()  # 0: prompt + masked answer, 1: the noisy answer
    allowed = (seg[:, None] == seg[None, :]) & (q[None, :] < T)  # segment 0 among itself
    allowed |= (seg[:, None] == 1) & ((q[None, :] < P) | (seg[None, :] == 1))  # answer: the prompt and itself
    keep2 = torch.cat([keep, torch.ones(B, G, dtype=torch.bool)], 1)
    mask4 = (allowed[None] & keep2[:, None, :])[:, None]  # (B, 1, T + G, T + G)
    pos2 = torch.cat([pos, pos[:, P:]], 1)
    logits = model(x, attention_mask=mask4, position_ids=pos2)[:, T:]  # (B, G, V)
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, P:], reduction="none")  # (B, G)
    ref = (ce * masked[:, P:] / p[:, None]).sum(1) / G
    assert torch.allclose(cached.double(), ref, atol=1e-5, rtol=0)  # the loss takes its CE in float32
    assert float((cached - plain).abs().max()) > 1e-4


def test_prefix_cache_training_runs_and_resumes_exactly(tmp_path, capsys):
    args = [*TINY, "train.steps=6", "runtime.checkpoint_every=3", "eval.n=0", "train.prefix_cache=0.5"]
    ref, cut, plain = tmp_path / "ref", tmp_path / "cut", tmp_path / "plain"
    assert cli(capsys, "train-dllm", *args, "--out", ref, "-q")[0] == 0
    assert cli(capsys, "train-dllm", *args, "--out", cut, "-q")[0] == 0
    shutil.rmtree(cut / "checkpoints" / "step-00000006")
    shutil.rmtree(cut / "model")
    assert cli(capsys, "train-dllm", *args, "--out", cut, "-q")[0] == 0
    assert cli(capsys, "train-dllm", *args[:-1], "--out", plain, "-q")[0] == 0
    a, b = load_file(str(ref / "model" / "model.safetensors")), load_file(str(cut / "model" / "model.safetensors"))
    c = load_file(str(plain / "model" / "model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert max(float((a[k] - c[k]).abs().max()) for k in a) > 0  # some of the 6 steps went through the cache
    late = tmp_path / "late"  # prefix_cache_after=1: the cache never starts, the run is the plain one
    assert cli(capsys, "train-dllm", *args[:-1], "train.prefix_cache=1.0", "train.prefix_cache_after=1.0",
               "--out", late, "-q")[0] == 0
    d = load_file(str(late / "model" / "model.safetensors"))
    assert max(float((d[k] - c[k]).abs().max()) for k in c) == 0.0
