"""WINO: wide-in, narrow-out revokable decoding, with a shadow block that verifies drafts in the same pass."""

from __future__ import annotations

import torch

from genkit.errors import ConfigError

from .common import (DecodeResult, add_gumbel_noise, argmax_no_mask, check_blocks, is_shifted, model_device,
                     new_trace, pad_prompts, resolve_mask_id, resolve_pad_id, softmax_prob)


def wino_layout(prompt_length: int, gen_length: int, block_length: int, block: int,
                pad: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids of WINO's working sequence for one block.

    The sequence is [prompt (P) | answer (G) | shadow (Bk)], T = P + G + Bk. Shadow slot j mirrors main position
    s + j of the current block [s, s + Bk) and shares its position id. Main rows attend to every main column and
    no shadow column; shadow rows attend to every shadow column and to every main column except their own
    partner, so a shadow slot predicts its partner's token from the full context minus the token itself.

    Returns mask (1, 1, T, T) bool (True = may attend) and position ids (T,); with `pad` (B,) left-padding
    counts, mask (B, 1, T, T) without the padding keys and position ids (B, T) that start at 0 after padding.
    """
    main = prompt_length + gen_length
    T = main + block_length
    s = prompt_length + block * block_length
    mask = torch.ones(T, T, dtype=torch.bool)
    mask[:, main:] = False  # nobody sees the shadow block ...
    mask[main:, main:] = True  # ... except the shadow block itself
    mask[main:, s:s + block_length] = ~torch.eye(block_length, dtype=torch.bool)  # shadow j does not see s + j
    pos = torch.cat([torch.arange(main), torch.arange(s, s + block_length)])  # (T,)
    if pad is None or not bool((pad > 0).any()):
        return mask[None, None], pos
    pad = pad.cpu()
    keep = torch.arange(T)[None, :] >= pad[:, None]  # (B, T); shadow columns are never padding
    return mask[None, None] & keep[:, None, None, :], (pos[None, :] - pad[:, None]).clamp_min(0)


def wino_start(model, prompt_ids, gen_length, block_length, mask_id, prompt_mask):
    """The shared start of WINO-style decoders: mask id, block length and count, device, the working sequence
    x (B, P + gen_length + block_length) = [prompt | masked answer | masked shadow block], left-padding counts
    pad (B,) and the padded prompt length P."""
    M = resolve_mask_id(model, mask_id)
    Bk, num_blocks, _ = check_blocks(gen_length, block_length)
    device = model_device(model)
    ids, pad = pad_prompts(prompt_ids, resolve_pad_id(model, M), prompt_mask, device)
    B, P = ids.shape
    x = torch.full((B, P + gen_length + Bk), M, dtype=torch.long, device=device)  # shadow slots stay M forever
    x[:, :P] = ids
    return M, Bk, num_blocks, device, x, pad, P


def _draft_cap(n_masked: int) -> int:
    # Official: min(max(int(0.7 * n), 5), 20) with n a tensor (float32 product); both agree wherever the clamp
    # does not bind (they first differ at n = 90, far above the cap).
    return min(max(int(n_masked * 0.7), 5), 20)


@torch.no_grad()
def _wino(model, prompt_ids, *, gen_length, block_length, tau1, tau2, temperature, mask_id, prompt_mask,
          generator, trace, cache, refresh=0):
    if is_shifted(model):
        raise ConfigError("WINO needs a model with unshifted logits (its shadow slots predict their partner "
                          "position); use llada or fast-dllm for Dream-style shifted models")
    M, Bk, num_blocks, device, x, pad, P = wino_start(model, prompt_ids, gen_length, block_length, mask_id,
                                                      prompt_mask)
    B, T = x.shape
    main = P + gen_length
    tr, rtr = new_trace(B, trace), new_trace(B, trace)
    nfe, remasked, per_block = 0, 0, []

    for k in range(num_blocks):
        s, e = P + k * Bk, P + (k + 1) * Bk
        mask4, pos = wino_layout(P, gen_length, Bk, k, pad)
        mask4, pos = mask4.to(device), pos.to(device)
        masked = x[:, s:e] == M  # (B, Bk): block positions still to decode
        verify = ~masked  # (B, Bk): block positions decoded in this block (checked by their shadow slot)
        last_accept = [30] * B
        kv, block_passes = None, 0
        base_kv = snap = None  # block-start cache (holds no block token); `snap`: block tokens the cache holds
        while bool(masked.any()):
            caps = [_draft_cap(int(masked[b].sum())) for b in range(B)]
            if kv is None or (refresh > 0 and block_passes % refresh == 0):  # a full pass
                out = model(x, attention_mask=mask4, position_ids=pos, use_cache=cache)
                logits = out.logits if cache else out  # (B, T, V)
                noisy = add_gumbel_noise(logits, temperature, generator)
                main_logits, shadow_logits = logits[:, s:e], logits[:, main:]  # (B, Bk, V) each
                main_noisy = noisy[:, s:e]
                if cache:
                    kv, snap = out.past_key_values, ~masked  # the cache encodes the tokens decoded now
                    if base_kv is None:
                        base_kv = kv
            else:  # cached pass: recompute only the current block and the shadow block
                q = torch.cat([torch.arange(s, e), torch.arange(main, T)]).to(device)  # (2 Bk,)
                out = model(x[:, q], attention_mask=mask4[:, :, q], position_ids=pos[..., q],
                            past_key_values=kv, cache_positions=q, use_cache=True)
                kv = out.past_key_values
                main_logits, shadow_logits = out.logits[:, :Bk], out.logits[:, Bk:]  # (B, Bk, V) each
                main_noisy = add_gumbel_noise(main_logits, temperature, generator)
            nfe += 1
            block_passes += 1

            blk = x[:, s:e]  # (B, Bk) view of the block; conf/back below use its state before the updates
            x0 = argmax_no_mask(main_noisy, M)  # (B, Bk) drafts
            conf = torch.full((B, Bk), float("-inf"), dtype=torch.float64, device=device)
            conf[masked] = softmax_prob(main_logits[masked], x0[masked])
            back = torch.full((B, Bk), float("inf"), dtype=torch.float64, device=device)
            back[verify] = softmax_prob(shadow_logits[verify], blk[verify])
            for b in range(B):
                if not bool(masked[b].any()):
                    continue
                c = conf[b]
                acc = c > tau1  # wide in: everything over the lenient threshold ...
                if int(acc.sum()) > caps[b]:  # ... at most `cap` of them, the most confident
                    acc = torch.zeros_like(acc)
                    acc[torch.topk(c, k=caps[b]).indices] = True
                elif not bool(acc.any()):  # ... at least the single best
                    acc[torch.argmax(c)] = True
                n_acc = int(acc.sum())
                blk[b, acc] = x0[b, acc]
                rem = torch.zeros_like(acc)
                if n_acc > 1:  # narrow out: re-mask decoded tokens their shadow slot no longer believes
                    rem = back[b] < tau2
                    if int(rem.sum()) >= last_accept[b]:
                        rem = torch.zeros_like(acc)
                        if last_accept[b] > 1:
                            rem[torch.topk(back[b], k=last_accept[b] - 1, largest=False).indices] = True
                blk[b, rem] = M
                masked[b] = (masked[b] & ~acc) | rem
                verify[b] = (verify[b] | acc) & ~rem
                last_accept[b] = n_acc
                remasked += int(rem.sum())
                if tr is not None:
                    a_idx = acc.nonzero().flatten()
                    tr[b].append([s - P + int(i) for i in a_idx[torch.argsort(-c[a_idx], stable=True)]])
                    r_idx = rem.nonzero().flatten()
                    rtr[b].append([s - P + int(i) for i in r_idx[torch.argsort(back[b][r_idx], stable=True)]])
            leak = (snap & masked).any(dim=1) if cache and refresh > 0 else None  # (B,)
            if leak is not None and bool(leak.any()):
                # a refreshed cache still encodes a token the verifier has now re-masked: the next passes
                # would read the revoked token back from it, so these rows fall back to the block-start cache
                sel = leak.view(B, 1, 1, 1)
                kv = [(torch.where(sel, bk, k_), torch.where(sel, bv, v_)) for (k_, v_), (bk, bv) in zip(kv, base_kv)]
                snap = snap & ~leak[:, None]
        per_block.append(block_passes)
    return DecodeResult(tokens=x[:, :main].clone(), nfe=nfe, remasked=remasked, trace=tr, remask_trace=rtr,
                        prompt_length=P, extras={"passes_per_block": per_block})


def decode_wino(model, prompt_ids, *, gen_length: int = 128, block_length: int = 128, tau1: float = 0.6,
                tau2: float = 0.9, temperature: float = 0.0, mask_id: int | None = None,
                prompt_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                trace: bool = False) -> DecodeResult:
    """WINO (Hong et al., "Wide-In, Narrow-Out: Revokable Decoding for Efficient and Effective DLLMs",
    arXiv 2507.18578; ICLR 2026), semi-autoregressive over blocks of `block_length`.

    One forward pass per iteration does both halves of the algorithm:
    * wide-in drafting: every masked position of the current block whose (float64 softmax) confidence is
      strictly above tau1 is committed, at most cap = clamp(int(0.7 * #masked), 5, 20) of them (the most
      confident); if none passes, the single most confident one;
    * narrow-out verification: a shadow copy of the block (appended to the sequence, same position ids,
      `wino_layout`) re-predicts each block position without seeing it; tokens decoded earlier in this block
      whose shadow probability is strictly below tau2 are re-masked, only when more than one token was just
      accepted, and when there are at least `last_accept` candidates (the previous acceptance count, initially
      30) only the `last_accept - 1` least confident are. Tokens accepted in this pass are not checked until
      the next one. tau2 = 0 never re-masks (the draft-only ablation).

    Where the official code (Feng-Hong/WINO-DLLM `decoding_wino`) differs from the paper: the paper states
    verification against tau2 for all decoded tokens; the code adds the draft cap, the acceptance-one skip and
    the `last_accept - 1` re-mask cap, all reproduced here (fixture `shared/fixtures/llada-tiny` matches token,
    pass and re-mask counts exactly). genkit differences: batches with left padding (per-row state, one
    batched forward per pass while any row is unfinished), and the mask id is never drafted (so a block's
    masked set only ever holds current-block positions, where the official one may revisit earlier blocks).

    Returns tokens (B, P + gen_length), nfe, and `remasked`, the total of re-masked tokens.
    """
    return _wino(model, prompt_ids, gen_length=gen_length, block_length=block_length, tau1=tau1, tau2=tau2,
                 temperature=temperature, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator,
                 trace=trace, cache=False)


def decode_wino_cache(model, prompt_ids, *, gen_length: int = 128, block_length: int = 128, tau1: float = 0.6,
                      tau2: float = 0.9, temperature: float = 0.0, refresh: int = 0, mask_id: int | None = None,
                      prompt_mask: torch.Tensor | None = None, generator: torch.Generator | None = None,
                      trace: bool = False) -> DecodeResult:
    """WINO (arXiv 2507.18578) with a block-wise key/value cache, in the manner of Fast-dLLM's DualCache
    (arXiv 2505.22618).

    The first pass of each block runs on the whole working sequence and keeps every position's keys and
    values; the following passes feed only the current block and its shadow block (2 x block_length tokens)
    and overwrite their cache entries, reusing the prompt's, the earlier blocks' and the (still masked) later
    blocks' keys/values from the block's first pass. Decisions are exactly `decode_wino`'s; the only
    difference is this approximation (which is exact for a one-layer model, whose keys/values depend on the
    token alone). Not in the official WINO code.

    ``refresh = r > 0`` makes every r-th pass of a block a full pass whose keys/values replace the cache, so
    the prompt's and other blocks' entries see the block's decoded tokens (r = 1 is `decode_wino` exactly).
    A refreshed cache encodes the tokens decoded when it was taken; as soon as the verifier re-masks one of
    them, the decoder falls back to the block-start cache (all block positions masked), because the revoked
    token could otherwise be read back through the stale entries.  Between refreshes a token held by the
    cache is also visible, through those entries, to its own shadow slot, which makes its verification
    lenient until the next refresh.  r = 0 (default) keeps the block-start cache.
    """
    if refresh < 0:
        raise ConfigError(f"refresh must be >= 0 (0 = never), got {refresh}")
    return _wino(model, prompt_ids, gen_length=gen_length, block_length=block_length, tau1=tau1, tau2=tau2,
                 temperature=temperature, mask_id=mask_id, prompt_mask=prompt_mask, generator=generator,
                 trace=trace, cache=True, refresh=refresh)
