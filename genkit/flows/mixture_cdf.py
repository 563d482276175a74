"""Gaussian-mixture CDF transforms for TarFlowLM's Mix-1 and Mix-d layers (arXiv 2507.00425; see
`genkit/flows/tarflowlm.py`): u = Phi^-1(F_mix(y)) with its log-det, and the inverse by bisection.

Numerics: everything in float32 or float64 (`_up`), CDFs carried as log F and log(1 - F) (`log_ndtr` of the
standardised values, combined with logsumexp), Phi^-1 taken on the smaller tail and polished by Newton steps
on log_ndtr, |u| clamped to U_CLAMP.
"""

from __future__ import annotations

import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
U_CLAMP = 37.0  # |Phi^-1| never exceeds this (Phi(-37) ~ 6e-300, the float64 floor)


def _up(t):
    """At least float32: the mixture maths never runs in bf16/fp16."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def normal_logpdf(x):
    return -0.5 * x * x - LOG_SQRT_2PI


def ndtri_lower(logp):
    """Phi^-1(p) for log p = logp <= log(1/2), accurate for any logp (also where p underflows).

    Start from `ndtri(exp(logp))` (or the tail asymptote where exp underflows), then Newton steps on
    h(u) = log_ndtr(u) - logp, whose slope is N(u) / Phi(u). The last step keeps the graph of logp only, so
    d u / d logp = Phi(u) / N(u) exactly, as implicit differentiation gives."""
    lp = logp.detach()
    tiny = lp < math.log(torch.finfo(lp.dtype).tiny) + 10
    x = (-2.0 * lp).clamp_min(1.0)
    asym = -torch.sqrt((x - torch.log(x) - math.log(2 * math.pi)).clamp_min(0.0))
    u = torch.where(tiny, asym, torch.special.ndtri(torch.exp(lp).clamp_max(0.5)))
    u = u.clamp(-U_CLAMP, 0.0)
    for _ in range(2):
        slope = torch.exp(normal_logpdf(u) - torch.special.log_ndtr(u))
        u = (u - (torch.special.log_ndtr(u) - lp) / slope).clamp(-U_CLAMP, 0.0)
    slope = torch.exp(normal_logpdf(u) - torch.special.log_ndtr(u))
    return u - (torch.special.log_ndtr(u) - logp) / slope  # one differentiable Newton step


def phi_inverse(log_f, log_1mf):
    """u = Phi^-1(F) from log F and log(1 - F), taking the smaller tail (no cancellation near F = 1)."""
    lower = log_f <= log_1mf
    u_lo = ndtri_lower(torch.where(lower, log_f, log_1mf))
    return torch.where(lower, u_lo, -u_lo).clamp(-U_CLAMP, U_CLAMP)


def mixture_gaussianize(y, logw, m, log_s):
    """1-D Gaussian-mixture CDF transform of every scalar of y (...,), components on the last axis of
    logw (normalised log-weights), m and log_s (broadcastable to (..., K)). Returns u = Phi^-1(F_mix(y)) and
    the log-det log p_mix(y) - log N(u), both (...,)."""
    zk = (y.unsqueeze(-1) - m) * torch.exp(-log_s)  # (..., K)
    log_f = torch.logsumexp(logw + torch.special.log_ndtr(zk), -1)  # (...,)
    log_1mf = torch.logsumexp(logw + torch.special.log_ndtr(-zk), -1)  # (...,)
    log_pdf = torch.logsumexp(logw + normal_logpdf(zk) - log_s, -1)  # (...,)
    u = phi_inverse(log_f, log_1mf)
    return u, log_pdf - normal_logpdf(u)


@torch.no_grad()
def mixture_invert(u, logw, m, log_s, iters: int | None = None, newton: int | None = None):
    """The y with Phi^-1(F_mix(y)) = u: bisection on the exact bracket [min_k m_k + u s_k, max_k m_k + u s_k]
    (at its ends every component CDF is <= resp. >= Phi(u), hence so is the mixture's), comparing in the log
    domain on the smaller tail; then `newton` Newton steps y <- y - (u(y) - u) / u'(y) (u'(y) = exp(log-det)
    from `mixture_gaussianize`), each kept inside the bracket. 30 halvings + 3 steps reach float64 precision
    (the inverse test asks 1e-6); in float32 16 + 2 stop where its CDF resolution does."""
    f64 = u.dtype == torch.float64
    iters, newton = iters or (30 if f64 else 16), newton if newton is not None else (3 if f64 else 2)
    s = torch.exp(log_s)
    ends = m + u.unsqueeze(-1) * s  # (..., K)
    lo, hi = ends.min(-1).values, ends.max(-1).values  # (...,)
    upper = u > 0  # compare log(1 - F) there: F(y) < Phi(u)  <=>  log(1 - F(y)) > log Phi(-u)
    target = torch.special.log_ndtr(torch.where(upper, -u, u))  # (...,)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        zk = (mid.unsqueeze(-1) - m) / s
        if bool(upper.any()):
            l1mf = torch.logsumexp(logw + torch.special.log_ndtr(-zk), -1)
        if not bool(upper.all()):
            lf = torch.logsumexp(logw + torch.special.log_ndtr(zk), -1)
        below = (l1mf > target) if bool(upper.all()) else (lf < target) if not bool(upper.any()) else \
            torch.where(upper, l1mf > target, lf < target)  # F(mid) < Phi(u): the root is above mid
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    y = 0.5 * (lo + hi)
    for _ in range(newton):
        uy, logdet = mixture_gaussianize(y, logw, m, log_s)
        step = (uy - u) * torch.exp(-logdet)
        y = torch.where(torch.isfinite(step), y - step, y).clamp(lo, hi)
    return y


def mixd_gaussianize(z, logits, mu, log_sigma):
    """Mix-d forward on tokens z (..., d) with mixture logits (..., V) over the codebook N(mu_k, sigma_k^2 I).

    Dimension j uses the Bayes-updated weights w^(j) = softmax_k(log pi_k + sum_{i<j} log N(z_i; mu_ki,
    sigma_k)); returns u (..., d) and the log-det (...,) = log sum_k pi_k N(z; mu_k, sigma_k^2 I) - sum_j
    log N(u_j) (the per-dimension log-densities telescope to the joint one)."""
    logpi = torch.log_softmax(logits, -1)  # (..., V)
    sig = torch.exp(log_sigma).unsqueeze(-1)  # (V, 1)
    lcomp = normal_logpdf((z.unsqueeze(-2) - mu) / sig) - log_sigma.unsqueeze(-1)  # (..., V, d)
    before = torch.cumsum(lcomp, -1) - lcomp  # (..., V, d): sum over i < j
    logw = torch.log_softmax(logpi.unsqueeze(-1) + before, dim=-2).transpose(-1, -2)  # (..., d, V)
    u, ld = mixture_gaussianize(z, logw, mu.t(), log_sigma)  # (..., d) each
    return u, ld.sum(-1)


@torch.no_grad()
def mixd_invert(u, logits, mu, log_sigma):
    """Invert `mixd_gaussianize` for tokens u (..., d): dimension by dimension, updating the weights."""
    acc = torch.log_softmax(logits, -1)  # (..., V): log pi_k + sum_{i<j} log N(z_i; mu_ki, sigma_k)
    sig = torch.exp(log_sigma)
    out = torch.empty_like(u)
    for j in range(u.shape[-1]):
        zj = mixture_invert(u[..., j], torch.log_softmax(acc, -1), mu[:, j], log_sigma)  # (...,)
        out[..., j] = zj
        acc = acc + normal_logpdf((zj.unsqueeze(-1) - mu[:, j]) / sig) - log_sigma
    return out
