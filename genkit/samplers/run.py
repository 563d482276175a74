"""Sampling a denoiser end to end: shape, noise, schedule, sampler, NFE counted by wrapping the denoiser.

Used by ``genkit sample --model`` and the benchmarks.  The denoiser is anything ``load_denoiser`` returns:
an analytic Gaussian mixture (exact teacher), a genkit EDM teacher folder, a diffusers UNet folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import torch

from genkit.config import field
from genkit.errors import ConfigError
from genkit.models.denoisers import NFECounter
from genkit.samplers import SAMPLERS, get_sampler, sigmas_for_nfe


@dataclass
class DiffusionSampleConfig:
    """Knobs of ``genkit sample --model``."""

    sampler: str = field("heun", help=f"one of {', '.join(SAMPLERS)}")
    nfe: int = field(35, help="denoiser evaluations per sample (Heun: 2N-1 for N steps)", min=1)
    cfg: float = field(0.0, help="classifier-free guidance weight w: (1+w) D(x|y) - w D(x) (conditional teachers)")
    label: int = field(-1, help="class of every sample for conditional teachers (-1 = cycle through the classes)")
    sigma_min: float = field(0.0, help="smallest sigma of the schedule (0 = the model's, else 0.002)", min=0.0)
    sigma_max: float = field(0.0, help="largest sigma (0 = the model's, else 80)", min=0.0)
    rho: float = field(7.0, help="Karras schedule exponent", min=1.0)
    schedule: Literal["karras", "exponential", "uniform-t"] = field(
        "karras", help="sigma schedule: Karras rho, log-uniform, or uniform in t of TADA's N=2 system")
    order: int = field(2, help="TADA: order N of the chain of integrators (2 = position + velocity, the "
                       "paper's default; 1 = flow matching, which is DDIM)", min=1, max=6)
    k: float = field(1.0, help="TADA: detail knob, initial variance of the last augmented variable (> 0)")
    ab_order: int = field(3, help="TADA: Adams-Bashforth order p on the force (1-3; the paper uses 3 for EDM, "
                          "2 for SD3)", min=1, max=3)
    grid: Literal["sigmas", "uniform"] = field("sigmas", help="TADA time grid: 'sigmas' = t where the "
                                               "effective noise equals each sigma of the schedule (the noise "
                                               "levels every sampler uses), 'uniform' = uniform in t")
    unipc_order: int = field(2, help="UniPC: predictor order (1-3; diffusers' default 2)", min=1, max=3)
    s_churn: float = field(0.0, help="Euler/Heun: EDM stochasticity S_churn (0 = deterministic)", min=0.0)
    seed: int = field(0, help="noise seed")
    batch_size: int = field(500, help="samples per sampler call", min=1)

    def validate(self) -> list[str]:
        problems = []
        if self.sampler not in SAMPLERS:
            problems.append(f"sampler: unknown sampler '{self.sampler}'; valid samplers: {', '.join(SAMPLERS)}")
        if not self.k > 0:
            problems.append(f"k: must be > 0 (got {self.k}); it is the initial variance of TADA's last variable")
        return problems


def denoiser_shape(denoiser) -> tuple[int, ...]:
    """Sample shape without the batch dimension."""
    if hasattr(denoiser, "shape"):
        return tuple(denoiser.shape)
    if hasattr(denoiser, "dim"):
        return (int(denoiser.dim),)
    unet = getattr(denoiser, "unet", None)
    if unet is not None:
        c = unet.config
        size = c.sample_size if isinstance(c.sample_size, int) else tuple(c.sample_size)
        return (c.in_channels, *((size, size) if isinstance(size, int) else size))
    raise ConfigError(f"cannot tell the sample shape of a {type(denoiser).__name__}")


def knobs_for(cfg: DiffusionSampleConfig, generator: torch.Generator) -> dict:
    if cfg.sampler == "tada":
        return {"order": cfg.order, "k": cfg.k, "solver_order": cfg.ab_order, "grid": cfg.grid,
                "generator": generator}
    if cfg.sampler == "unipc":
        return {"order": cfg.unipc_order}
    if cfg.sampler in ("euler", "heun") and cfg.s_churn > 0:
        return {"s_churn": cfg.s_churn, "generator": generator}
    return {}


@torch.no_grad()
def sample_denoiser(denoiser, n: int, cfg: DiffusionSampleConfig, *, device="cpu", progress=None):
    """``n`` samples and the facts of the run: ``(x, labels, info)`` with the NFE counted per sample."""
    sampler = get_sampler(cfg.sampler)
    smin = cfg.sigma_min or float(getattr(denoiser, "sigma_min", 0.0) or 0.002)
    smax = cfg.sigma_max or float(getattr(denoiser, "sigma_max", 0.0) or 80.0)
    smin, smax = max(smin, 1e-4), min(smax, 1e4)
    sigmas = sigmas_for_nfe(cfg.sampler, cfg.nfe, smin, smax, cfg.rho, cfg.schedule).to(device)
    shape = denoiser_shape(denoiser)
    nc = int(getattr(denoiser, "num_classes", 0) or 0)
    if cfg.cfg and not nc:
        raise ConfigError("cfg: classifier-free guidance needs a class-conditional teacher; this one is unconditional")
    counter = NFECounter(denoiser)
    xs, ys = [], []
    t0 = time.time()
    for i in range(0, n, cfg.batch_size):
        m = min(cfg.batch_size, n - i)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)
        x = torch.randn((m, *shape), generator=g).to(device) * sigmas[0]
        cond = {}
        if nc:
            y = torch.full((m,), cfg.label) if cfg.label >= 0 else torch.arange(i, i + m) % nc
            cond = {"class_labels": y.to(device), "cfg": cfg.cfg}
            ys.append(y)
        calls_before = counter.calls
        x = sampler(counter, x, sigmas, cond=cond, **knobs_for(cfg, g))
        xs.append(x.cpu())
        if i == 0:
            nfe_per_sample = counter.calls - calls_before
        if progress is not None:
            progress.update(1)
    seconds = time.time() - t0
    info = {"sampler": cfg.sampler, "nfe_requested": cfg.nfe, "nfe": nfe_per_sample, "steps": len(sigmas) - 1,
            "sigma_min": smin, "sigma_max": smax, "seconds": round(seconds, 4),
            "samples_per_second": n / max(seconds, 1e-9)}
    return torch.cat(xs), (torch.cat(ys) if ys else None), info
