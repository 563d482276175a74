"""Coupled-GRPO (DiffuCoder, Gong et al., arXiv 2506.20639, Sec. 4): token log-probabilities of a masked diffusion
LM from complementary masks, and the clipped GRPO loss that uses them.

Official code: apple/ml-diffucoder `src/open_r1/coupled_grpo.py` (`DiffuGRPOTrainer.forward_process`,
`_get_per_token_logps`, `selective_log_softmax`, `compute_loss`, `_generate_and_score_completions`) on top of
TRL's `GRPOTrainer` (commit 1bca495), run with `recipes/config_coupled_code.yaml`. What genkit matches:

* Masks (`forward_process`): one mask ratio t ~ U(0.2, 0.8) per call, shared by the whole batch, and one
  uniform u per completion token; three inputs: (1) the whole completion masked, (2) completion tokens with
  u < t masked, (3) those with u > t masked. (2) and (3) are complementary: every completion token is masked in
  exactly one of them. The prompt is never masked.
* Per-token log-probability (`selective_log_softmax`): lp = 1/2 [lp_1 + (u < t ? lp_2 / t : lp_3 / (1 - t))],
  lp_k = log p(o_n | input k) at completion token n. Logit alignment: the official code takes Dream's logits
  shifted (`logits[:, :-1]`, the output at position i - 1 scores token i); genkit's `logits_at` does the same
  for models whose config sets `shifted_logits` and keeps LLaDA-style (unshifted) logits as they are.
* The old, reference and current log-probabilities of one update use the same masks (the official code
  re-seeds `forward_process` with the iteration's mask seed; genkit keys the draw on (seed, step, iteration)).

How the weighting relates to the masked-diffusion ELBO. The paper trains on the ELBO (its Sec. 2, as LLaDA):
log p(o) >= E_{s ~ U(0,1)} f(s) with f(s) = E_{x_s}[(1/s) sum_n 1[o_n masked in x_s] log p(o_n | x_s)] and
each token masked with probability s. Summed over the completion, the official per-token values give

    sum_n lp_n = 1/2 f^(1) + 1/2 [f^(t) + f^(1 - t)],

f^(s) the one-draw Monte Carlo estimate of f(s) (mask (2) is a draw at ratio t, mask (3) at ratio 1 - t, and
f^(1) = f(1) is exact: the fully masked input has no randomness). The bracket is an antithetic pair: the two
draws share u, so each token enters exactly one of them (the paper's Fig. 2, "each token is sampled exactly
the same number of times"), which is the variance reduction `benchmarks/rl.py` measures. Its expectation is
the ELBO integrand averaged over s in [0.2, 0.8] (not over (0, 1]: t is drawn from U(0.2, 0.8)), and the code
adds half of the fully-masked term f(1) (d1's one-step estimator, Zhao et al., arXiv 2504.12216) on top; so
the estimate is not a bound on log p(o) but a surrogate with weight 1/2 on f(1). The paper's own coupled
estimator equation (Sec. 4) could not be read offline here; this relation is derived from the code.

Ablations (`method`): `decoupled` keeps the three passes and weights but draws mask (3) from an independent
uniform u' (tokens with u' > t), so the pair is no longer complementary (same expectation, no coupling);
`full-mask` uses only input (1): lp = lp_1 (d1's estimator, one pass).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from genkit.dllm.decoding.common import is_shifted, shift_right

METHODS = ("coupled", "decoupled", "full-mask")


@dataclass
class MaskDraw:
    """The randomness of one estimate: ratio t shared by the batch, u (R, G) per completion token, and u2 (R, G)
    for `decoupled` (the independent uniform of its second mask)."""

    t: float
    u: torch.Tensor
    u2: torch.Tensor | None = None

    def rows(self, index) -> "MaskDraw":
        return MaskDraw(self.t, self.u[index], None if self.u2 is None else self.u2[index])


def draw_masks(rows: int, gen_length: int, generator: torch.Generator, method: str = "coupled",
               t_min: float = 0.2, t_max: float = 0.8) -> MaskDraw:
    """t ~ U(t_min, t_max) once (official: `random.uniform(0.2, 0.8)`), then u ~ U(0, 1) per completion token.

    Drawn for the global batch in a fixed order, so a process takes its rows with `MaskDraw.rows` and W processes
    see the masks of one. (The official code tiles one (b / grad_accum, L) matrix over its micro-batches, so rows
    of different micro-batches share u; genkit draws u independently for every row.)
    """
    t = t_min + (t_max - t_min) * float(torch.rand((), dtype=torch.float64, generator=generator))
    u = torch.rand((rows, gen_length), generator=generator)  # (R, G)
    u2 = torch.rand((rows, gen_length), generator=generator) if method == "decoupled" else None
    return MaskDraw(t, u, u2)


def masked_inputs(ids: torch.Tensor, prompt_length: int, draw: MaskDraw, method: str, mask_id: int) -> torch.Tensor:
    """The inputs of one estimate stacked as (k * B, T): k = 3 (full, u < t, u > t or u2 > t) or 1 (full-mask).

    ids (B, T): prompt (P columns, never masked) followed by the completion (G = T - P columns).
    """
    P = prompt_length
    comp = ids[:, P:]  # (B, G)
    full = torch.cat([ids[:, :P], torch.full_like(comp, mask_id)], 1)  # (B, T) whole completion masked
    if method == "full-mask":
        return full
    u = draw.u.to(ids.device)
    second = draw.u2.to(ids.device) if method == "decoupled" else u
    x2 = torch.cat([ids[:, :P], comp.masked_fill(u < draw.t, mask_id)], 1)  # (B, T)
    x3 = torch.cat([ids[:, :P], comp.masked_fill(second > draw.t, mask_id)], 1)  # (B, T)
    return torch.cat([full, x2, x3], 0)  # (3B, T)


def per_token_logps(model, ids: torch.Tensor, prompt_length: int, draw: MaskDraw | None, *, method: str = "coupled",
                    mask_id: int, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, shifted: bool | None = None) -> torch.Tensor:
    """Per-token log-probability estimates (B, G) of the completions ids[:, P:] (see the module docstring).

    One batched forward pass over the k stacked inputs (official: one `get_logits` call over the three versions).
    attention_mask / position_ids: (B, T) key padding and positions of left-padded prompts (repeated for the k
    inputs). `shifted` (default: the model config's `shifted_logits`) says the model's output at i scores
    token i + 1, as Dream's; pass it when `model` is wrapped (DDP) and has no config.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not one of {', '.join(METHODS)}")
    B, T = ids.shape
    P = prompt_length
    x = masked_inputs(ids, P, draw, method, mask_id)  # (kB, T)
    k = x.shape[0] // B
    am = None if attention_mask is None else attention_mask.repeat(k, *([1] * (attention_mask.ndim - 1)))
    pos = None if position_ids is None else position_ids.repeat(k, *([1] * (position_ids.ndim - 1)))
    logits = model(x, attention_mask=am, position_ids=pos)  # (kB, T, V)
    if is_shifted(model) if shifted is None else shifted:
        logits = shift_right(logits)  # row i now scores token i
    logits = logits[:, P:]
    logp = F.log_softmax(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)  # (kB, G, V) >= fp32
    target = ids[:, P:].repeat(k, 1)  # (kB, G)
    lp = logp.gather(-1, target[..., None]).squeeze(-1).view(k, B, T - P)  # (k, B, G)
    if method == "full-mask":
        return lp[0]
    u = draw.u.to(ids.device)
    if method == "coupled":
        pair = torch.where(u < draw.t, lp[1] / draw.t, lp[2] / (1 - draw.t))  # each token from the pass masking it
    else:
        u2 = draw.u2.to(ids.device)
        pair = (u < draw.t) * lp[1] / draw.t + (u2 > draw.t) * lp[2] / (1 - draw.t)
    return (lp[0] + pair) / 2  # (B, G)


def completion_mask(completions: torch.Tensor, eot_id: int) -> torch.Tensor:
    """(R, G) bool: completion tokens up to and including the first end-of-turn token (all when there is none).

    Official: `_generate_and_score_completions` masks everything after the first `<|im_end|>`.
    """
    is_eot = completions == eot_id
    G = completions.shape[1]
    first = torch.where(is_eot.any(1), is_eot.int().argmax(1), torch.full_like(is_eot[:, 0], G, dtype=torch.long))
    return torch.arange(G, device=completions.device)[None, :] <= first[:, None]


def group_advantages(rewards: torch.Tensor, num_generations: int, kind: str = "loo", scale: bool = False) -> torch.Tensor:
    """Advantages (N,) of rewards (N,) laid out as groups of `num_generations` consecutive completions per prompt.

    loo (the official code hard-codes `leave_one_out = True`): r_i minus the mean of the other rewards of its
    group; mean: r_i minus the group mean (TRL's GRPO). `scale` divides by the group's std + 1e-4 (TRL's
    `scale_rewards`; the official recipe sets `scale_rewards: false`).
    """
    N = num_generations
    r = rewards.view(-1, N).double()  # (groups, N)
    if kind == "loo":
        if N < 2:
            raise ValueError("leave-one-out advantages need num_generations >= 2")
        adv = r - (r.sum(1, keepdim=True) - r) / (N - 1)
    elif kind == "mean":
        adv = r - r.mean(1, keepdim=True)
    else:
        raise ValueError(f"advantage={kind!r} is not loo or mean")
    if scale:
        adv = adv / (r.std(1, keepdim=True) + 1e-4)
    return adv.reshape(-1).to(rewards.dtype)


class CoupledGRPOLoss:
    """The clipped GRPO objective per token (official `DiffuGRPOTrainer.compute_loss`).

    ratio = exp(lp - lp_old); loss = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL with the k3
    estimator KL = exp(ref - lp) - (ref - lp) - 1. `__call__` returns the unreduced (B, G) loss and its
    diagnostics; the loop reduces it as sum(loss * mask) / sum(mask) over the rollout batch.
    """

    def __init__(self, epsilon: float = 0.5, beta: float = 0.01, epsilon_high: float | None = None):
        self.eps_low, self.eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
        self.beta = beta

    def __call__(self, lp: torch.Tensor, old: torch.Tensor, ref: torch.Tensor | None, advantages: torch.Tensor):
        A = advantages.to(lp.dtype)[:, None]  # (B, 1)
        ratio = torch.exp(lp - old)  # (B, G)
        clipped = torch.clamp(ratio, 1 - self.eps_low, 1 + self.eps_high)
        loss = -torch.min(ratio * A, clipped * A)
        kl = None
        if self.beta != 0.0:
            d = ref - lp
            kl = torch.exp(d) - d - 1  # (B, G)
            loss = loss + self.beta * kl
        with torch.no_grad():
            clip = ((ratio < 1 - self.eps_low) & (A < 0)) | ((ratio > 1 + self.eps_high) & (A > 0))
        return loss, {"kl": kl, "clipped": clip}
