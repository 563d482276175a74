"""Diffusers UNets as EDM-convention denoisers ``D(x, sigma, **cond) -> x0``.

A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` is a discrete-time variance-preserving (VP) model:
``x_vp = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` with ``a_t = alphas_cumprod[t]``. Dividing by ``sqrt(a_t)`` gives
the VE form ``x = x0 + sigma eps`` with ``sigma_t = sqrt((1 - a_t) / a_t)``, so

    x_vp = x / sqrt(1 + sigma^2),    t(sigma) = interpolation over the discrete log-sigmas,

and the network output (``prediction_type`` from the scheduler config) converts to x0:

    epsilon:       x0 = x - sigma * eps
    v_prediction:  x0 = x / (1 + sigma^2) - sigma / sqrt(1 + sigma^2) * v     (v = sqrt(a) eps - sqrt(1-a) x0)
    sample:        x0 = output

This is the construction of k-diffusion's ``DiscreteEpsDDPMDenoiser`` / ``DiscreteVDDPMDenoiser`` /
``CompVisDenoiser`` (crowsonkb/k-diffusion ``k_diffusion/external.py``); fractional timesteps go straight to
the UNet's sinusoidal time embedding. diffusers is imported lazily.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from genkit.errors import ConfigError
from genkit.models.denoisers import broadcast_sigma

UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


class DiffusersDenoiser(nn.Module):
    """Presents a VP discrete-time UNet as ``D(x, sigma, **cond)``; ``cond`` goes to the UNet's forward
    (``class_labels=``, ``encoder_hidden_states=`` ...)."""

    def __init__(self, unet: nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon"):
        super().__init__()
        if prediction_type not in {"epsilon", "v_prediction", "sample"}:
            raise ConfigError(f"prediction_type {prediction_type!r} is not supported (epsilon, v_prediction, sample)")
        self.unet = unet
        self.prediction_type = prediction_type
        alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
        sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()  # increasing in t
        self.register_buffer("sigmas", sigmas)
        self.register_buffer("log_sigmas", sigmas.log())

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep: linear interpolation of t over the discrete log-sigmas (clamped to the ends)."""
        log_sigma = sigma.to(torch.float64).log().clamp(self.log_sigmas[0], self.log_sigmas[-1])
        hi = torch.searchsorted(self.log_sigmas, log_sigma).clamp(1, len(self.log_sigmas) - 1)  # first >= value
        lo = hi - 1
        w = (log_sigma - self.log_sigmas[lo]) / (self.log_sigmas[hi] - self.log_sigmas[lo])
        return lo.to(torch.float64) + w

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        s = broadcast_sigma(sigma, x)  # (B, 1, 1, 1)
        t = self.sigma_to_t(s.flatten())  # (B,)
        p = next(self.unet.parameters())
        x_vp = (x / (1 + s ** 2).sqrt()).to(p.dtype)  # c_in = 1 / sqrt(1 + sigma^2)
        out = self.unet(x_vp, t.to(p.dtype), **cond, return_dict=False)[0].to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - s * out
        if self.prediction_type == "v_prediction":
            return x / (1 + s ** 2) - s / (1 + s ** 2).sqrt() * out
        return out


def _unet_dir(folder: Path) -> Path | None:
    for cand in (folder, folder / "unet"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("_class_name") in UNET_CLASSES:
                    return cand
            except (OSError, json.JSONDecodeError):
                pass
    return None


def is_diffusers_unet_folder(path: str | Path) -> bool:
    """True for a folder holding a diffusers UNet config (directly or in ``unet/``)."""
    return Path(path).is_dir() and _unet_dir(Path(path)) is not None


def load_diffusers_denoiser(path: str | Path, prediction_type: str | None = None,
                            dtype: torch.dtype = torch.float32, **scheduler_overrides) -> DiffusersDenoiser:
    """Load a local diffusers UNet folder (flat, or a pipeline folder with ``unet/`` and ``scheduler/``).

    The VP schedule and ``prediction_type`` come from ``scheduler_config.json`` (next to the UNet config or in
    ``scheduler/``) through diffusers' ``DDPMScheduler`` (so linear, scaled_linear, squaredcos_cap_v2 and
    trained_betas all work); without one, DDPM's defaults (linear 1e-4..0.02 over 1000 steps, epsilon) apply.
    ``prediction_type`` and ``scheduler_overrides`` override the config.
    """
    folder = Path(path)
    unet_dir = _unet_dir(folder) if folder.is_dir() else None
    if unet_dir is None:
        raise ConfigError(f"{folder} is not a diffusers UNet2DModel/UNet2DConditionModel folder")
    try:
        import diffusers
    except ImportError:
        raise ConfigError("loading a diffusers UNet needs the diffusers package: pip install diffusers") from None
    cls_name = json.loads((unet_dir / "config.json").read_text())["_class_name"]
    unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, torch_dtype=dtype).eval()
    sched_cfg = {}
    for cand in (unet_dir / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                 folder / "scheduler_config.json"):
        if cand.is_file():
            sched_cfg = json.loads(cand.read_text())
            break
    sched_cfg.update(scheduler_overrides)
    if prediction_type is not None:
        sched_cfg["prediction_type"] = prediction_type
    sched = diffusers.DDPMScheduler.from_config(sched_cfg)
    return DiffusersDenoiser(unet, sched.alphas_cumprod, sched.config.prediction_type)
