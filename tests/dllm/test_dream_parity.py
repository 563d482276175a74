"""Dream orders against the official sampler: token sequences and passes recorded from the official code.

How the references were produced (not part of the suite; nothing of the official code is in this repository):
the tiny folder below (`build_tiny_dream().save_pretrained(DIR)`, plus a generation_config.json the official
loader wants) was loaded with Dream's `modeling_dream.py` / `generation_utils.py` as vendored in NVlabs/Fast-dLLM
`dream/model/` (`DreamModel.from_pretrained(DIR, torch_dtype=torch.float32)`), under transformers 4.46.2 (Dream's
pin) and torch 2.13.0 CPU, one thread. One patch to that copy: Fast-dLLM's `DreamBaseModel.forward` overwrites
`position_ids` with arange (for its caches) while the Hub's Dream code honours them; the patch restores that, which
only matters for the left-padded case. Each case ran `torch.manual_seed(seed)` and then
`model.diffusion_generate(prompt, attention_mask=<0/1 mask, padded case only>, max_new_tokens=12,
return_dict_in_generate=True, output_history=True, **call)`; `tokens` are sequences[:, P:], `per_pass` the number of
positions each step unmasked (from the history) and the number of model calls (a forward pre-hook) was `steps`
every time. `_prepare_generation_config(None, alg="entropy")` gave temperature 1.0, top_p 1.0, top_k 50,
steps 512 for settings a call omits (genkit's OFFICIAL_OMITTED). The official forward's logits on
[P1 + 7 masks] summed to -498.0637318622321 and equal genkit's DreamModel bit for bit.
"""

import pytest
import torch
from dllm_support import DREAM_MASK, build_tiny_dream

from genkit.dllm.decoding import get_decoder
from genkit.dllm.decoding.dream import OFFICIAL_OMITTED

P1, P2 = [5, 17, 42, 9, 88], [33, 64, 2]
G = 12
CASES = {  # name: (seed, official diffusion_generate settings, tokens per row, positions committed per pass)
    "maskgit_greedy": (0, dict(steps=12, alg="maskgit_plus", temperature=0.0, top_p=None, top_k=None),
                       [[35, 64, 114, 73, 112, 25, 109, 112, 25, 109, 84, 54]],
                       [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "entropy_5_steps": (0, dict(steps=5, alg="entropy", temperature=0.0, top_p=None, top_k=None),
                        [[35, 64, 114, 73, 112, 54, 114, 73, 112, 25, 109, 54]], [[2, 2, 2, 2, 4]]),
    "topk_margin_sampled": (1, dict(steps=12, alg="topk_margin", temperature=0.5, top_p=0.9, top_k=5),
                            [[35, 64, 111, 114, 59, 26, 84, 6, 84, 19, 6, 6]],
                            [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "origin_greedy_seed3": (3, dict(steps=6, alg="origin", temperature=0.0, top_p=None, top_k=None),
                            [[35, 64, 114, 114, 59, 114, 73, 112, 114, 73, 6, 6]], [[4, 3, 3, 2, 0, 0]]),
    "origin_greedy_seed4": (4, dict(steps=6, alg="origin", temperature=0.0, top_p=None, top_k=None),
                            [[35, 64, 64, 114, 114, 114, 73, 112, 24, 24, 6, 26]], [[3, 1, 0, 4, 0, 4]]),
    "origin_sampled": (5, dict(steps=12, alg="origin", temperature=1.0, top_p=None, top_k=None),
                       [[7, 24, 26, 47, 24, 9, 54, 114, 72, 114, 114, 64]], [[1, 2, 1, 0, 1, 1, 1, 2, 2, 0, 0, 1]]),
    "maskgit_alg_temp": (6, dict(steps=12, alg="maskgit_plus", temperature=0.3, top_p=None, top_k=None, alg_temp=0.5),
                         [[77, 73, 24, 6, 26, 70, 24, 64, 114, 24, 9, 6]], [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "entropy_padded_batch": (0, dict(steps=12, alg="entropy", temperature=0.0, top_p=None, top_k=None),
                             [[35, 64, 114, 73, 112, 25, 109, 112, 25, 109, 84, 54],
                              [109, 87, 51, 42, 112, 24, 96, 24, 96, 81, 24, 24]],
                             [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "entropy_t15_top_k_omitted": (8, dict(steps=12, alg="entropy", temperature=1.5),
                                  [[35, 111, 19, 64, 70, 48, 35, 64, 61, 55, 32, 6]],
                                  [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "entropy_t15_top_k_none": (8, dict(steps=12, alg="entropy", temperature=1.5, top_k=None),
                               [[35, 30, 25, 60, 95, 32, 72, 64, 73, 46, 96, 18]],
                               [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
    "entropy_all_omitted": (7, dict(steps=12, alg="entropy"),
                            [[35, 64, 61, 73, 76, 115, 84, 1, 114, 84, 19, 64]],
                            [[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2]]),
}


@pytest.fixture(scope="module")
def dream():
    return build_tiny_dream()


def genkit_kwargs(call: dict) -> dict:
    """genkit's keyword arguments for an official call: what the call omits takes the official omitted values."""
    kw = {k: v for k, v in call.items() if k != "alg"}
    for k in ("temperature", "top_p", "top_k"):
        kw.setdefault(k, OFFICIAL_OMITTED[k])
    return kw


@torch.no_grad()
def test_builder_reproduces_the_reference_model(dream):
    x = torch.tensor([P1 + [DREAM_MASK] * 7])
    assert abs(dream(x).double().sum().item() - (-498.0637318622321)) < 1e-3


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_decoders_equal_official_sampler(dream, name):
    seed, call, tokens, per_pass = CASES[name]
    prompts = [P1, P2] if "batch" in name else [P1]
    res = get_decoder(call["alg"])(dream, prompts, gen_length=G, trace=True,
                                   generator=torch.Generator().manual_seed(seed), **genkit_kwargs(call))
    assert res.generated.tolist() == tokens
    assert res.nfe == call["steps"]  # passes that commit nothing count: the official loop calls the model each step
    assert [[len(p) for p in row] for row in res.trace] == per_pass


def test_what_the_references_show():
    # the int(...) schedule: one token per step on average, yet the first pass commits none and the last two
    assert CASES["maskgit_greedy"][3][0][0] == 0 and CASES["maskgit_greedy"][3][0][-1] == 2
    # origin is random at temperature 0: its reveal draws uniforms; two seeds, two answers
    assert CASES["origin_greedy_seed3"][2] != CASES["origin_greedy_seed4"][2]
    # an omitted top_k is top_k=50, not "no filter": same seed and settings, different tokens
    assert CASES["entropy_t15_top_k_omitted"][2] != CASES["entropy_t15_top_k_none"][2]
    assert OFFICIAL_OMITTED == {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "steps": 512}


@torch.no_grad()
def test_global_rng_when_no_generator(dream):
    """generator=None draws from the global RNG, exactly as the official code after torch.manual_seed."""
    seed, call, tokens, _ = CASES["origin_sampled"]
    torch.manual_seed(seed)
    res = get_decoder("origin")(dream, [P1], gen_length=G, **genkit_kwargs(call))
    assert res.generated.tolist() == tokens
