"""What every dLLM decoder shares: the result type, the batch layout, and the LLaDA sampling helpers.

Conventions (all decoders):
* the working sequence is the (left-padded) prompt, P positions, followed by `gen_length` mask tokens;
* `logits_at(model, ...)` always returns logits whose row i predicts token i: Dream-style models (config flag
  `shifted_logits`) are shifted right by one here, once, so that decoders never think about it;
* the mask id is never proposed as a token (see `argmax_no_mask`);
* `trace` (when asked) records, per row and per forward pass, the generated-region indices (position - P)
  committed by that pass, most confident first; adaptive decoders (fast-dllm, wino) skip the passes in which
  a row had already finished its block, so a row's trace equals the one it gets when decoded alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from genkit.errors import ConfigError


@dataclass
class DecodeResult:
    """Output of a `decode_<name>` function."""

    tokens: torch.Tensor  # (B, P + gen_length) int64: left-padded prompt followed by the generated tokens
    nfe: int  # number of forward passes (calls of the model; a batched call counts once)
    remasked: int = 0  # tokens committed and later re-masked (WINO), summed over the batch
    trace: list[list[list[int]]] | None = None  # [row][pass] -> generated-region indices committed, in order
    remask_trace: list[list[list[int]]] | None = None  # same layout, indices re-masked (WINO only)
    prompt_length: int = 0  # P: the generated region is tokens[:, P:]
    extras: dict = field(default_factory=dict)  # decoder-specific counters (e.g. WINO's per-block passes)

    @property
    def generated(self) -> torch.Tensor:
        return self.tokens[:, self.prompt_length:]  # (B, gen_length)


# ------------------------------------------------------------------------------------------- batches
def pad_prompts(prompt_ids, pad_id: int, prompt_mask: torch.Tensor | None = None,
                device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts. Returns ids (B, P) int64 and the number of padding slots per row (B,) int64.

    `prompt_ids` is a (P,) or (B, P) tensor (already left-padded when `prompt_mask`, (B, P) with 1 = real
    token, says so) or a list of token-id sequences of any lengths.
    """
    if isinstance(prompt_ids, torch.Tensor):
        ids = prompt_ids.long().cpu()
        ids = ids[None] if ids.ndim == 1 else ids
        if prompt_mask is None:
            pad = torch.zeros(ids.shape[0], dtype=torch.long)
        else:
            keep = prompt_mask.bool().cpu().reshape(ids.shape)
            pad = (~keep).long().sum(1)
            if not bool((keep == (torch.arange(ids.shape[1]) >= pad[:, None])).all()):
                raise ConfigError("prompt_mask must describe left padding (zeros first, then ones in every row)")
    else:
        rows = [torch.as_tensor(list(r) if not isinstance(r, torch.Tensor) else r.cpu(), dtype=torch.long).flatten()
                for r in prompt_ids]
        if not rows:
            raise ConfigError("prompt_ids is empty: pass at least one prompt")
        P = max(len(r) for r in rows)
        ids = torch.full((len(rows), P), pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, P - len(r):] = r
        pad = torch.tensor([P - len(r) for r in rows], dtype=torch.long)
    if ids.shape[1] == 0 or bool((pad >= ids.shape[1]).any()):
        raise ConfigError("every prompt needs at least one token (e.g. BOS)")
    return ids.to(device), pad.to(device)


def padding_layout(pad: torch.Tensor, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key-padding mask (B, T) bool (True = real token) and position ids (B, T) starting at 0 after the padding.

    Returns (None, None) when no row is padded, so an unpadded batch runs exactly like the official code.
    Padding slots still get a query row (it attends to the real keys and is ignored), so no row is empty.
    """
    if not bool((pad > 0).any()):
        return None, None
    ar = torch.arange(T, device=pad.device)
    keep = ar[None, :] >= pad[:, None]  # (B, T)
    pos = (ar[None, :] - pad[:, None]).clamp_min(0)  # (B, T)
    return keep, pos


def check_blocks(gen_length: int, block_length: int | None, steps: int | None = None) -> tuple[int, int, int | None]:
    """Validate the semi-autoregressive block layout; returns (block_length, num_blocks, steps per block)."""
    block_length = gen_length if block_length is None else block_length
    if gen_length <= 0 or block_length <= 0:
        raise ConfigError(f"gen_length={gen_length} and block_length={block_length} must be positive")
    if gen_length % block_length:
        raise ConfigError(f"gen_length={gen_length} is not a multiple of block_length={block_length}; "
                          "pick a block_length that divides gen_length")
    num_blocks = gen_length // block_length
    if steps is None:
        return block_length, num_blocks, None
    if steps <= 0 or steps % num_blocks:
        raise ConfigError(f"steps={steps} must be a positive multiple of the number of blocks "
                          f"({gen_length}/{block_length} = {num_blocks})")
    return block_length, num_blocks, steps // num_blocks


def resolve_mask_id(model, mask_id: int | None) -> int:
    if mask_id is not None:
        return int(mask_id)
    mid = getattr(getattr(model, "config", None), "mask_token_id", None)
    if mid is None:
        raise ConfigError("the model has no mask_token_id and none was given: pass mask_id=<id of [MASK]>")
    return int(mid)


def resolve_pad_id(model, mask_id: int) -> int:
    cfg = getattr(model, "config", None)
    for name in ("pad_token_id", "eos_token_id"):
        v = getattr(cfg, name, None)
        if v is not None and v != mask_id:
            return int(v)
    return 0 if mask_id != 0 else 1


def model_device(model) -> torch.device:
    dev = getattr(model, "device", None)
    if dev is not None:
        return torch.device(dev)
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def is_shifted(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "shifted_logits", False))


def shift_right(logits: torch.Tensor) -> torch.Tensor:
    """Dream's alignment: row i of the result predicts token i (row 0 is a copy, never used: it is prompt)."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def logits_at(model, x, attention_mask=None, position_ids=None) -> torch.Tensor:
    """One forward pass on the whole sequence, logits aligned so that row i predicts token i (B, T, V)."""
    logits = model(x, attention_mask=attention_mask, position_ids=position_ids)
    return shift_right(logits) if is_shifted(model) else logits


# ------------------------------------------------------------------------------------------- sampling
def get_num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    """How many tokens each of `steps` passes commits, (B, steps) int64, from the block's mask (B, L).

    LLaDA's linear schedule (arXiv 2502.09992, Eq. 8: alpha_t = 1 - t) unmasks the same expected number of
    tokens per step, so m masked tokens over S steps give m // S each and one more to the first m % S steps.
    """
    mask_num = mask_index.sum(dim=1, keepdim=True)  # (B, 1)
    base, remainder = mask_num // steps, mask_num % steps
    num = torch.zeros(mask_num.shape[0], steps, device=mask_index.device, dtype=torch.int64) + base
    num += torch.arange(steps, device=mask_index.device)[None, :] < remainder  # first `remainder` get +1
    return num


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """Scores whose argmax samples softmax(logits / temperature): LLaDA's Gumbel-max, in float64.

    exp(l) / (-log u)^tau = exp(l - tau * log(-log u)) = exp(l + tau * g) with g ~ Gumbel(0, 1), so the argmax
    is that of l / tau + g. LLaDA computes it in float64 because low-precision Gumbel-max degrades masked
    diffusion sampling (arXiv 2409.02908). Temperature 0 returns the logits unchanged (greedy). The noise is
    drawn for the whole tensor, in the official order, so seeded runs consume the RNG as the official code does.
    """
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = torch.rand(logits.shape, dtype=torch.float64, device=logits.device, generator=generator)
    return logits.exp() / (-torch.log(noise)) ** temperature


def argmax_no_mask(scores: torch.Tensor, mask_id: int) -> torch.Tensor:
    """argmax over the last dim that never returns `mask_id` (identical to argmax whenever it would not).

    genkit deviation: the official decoders can commit the mask id itself (a trained LLaDA never predicts it),
    which would leave a position masked forever and stall threshold decoders on untrained models.
    """
    x0 = scores.argmax(dim=-1)
    bad = x0 == mask_id
    if bool(bad.any()):
        rows = scores[bad].clone()
        rows[:, mask_id] = float("-inf")
        x0[bad] = rows.argmax(dim=-1)
    return x0


def softmax_prob(logits_rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Float64 softmax probability of `tokens` (N,) under `logits_rows` (N, V) (LLaDA's low-confidence score)."""
    p = F.softmax(logits_rows.to(torch.float64), dim=-1)  # (N, V)
    return p.gather(-1, tokens[:, None]).squeeze(-1)  # (N,)


def new_trace(batch: int, enabled: bool) -> list[list[list[int]]] | None:
    return [[] for _ in range(batch)] if enabled else None
