"""TarFlow: a Transformer autoregressive flow on image patches.

Zhai et al., "Normalizing Flows are Capable Generative Models", arXiv 2412.06329 (ICML 2025); official code
github.com/apple/ml-tarflow (`transformer_flow.py`, `train.py`, `evaluate_fid.py`, `sample.ipynb`). This is a
re-implementation, faithful to that code; where the code and the paper differ it follows the code and says so.

The flow (paper §2, "Block autoregressive flows"): an image becomes T patch tokens of size D = C*p*p; each of
`num_blocks` blocks is a causal Transformer that reads tokens x_{<t} and predicts (mu_t, alpha_t), then

    z_t = (x_t - mu_t(x_{<t})) * exp(-alpha_t(x_{<t}))          log|det dz/dx| = -sum_t alpha_t,

with token 0 passed through unchanged. Blocks alternate the autoregression direction (identity, flip, ...).
Prior: z ~ N(0, I); the inverse x_t = z_t * exp(alpha_t) + mu_t runs token by token (a KV cache makes it
one Transformer call per token).

Conventions in genkit (see the method docstrings):
* `forward(x, y) -> (z, logdet)`: z has the shape of x, (B, C, H, W); logdet is per sample, (B,), summed over
  all N = C*H*W dimensions. The official code returns z as tokens and a per-dimension logdet (mean over dims).
* Labels: 0..K-1 are classes; K (= num_classes) or any negative value is the null label of classifier-free
  guidance. As in the official code the null label has no embedding of its own: it uses the mean of the K
  class embeddings (official `train.py` drops labels to -1 and `MetaBlock` maps them to that mean).
* State-dict keys follow the official module names, so an official `.pth` loads after dropping its
  `blocks.*.attn_mask` buffers (kept non-persistent here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkit.config import model_config_from_dict
from genkit.errors import ConfigError
from genkit.flows.switches import INV_SOFTPLUS_1, BlockSwitches, RMSNorm, apply_rope, guide, rope_angles

MODEL_TYPE = "tarflow"
__all__ = ["TarFlow", "TarFlowConfig", "MetaBlock", "BlockSwitches", "guide", "denoise", "drop_labels"]


@dataclass
class TarFlowConfig:
    """Hyper-parameters of a TarFlow (names in brackets: the official `train.py` flags)."""

    img_size: int = 28  # square image side H = W [--img_size]
    channels: int = 1  # image channels C [--channel_size]
    patch_size: int = 4  # p; tokens are p x p patches, T = (H/p)^2, D = C*p*p [--patch_size]
    num_blocks: int = 4  # autoregressive flow blocks [--blocks]
    layers_per_block: int = 4  # Transformer layers in each block [--layers_per_block]
    channels_model: int = 128  # Transformer width [--channels]
    head_dim: int = 64  # channels per attention head (official: fixed at 64)
    num_classes: int = 0  # 0 = unconditional; K > 0 adds a class embedding (label K = null)
    expansion: int = 4  # MLP hidden width = expansion * channels_model (official: fixed at 4)
    dropout: float = 0.0  # residual dropout in attention and MLP (not in the official code; keep 0)
    nvp: bool = True  # affine (True) or volume-preserving, shift-only, with a learned prior var [--nvp]

    def __post_init__(self):
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.channels_model % self.head_dim:
            problems.append(f"channels_model={self.channels_model} is not a multiple of head_dim={self.head_dim}")
        for name in ("img_size", "channels", "patch_size", "num_blocks", "layers_per_block", "expansion"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0 or not 0.0 <= self.dropout < 1.0:
            problems.append(f"need num_classes >= 0 and 0 <= dropout < 1, got {self.num_classes}, {self.dropout}")
        if problems:
            raise ConfigError(problems)

    @property
    def num_patches(self) -> int:  # T
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:  # D
        return self.channels * self.patch_size**2

    def to_dict(self) -> dict:
        """The HF-style `config.json` content: `model_type` plus every field."""
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TarFlowConfig:
        return model_config_from_dict(cls, d, MODEL_TYPE, "TarFlow")


def _up(t):
    """t in at least fp32: the official code runs LayerNorm and exp in fp32 under bf16 autocast."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _layer_norm(norm: nn.LayerNorm, x):
    w, b = _up(norm.weight), _up(norm.bias)
    return F.layer_norm(_up(x), norm.normalized_shape, w, b, norm.eps).type(x.dtype)  # (B, T, C)


class Attention(nn.Module):
    """Pre-norm multi-head attention with an optional KV cache. `temp` divides the logits: the attention
    temperature of the unconditional guidance (paper §2, "Guidance")."""

    def __init__(self, dim: int, head_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.num_heads, self.head_dim = dim // head_dim, head_dim
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, temp: float = 1.0, cache: dict | None = None, angles=None):
        B, T, C = x.shape
        h = _layer_norm(self.norm, x)  # (B, T, C)
        q, k, v = (t.view(B, T, self.num_heads, self.head_dim).transpose(1, 2) for t in self.qkv(h).split(C, -1))
        if angles is not None:  # RoPE (STARFlow switch): rotate the queries and the new keys by their positions
            q, k = apply_rope(q, angles), apply_rope(k, angles)
        if cache is not None:  # append this step's keys/values to those of the earlier tokens
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)  # (B, H, S, hd)
            cache["k"], cache["v"] = k, v
        scale = self.head_dim**-0.5 / temp
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, T, hd)
        return self.drop(self.proj(out.transpose(1, 2).reshape(B, T, C)))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, dim: int, expansion: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.main = nn.Sequential(nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim))

    def forward(self, x):
        return self.main(_layer_norm(self.norm, x))  # (B, T, C)


class AttentionBlock(nn.Module):
    """One Transformer layer: x + attn(x), then + mlp(x). No final norm (as in the official code)."""

    def __init__(self, dim: int, head_dim: int, expansion: int, dropout: float):
        super().__init__()
        self.attention = Attention(dim, head_dim, dropout)
        self.mlp = MLP(dim, expansion)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, mask=None, temp: float = 1.0, cache: dict | None = None, angles=None):
        x = x + self.attention(x, mask, temp, cache, angles)  # (B, T, C)
        return x + self.drop(self.mlp(x))  # (B, T, C)


class MetaBlock(nn.Module):
    """One autoregressive flow block (the official `MetaBlock`).

    If `flip`, the block reverses the token order on the way in and restores it on the way out (the official
    `PermutationFlip`, used by every odd block), so every block maps tokens in natural order to tokens in
    natural order, and the composition of the blocks is never left flipped. The learned positional embedding
    is flipped with the tokens, so each embedding stays tied to its image location.

    `switches` (STARFlow, see `BlockSwitches`) change the block the way the official STARFlow `MetaBlock` does:
    a learned start token (`sos`: the sequence fed to the Transformer is [sos, x_0, ..., x_{T-2}], row t predicts
    token t, no zero shift), sigma = softplus(a + log(e - 1)) (`softplus`), c tanh(out / c) on the output
    projection (`soft_clip`), an RMSNorm before it (`final_norm`), rotary positions in place of `pos_embed`
    (`rope`; positions are those of the sequence index, unflipped, as in the official code), and text hidden
    states projected by `proj_txt` and prepended to the causal sequence (`txt_dim`; their outputs are dropped).
    `predict` returns the log-scale log(sigma) (TarFlow's alpha) and mu in both parameterisations."""

    def __init__(self, cfg: TarFlowConfig, flip: bool, switches: BlockSwitches = BlockSwitches()):
        super().__init__()
        C, D, T = cfg.channels_model, cfg.token_dim, cfg.num_patches
        self.flip, self.sw = flip, switches
        self.side, self.head_dim = int(round(math.sqrt(T))), cfg.head_dim
        self.proj_in = nn.Linear(D, C)
        # rope replaces the learned positions (official: pos_embed is None with use_rope)
        self.pos_embed = None if switches.rope else nn.Parameter(torch.randn(T, C) * 1e-2)  # (T, C)
        self.sos_embed = nn.Parameter(torch.randn(1, 1, D)) if switches.sos else None  # official init: randn
        self.proj_txt = nn.Linear(switches.txt_dim, C) if switches.txt_dim else None
        # K embeddings; the null label uses their mean (official code), so no (K+1)-th row.
        self.class_embed = nn.Parameter(torch.randn(cfg.num_classes, 1, C) * 1e-2) if cfg.num_classes else None
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(C, cfg.head_dim, cfg.expansion, cfg.dropout) for _ in range(cfg.layers_per_block)
        )
        self.final_norm = RMSNorm(C) if switches.final_norm else None
        self.nvp = cfg.nvp
        self.proj_out = nn.Linear(C, 2 * D if cfg.nvp else D)  # (alpha, mu) or mu only
        # The official code zeroes only the weight and keeps PyTorch's random bias, so its flow starts as a
        # token-independent affine map on tokens 1..T-1. We zero the bias too: the flow starts as the identity.
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)
        self.register_buffer("attn_mask", torch.ones(T, T, dtype=torch.bool).tril(), persistent=False)

    def permute(self, x, dim: int = 1):
        return x.flip(dim) if self.flip else x  # a flip is its own inverse

    def class_embedding(self, y):
        """(B, 1, C) embedding of labels y, or (1, C) for y=None; labels < 0 or == K are the null label."""
        if self.class_embed is None:
            return 0.0
        null = self.class_embed.mean(dim=0)  # (1, C)
        if y is None:
            return null
        is_null = (y < 0) | (y == self.class_embed.shape[0])  # (B,)
        emb = self.class_embed[torch.where(is_null, 0, y)]  # (B, 1, C)
        return torch.where(is_null.view(-1, 1, 1), null, emb)  # (B, 1, C)

    def angles(self, start: int, stop: int, text_len: int = 0):
        """RoPE angles of sequence positions start..stop-1, preceded by `text_len` text positions; None if off."""
        if not self.sw.rope:
            return None
        return rope_angles(self.head_dim, self.side, torch.arange(start, stop),
                           torch.arange(text_len) if text_len else None, text_len, self.sw.rope_text)

    def predict(self, x, pos, y, mask=None, temp: float = 1.0, caches=None, txt=None, angles=None):
        """Transformer on (permuted) tokens x (B, S, D) at positions pos (S, C) (None with rope): returns the
        log-scale and mu (B, S, D), where row s is computed from tokens <= s (and the text states `txt` (B, L, E)
        prepended when given); without the start token the caller shifts row s to predict token s+1."""
        h = self.proj_in(x) + self.class_embedding(y)  # (B, S, C)
        if pos is not None:
            h = h + pos
        n_txt = 0
        if txt is not None:  # official: text tokens go first in the causal sequence of every layer
            n_txt = txt.shape[1]
            h = torch.cat([self.proj_txt(txt.to(h.dtype)), h], dim=1)  # (B, L + S, C)
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, mask, temp, None if caches is None else caches[i], angles)  # (B, L + S, C)
        h = h[:, n_txt:]  # (B, S, C)
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h)  # (B, S, 2D) or (B, S, D)
        if self.sw.soft_clip > 0:  # official `get_proj_out`: c * tanh(out / c) on both halves
            out = self.sw.soft_clip * torch.tanh(out / self.sw.soft_clip)
        if not self.nvp:
            return torch.zeros_like(out), out
        alpha, mu = out.chunk(2, dim=-1)  # official order: first half alpha ("xa"), second half mu ("xb")
        if self.sw.softplus:  # sigma = softplus(a + log(e - 1)); returned as log(sigma), in fp32
            alpha = torch.log(F.softplus(_up(alpha) + INV_SOFTPLUS_1))
        return alpha, mu

    def prefill(self, txt, caches, temp: float = 1.0):
        """Run the text states through the layers once to fill the KV caches (official `reverse_step_condition`)."""
        h = self.proj_txt(txt.to(self.proj_in.weight.dtype))  # (B, L, C)
        L = h.shape[1]
        mask = torch.ones(L, L, dtype=torch.bool, device=h.device).tril()
        for i, layer in enumerate(self.attn_blocks):
            h = layer(h, mask, temp, caches[i], self.angles(0, 0, L))

    def _inputs(self, x):
        """The sequence the Transformer reads: [sos, x_0 .. x_{T-2}] with the start token, else x itself."""
        if self.sos_embed is None:
            return x
        return torch.cat([self.sos_embed.expand(x.shape[0], -1, -1).to(x.dtype), x[:, :-1]], dim=1)  # (B, T, D)

    def forward(self, x, y=None, txt=None):
        """x (B, T, D) -> z (B, T, D), logdet (B,) = -sum of alpha over tokens and dims."""
        x = self.permute(x)  # (B, T, D)
        T = x.shape[1]
        L = 0 if txt is None else txt.shape[1]
        mask = self.attn_mask if L == 0 else torch.ones(L + T, L + T, dtype=torch.bool, device=x.device).tril()
        pos = None if self.pos_embed is None else self.permute(self.pos_embed, 0)
        alpha, mu = self.predict(self._inputs(x), pos, y, mask, txt=txt, angles=self.angles(0, T, L))  # (B, T, D)
        if self.sos_embed is None:
            # Shift by one token: row t predicts token t+1, token 0 gets (alpha, mu) = 0 and passes through.
            alpha = torch.cat([torch.zeros_like(alpha[:, :1]), alpha[:, :-1]], dim=1)  # (B, T, D)
            mu = torch.cat([torch.zeros_like(mu[:, :1]), mu[:, :-1]], dim=1)  # (B, T, D)
        z = (x - mu) * torch.exp(-_up(alpha)).type(x.dtype)  # (B, T, D)
        # Official: -alpha.mean(dim=[1, 2]) per block (a per-dimension log-det); genkit sums instead.
        return self.permute(z), -_up(alpha).sum(dim=(1, 2))  # (B, T, D), (B,)

    def reverse(self, z, y=None, guidance=0.0, guide_what="ab", attn_temp=1.0, annealed_guidance=False,
                use_cache=True, *, txt=None, txt_null=None, guidance_kind="tarflow"):
        """Invert `forward` token by token: x_0 = z_0, x_{t+1} = z_{t+1} * exp(alpha_t) + mu_t (with the start
        token every x_t, t >= 0, is transformed). Guidance: see `guide`; the unconditional pass uses the null
        label (class models) or the text states `txt_null` (of the empty caption) and attention temperature
        `attn_temp`."""
        x = self.permute(z).clone()  # (B, T, D), filled in place
        pos = None if self.pos_embed is None else self.permute(self.pos_embed, 0)  # (T, C)
        B, T, D = x.shape
        guided = guidance != 0 and (bool(guide_what) or guidance_kind == "starflow")
        if guided and txt is not None and txt_null is None:
            raise ValueError("text guidance needs txt_null, the states of the empty caption")
        n, L = len(self.attn_blocks), 0 if txt is None else txt.shape[1]
        first = 0 if self.sos_embed is not None else 1  # first token the block transforms
        caches = {"cond": [{} for _ in range(n)], "uncond": [{} for _ in range(n)]} if use_cache else None
        if use_cache and txt is not None:
            self.prefill(txt, caches["cond"])
            if guided:
                self.prefill(txt_null, caches["uncond"], attn_temp)

        def step(p, labels, text, temp, which):  # (log-scale, mu) of token p + first, each (B, D)
            if use_cache:  # feed only the token at sequence position p; the rest comes from the cache
                fed = self._inputs(x[:, : p + 1])[:, p : p + 1] if first == 0 else x[:, p : p + 1]
                a, m = self.predict(fed, None if pos is None else pos[p : p + 1], labels, None, temp, caches[which],
                                    angles=self.angles(p, p + 1))
            else:  # recompute the whole prefix 0..p under the causal mask
                mask = torch.ones(L + p + 1, L + p + 1, dtype=torch.bool, device=x.device).tril()
                seq = self._inputs(x[:, : p + 1]) if first == 0 else x[:, : p + 1]
                a, m = self.predict(seq, None if pos is None else pos[: p + 1], labels, mask, temp, txt=text,
                                    angles=self.angles(0, p + 1, L))
            return a[:, -1], m[:, -1]

        for t in range(first, T):
            p = t - first  # sequence position of the token fed to predict token t
            alpha, mu = step(p, y, txt, 1.0, "cond")  # (B, D) each
            if guided:  # classifier-free guidance, official `MetaBlock.reverse`
                alpha_u, mu_u = step(p, None, txt_null, attn_temp, "uncond")  # null label and temperature
                g = guidance * (p + 1) / (T - first) if annealed_guidance else guidance
                alpha, mu = guide(alpha, mu, alpha_u, mu_u, g, guidance_kind, guide_what)
            x[:, t] = x[:, t] * torch.exp(_up(alpha)).type(x.dtype) + mu  # (B, D)
        return self.permute(x)  # (B, T, D)


class TarFlow(nn.Module):
    """The whole flow: patchify, `num_blocks` MetaBlocks (block i flipped iff i is odd), N(0, I) prior.

    `var` (T, D) is the official prior-variance buffer: all ones for the affine flow (nvp=True), an EMA of
    E[z^2] for the volume-preserving flow (nvp=False, see `update_prior`). It only scales the noise in `reverse`;
    the loss and `log_prob` use N(0, I), as the official `get_loss` and `evaluate_bpd.py` do."""

    VAR_LR = 0.1  # EMA rate of `update_prior` (official `Model.VAR_LR`)

    def __init__(self, config: TarFlowConfig):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList(MetaBlock(config, flip=i % 2 == 1) for i in range(config.num_blocks))
        self.register_buffer("var", torch.ones(config.num_patches, config.token_dim))  # (T, D)

    # -- shapes ------------------------------------------------------------------------------------------------
    def patchify(self, x):
        """(B, C, H, W) -> (B, T, D): row-major patches, features ordered (c, i, j) like `F.unfold`."""
        return F.unfold(x, self.config.patch_size, stride=self.config.patch_size).transpose(1, 2)  # (B, T, D)

    def unpatchify(self, x):
        """(B, T, D) -> (B, C, H, W), the exact inverse of `patchify`."""
        s, p = self.config.img_size, self.config.patch_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)  # (B, C, H, W)

    # -- density -----------------------------------------------------------------------------------------------
    def forward(self, x, y=None):
        """x (B, C, H, W), labels y (B,) or None -> z (B, C, H, W), logdet (B,) = log|det dz/dx|, summed over
        all N = C*H*W dimensions and over blocks. y=None (or null labels) means unconditional."""
        h = self.patchify(x)  # (B, T, D)
        logdet = torch.zeros(x.shape[0], device=x.device)  # (B,)
        for block in self.blocks:
            h, ld = block(h, y)  # (B, T, D), (B,)
            logdet = logdet + ld
        return self.unpatchify(h), logdet  # (B, C, H, W), (B,)

    @staticmethod
    def get_loss(z, logdet):
        """Official training loss, per dimension: 0.5 * mean(z^2) - mean(logdet) / N, means over batch and
        dims. It is the mean NLL in nats per dimension minus the constant 0.5 * log(2 pi)."""
        n = z[0].numel()
        return 0.5 * z.pow(2).mean() - logdet.mean() / n

    def loss(self, x, y=None):
        """The official per-dimension training loss of a batch (a scalar); see `get_loss`."""
        return self.get_loss(*self(x, y))

    def log_prob(self, x, y=None):
        """Exact log p(x) in nats per sample, (B,): -0.5 ||z||^2 - (N/2) log(2 pi) + logdet. For 8-bit data
        scaled to [-1, 1] and uniformly dequantised, bits/dim = (-log_prob / N + log 128) / log 2
        (official `evaluate_bpd.py`)."""
        z, logdet = self(x, y)
        n = z[0].numel()
        return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * n * math.log(2 * math.pi) + logdet  # (B,)

    @torch.no_grad()
    def update_prior(self, z):
        """Volume-preserving mode only: var <- lerp(var, E_batch[z^2], VAR_LR) (official `update_prior`)."""
        self.var.lerp_(self.patchify(z.detach()).pow(2).mean(dim=0), self.VAR_LR)  # (T, D)

    # -- sampling ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reverse(self, z, y=None, *, guidance: float = 0.0, guide_what: str = "ab", attn_temp: float = 1.0,
                annealed_guidance: bool = False, use_cache: bool = True):
        """Invert the flow: standard-normal z (B, C, H, W) -> x (B, C, H, W). Official `Model.reverse`.

        Guidance (paper §2, "Guidance"; official `MetaBlock.reverse`), in every block and at every token: a
        second pass with the null label and attention temperature `attn_temp` gives (alpha_u, mu_u), and
        alpha <- alpha + g (alpha - alpha_u), mu likewise, for the letters in `guide_what` ('a', 'b').
        g = guidance, or g = guidance * (t+1)/(T-1) at step t with `annealed_guidance` (the official
        `evaluate_fid.py` always anneals). For an unconditional model both passes differ only by `attn_temp`:
        that is the paper's attention-temperature guidance (needs attn_temp != 1). guidance=0 skips the second
        pass and is exactly the unguided inverse. The official code guides only when guidance > 0; we guide
        for any guidance != 0. Call in eval mode (dropout off)."""
        h = self.patchify(z) * self.var.sqrt()  # (B, T, D)
        for block in reversed(self.blocks):
            h = block.reverse(h, y, guidance, guide_what, attn_temp, annealed_guidance, use_cache)  # (B, T, D)
        return self.unpatchify(h)  # (B, C, H, W)

    # -- checkpoints -------------------------------------------------------------------------------------------
    def save_pretrained(self, folder):
        """Write `config.json` + `model.safetensors` into a temporary sibling folder, then rename it to
        `folder` (replacing an older one), so a reader never sees a half-written folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp, old = (folder.with_name(f".{folder.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        (tmp / "config.json").write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if folder.exists():
            folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> TarFlow:
        """Load a folder written by `save_pretrained`."""
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder} is not a TarFlow folder: missing {', '.join(missing)}")
        model = cls(TarFlowConfig.from_dict(json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
        return model.to(device)


def drop_labels(y, p: float, num_classes: int, generator=None):
    """Label dropout for classifier-free guidance (paper §2, "Guidance"; official `--drop_label`, 0.1 in the
    paper's recipes): each label becomes the null label `num_classes` with probability p."""
    drop = torch.rand(y.shape, generator=generator, device=y.device) < p  # (B,)
    return torch.where(drop, torch.full_like(y, num_classes), y)  # (B,)


def denoise(model: TarFlow, x, y=None, sigma: float | None = None, *, step_scale: float = 1.0, txt=None):
    """Score-based denoising of samples (paper §2, "Denoising"): x + sigma^2 * grad_x log p(x), Tweedie's
    formula for a model trained on data + N(0, sigma^2) noise, with the flow's own exact density. The official
    code (`evaluate_fid.py`, `sample.ipynb`) takes one gradient step on its mean loss with lr = B * N * sigma^2,
    which is the same step; `step_scale` is its `--self_denoising_lr` multiplier. Exact only for Gaussian
    training noise: for uniform dequantization, sigma = bin width / sqrt(12) matches the noise variance but the
    step is an approximation. Apply it before clipping to [-1, 1], as the official code does. Batched (samples do not
    interact); works under `no_grad`/`inference_mode`; gradients reach only x, not the weights. `txt`: the caption
    states of a text-conditioned STARFlow (which has the same `log_prob`)."""
    if sigma is None:
        raise TypeError("denoise() needs sigma, the std of the Gaussian noise the model was trained with")
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)  # (B, C, H, W); clone also leaves inference mode
        y = None if y is None else y.clone()
        lp = model.log_prob(x, y) if txt is None else model.log_prob(x, y, txt)  # (B,)
        (score,) = torch.autograd.grad(lp.sum(), x)  # (B, C, H, W)
    return (x + step_scale * sigma**2 * score).detach()  # (B, C, H, W)
