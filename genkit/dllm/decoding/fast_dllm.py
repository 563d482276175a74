"""Fast-dLLM: confidence-threshold parallel decoding with block-wise prefix / dual key-value caches."""

from __future__ import annotations

import torch

from genkit.errors import ConfigError

from .common import (DecodeResult, add_gumbel_noise, argmax_no_mask, check_blocks, get_num_transfer_tokens,
                     is_shifted, model_device, new_trace, pad_prompts, padding_layout, resolve_mask_id,
                     resolve_pad_id, softmax_prob)
from .llada import REMASKING

CACHES = ("none", "prefix", "dual")


@torch.no_grad()
def decode_fast_dllm(
    model,
    prompt_ids,
    *,
    gen_length: int = 256,
    block_length: int = 32,
    tau: float | None = 0.9,
    steps: int | None = None,
    cache: str = "none",
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    trace: bool = False,
) -> DecodeResult:
    """Fast-dLLM (Wu et al., arXiv 2505.22618): confidence-aware parallel decoding (threshold rule) and the
    block-wise approximate KV cache (prefix cache and DualCache), on LLaDA's semi-autoregressive blocks.

    Each pass predicts the current block's masked tokens and commits the most confident one plus every other
    one whose float64 softmax confidence is strictly above `tau`, until the block has no mask left (so the pass
    count adapts). `tau=None` falls back to LLaDA's fixed quota of `steps` / num_blocks passes per block.
    `cache`:
    * "none": every pass runs on the whole sequence;
    * "prefix": the block's first pass runs on the whole sequence and keeps the keys/values left of the
      block; later passes feed the block and everything right of it, attending to that stale prefix cache;
    * "dual": the first pass keeps every position's keys/values; later passes feed only the block, whose
      cache entries they overwrite, attending to the stale prefix and suffix entries.
    Both caches are approximations (the cached keys/values stop seeing later updates); they are exact for a
    one-layer model, where keys/values depend on the token alone.

    Where the official code (NVlabs/Fast-dLLM `llada/generate.py`) differs from the paper: it keeps the other
    candidates when confidence >= tau (`< threshold` are dropped), the paper's rule is c > tau; genkit uses
    the strict rule, so tau = 1.0 commits exactly one token per pass and equals `decode_llada` with
    steps = gen_length. The code's counter counts every model call (the cache-filling pass included), as
    `nfe` does here. Fast-dLLM's LLaDA code is batch-1; genkit decodes left-padded batches (rows that finish a
    block early wait for the others; tokens equal batch-1 decoding). With a Dream-style shifted model the
    cached passes start one position left of the block, so that the block's logits are available.
    """
    if cache not in CACHES:
        raise ConfigError(f"cache={cache!r} is not one of {', '.join(CACHES)}")
    if remasking not in REMASKING:
        raise ConfigError(f"remasking={remasking!r} is not one of {', '.join(REMASKING)}")
    if tau is None and steps is None:
        raise ConfigError("fast-dllm needs tau (confidence threshold) or steps (fixed quota per pass)")
    M = resolve_mask_id(model, mask_id)
    block_length, num_blocks, steps_per_block = check_blocks(gen_length, block_length,
                                                             None if tau is not None else steps)
    device = model_device(model)
    ids, pad = pad_prompts(prompt_ids, resolve_pad_id(model, M), prompt_mask, device)
    B, P = ids.shape
    T = P + gen_length
    shift = int(is_shifted(model))
    x = torch.full((B, T), M, dtype=torch.long, device=device)  # (B, T)
    x[:, :P] = ids
    keep, pos = padding_layout(pad, T)  # (B, T) key padding and position ids, or None, None
    tr = new_trace(B, trace)
    nfe = 0

    for k in range(num_blocks):
        s, e = P + k * block_length, P + (k + 1) * block_length
        q0 = s - shift  # first query position of a cached pass
        quota = None if tau is not None else get_num_transfer_tokens(x[:, s:e] == M, steps_per_block)
        i, kv = 0, None
        while bool((x[:, s:e] == M).any()):
            if cache == "none" or i == 0:
                out = model(x, attention_mask=keep, position_ids=pos, use_cache=cache != "none")
                raw = out if cache == "none" else out.logits  # (B, T, V)
                logits = raw[:, q0:e - shift]  # (B, Bk, V): row r predicts token s + r
                if cache == "prefix":
                    kv = [(kk[:, :, :q0], vv[:, :, :q0]) for kk, vv in out.past_key_values]
                elif cache == "dual":
                    kv = out.past_key_values
            elif cache == "prefix":  # queries [q0, T), keys = cached [0, q0) + fresh [q0, T)
                raw = model(x[:, q0:], attention_mask=keep, position_ids=None if pos is None else pos[:, q0:],
                            past_key_values=kv)
                logits = raw[:, :block_length]
            else:  # dual: queries [q0, e) overwrite their cache entries; keys = all T positions
                qpos = torch.arange(q0, e, device=device)
                out = model(x[:, q0:e], attention_mask=keep, position_ids=None if pos is None else pos[:, q0:e],
                            past_key_values=kv, cache_positions=qpos, use_cache=True)
                kv, logits = out.past_key_values, out.logits[:, :block_length]
            nfe += 1

            x0 = argmax_no_mask(add_gumbel_noise(logits, temperature, generator), M)  # (B, Bk)
            cand = x[:, s:e] == M  # (B, Bk)
            if remasking == "low_confidence":
                conf = torch.full((B, block_length), float("-inf"), dtype=torch.float64, device=device)
                conf[cand] = softmax_prob(logits[cand], x0[cand])
            else:
                conf = torch.rand((B, block_length), device=device, generator=generator)
                conf = conf.masked_fill(~cand, float("-inf"))
            for b in range(B):
                n = int(cand[b].sum())
                if n == 0:
                    continue
                order = torch.topk(conf[b], k=n).indices  # masked positions, most confident first
                if quota is not None:
                    sel = order[:int(quota[b, i])]
                else:
                    sel = torch.cat([order[:1], order[1:][conf[b, order[1:]] > tau]])
                x[b, s + sel] = x0[b, sel]
                if tr is not None:
                    tr[b].append([s - P + int(j) for j in sel])
            i += 1
    return DecodeResult(tokens=x, nfe=nfe, trace=tr, prompt_length=P)
