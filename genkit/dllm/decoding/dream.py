"""Dream / DiffuCoder unmasking orders: origin, maskgit_plus, topk_margin, entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkit.errors import ConfigError

from .common import (DecodeResult, argmax_no_mask, check_blocks, logits_at, model_device, new_trace,
                     pad_prompts, padding_layout, resolve_mask_id, resolve_pad_id)

ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")

# What an official `model.diffusion_generate(...)` call gets for the sampling settings it omits (Dream's pinned
# transformers 4.46.2; also 4.52, which DiffuCoder's RL code pins): with no generation_config argument the sampler
# builds one with `DreamGenerationConfig.from_model_config(model.config)`, and a transformers 4.x model config
# carries the global generation defaults, so DreamGenerationConfig's own defaults (temperature 0, no top-p / top-k)
# are replaced by these. The README / demo calls and DiffuCoder's coupled-GRPO rollouts omit top_k (so they
# sample after a top-50 filter); Dream's lm-eval harness passes top_k=None explicitly (no filter). genkit's
# decoders take every setting explicitly, defaulting to temperature 0, top_p / top_k None, steps = gen_length;
# pass these values to reproduce an official call that omits them.
OFFICIAL_OMITTED = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "steps": 512}


def top_p_logits(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest most-probable set whose mass reaches top_p (the top token always)."""
    sorted_logits, sorted_idx = torch.sort(logits, descending=True)
    cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    drop = cum > top_p
    drop[..., 1:] = drop[..., :-1].clone()  # shift right: keep the token that crosses top_p
    drop[..., 0] = False
    drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_idx, drop)
    return logits.masked_fill(drop, torch.finfo(logits.dtype).min)


def top_k_logits(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k logits (ties with the k-th kept), the others to the dtype's minimum."""
    top_k = min(top_k, logits.shape[-1])
    kth = torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def sample_tokens(logits: torch.Tensor, alg: str, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, mask_id: int | None = None,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (N,) and the order score (N,) that ranks positions for `alg`, from logits (N, V).

    Tokens: argmax (temperature 0) or a sample of softmax(logits / temperature) after top-p / top-k.
    Scores (higher = unmask first), all computed on those tempered, filtered probabilities p:
    maskgit_plus (and origin): p(token); topk_margin: p(top1) - p(top2) (Kim et al., arXiv 2502.06768);
    entropy: sum_v p_v log(p_v + 1e-10), the negative entropy.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    if temperature > 0:  # torch.distributions.Categorical(probs).sample(), with an optional generator
        x0 = torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, True, generator=generator).squeeze(-1)
        if mask_id is not None and bool((x0 == mask_id).any()):  # redraw those rows without the mask id
            bad = x0 == mask_id
            alt = probs[bad].clone()
            alt[:, mask_id] = 0
            x0[bad] = torch.multinomial(alt / alt.sum(-1, keepdim=True), 1, True, generator=generator).squeeze(-1)
    else:
        x0 = probs.argmax(-1) if mask_id is None else argmax_no_mask(probs, mask_id)
    conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    if alg == "topk_margin":
        top2 = torch.topk(probs, 2, dim=-1).values
        conf = top2[:, 0] - top2[:, 1]
    elif alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return conf, x0


@torch.no_grad()
def _decode_dream(model, prompt_ids, alg, *, gen_length, block_length, steps, temperature, top_p, top_k,
                  alg_temp, eps, mask_id, prompt_mask, generator, trace):
    if alg not in ALGS:
        raise ConfigError(f"alg={alg!r} is not one of {', '.join(ALGS)}")
    if steps is None:
        steps = gen_length
    M = resolve_mask_id(model, mask_id)
    block_length, num_blocks, steps_per_block = check_blocks(gen_length, block_length, steps)
    device = model_device(model)
    ids, pad = pad_prompts(prompt_ids, resolve_pad_id(model, M), prompt_mask, device)
    B, P = ids.shape
    T = P + gen_length
    x = torch.full((B, T), M, dtype=torch.long, device=device)  # (B, T)
    x[:, :P] = ids
    key_mask, pos = padding_layout(pad, T)
    ar = torch.arange(T, device=device)
    timesteps = torch.linspace(1, eps, steps_per_block + 1, device=device)  # t: 1 -> eps (float32, as Dream)
    tr = new_trace(B, trace)
    rows = torch.arange(B, device=device)[:, None]

    for k in range(num_blocks):
        s, e = P + k * block_length, P + (k + 1) * block_length
        for i in range(steps_per_block):
            mask_index = (x == M) & (ar >= s) & (ar < e)  # (B, T)
            logits = logits_at(model, x, key_mask, pos)  # (B, T, V), shifted for Dream-style models
            mask_logits = logits[mask_index]  # (N, V)
            t, s_ = timesteps[i], timesteps[i + 1]
            last = i == steps_per_block - 1
            if alg == "origin":  # each masked token is revealed with probability 1 - s/t (all at the end)
                p_transfer = 1 if last else 1 - s_ / t
                x0 = torch.full((mask_logits.shape[0],), M, dtype=torch.long, device=device)
                reveal = torch.rand(x0.shape, device=device, generator=generator) < p_transfer
                if bool(reveal.any()):
                    x0[reveal] = sample_tokens(mask_logits[reveal], alg, temperature, top_p, top_k, M, generator)[1]
                new = torch.full_like(x, M)
                new[mask_index] = x0
                if tr is not None:
                    for b in range(B):
                        tr[b].append([int(p) - P for p in (mask_index[b] & (new[b] != M)).nonzero().flatten()])
                x[mask_index] = x0
                continue
            conf, x0 = sample_tokens(mask_logits, alg, temperature, top_p, top_k, M, generator)
            num_mask = mask_index.sum() / B  # Dream averages over the batch (rows have equal counts here)
            n = int(num_mask) if last else int(num_mask * (1 - s_ / t))
            if n <= 0:
                if tr is not None:
                    for b in range(B):
                        tr[b].append([])
                continue
            full = torch.full((B, T), float("-inf"), dtype=logits.dtype, device=device)
            full[mask_index] = conf.to(logits.dtype)
            if not alg_temp:
                idx = torch.topk(full, n).indices  # (B, n) best first
            else:  # sample the positions: softmax(score / alg_temp), without replacement
                idx = torch.multinomial(F.softmax(full / alg_temp, dim=-1), n, generator=generator)
            new = torch.full_like(x, M)
            new[mask_index] = x0
            x[rows, idx] = new[rows, idx]
            if tr is not None:
                for b in range(B):
                    tr[b].append([int(p) - P for p in idx[b]])
    return DecodeResult(tokens=x, nfe=num_blocks * steps_per_block, trace=tr, prompt_length=P)


_COMMON = """
    Dream (Ye et al., arXiv 2508.15487) runs `steps` passes over timesteps t_i = linspace(1, eps, steps + 1);
    with m masked positions left, pass i commits n = int(m (1 - t_{i+1}/t_i)) of them (all at the last pass).
    The truncation makes some passes commit nothing (with steps = gen_length the first commits none and the last
    two); such a pass still runs the model, so `nfe` = steps (= the length of each trace, empty passes included).
    Tokens are the argmax, or a sample at `temperature` after `top_p` then `top_k` (`sample_tokens`; both filter
    the tempered logits before the softmax); logits of Dream-style models (config `shifted_logits`) are shifted
    right by one first, as Dream's sampler does (position 0 reuses its own row; it is prompt). genkit's
    defaults are temperature 0, no top-p / top-k filter (top_k=None, as Dream's lm-eval harness passes it);
    an official call that omits them gets `OFFICIAL_OMITTED` (temperature 1.0, top_k 50, steps 512). Random
    numbers come from `generator` (the global torch RNG when None) in the official order, so a seeded call equals
    the official sampler seeded with torch.manual_seed (tests/dllm/test_dream_parity.py). DiffuCoder (Gong et
    al., arXiv 2506.20639, apple/ml-diffucoder) decodes with this same sampler, `entropy` by default.

    Official code: Dream's `generation_utils.py` `_sample` (shipped with the HF checkpoints; copied in
    NVlabs/Fast-dLLM `dream/model/generation_utils.py`). Where it differs from the paper: the paper's reverse
    step re-masks a fraction s/t of the predictions; the code turns that into the truncated count above, so a
    one-token-per-step schedule commits nothing at its first pass and two at its last. genkit additions:
    `block_length` < gen_length runs the schedule inside each block, left to right, with steps / num_blocks
    passes each (the default, one block, is exactly Dream); left-padded batches; the mask id is never committed.
"""


@torch.no_grad()
def decode_origin(model, prompt_ids, *, gen_length: int = 128, block_length: int | None = None,
                  steps: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                  top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
                  mask_id: int | None = None, prompt_mask: torch.Tensor | None = None,
                  generator: torch.Generator | None = None, trace: bool = False) -> DecodeResult:
    """Dream's `origin` order: the plain absorbing-state reverse step (D3PM, Austin et al., arXiv 2107.03006).

    At pass i every masked position is revealed independently with probability 1 - t_{i+1}/t_i (all of them
    at the last pass), its token drawn as below; no confidence ordering (`alg_temp` is unused). The reveal draws
    one uniform number per masked position at every pass, the last included, even at temperature 0: greedy
    `origin` decoding is random in *which* positions open when, and reproducible only through `generator`.
    """
    return _decode_dream(model, prompt_ids, "origin", gen_length=gen_length, block_length=block_length,
                         steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                         eps=eps, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator, trace=trace)


@torch.no_grad()
def decode_maskgit_plus(model, prompt_ids, *, gen_length: int = 128, block_length: int | None = None,
                        steps: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                        top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
                        mask_id: int | None = None, prompt_mask: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, trace: bool = False) -> DecodeResult:
    """Dream's `maskgit_plus` order: commit the positions whose token is most probable (MaskGIT's confidence,
    Chang et al., arXiv 2202.04200); `alg_temp` > 0 samples them from softmax(p / alg_temp) instead.
    """
    return _decode_dream(model, prompt_ids, "maskgit_plus", gen_length=gen_length, block_length=block_length,
                         steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                         eps=eps, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator, trace=trace)


@torch.no_grad()
def decode_topk_margin(model, prompt_ids, *, gen_length: int = 128, block_length: int | None = None,
                       steps: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                       top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
                       mask_id: int | None = None, prompt_mask: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, trace: bool = False) -> DecodeResult:
    """Dream's `topk_margin` order: commit the positions with the largest top-1 minus top-2 probability
    margin (Kim et al., arXiv 2502.06768); `alg_temp` > 0 samples them from softmax(margin / alg_temp).
    """
    return _decode_dream(model, prompt_ids, "topk_margin", gen_length=gen_length, block_length=block_length,
                         steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                         eps=eps, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator, trace=trace)


@torch.no_grad()
def decode_entropy(model, prompt_ids, *, gen_length: int = 128, block_length: int | None = None,
                   steps: int | None = None, temperature: float = 0.0, top_p: float | None = None,
                   top_k: int | None = None, alg_temp: float | None = None, eps: float = 1e-3,
                   mask_id: int | None = None, prompt_mask: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, trace: bool = False) -> DecodeResult:
    """Dream's `entropy` order (DiffuCoder's default): commit the positions with the lowest predictive
    entropy, score sum_v p_v log(p_v + 1e-10); `alg_temp` > 0 samples them from softmax(score / alg_temp).
    """
    return _decode_dream(model, prompt_ids, "entropy", gen_length=gen_length, block_length=block_length,
                         steps=steps, temperature=temperature, top_p=top_p, top_k=top_k, alg_temp=alg_temp,
                         eps=eps, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator, trace=trace)


for _f in (decode_origin, decode_maskgit_plus, decode_topk_margin, decode_entropy):
    _f.__doc__ += _COMMON
