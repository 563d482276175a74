"""Noise schedules: decreasing sigmas with a final 0 appended (n steps -> n + 1 values), float64."""

from __future__ import annotations

import math

import torch


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def get_sigmas_karras(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                      device="cpu") -> torch.Tensor:
    """Karras et al. 2022 (arXiv 2206.00364), Eq. 5: sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho for i < n, then sigma_n = 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho  # n = 1: just sigma_max
    return append_zero(sigmas).to(device)


def get_sigmas_exponential(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
                           device="cpu") -> torch.Tensor:
    """Log-uniform sigmas (uniform in lambda = -log sigma, the DPM-Solver "logSNR" spacing), then 0."""
    sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()
    return append_zero(sigmas).to(device)


def get_sigmas_uniform_t(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, order: int = 2,
                         k: float = 1.0, device="cpu") -> torch.Tensor:
    """n sigmas at times uniform in t of TADA's augmented system (arXiv 2506.21757; order N, detail knob k,
    default the paper's N = 2, k = 1) between t(sigma_max) and t(sigma_min), sigma = gamma(t)^(-1/2), then 0:
    the noise levels TADA's ``grid="uniform"`` queries, for any sampler (``genkit.samplers.tada``, (T6))."""
    from genkit.samplers.tada import sigmas_uniform_t

    return sigmas_uniform_t(get_sigmas_karras(n, sigma_min, sigma_max), order, k).to(device)


SCHEDULES = {"karras": get_sigmas_karras, "exponential": get_sigmas_exponential, "uniform-t": get_sigmas_uniform_t}
