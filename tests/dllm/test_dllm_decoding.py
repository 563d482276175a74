"""Decoder behaviour on tiny random models and hand-made logits: batching, seeds, invariants, definitions."""

import math
from types import SimpleNamespace

import pytest
import torch

from genkit.dllm.decoding import (DECODERS, add_gumbel_noise, decode_entropy, decode_fast_dllm, decode_llada,
                                  decode_maskgit_plus, decode_topk_margin, decode_wino, decode_wino_cache,
                                  get_decoder, get_num_transfer_tokens, sample_tokens, wino_layout)
from genkit.errors import ConfigError

GREEDY = [
    ("llada", dict(steps=16, block_length=8)),
    ("llada", dict(steps=8, block_length=16, cfg_scale=1.0)),
    ("fast-dllm", dict(block_length=8, tau=0.5)),
    ("fast-dllm", dict(block_length=4, tau=0.5, cache="prefix")),
    ("fast-dllm", dict(block_length=4, tau=0.5, cache="dual")),
    ("wino", dict(block_length=8, tau1=0.3)),
    ("wino-cache", dict(block_length=8, tau1=0.3)),
    ("wino-cache", dict(block_length=8, tau1=0.3, refresh=2)),
    ("entropy", dict(steps=16)),
    ("maskgit_plus", dict(steps=8, block_length=8)),
    ("topk_margin", dict(steps=16, block_length=4)),
]


def test_registry_and_unknown_name():
    assert set(DECODERS) == {"llada", "fast-dllm", "wino", "wino-cache", "wino-plus", "origin", "maskgit_plus",
                             "topk_margin", "entropy"}
    with pytest.raises(ConfigError, match="choose one of: llada, fast-dllm"):
        get_decoder("beam")


@pytest.mark.parametrize("name, knobs", GREEDY, ids=[f"{n}-{i}" for i, (n, _) in enumerate(GREEDY)])
def test_left_padded_batch_equals_one_at_a_time(tiny, prompts, name, knobs):
    model, decode = tiny(), get_decoder(name)
    batch = decode(model, prompts, gen_length=16, trace=True, **knobs)
    assert batch.tokens.shape == (3, 7 + 16)
    for row, prompt in enumerate(prompts):
        alone = decode(model, [prompt], gen_length=16, trace=True, **knobs)
        assert torch.equal(batch.generated[row], alone.generated[0])
        assert batch.trace[row] == alone.trace[0]
        assert torch.equal(batch.tokens[row, 7 - len(prompt):7], torch.tensor(prompt))
    if name in ("llada", "entropy", "maskgit_plus", "topk_margin"):
        assert batch.nfe == alone.nfe  # fixed schedules


def test_wino_batch_remask_counts_add_up(tiny, prompts):
    model = tiny()
    batch = decode_wino(model, prompts, gen_length=16, block_length=8, tau1=0.3)
    alone = [decode_wino(model, [p], gen_length=16, block_length=8, tau1=0.3) for p in prompts]
    assert batch.remasked == sum(a.remasked for a in alone) > 0  # this model does re-mask
    assert batch.nfe >= max(a.nfe for a in alone)


def test_wino_draft_only_ablation_never_remasks(tiny, prompts):
    res = decode_wino(tiny(), prompts, gen_length=16, block_length=8, tau1=0.3, tau2=0.0, trace=True)
    assert res.remasked == 0 and all(r == [] for row in res.remask_trace for r in row)
    assert not (res.generated == 63).any()


def test_random_remasking_and_sampling_reproducible_with_seed(tiny, prompts):
    model = tiny()

    def run(seed, **kw):
        return decode_llada(model, prompts, gen_length=16, steps=8, block_length=8, trace=True,
                            generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = run(1, remasking="random"), run(1, remasking="random"), run(2, remasking="random")
    assert torch.equal(a.tokens, b.tokens) and a.trace == b.trace
    assert a.trace != c.trace  # another seed commits in another order
    s1, s2 = run(3, temperature=1.0), run(3, temperature=1.0)
    assert torch.equal(s1.tokens, s2.tokens)
    torch.manual_seed(5)  # the global RNG works as well (generator=None), as in the official code
    g1 = decode_llada(model, prompts, gen_length=16, steps=8, block_length=8, remasking="random")
    torch.manual_seed(5)
    g2 = decode_llada(model, prompts, gen_length=16, steps=8, block_length=8, remasking="random")
    assert torch.equal(g1.tokens, g2.tokens)


def test_fast_dllm_tau_one_is_llada_one_token_per_step(tiny, prompts):
    # tau = 1.0: no probability is strictly above 1, so each pass commits only the top-1, which is
    # LLaDA's low-confidence choice with one token per step.
    model = tiny()
    for block_length in (4, 16):
        ll = decode_llada(model, prompts, gen_length=16, block_length=block_length, steps=16, trace=True)
        fd = decode_fast_dllm(model, prompts, gen_length=16, block_length=block_length, tau=1.0, trace=True)
        assert torch.equal(ll.tokens, fd.tokens) and ll.trace == fd.trace and ll.nfe == fd.nfe == 16


def test_fast_dllm_fixed_quota_equals_llada(tiny, prompts):
    model = tiny()
    ll = decode_llada(model, prompts, gen_length=16, block_length=8, steps=6)
    fd = decode_fast_dllm(model, prompts, gen_length=16, block_length=8, tau=None, steps=6)
    assert torch.equal(ll.tokens, fd.tokens) and ll.nfe == fd.nfe == 6


@pytest.mark.parametrize("shifted", [False, True])
def test_caches_are_exact_for_one_layer(tiny, prompts, shifted):
    # With one layer every cached key/value is a function of its own token, so stale caches are exact and the
    # cached decoders must take the same decisions as the uncached ones.
    model = tiny(n_layers=1, shifted=shifted)
    ref = decode_fast_dllm(model, prompts, gen_length=16, block_length=4, tau=0.6, trace=True)
    for cache in ("prefix", "dual"):
        got = decode_fast_dllm(model, prompts, gen_length=16, block_length=4, tau=0.6, cache=cache, trace=True)
        assert torch.equal(got.tokens, ref.tokens) and got.trace == ref.trace and got.nfe == ref.nfe
    if not shifted:
        w = decode_wino(model, prompts, gen_length=16, block_length=8, tau1=0.3, trace=True)
        wc = decode_wino_cache(model, prompts, gen_length=16, block_length=8, tau1=0.3, trace=True)
        assert torch.equal(w.tokens, wc.tokens) and (w.nfe, w.remasked) == (wc.nfe, wc.remasked)


def test_caches_run_on_deeper_models(tiny, prompts):
    model = tiny(n_layers=2)
    for cache in ("prefix", "dual"):
        res = decode_fast_dllm(model, prompts, gen_length=16, block_length=4, tau=0.6, cache=cache)
        assert not (res.generated == 63).any() and 4 <= res.nfe <= 16
    res = decode_wino_cache(model, prompts, gen_length=16, block_length=8)
    assert not (res.generated == 63).any()


def test_wino_cache_refresh_every_pass_is_wino(tiny, prompts):
    model = tiny(n_layers=2)
    w = decode_wino(model, prompts, gen_length=16, block_length=8, tau1=0.3, trace=True)
    wc = decode_wino_cache(model, prompts, gen_length=16, block_length=8, tau1=0.3, refresh=1, trace=True)
    assert torch.equal(w.tokens, wc.tokens) and (w.nfe, w.remasked) == (wc.nfe, wc.remasked) and w.trace == wc.trace
    with pytest.raises(ConfigError, match="refresh must be >= 0"):
        decode_wino_cache(model, prompts, gen_length=16, block_length=8, refresh=-1)


def test_wino_cache_refresh_falls_back_when_a_cached_token_is_remasked(tiny):
    # Spy on the passes: which cache each cached pass reads.  Replaying the accept/re-mask trace gives the
    # decoded set at every refresh; a pass must read the block-start cache exactly when a token decoded at
    # the newest refresh has been re-masked since, and otherwise the cache left by the pass before it.
    model = tiny(n_layers=2)
    calls = []
    forward = model.forward

    def spy(*a, **k):
        out = forward(*a, **k)
        calls.append((k.get("past_key_values"), out.past_key_values))
        return out

    model.forward = spy
    r = 2
    res = decode_wino_cache(model, [[3, 4]], gen_length=16, block_length=16, tau1=0.3, refresh=r,
                            trace=True)
    acc, rem = res.trace[0], res.remask_trace[0]
    assert len(calls) == res.nfe == len(acc) and sum(map(len, rem)) == res.remasked > 0
    decoded, snap, base, fallbacks, used_refresh = set(), set(), calls[0][1], 0, 0
    same = lambda a, b: all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))  # noqa: E731
    for t, (kv_in, _) in enumerate(calls):
        if t % r == 0:
            assert kv_in is None  # a full pass
            snap = set(decoded)
        else:
            leaked = bool(snap - decoded)  # a token held by the newest refresh was re-masked since
            assert same(kv_in, base if leaked else calls[t - 1][1])
            used_refresh += not leaked and not same(kv_in, base)
            fallbacks += leaked
            if leaked:
                snap = set()
        decoded = (decoded | set(acc[t])) - set(rem[t])
    assert fallbacks > 0 and used_refresh > 0  # both cases happened (and the caches differ)


def test_wino_rejects_shifted_models(tiny):
    with pytest.raises(ConfigError, match="unshifted"):
        decode_wino(tiny(n_layers=1, shifted=True), [[1, 2]], gen_length=8, block_length=8)


def test_wino_layout_with_padding():
    mask, pos = wino_layout(prompt_length=3, gen_length=4, block_length=2, block=1, pad=torch.tensor([0, 2]))
    assert mask.shape == (2, 1, 9, 9) and pos.shape == (2, 9)
    assert pos[1].tolist() == [0, 0, 0, 1, 2, 3, 4, 3, 4]  # shadow slots share their partners' positions
    assert not mask[1, 0, :, :2].any() and mask[0, 0, :7, :7].all()
    assert not mask[0, 0, 7, 5] and mask[0, 0, 7, 6] and mask[0, 0, 7, 8]  # shadow 0 hides only partner 5


def test_bad_layouts_raise_config_error(tiny):
    model = tiny(n_layers=1)
    with pytest.raises(ConfigError, match="block_length"):
        decode_llada(model, [[1]], gen_length=10, block_length=4, steps=10)
    with pytest.raises(ConfigError, match="steps"):
        decode_llada(model, [[1]], gen_length=8, block_length=4, steps=3)
    with pytest.raises(ConfigError, match="cache"):
        decode_fast_dllm(model, [[1]], gen_length=8, block_length=4, cache="full")


def test_helpers():
    quota = get_num_transfer_tokens(torch.tensor([[True] * 7 + [False], [True] * 3 + [False] * 5]), 3)
    assert quota.tolist() == [[3, 2, 2], [1, 1, 1]]
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0]])).expand(60000, 3)
    assert add_gumbel_noise(logits, 0.0) is logits
    g = torch.Generator().manual_seed(0)
    noisy = add_gumbel_noise(logits, 1.0, generator=g)
    u = torch.rand(logits.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert noisy.dtype == torch.float64 and torch.allclose(noisy, logits.double().exp() / (-u.log()))
    freq = torch.bincount(noisy.argmax(-1), minlength=3) / 60000  # Gumbel-max samples softmax(logits)
    assert torch.allclose(freq, torch.tensor([1 / 6, 2 / 6, 3 / 6]), atol=0.01)


class FixedLogits(torch.nn.Module):
    """A 'model' whose logits at the generated positions are fixed, whatever the input."""

    def __init__(self, probs):
        super().__init__()
        self.config = SimpleNamespace(mask_token_id=11, pad_token_id=None, eos_token_id=None, shifted_logits=False)
        gen = torch.log(torch.tensor(probs) + 1e-12)  # (G, 12)
        self.table = torch.cat([torch.zeros(1, 12), gen])  # one prompt position

    def forward(self, input_ids, attention_mask=None, position_ids=None):
        return self.table[None].expand(input_ids.shape[0], -1, -1)


# Generated positions 0, 1, 2. Position 1 has the most probable token (0.70), position 2 the widest top-1/top-2
# margin (0.69 - 0.031), position 0 the lowest entropy (a two-way 0.65/0.35 split).
PROBS = [[0.65, 0.35] + [0.0] * 10, [0.7, 0.1, 0.1, 0.1] + [0.0] * 8, [0.69] + [0.031] * 10 + [0.0]]


@pytest.mark.parametrize("decode, first, scores", [
    (decode_maskgit_plus, 1, lambda p: max(p)),
    (decode_topk_margin, 2, lambda p: sorted(p)[-1] - sorted(p)[-2]),
    (decode_entropy, 0, lambda p: sum(q * math.log(q + 1e-10) for q in p)),
])
def test_dream_orders_follow_their_definitions(decode, first, scores):
    res = decode(FixedLogits(PROBS), [[5]], gen_length=3, steps=3, trace=True)
    order = sorted(range(3), key=lambda i: -scores(PROBS[i]))
    assert order[0] == first
    # Dream's schedule with 3 steps for 3 tokens: int(3 * (1 - t1/t0)) = 0, then 1, then the rest.
    assert res.trace[0] == [[], order[:1], order[1:]] and res.nfe == 3
    assert res.generated[0].tolist() == [0, 0, 0]
    alg = decode.__name__.removeprefix("decode_")
    conf, x0 = sample_tokens(FixedLogits(PROBS).table[1:], alg)
    assert x0.tolist() == [0, 0, 0]
    assert torch.allclose(conf, torch.tensor([scores(p) for p in PROBS]), atol=1e-5)


def test_dream_origin_and_sampling_reproducible(tiny, prompts):
    model = tiny()
    for decode, kw in ((get_decoder("origin"), {}), (decode_entropy, dict(temperature=0.7, top_p=0.9, top_k=20)),
                       (decode_maskgit_plus, dict(alg_temp=0.5))):
        a = decode(model, prompts, gen_length=16, steps=8, generator=torch.Generator().manual_seed(0), **kw)
        b = decode(model, prompts, gen_length=16, steps=8, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(a.tokens, b.tokens) and not (a.generated == 63).any()


def test_prepadded_tensor_with_prompt_mask_equals_list_input(tiny, prompts):
    model = tiny()
    ids = torch.full((3, 7), 62)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 7 - len(p):], mask[row, 7 - len(p):] = torch.tensor(p), 1
    a = decode_wino(model, prompts, gen_length=8, block_length=8, tau1=0.3)
    b = decode_wino(model, ids, prompt_mask=mask, gen_length=8, block_length=8, tau1=0.3)
    assert torch.equal(a.tokens, b.tokens)
    with pytest.raises(ConfigError, match="left padding"):
        decode_wino(model, ids, prompt_mask=mask.flip(1), gen_length=8, block_length=8)
