"""Sample grids as PNG (images in [-1, 1], (N, C, H, W))."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch

from genkit.runtime.files import atomic_write_bytes


def image_grid(x: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int | None = None) -> np.ndarray:
    """Tile ``x`` into one uint8 image (H, W, C); small images are upscaled to about 32 px per tile."""
    x = x.detach().float().cpu().clamp(-1, 1)
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    scale = scale or max(1, 32 // max(h, w))
    img = ((x + 1) * 127.5).round().to(torch.uint8).numpy()
    img = img.repeat(scale, axis=2).repeat(scale, axis=3)
    h, w = h * scale, w * scale
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = (
            img[i].transpose(1, 2, 0))
    return grid


def save_grid(x: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    from PIL import Image

    g = image_grid(x, nrow)
    im = Image.fromarray(g[..., 0] if g.shape[2] == 1 else g)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_samples_npz(path: str | Path, **arrays) -> Path:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: (v.detach().cpu().numpy() if torch.is_tensor(v) else v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())
