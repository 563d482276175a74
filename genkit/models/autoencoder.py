"""Autoencoders for latent flows: any diffusers ``AutoencoderKL`` folder by local path.

STARFlow (arXiv 2506.06276; official apple/ml-starflow ``utils/model_setup.py::VAE``) models the latents of a
pretrained KL autoencoder: ``z = scaling_factor * sample(q(z|x))`` on the way in, ``x = decode(z /
scaling_factor)`` on the way out. genkit takes the autoencoder as a diffusers folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, as ``AutoencoderKL.save_pretrained`` writes it: Stable Diffusion's
``sd-vae-ft-ema``, or a small one trained by ``genkit train-ae``) and never downloads anything.

Scaling: the folder's ``scaling_factor`` (0.18215 for the SD VAE) when its ``config.json`` names one, else
1 / std of the training latents (:func:`latent_scale`), the recipe that produced SD's 0.18215. A
``shift_factor`` in the config (SD3/FLUX-style VAEs) is subtracted before scaling; the official code has none.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from genkit.errors import ConfigError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def read_ae_config(path: str | Path) -> dict:
    """The ``config.json`` of an AutoencoderKL folder, with one-line errors for a missing/foreign folder."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"autoencoder folder '{p}' does not exist: give a diffusers AutoencoderKL folder "
                          "(config.json + diffusion_pytorch_model.safetensors), e.g. the ae/ of genkit train-ae")
    if (p / "vae" / "config.json").is_file() and not (p / "config.json").is_file():
        p = p / "vae"  # a whole pipeline folder: its vae/ subfolder
    cfg_path = p / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"'{p}' has no config.json: not a diffusers AutoencoderKL folder")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{cfg_path}' is not valid JSON ({e})") from None
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"'{p}' holds a {cfg.get('_class_name')}, not an AutoencoderKL")
    if not (p / WEIGHTS).is_file():
        raise ConfigError(f"'{p}' has no {WEIGHTS} (genkit loads safetensors only; convert a .bin with "
                          "AutoencoderKL.from_pretrained(...).save_pretrained(..., safe_serialization=True))")
    cfg["_folder"] = str(p)
    return cfg


def load_autoencoder(path: str | Path, device="cpu"):
    """A diffusers ``AutoencoderKL`` from a local folder (safetensors only), in eval mode, float32."""
    cfg = read_ae_config(path)
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ConfigError("latent flows need diffusers: pip install 'diffusers>=0.30'") from None
    try:
        ae = AutoencoderKL.from_pretrained(cfg["_folder"], use_safetensors=True, local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"could not load the autoencoder '{cfg['_folder']}': {type(e).__name__}: {e}") from None
    return ae.to(device).float().eval()


class LatentCodec(torch.nn.Module):
    """An AutoencoderKL with its latent scaling: ``encode(x) -> z`` (scaled), ``decode(z) -> x``.

    ``scale`` multiplies the (shifted) latents; ``noise`` is not added here (the flow's training adds it)."""

    def __init__(self, ae, scale: float, shift: float = 0.0):
        super().__init__()
        self.ae = ae
        self.scale, self.shift = float(scale), float(shift)

    @property
    def in_channels(self) -> int:
        return int(self.ae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.ae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ae.config.block_out_channels) - 1)

    @torch.no_grad()
    def posterior(self, x):
        """(mean, std) of q(z|x) before scaling, each (B, c, h, w)."""
        d = self.ae.encode(x).latent_dist
        return d.mean, d.std

    def scaled(self, z):
        return (z - self.shift) * self.scale

    @torch.no_grad()
    def encode(self, x, generator: torch.Generator | None = None, sample: bool = True):
        """Scaled latents of images x in [-1, 1]: a posterior sample (official ``VAE.encode``) or its mean."""
        mean, std = self.posterior(x)
        if sample:
            eps = torch.randn(mean.shape, generator=generator).to(mean)
            mean = mean + std * eps
        return self.scaled(mean)

    def decode(self, z):
        """Images (B, C, H, W) from scaled latents (not clamped)."""
        return self.ae.decode(z / self.scale + self.shift).sample


def latent_scale(codec_or_ae, images: torch.Tensor, batch_size: int = 256, seed: int = 0) -> float:
    """1 / std of posterior samples of ``images`` (all latent dims pooled), as SD's 0.18215 was computed."""
    ae = getattr(codec_or_ae, "ae", codec_or_ae)
    g = torch.Generator().manual_seed(seed)
    s1 = s2 = n = 0.0
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            d = ae.encode(images[i : i + batch_size]).latent_dist
            z = (d.mean + d.std * torch.randn(d.mean.shape, generator=g).to(d.mean)).double()
            s1, s2, n = s1 + float(z.sum()), s2 + float(z.pow(2).sum()), n + z.numel()
    var = s2 / n - (s1 / n) ** 2
    if not var > 0:
        raise ConfigError("the autoencoder's latents have zero variance on the training data: it is not usable")
    return float(var**-0.5)


def load_codec(path: str | Path, *, images: torch.Tensor | None = None, scaling_factor: float = 0.0,
               device="cpu") -> tuple[LatentCodec, str]:
    """(codec, where the scale came from): ``scaling_factor`` > 0 as given, else the folder's, else 1/std of
    ``images``' latents."""
    cfg = read_ae_config(path)
    ae = load_autoencoder(path, device)
    shift = float(cfg.get("shift_factor") or 0.0)
    if scaling_factor > 0:
        return LatentCodec(ae, scaling_factor, shift), "recipe"
    if cfg.get("scaling_factor"):
        return LatentCodec(ae, float(cfg["scaling_factor"]), shift), "folder"
    if images is None:
        raise ConfigError(f"'{cfg['_folder']}' names no scaling_factor: give latent.scaling_factor")
    return LatentCodec(ae, latent_scale(ae, images.to(device)), shift), "1/std of the training latents"
