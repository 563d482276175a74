"""UniPC: Zhao, Bai, Rao, Zhou, Lu 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models" (arXiv 2302.04867): the multistep UniP-p predictor and UniC-p corrector in the B(h) form
(official code wl-zhao/UniPC ``multistep_uni_pc_bh_update``), data prediction, as diffusers'
``UniPCMultistepScheduler`` runs it (``predict_x0=True``, ``solver_type="bh2"`` by default; the official
score_sde example defaults to "bh1"; ``lower_order_final=True``), written in the VE sigma
parameterisation: with lambda = -log sigma the data-prediction updates do not depend on the VP scale alpha
(as for DPM-Solver++ in ``dpm_solver.py``). ``tests/samplers/test_unipc.py`` checks parity with diffusers.

Per step i (h = lambda_{i+1} - lambda_i > 0, D_i = D(x_i, sigma_i), one denoiser call per step):

    predictor (UniP-p) from x_i:
        x_{i+1} = (sigma_{i+1}/sigma_i) x_i - expm1(-h) D_i - B(h) sum_{k<p} rho^p_k D1_k,
        r_k = (lambda_{i-k} - lambda_i) / h,  D1_k = (D_{i-k} - D_i) / r_k  (k = 1..p-1);
    corrector (UniC-p', p' the order of the predictor that produced x_{i+1}), once D_{i+1} = D(x_{i+1}) is known:
        x_{i+1} <- (sigma_{i+1}/sigma_i) x_i - expm1(-h) D_i
                   - B(h) (sum_{k<p'} rho^c_k D1_k + rho^c_{p'} (D_{i+1} - D_i))    (r_{p'} = 1);
    B(h) = expm1(-h) ("bh2") or -h ("bh1"). rho solves the Vandermonde system sum_k rho_k r_k^(m-1) = g_m
    (m = 1..p-1 for the predictor, 1..p' for the corrector), g_m = m! psi_m / B(h) with hh = -h,
    psi_1 = expm1(hh)/hh - 1, psi_{m+1} = psi_m / hh - 1/(m+1)!; rho^p = 1/2 at p = 2 and rho^c = 1/2 at
    p' = 1, as in the official code.

The corrector reuses the call made at the new point, so UniPC spends one call per step like DPM-Solver++(2M).
The order drops to min(p, steps left) near the end (``lower_order_final``); the step to sigma = 0 returns D
at the last positive sigma (the official code skips the corrector there, diffusers runs it; neither changes
D). NFE = number of positive sigmas.
"""

from __future__ import annotations

import math

import torch

from genkit.errors import ConfigError


def _rhs(h: float, order: int, variant: str) -> tuple[list[float], float]:
    """The right-hand sides g_1..g_order and B(h) of UniPC's linear system (data prediction, hh = -h):
    g_m = m! * psi_m / B(h) with psi_1 = expm1(hh)/hh - 1, psi_{m+1} = psi_m / hh - 1/(m+1)!."""
    hh = -h
    b_h = math.expm1(hh) if variant == "bh2" else hh
    psi = math.expm1(hh) / hh - 1
    g = []
    for m in range(1, order + 1):
        g.append(psi * math.factorial(m) / b_h)
        psi = psi / hh - 1 / math.factorial(m + 1)
    return g, b_h


def _solve(rks: list[float], g: list[float]) -> list[float]:
    """rho with sum_k rho_k r_k^(m-1) = g_m, m = 1..len(rks) (Vandermonde system, float64)."""
    r = torch.tensor(rks, dtype=torch.float64)
    mat = torch.stack([r ** m for m in range(len(rks))])  # (M, K): row m holds r_k^m
    return torch.linalg.solve(mat, torch.tensor(g[: len(rks)], dtype=torch.float64)).tolist()


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, callback=None, order: int = 2, variant: str = "bh2",
                 corrector: bool = True, cond: dict | None = None):
    """UniPC (arXiv 2302.04867) with UniP-``order`` / UniC (``order`` 1-3; 2 is diffusers' default and the
    paper's choice for guided sampling, 3 for unconditional), ``variant`` "bh2" (B(h) = e^h - 1, the
    default) or "bh1" (B(h) = h). ``corrector=False`` gives UniP alone. NFE = len(sigmas) - 1."""
    cond = cond or {}
    if order not in (1, 2, 3):
        raise ConfigError(f"UniPC order must be 1, 2 or 3 (got {order!r})")
    if variant not in ("bh1", "bh2"):
        raise ConfigError(f"UniPC variant must be 'bh1' or 'bh2' (got {variant!r})")
    sig = [float(s) for s in sigmas]
    if any(a <= b for a, b in zip(sig[:-1], sig[1:])) or any(s <= 0 for s in sig[:-1]):
        raise ConfigError("UniPC: sigmas must be strictly decreasing and positive except a final 0")
    n = len(sig) - 1
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    s_in = x.new_ones(x.shape[0])
    outs: list[torch.Tensor] = []  # D_0 .. D_i
    x_prev, prev_order = None, 0
    for i in range(n):
        denoised = denoiser(x, sig[i] * s_in, **cond)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": denoised})
        if corrector and x_prev is not None:  # UniC-prev_order on the step (i-1 -> i) with the call at x_i
            h = lam[i] - lam[i - 1]
            g, b_h = _rhs(h, prev_order, variant)
            rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, prev_order)] + [1.0]
            rho = [0.5] if prev_order == 1 else _solve(rks, g)
            m0 = outs[-1]
            res = rho[-1] * (denoised - m0)
            for k in range(1, prev_order):
                res = res + rho[k - 1] * (outs[-1 - k] - m0) / rks[k - 1]
            x = (sig[i] / sig[i - 1]) * x_prev - math.expm1(-h) * m0 - b_h * res
        outs.append(denoised)
        if sig[i + 1] == 0:  # final step: first order, x_{n} = D_{n-1}
            return denoised
        p = min(order, n - i, i + 1)  # lower_order_final and warm-up
        h = lam[i + 1] - lam[i]
        x_next = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised
        if p > 1:
            g, b_h = _rhs(h, p, variant)
            rks = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
            rho = [0.5] if p == 2 else _solve(rks, g)
            res = sum(rho[k - 1] * (outs[-1 - k] - denoised) / rks[k - 1] for k in range(1, p))
            x_next = x_next - b_h * res
        x_prev, prev_order, x = x, p, x_next
    return x
