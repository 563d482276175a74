"""Teacher folders and the denoiser that samplers and ``distill`` see.

Folder format (written by ``genkit train-diffusion``; ``RUN/model/`` or any checkpoint's ``model/``)::

    config.json        {"model_type": "edm-unet", <UNetConfig fields>,
                        "precond": {"sigma_data": 0.5, "sigma_min": 0.002, "sigma_max": 80.0},
                        "data": {"source", "split_seed", "shape", "levels", "num_classes", "class_names"}}
    model.safetensors  the raw UNet's state dict (EMA weights in RUN/model/; keys without a prefix)

:func:`load_edm_teacher` turns a run folder, checkpoint folder or model folder into an :class:`EDMTeacher`:
``D(x, sigma, class_labels=None, cfg=0.0) -> x0`` (``EDMPrecond`` around the UNet plus classifier-free
guidance).  :func:`is_edm_teacher_folder` tells ``load_denoiser`` when to call it.

Classifier-free guidance convention (Ho & Salimans 2022, arXiv 2207.12598, Eq. 6, in x0-space)::

    D_w(x, sigma, y) = D(x, sigma, y) + w * (D(x, sigma, y) - D(x, sigma, null))
                     = (1 + w) D(x, sigma, y) - w D(x, sigma, null)

so ``cfg=0`` is the plain conditional denoiser, ``cfg=-1`` the unconditional one, and ``cfg=w > 0``
extrapolates away from the unconditional prediction (w = 1 matches "guidance scale 2" in the diffusers
convention ``uncond + s (cond - uncond)``, s = 1 + w).  ``class_labels=None`` on a conditional teacher
means the null class (unconditional); unconditional teachers accept and ignore ``class_labels``/``cfg``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from genkit.diffusion.networks import MODEL_TYPE, UNet, UNetConfig
from genkit.errors import ConfigError
from genkit.models.denoisers import EDMPrecond
from genkit.runtime.checkpoint import find_model_folder


class EDMTeacher(nn.Module):
    """A genkit EDM teacher: ``D(x, sigma, class_labels=None, cfg=0.0) -> x0`` (see the module docstring).

    Attributes for callers: ``shape`` (C, H, W), ``num_classes`` (0 = unconditional), ``sigma_data``,
    ``sigma_min``/``sigma_max`` (the sampling range), ``precond`` (the :class:`EDMPrecond`), ``net`` (the UNet).
    """

    def __init__(self, net: UNet, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 data: dict | None = None):
        super().__init__()
        self.precond = EDMPrecond(net, sigma_data=sigma_data, sigma_min=sigma_min, sigma_max=sigma_max)
        self.data = dict(data or {})

    @property
    def net(self) -> UNet:
        return self.precond.model

    @property
    def num_classes(self) -> int:
        return self.net.config.num_classes

    @property
    def shape(self) -> tuple[int, int, int]:
        c = self.net.config
        return (c.channels, c.img_size, c.img_size)

    @property
    def sigma_data(self) -> float:
        return self.precond.sigma_data

    @property
    def sigma_min(self) -> float:
        return self.precond.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.precond.sigma_max

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, cfg: float = 0.0,
                **cond) -> torch.Tensor:
        if not self.num_classes:
            return self.precond(x, sigma)
        if class_labels is None or cfg == 0:
            return self.precond(x, sigma, class_labels=class_labels)
        # one batched call: conditional rows then unconditional (null-class) rows
        b = x.shape[0]
        labels = self.net.label_index(class_labels, b, x.device)  # ints (B,), one-hot rows accepted
        null = torch.full_like(labels, self.num_classes)
        sig = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        sig = sig.reshape(-1).expand(b) if sig.numel() == 1 else sig
        both = self.precond(torch.cat([x, x]), torch.cat([sig, sig]), class_labels=torch.cat([labels, null]))
        d_cond, d_uncond = both[:b], both[b:]
        return d_cond + cfg * (d_cond - d_uncond)


def resolve_teacher_folder(path: str | Path) -> Path:
    """``RUN`` -> ``RUN/model`` or the newest checkpoint's ``model/``; a model folder as is."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"teacher '{p}' does not exist: give a run folder of genkit train-diffusion or its model/")
    folder = find_model_folder(p)
    if folder is not None:
        return folder
    raise ConfigError(f"'{p}' holds no teacher weights (no config.json + model.safetensors, no complete checkpoint)")


def _read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{folder / 'config.json'}' is not valid JSON ({e})") from None


def is_edm_teacher_folder(path: str | Path) -> bool:
    """True when ``path`` (run, checkpoint or model folder) holds a genkit EDM teacher (model_type edm-unet)."""
    try:
        folder = resolve_teacher_folder(path)
    except ConfigError:
        return False
    try:
        return _read_config(folder).get("model_type") == MODEL_TYPE
    except ConfigError:
        return False


def teacher_config(net: UNet, sigma_data: float, sigma_min: float, sigma_max: float, data: dict) -> dict:
    """The ``config.json`` of a teacher folder."""
    return {**net.config.to_dict(), "precond": {"sigma_data": sigma_data, "sigma_min": sigma_min,
                                                "sigma_max": sigma_max}, "data": data}


def load_edm_teacher(path: str | Path, device="cpu") -> EDMTeacher:
    """A run folder, checkpoint folder or model folder of ``genkit train-diffusion`` -> :class:`EDMTeacher`
    in eval mode (``requires_grad`` left on: ``distill`` may fine-tune a copy)."""
    from safetensors.torch import load_file

    folder = resolve_teacher_folder(path)
    cfg = _read_config(folder)
    if cfg.get("model_type") != MODEL_TYPE:
        raise ConfigError(f"'{folder}' is a '{cfg.get('model_type')}' model, not a genkit EDM teacher "
                          f"(expected model_type {MODEL_TYPE})")
    pre = cfg.get("precond", {})
    net = UNet(UNetConfig.from_dict(cfg))
    sd = load_file(str(folder / "model.safetensors"))
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"'{folder / 'model.safetensors'}' does not match its config.json "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    teacher = EDMTeacher(net, sigma_data=pre.get("sigma_data", 0.5), sigma_min=pre.get("sigma_min", 0.002),
                         sigma_max=pre.get("sigma_max", 80.0), data=cfg.get("data"))
    return teacher.to(device).eval()
