"""STARFlow's switches on TarFlow's shared block, and the guidance of one autoregressive step.

STARFlow (Gu et al., arXiv 2506.06276; official apple/ml-starflow `transformer_flow.py`) keeps TarFlow's block and
turns on a few options of the official `MetaBlock`. genkit.flows.tarflow's `MetaBlock` takes them as
`BlockSwitches` (all off = TarFlow exactly, tests/flows/test_tarflow.py::test_parity_with_official_code);
genkit.flows.starflow builds its model from them. This module holds the pieces those switches need (RMSNorm,
rotary positions) and `guide`, the per-step guidance both flows use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def _up(t):
    """t in at least fp32 (as genkit.flows.tarflow)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(a + log(e - 1)) = 1 at a = 0 (official INV_SOFTPLUS_1)


@dataclass(frozen=True)
class BlockSwitches:
    """The official STARFlow `MetaBlock` options (flag names in brackets); all off = TarFlow."""

    sos: bool = False  # learned start token in front of the sequence, so token 0 is transformed too [use_sos]
    softplus: bool = False  # scale sigma = softplus(a + log(e - 1)) instead of exp(alpha) [use_softplus]
    soft_clip: float = 0.0  # outputs (a, mu) soft-clipped to c * tanh(. / c); official 4 [soft_clip]
    final_norm: bool = False  # RMSNorm (unit offset, zero-initialised gain) before proj_out [use_final_norm]
    rope: bool = False  # rotary positions instead of the learned pos_embed [rope]
    rope_text: bool = False  # the model is text-conditioned: RoPE keeps 8 frequency pairs for the text axis
    txt_dim: int = 0  # text hidden states (B, L, txt_dim) are projected and prepended to the sequence [txt_dim]


class RMSNorm(nn.Module):
    """x / rms(x) * (1 + w), w initialised to 0, computed in fp32 (official `RMSNorm`, add_unit_offset=True)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = _up(x)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + _up(self.weight))).type(x.dtype)


def rope_angles(head_dim: int, side: int, image_pos, text_pos=None, text_len: int = 0, with_text: bool = False):
    """Rotation angles (S, head_dim / 2), one per pair of channels, of the official `VisionRotaryEmbeddingFast`
    (misc/pe.py) with `get_positions(..., mode='3d')`: image token at raster index p sits at (row, col) = divmod(p,
    side) and rotates its first pairs by row * f_i and col * f_i, f_i = 10000^(-2i / d), d = head_dim / 2 (minus 8
    when the model is text-conditioned); with text the last 8 pairs rotate by the text axis, 10000^(-j / 8),
    where text token l sits at l / text_len * side and image tokens at 0. `image_pos`, `text_pos`: index tensors."""
    d = head_dim // 2 - (8 if with_text else 0)
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d / 2,)
    rows, cols = (torch.div(image_pos, side, rounding_mode="floor").double(), (image_pos % side).double())
    parts = [rows[:, None] * freqs, cols[:, None] * freqs]
    if with_text:
        freqs2 = 10000.0 ** (-torch.arange(8, dtype=torch.float64) / 8)  # (8,)
        parts.append(torch.zeros(len(image_pos), 8, dtype=torch.float64))
        img = torch.cat(parts, -1)  # (S_img, head_dim / 2)
        if text_pos is None or len(text_pos) == 0:
            return img.float()
        t = text_pos.double() / max(text_len, 1) * side
        txt = torch.cat([torch.zeros(len(t), d), t[:, None] * freqs2], -1)  # (L, head_dim / 2)
        return torch.cat([txt, img]).float()
    return torch.cat(parts, -1).float()


def apply_rope(x, angles):
    """Rotate interleaved channel pairs (x_2i, x_2i+1) of x (B, H, S, hd) by angles (S, hd / 2) (official
    `apply_rope` with `rotate_half` on '(d r)' pairs)."""
    a = angles.to(x.device)
    cos, sin = a.cos().to(x.dtype), a.sin().to(x.dtype)  # (S, hd / 2)
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, H, S, hd / 2)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)  # (B, H, S, hd)


def guide(log_sigma, mu, log_sigma_u, mu_u, w: float, kind: str = "tarflow", guide_what: str = "ab"):
    """Classifier-free guidance of one autoregressive step x = z * sigma + mu; returns (log_sigma, mu).

    kind="tarflow" (TarFlow paper §2, official ml-tarflow `MetaBlock.reverse`): extrapolate the log-scale and the
    shift, alpha + w (alpha - alpha_u), mu + w (mu - mu_u), for the letters of `guide_what`.
    kind="starflow" (STARFlow guidance; official ml-starflow `MetaBlock.guidance.logits_guided`): sample the
    Gaussian proportional to N(mu_c, sigma_c)^(1+w) / N(mu_u, sigma_u)^w with the unconditional precision capped
    at the conditional one, s = min(sigma_c / sigma_u, 1)^2,
        sigma~ = sigma_c / sqrt(1 + w - w s),   mu~ = ((1 + w) mu_c - w s mu_u) / (1 + w - w s),
    which equals ordinary CFG on mu when sigma_c = sigma_u and stays finite for any w >= 0 (1 + w - w s >= 1)."""
    if kind == "starflow":
        s = torch.exp(2 * (log_sigma - log_sigma_u).clamp(max=0.0))  # min(sigma_c / sigma_u, 1)^2
        denom = 1 + w - w * s
        return log_sigma - 0.5 * torch.log(denom), ((1 + w) * mu - w * s * mu_u) / denom
    if "a" in guide_what:
        log_sigma = log_sigma + w * (log_sigma - log_sigma_u)
    if "b" in guide_what:
        mu = mu + w * (mu - mu_u)
    return log_sigma, mu

