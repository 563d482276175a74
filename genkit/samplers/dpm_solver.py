"""DPM-Solver++(2M): Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models" (arXiv 2211.01095), Algorithm 2 (multistep second order, data prediction), written in
the sigma parameterisation of k-diffusion (crowsonkb/k-diffusion ``sample_dpmpp_2m``)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, callback=None, cond: dict | None = None):
    """With lambda = -log sigma and h_i = lambda_{i+1} - lambda_i, the exact VE solution
    x_{i+1} = (sigma_{i+1}/sigma_i) x_i + sigma_{i+1} int e^lambda D dlambda (the data-prediction form of
    the exponential integrator, Lu et al. Sec. 3, with alpha = 1) is approximated by

        x_{i+1} = (sigma_{i+1} / sigma_i) x_i - expm1(-h_i) * D_i'
        D_i'    = (1 + 1/(2 r_i)) D_i - 1/(2 r_i) D_{i-1},   r_i = h_{i-1} / h_i     (Alg. 2)

    The first step and the step to sigma = 0 are first order (D_i' = D_i; the latter returns D_i).
    NFE = len(sigmas) - 1."""
    cond = cond or {}
    s_in = x.new_ones(x.shape[0])
    denoised_prev, h_prev = None, None
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = denoiser(x, sigma * s_in, **cond)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        if sigma_next == 0:
            x = denoised
            break
        h = math.log(sigma) - math.log(sigma_next)
        if denoised_prev is None:
            d_prime = denoised
        else:
            r = h_prev / h
            d_prime = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
        x = (sigma_next / sigma) * x - math.expm1(-h) * d_prime
        denoised_prev, h_prev = denoised, h
    return x
