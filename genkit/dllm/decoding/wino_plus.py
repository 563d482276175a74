"""WINO+ (genkit): WINO whose verifier also acts on single-token passes and once more when a block is full.

Not an official algorithm: `decode_wino` stays the paper's code; this file changes two control-flow rules
that, on well-calibrated models, keep the verifier from ever acting (see `decode_wino_plus`).
"""

from __future__ import annotations

import torch

from genkit.errors import ConfigError

from .common import (
    DecodeResult,
    add_gumbel_noise,
    argmax_no_mask,
    is_shifted,
    new_trace,
    softmax_prob,
)
from .wino import _draft_cap, wino_layout, wino_start


@torch.no_grad()
def decode_wino_plus(model, prompt_ids, *, gen_length: int = 128, block_length: int = 128, tau1: float = 0.6,
                     tau2: float = 0.9, final_checks: int = 2, temperature: float = 0.0, mask_id: int | None = None,
                     prompt_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                     trace: bool = False) -> DecodeResult:
    """WINO (arXiv 2507.18578) with two changes to the official control flow, same drafting rule and layout:

    1. verify on every pass: the official code re-masks only when more than one token was just accepted, so
       once a block is down to one accepted token per pass nothing is ever revoked. Here every pass re-masks
       decoded tokens of the block whose shadow probability is below tau2, keeping the official cap (at most
       `last_accept - 1` of them, the least confident), which also guarantees progress: a pass never revokes
       as many tokens as the previous pass accepted;
    2. final verification: the official loop ends as soon as the block has no mask, so the last accepted
       tokens are never checked. Here a full block triggers a check pass (it costs one forward pass): every
       block token whose shadow probability is below tau2 is re-masked (at most half of the block, the least
       confident) and decoding resumes; at most `final_checks` such passes per block.

    tau2 = 0 never re-masks, as in WINO. Returns tokens, nfe (check passes included), remasked, traces (a
    check pass appears in the trace as a pass that commits nothing).
    """
    if is_shifted(model):
        raise ConfigError("WINO+ needs a model with unshifted logits; use llada or fast-dllm for Dream-style models")
    M, Bk, num_blocks, device, x, pad, P = wino_start(model, prompt_ids, gen_length, block_length, mask_id,
                                                      prompt_mask)
    B = x.shape[0]
    main = P + gen_length
    tr, rtr = new_trace(B, trace), new_trace(B, trace)
    nfe, remasked, per_block = 0, 0, []

    for k in range(num_blocks):
        s, e = P + k * Bk, P + (k + 1) * Bk
        mask4, pos = wino_layout(P, gen_length, Bk, k, pad)
        mask4, pos = mask4.to(device), pos.to(device)
        masked = x[:, s:e] == M  # (B, Bk)
        verify = ~masked  # (B, Bk)
        last_accept = [30] * B
        checks_left = [final_checks] * B
        active = masked.any(1).clone()  # rows still working on this block
        block_passes = 0
        while bool(active.any()):
            logits = model(x, attention_mask=mask4, position_ids=pos)  # (B, T, V)
            nfe += 1
            block_passes += 1
            main_logits, shadow_logits = logits[:, s:e], logits[:, main:]  # (B, Bk, V) each
            x0 = argmax_no_mask(add_gumbel_noise(main_logits, temperature, generator), M)  # (B, Bk)
            blk = x[:, s:e]
            conf = torch.full((B, Bk), float("-inf"), dtype=torch.float64, device=device)
            conf[masked] = softmax_prob(main_logits[masked], x0[masked])
            back = torch.full((B, Bk), float("inf"), dtype=torch.float64, device=device)
            back[verify] = softmax_prob(shadow_logits[verify], blk[verify])
            for b in range(B):
                if not bool(active[b]):
                    continue
                acc = torch.zeros(Bk, dtype=torch.bool, device=device)
                if bool(masked[b].any()):  # wide in, exactly as WINO
                    c = conf[b]
                    acc = c > tau1
                    cap = _draft_cap(int(masked[b].sum()))
                    if int(acc.sum()) > cap:
                        acc = torch.zeros_like(acc)
                        acc[torch.topk(c, k=cap).indices] = True
                    elif not bool(acc.any()):
                        acc[torch.argmax(c)] = True
                    blk[b, acc] = x0[b, acc]
                    rem = back[b] < tau2  # narrow out on every pass, with WINO's cap
                    limit = last_accept[b] - 1
                    last_accept[b] = int(acc.sum())
                else:  # the block is full: a final check pass
                    checks_left[b] -= 1
                    rem = back[b] < tau2
                    limit = Bk // 2
                if int(rem.sum()) > limit:
                    keep = torch.zeros_like(rem)
                    if limit > 0:
                        keep[torch.topk(back[b].masked_fill(~rem, float("inf")), k=limit, largest=False).indices] = True
                    rem = keep
                blk[b, rem] = M
                masked[b] = (masked[b] & ~acc) | rem
                verify[b] = (verify[b] | acc) & ~rem
                remasked += int(rem.sum())
                if tr is not None:
                    a_idx = acc.nonzero().flatten()
                    tr[b].append([s - P + int(i) for i in a_idx[torch.argsort(-conf[b][a_idx], stable=True)]])
                    r_idx = rem.nonzero().flatten()
                    rtr[b].append([s - P + int(i) for i in r_idx[torch.argsort(back[b][r_idx], stable=True)]])
                if not bool(masked[b].any()) and (checks_left[b] <= 0 or tau2 <= 0 or
                                                  (not bool(rem.any()) and not bool(acc.any()))):
                    active[b] = False  # done: full and (checked clean, out of checks, or no verifier)
        per_block.append(block_passes)
    return DecodeResult(tokens=x[:, :main].clone(), nfe=nfe, remasked=remasked, trace=tr, remask_trace=rtr,
                        prompt_length=P, extras={"passes_per_block": per_block})
