"""A small UNet, the raw network ``F(c_in * x, c_noise, class_labels=None)`` of genkit's EDM teachers.

A cut-down DDPM++ / EDM "SongUNet" (NVlabs/edm ``training/networks.py``): a Fourier/positional embedding
of ``c_noise`` (and an optional class embedding) feeds every residual block through an adaptive
scale/shift (EDM ``UNetBlock`` with ``adaptive_scale=True``); one self-attention layer per block at the
listed resolutions; skip connections from every encoder block to the decoder; zero-initialised output
layers so the preconditioned denoiser starts at ``D = c_skip x``.  Differences from the official code
(chosen for CPU-size models): GroupNorm groups = min(32, C // 4), average-pool down / nearest up-sampling
followed by a 3x3 convolution, no resampling filters, a learned class embedding instead of a linear map of
one-hot labels.

Class labels are integers in ``[0, num_classes]`` where ``num_classes`` is the *null* class (label dropout
for classifier-free guidance); one-hot float labels (EDM style, an all-zero row = unconditional) are
accepted too.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from genkit.config import model_config_from_dict
from genkit.errors import ConfigError

MODEL_TYPE = "edm-unet"


@dataclass
class UNetConfig:
    """Hyper-parameters of :class:`UNet` (``config.json`` of a teacher folder)."""

    img_size: int = 8  # square image side H = W
    channels: int = 1  # image channels C
    model_channels: int = 64  # channels at the first resolution
    channel_mult: tuple[int, ...] = (1, 2)  # channels = model_channels * mult per resolution (len-1 downsamplings)
    num_blocks: int = 2  # residual blocks per resolution in the encoder (decoder has num_blocks + 1)
    attn_resolutions: tuple[int, ...] = (4,)  # resolutions (sides) with self-attention after each block
    num_heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout inside residual blocks
    num_classes: int = 0  # 0 = unconditional; else labels 0..num_classes-1 plus the null label num_classes
    embedding: str = "positional"  # noise embedding: "positional" (DDPM++) or "fourier" (NCSN++)

    def __post_init__(self):
        self.channel_mult = tuple(int(m) for m in self.channel_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        problems = []
        down = 2 ** (len(self.channel_mult) - 1)
        if self.img_size % down:
            problems.append(f"img_size {self.img_size} is not divisible by 2^(len(channel_mult)-1) = {down}")
        if self.model_channels % 8:
            problems.append(f"model_channels {self.model_channels} must be a multiple of 8")
        if self.embedding not in ("positional", "fourier"):
            problems.append(f"embedding '{self.embedding}' is not 'positional' or 'fourier'")
        for r in self.attn_resolutions:
            if r not in [self.img_size // 2 ** i for i in range(len(self.channel_mult))]:
                problems.append(f"attn_resolutions: {r} is not one of the UNet's resolutions")
        if problems:
            raise ConfigError(problems)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return {"model_type": MODEL_TYPE, **d}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        return model_config_from_dict(cls, d, MODEL_TYPE, "UNet", ignore=("precond", "data"))


def _groups(c: int) -> int:
    return math.gcd(c, min(32, max(1, c // 4)))


class NoiseEmbedding(nn.Module):
    """``c_noise`` (B,) -> (B, C): sin/cos of c_noise times geometric frequencies (positional, DDPM++
    with ``endpoint=True``) or of random frequencies (Fourier features, NCSN++)."""

    def __init__(self, num_channels: int, kind: str = "positional", max_positions: int = 10000, scale: float = 16):
        super().__init__()
        self.kind = kind
        if kind == "fourier":
            self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)
        else:
            f = torch.arange(num_channels // 2, dtype=torch.float32) / (num_channels // 2 - 1)
            self.register_buffer("freqs", (1 / max_positions) ** f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arg = x.float()[:, None] * (2 * math.pi * self.freqs if self.kind == "fourier" else self.freqs)[None]
        return torch.cat([arg.cos(), arg.sin()], dim=1)  # (B, C)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, adaptive scale/shift from the embedding, GroupNorm-SiLU-dropout-conv, skip;
    optional self-attention; the sum is scaled by 1/sqrt(2) (EDM ``skip_scale``)."""

    def __init__(self, cin: int, cout: int, emb_dim: int, dropout: float, attention: bool, num_heads: int):
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(cin), cin)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.affine = nn.Linear(emb_dim, 2 * cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        self.num_heads = num_heads
        if attention:
            self.norm2 = nn.GroupNorm(_groups(cout), cout)
            self.qkv = nn.Conv2d(cout, 3 * cout, 1)
            self.proj = nn.Conv2d(cout, cout, 1)
            nn.init.zeros_(self.proj.weight)
            nn.init.zeros_(self.proj.bias)
        else:
            self.qkv = None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))  # (B, Cout, H, W)
        scale, shift = self.affine(emb)[:, :, None, None].chunk(2, dim=1)  # (B, Cout, 1, 1) each
        h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        h = self.conv1(self.dropout(h))
        x = (h + self.skip(x)) / math.sqrt(2)
        if self.qkv is not None:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, self.num_heads, c // self.num_heads, hh * ww).unbind(1)
            a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
            a = a.transpose(-1, -2).reshape(b, c, hh, ww)  # (B, C, H, W)
            x = (x + self.proj(a)) / math.sqrt(2)
        return x


class UNet(nn.Module):
    """The raw network: ``forward(x_in, c_noise, class_labels=None) -> F`` with x_in, F of shape (B, C, H, W)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = c = config
        ch = c.model_channels
        emb_dim = 4 * ch
        self.map_noise = NoiseEmbedding(ch, c.embedding)
        self.map_label = nn.Embedding(c.num_classes + 1, ch) if c.num_classes else None
        self.map_layer0 = nn.Linear(ch, emb_dim)
        self.map_layer1 = nn.Linear(emb_dim, emb_dim)
        self.conv_in = nn.Conv2d(c.channels, ch, 3, padding=1)
        self.enc = nn.ModuleList()
        self.down = nn.ModuleList()
        skips = [ch]
        cur, res = ch, c.img_size
        for level, mult in enumerate(c.channel_mult):
            if level > 0:
                self.down.append(nn.Conv2d(cur, cur, 3, padding=1))  # after a 2x average pool
                res //= 2
                skips.append(cur)
            blocks = nn.ModuleList()
            for _ in range(c.num_blocks):
                blocks.append(ResBlock(cur, ch * mult, emb_dim, c.dropout, res in c.attn_resolutions, c.num_heads))
                cur = ch * mult
                skips.append(cur)
            self.enc.append(blocks)
        self.mid = nn.ModuleList([ResBlock(cur, cur, emb_dim, c.dropout, True, c.num_heads),
                                  ResBlock(cur, cur, emb_dim, c.dropout, False, c.num_heads)])
        self.dec = nn.ModuleList()
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(c.num_blocks + 1):
                blocks.append(ResBlock(cur + skips.pop(), ch * mult, emb_dim, c.dropout,
                                       res in c.attn_resolutions, c.num_heads))
                cur = ch * mult
            self.dec.append(blocks)
            if level > 0:
                self.up.append(nn.Conv2d(cur, cur, 3, padding=1))  # after a 2x nearest upsampling
                res *= 2
        self.norm_out = nn.GroupNorm(_groups(cur), cur)
        self.conv_out = nn.Conv2d(cur, c.channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def label_index(self, class_labels: torch.Tensor | None, batch: int, device) -> torch.Tensor:
        """(B,) integer labels with the null class ``num_classes`` for missing / all-zero one-hot labels."""
        n = self.config.num_classes
        if class_labels is None:
            return torch.full((batch,), n, dtype=torch.long, device=device)
        if class_labels.is_floating_point() and class_labels.ndim == 2:  # EDM one-hot (zero row = uncond)
            idx = class_labels.argmax(1)
            return torch.where(class_labels.abs().sum(1) > 0, idx, torch.full_like(idx, n))
        idx = class_labels.long().reshape(-1).expand(batch) if class_labels.numel() == 1 else class_labels.long()
        return torch.where(idx < 0, torch.full_like(idx, n), idx)  # -1 also means "no label"

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor | None = None):
        b = x.shape[0]
        emb = self.map_noise(c_noise.reshape(-1).expand(b))  # (B, ch)
        if self.map_label is not None:
            emb = emb + self.map_label(self.label_index(class_labels, b, x.device))
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))  # (B, 4 ch)
        h = self.conv_in(x)  # (B, ch, H, W)
        skips = [h]
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = self.down[level - 1](F.avg_pool2d(h, 2))  # (B, C, H/2, W/2)
                skips.append(h)
            for blk in blocks:
                h = blk(h, emb)
                skips.append(h)
        for blk in self.mid:
            h = blk(h, emb)
        for level, blocks in enumerate(self.dec):
            for blk in blocks:
                h = blk(torch.cat([h, skips.pop()], dim=1), emb)
            if level < len(self.up):
                h = self.up[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_img, H, W)
