"""Euler and Heun samplers of Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models" (EDM, arXiv 2206.00364), Algorithm 2 (with S_churn = 0 it is Algorithm 1)."""

from __future__ import annotations

import math

import torch


def to_d(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM Sec. 2, sigma(t) = t, s(t) = 1)."""
    return (x - denoised) / sigma


def _churn(x, sigma, n_steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """EDM Alg. 2 churn: gamma_i = min(S_churn / N, sqrt(2) - 1) on [S_tmin, S_tmax]; sigma_hat =
    sigma (1 + gamma); x_hat = x + sqrt(sigma_hat^2 - sigma^2) S_noise eps."""
    gamma = min(s_churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * s_noise
        x = x + eps * (sigma_hat ** 2 - sigma ** 2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, callback=None, s_churn: float = 0.0, s_tmin: float = 0.0,
                 s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
                 cond: dict | None = None):
    """EDM Algorithm 2 without the second-order correction: one Euler step per interval.
    ``x`` is the initial noise at sigmas[0]; NFE = len(sigmas) - 1."""
    cond = cond or {}
    s_in = x.new_ones(x.shape[0])
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, sigma_hat * s_in, **cond)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
        x = x + d * (sigma_next - sigma_hat)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, callback=None, s_churn: float = 0.0, s_tmin: float = 0.0,
                s_tmax: float = float("inf"), s_noise: float = 1.0, generator: torch.Generator | None = None,
                cond: dict | None = None):
    """EDM Algorithm 2: Heun's 2nd-order method (trapezoidal correction) on every interval except
    the last one to sigma = 0, which is an Euler step. NFE = 2 N - 1 for N = len(sigmas) - 1 intervals
    ending at 0. Churn is off by default (S_churn = 0: deterministic, Algorithm 1)."""
    cond = cond or {}
    s_in = x.new_ones(x.shape[0])
    n = len(sigmas) - 1
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        denoised = denoiser(x, sigma_hat * s_in, **cond)
        d = to_d(x, sigma_hat, denoised)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})
        dt = sigma_next - sigma_hat
        x_euler = x + d * dt
        if sigma_next == 0:
            x = x_euler
        else:
            d_next = to_d(x_euler, sigma_next, denoiser(x_euler, sigma_next * s_in, **cond))
            x = x + 0.5 * (d + d_next) * dt
    return x
