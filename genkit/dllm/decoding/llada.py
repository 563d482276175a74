"""LLaDA's reverse process: semi-autoregressive blocks, fixed steps, low-confidence or random re-masking."""

from __future__ import annotations

import torch

from genkit.errors import ConfigError

from .common import (DecodeResult, add_gumbel_noise, argmax_no_mask, check_blocks, get_num_transfer_tokens,
                     logits_at, model_device, new_trace, pad_prompts, padding_layout, resolve_mask_id, resolve_pad_id,
                     softmax_prob)

REMASKING = ("low_confidence", "random")


@torch.no_grad()
def decode_llada(
    model,
    prompt_ids,
    *,
    gen_length: int = 128,
    block_length: int = 128,
    steps: int = 128,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    mask_id: int | None = None,
    prompt_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    trace: bool = False,
) -> DecodeResult:
    """LLaDA sampling (Nie et al., "Large Language Diffusion Models", arXiv 2502.09992: the reverse process
    with random re-masking and with low-confidence re-masking, Appendix algorithms 4 and 5).

    The answer starts as `gen_length` masks, cut into blocks of `block_length` decoded left to right (the
    paper's semi-autoregressive re-masking). Each block gets steps / num_blocks forward passes; a pass predicts
    every masked token (argmax of the logits, or of Gumbel-perturbed logits when temperature > 0) and commits
    the `get_num_transfer_tokens` quota of the current block's masked positions with the highest confidence
    (`low_confidence`: float64 softmax probability of the prediction) or at random (`random`).
    `cfg_scale` = w > 0 adds the paper's unsupervised classifier-free guidance (after Nie et al., arXiv
    2410.18514): logits = u + (w + 1)(c - u), where the unconditional pass u sees the prompt masked.

    Where the official code (ML-GSAI/LLaDA `generate.py`) differs from the paper: the paper's step t -> s
    predicts all masks and re-masks a fraction s/t of the predictions; the code keeps the masks and commits a
    deterministic count instead (m // S per pass, the remainder to the first passes), which makes the pass
    count exactly `steps`. `generate.py` takes the confidence softmax in the logits' dtype, WINO's copy
    (`decoding_default`) and Fast-dLLM in float64; genkit uses float64 (identical tokens on the fixture).
    With a padded batch `generate.py` masks the padding keys but keeps positions 0..L-1; genkit restarts the
    positions after the padding, so a row decodes exactly as it would alone. genkit never commits the mask id.

    Returns tokens (B, P + gen_length) and nfe = steps (one batched forward per step; CFG doubles the batch).
    """
    if remasking not in REMASKING:
        raise ConfigError(f"remasking={remasking!r} is not one of {', '.join(REMASKING)}")
    M = resolve_mask_id(model, mask_id)
    block_length, num_blocks, steps_per_block = check_blocks(gen_length, block_length, steps)
    device = model_device(model)
    ids, pad = pad_prompts(prompt_ids, resolve_pad_id(model, M), prompt_mask, device)
    B, P = ids.shape
    T = P + gen_length
    x = torch.full((B, T), M, dtype=torch.long, device=device)  # (B, T)
    x[:, :P] = ids
    key_mask, pos = padding_layout(pad, T)  # (B, T) key padding and position ids, or None, None
    ar = torch.arange(T, device=device)
    real_prompt = (ar[None, :] < P) & (ar[None, :] >= pad[:, None])  # (B, T): what CFG masks
    tr = new_trace(B, trace)
    nfe = 0

    for k in range(num_blocks):
        s, e = P + k * block_length, P + (k + 1) * block_length
        quota = get_num_transfer_tokens(x[:, s:e] == M, steps_per_block)  # (B, steps_per_block)
        for i in range(steps_per_block):
            cand = (x == M) & (ar[None, :] >= P) & (ar[None, :] < e)  # (B, T): masked, not right of the block
            if cfg_scale > 0:
                un_x = x.masked_fill(real_prompt, M)
                both = torch.cat([x, un_x])  # (2B, T)
                m2 = None if key_mask is None else torch.cat([key_mask, key_mask])
                p2 = None if pos is None else torch.cat([pos, pos])
                cond, uncond = logits_at(model, both, m2, p2).chunk(2)  # (B, T, V) each
                logits = uncond + (cfg_scale + 1) * (cond - uncond)
            else:
                logits = logits_at(model, x, key_mask, pos)  # (B, T, V)
            nfe += 1
            x0 = argmax_no_mask(add_gumbel_noise(logits, temperature, generator), M)  # (B, T)
            if remasking == "low_confidence":
                conf = torch.full((B, T), float("-inf"), dtype=torch.float64, device=device)
                conf[cand] = softmax_prob(logits[cand], x0[cand])
            else:
                conf = torch.rand((B, T), device=device, generator=generator)
                conf = conf.masked_fill(~cand, float("-inf"))
            x0 = torch.where(cand, x0, x)
            for j in range(B):
                sel = torch.topk(conf[j], k=int(quota[j, i])).indices  # most confident first
                x[j, sel] = x0[j, sel]
                if tr is not None:
                    tr[j].append([int(p) - P for p in sel])
    return DecodeResult(tokens=x, nfe=nfe, trace=tr, prompt_length=P)
