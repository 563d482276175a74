"""STARFlow: a deep-shallow TarFlow in an autoencoder's latent space, with text conditioning and its own guidance.

Gu et al., "STARFlow: Scaling Latent Normalizing Flows for High-resolution Image Synthesis", arXiv 2506.06276;
official code github.com/apple/ml-starflow (`transformer_flow.py::Model`, `train.py`, `utils/`,
`configs/starflow_3B_t2i_256x256.yaml`). The model is TarFlow (genkit.flows.tarflow) with:

* a deep-shallow stack: `layers_per_block` is a list, shallow blocks first (next to the data) and one deep block
  last (next to the prior), official `2 2 2 2 2 24` at width 3072, patch 1; sampling runs the deep block first;
* the official t2i block options as switches on TarFlow's `MetaBlock` (`BlockSwitches`): learned start token,
  sigma = softplus(a + log(e - 1)), outputs soft-clipped to 4 tanh(. / 4), final RMSNorm, RoPE;
* conditioning (class labels, or text encoder hidden states with padding zeroed, prepended to the causal
  sequence) in the deep block only (official `cond_top_only: 1`), so the shallow blocks are unconditional;
* guidance in the deep block only (`genkit.flows.switches.guide`, kind "starflow" by default, official cfg 2.5);
* block order `seq_order`: "L2R" (official t2i config) flips block 0 and alternates, so with an even number of
  blocks the deep block reads tokens in natural order; "R2L" (official default, TarFlow's) leaves block 0 as is.

With every switch off, `cond_top_only=False`, `seq_order="R2L"` and uniform layers, a STARFlow equals a TarFlow
of the same weights (tests/flows/test_starflow.py). The latent space, text encoder and training noise are the
training loop's business (genkit.flows.train); this file is the flow on (B, C, H, W) latents.

Conventions as in TarFlow: `forward(x, y, txt=None) -> (z, logdet)` with logdet per sample summed over all
dimensions; `reverse(z, y, txt=..., guidance=...)`. Differences from the official code: genkit zeroes the output
projection's bias too (the flow starts as the identity); the official `Model` keeps a deprecated `var` buffer
that genkit drops; the official annealing factor of guidance, r = (t + 1) / T, is computed in
`MetaBlock.reverse` and then never used (`guidance` is passed to `logits_guided`, not `r * guidance`), so the
official sampler never anneals: genkit anneals only when asked (`annealed_guidance=True`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkit.config import model_config_from_dict
from genkit.errors import ConfigError
from genkit.flows.switches import BlockSwitches
from genkit.flows.tarflow import MetaBlock, TarFlowConfig

MODEL_TYPE = "starflow"


@dataclass
class StarFlowConfig:
    """Hyper-parameters of a STARFlow (official `train.py` flags in brackets)."""

    img_size: int = 8  # latent side [--img_size / VAE downsampling]
    channels: int = 4  # latent channels [--channel_size]
    patch_size: int = 1  # [--patch_size]; official 1
    layers_per_block: list[int] = field(default_factory=lambda: [1, 1, 1, 5])  # shallow ... deep [--layers_per_block]
    channels_model: int = 128  # Transformer width [--channels]
    head_dim: int = 32  # [--head_dim]; official 64
    num_classes: int = 0  # class labels (0 = none); K = the null label
    txt_dim: int = 0  # text hidden size (0 = no text) [txt_dim from the text encoder]
    expansion: int = 4
    dropout: float = 0.0
    nvp: bool = True  # [--nvp]
    sos: bool = True  # learned start token [--sos]
    softplus: bool = True  # [--use_softplus]
    soft_clip: float = 4.0  # [--soft_clip]
    final_norm: bool = True  # [--use_final_norm]
    rope: bool = True  # [--rope]
    cond_top_only: bool = True  # conditioning in the deep block only [--cond_top_only]
    seq_order: str = "L2R"  # [--seq_order]

    def __post_init__(self):
        self.layers_per_block = [int(n) for n in self.layers_per_block]
        problems = []
        if self.img_size % self.patch_size:
            problems.append(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.channels_model % self.head_dim:
            problems.append(f"channels_model={self.channels_model} is not a multiple of head_dim={self.head_dim}")
        if not self.layers_per_block or min(self.layers_per_block) < 1:
            problems.append(f"layers_per_block must be a non-empty list of positive counts, got {self.layers_per_block}")
        if self.seq_order not in ("L2R", "R2L"):
            problems.append(f"seq_order must be L2R or R2L, got {self.seq_order!r}")
        if self.num_classes and self.txt_dim:
            problems.append("a STARFlow is conditioned on class labels or on text, not both")
        if self.rope:
            need = 4 + (16 if self.txt_dim else 0)
            if self.head_dim % 4 or self.head_dim < need:
                problems.append(f"rope needs head_dim a multiple of 4 and >= {need} (8 pairs go to the text axis with "
                                f"text), got {self.head_dim}")
        if self.soft_clip < 0:
            problems.append(f"soft_clip must be >= 0, got {self.soft_clip}")
        if problems:
            raise ConfigError(problems)

    @property
    def num_blocks(self) -> int:
        return len(self.layers_per_block)

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size**2

    def block_config(self, i: int) -> TarFlowConfig:
        """TarFlow's config for block i (deep block = the last): its layer count, and the classes only where
        the block is conditioned."""
        deep = i == self.num_blocks - 1
        return TarFlowConfig(img_size=self.img_size, channels=self.channels, patch_size=self.patch_size,
                             num_blocks=self.num_blocks, layers_per_block=self.layers_per_block[i],
                             channels_model=self.channels_model, head_dim=self.head_dim,
                             num_classes=self.num_classes if (deep or not self.cond_top_only) else 0,
                             expansion=self.expansion, dropout=self.dropout, nvp=self.nvp)

    def switches(self, i: int) -> BlockSwitches:
        deep = i == self.num_blocks - 1
        return BlockSwitches(sos=self.sos, softplus=self.softplus, soft_clip=self.soft_clip,
                             final_norm=self.final_norm, rope=self.rope, rope_text=bool(self.txt_dim),
                             txt_dim=self.txt_dim if (deep or not self.cond_top_only) else 0)

    def flipped(self, i: int) -> bool:
        """R2L: block i flipped iff i is odd (TarFlow); L2R: iff i is even (official `permutations[(i+1) % 2]`)."""
        return (i % 2 == 1) if self.seq_order == "R2L" else (i % 2 == 0)

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> StarFlowConfig:
        return model_config_from_dict(cls, d, MODEL_TYPE, "STARFlow")


class StarFlow(nn.Module):
    """Shallow blocks then the deep block on patch tokens of latents (B, C, H, W); N(0, I) prior."""

    def __init__(self, config: StarFlowConfig):
        super().__init__()
        self.config = c = config
        self.blocks = nn.ModuleList(MetaBlock(c.block_config(i), c.flipped(i), c.switches(i))
                                    for i in range(c.num_blocks))

    @property
    def deep(self) -> MetaBlock:
        return self.blocks[-1]

    def _conditioned(self, i: int) -> bool:
        return i == len(self.blocks) - 1 or not self.config.cond_top_only

    # -- shapes (as TarFlow: row-major patches, features ordered (c, i, j)) -------------------------------------
    def patchify(self, x):
        return F.unfold(x, self.config.patch_size, stride=self.config.patch_size).transpose(1, 2)  # (B, T, D)

    def unpatchify(self, x):
        s, p = self.config.img_size, self.config.patch_size
        return F.fold(x.transpose(1, 2), (s, s), p, stride=p)  # (B, C, H, W)

    # -- density -------------------------------------------------------------------------------------------------
    def forward(self, x, y=None, txt=None, return_intermediates: bool = False):
        """x (B, C, H, W) -> z (B, C, H, W), logdet (B,) summed over all dims and blocks; with
        `return_intermediates` also the list of the shallow blocks' outputs (B, T, D) (the official training
        regularises their mean square, `--latent_norm_regularization`)."""
        h = self.patchify(x)  # (B, T, D)
        logdet = torch.zeros(x.shape[0], device=x.device)  # (B,)
        inter = []
        for i, block in enumerate(self.blocks):
            cond = self._conditioned(i)
            h, ld = block(h, y if cond else None, txt if cond else None)  # (B, T, D), (B,)
            logdet = logdet + ld
            if i < len(self.blocks) - 1:
                inter.append(h)
        z = self.unpatchify(h)
        return (z, logdet, inter) if return_intermediates else (z, logdet)

    def log_prob(self, x, y=None, txt=None):
        """Exact log p(x) in nats per sample (B,) under the N(0, I) prior."""
        z, logdet = self(x, y, txt)
        n = z[0].numel()
        return -0.5 * z.pow(2).flatten(1).sum(1) - 0.5 * n * math.log(2 * math.pi) + logdet

    # -- sampling ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reverse(self, z, y=None, *, txt=None, txt_null=None, guidance: float = 0.0,
                guidance_kind: str = "starflow", guide_what: str = "ab", attn_temp: float = 1.0,
                annealed_guidance: bool = False, use_cache: bool = True):
        """Invert the flow: z (B, C, H, W) -> x. The deep block runs first, conditioned and guided (official
        `Model.reverse`: `reverse_deep`, then `reverse_shallow` with guidance 0 when `cond_top_only`); then the
        shallow blocks from the deep side to the data side. `txt_null` are the states of the empty caption
        (the unconditional branch of text guidance); class models use the null label."""
        if guidance_kind not in ("starflow", "tarflow"):
            raise ConfigError(f"guidance_kind must be starflow or tarflow, got {guidance_kind!r}")
        h = self.patchify(z)  # (B, T, D)
        for i in reversed(range(len(self.blocks))):
            cond = self._conditioned(i)
            g = guidance if cond else 0.0  # unconditional shallow blocks are never guided
            h = self.blocks[i].reverse(h, y if cond else None, g, guide_what, attn_temp, annealed_guidance,
                                       use_cache, txt=txt if cond else None, txt_null=txt_null if cond else None,
                                       guidance_kind=guidance_kind)  # (B, T, D)
        return self.unpatchify(h)  # (B, C, H, W)

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def save_pretrained(self, folder):
        from genkit.runtime.checkpoint import save_model_folder

        return save_model_folder(folder, {k: v.detach().cpu() for k, v in self.state_dict().items()},
                                 self.config.to_dict())

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> StarFlow:
        from genkit.runtime.files import load_safetensors

        folder = Path(folder)
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder} is not a STARFlow folder: missing {', '.join(missing)}")
        model = cls(StarFlowConfig.from_dict(json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_safetensors(folder / "model.safetensors", device=str(device)))
        return model.to(device)


def uniform_config(**kw) -> StarFlowConfig:
    """A STARFlow with every STARFlow switch off (TarFlow's block, order and conditioning)."""
    base = dict(sos=False, softplus=False, soft_clip=0.0, final_norm=False, rope=False, cond_top_only=False,
                seq_order="R2L")
    return StarFlowConfig(**{**base, **kw})

