"""Losses of ``genkit train-ae``: the official STARFlow decoder fine-tuning loss and its offline perceptual terms.

Official code: apple/ml-starflow ``misc/ae_losses.py::ReconstructionLoss_Single_Stage`` (used by
``finetune_decoder.py``), ``misc/discriminator.py::NLayerDiscriminator``. With images in [0, 1]:

    generator:      L2(x, x^) + 1.1 * (P1 + 0.1 P2) / 1.1 + 0.1 * (-mean D(x^))
    discriminator:  0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x^))) + 0.001 * LeCam

where the official P1 is LPIPS (VGG16) and P2 the MSE between ConvNeXt-S ImageNet logits, averaged with weights
1.0 and 0.1 (``PerceptualLoss("lpips-convnext_s-1.0-0.1")`` divides by 1.1) and then weighted by 1.1; so the net
perceptual term is P1 + 0.1 P2 (the issue's "1.1 (P1 + 0.1 P2)" misses the division; the code is followed).
LeCam (Tseng et al. 2021): mean(relu(mean D(x) - ema_fake)^2) + mean(relu(ema_real - mean D(x^))^2), EMAs of
the mean logits with decay 0.999.

Offline, no LPIPS or ConvNeXt weights exist, so genkit's default perceptual pair comes from the shipped
classifier of the data source (``genkit/assets/classifier-<source>.safetensors``, see genkit.eval.features):
P1 = an LPIPS-style distance on its conv stages (channel-normalised activations, squared difference summed over
channels, averaged over space, summed over stages; no learned per-channel weights), P2 = the MSE between its
logits (the role ConvNeXt's logits play). Real LPIPS/VGG16 weights are taken by folder (:class:`LPIPS`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkit.errors import ConfigError


def _normalize(f, eps: float = 1e-10):
    return f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)  # unit length over channels (LPIPS)


def _resize(x, size: int):
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class ClassifierPerceptual(nn.Module):
    """(P1, P2) on genkit's shipped classifier of ``source``: LPIPS-style stage distance and logits MSE.
    Inputs are images in [-1, 1], resized to the classifier's side (as the official code resizes to 224)."""

    def __init__(self, source: str):
        super().__init__()
        from genkit.eval.features import load_classifier

        self.net = load_classifier(source)
        self.net.requires_grad_(False)
        self.size = self.net.config.img_size
        self.channels = self.net.config.channels

    def _features(self, x):
        x = _resize(x, self.size)
        if x.shape[1] != self.channels:  # RGB <-> grey
            x = x.mean(1, keepdim=True).expand(-1, self.channels, -1, -1)
        taps = []
        for layer in self.net.conv:
            if isinstance(layer, nn.AvgPool2d):
                taps.append(x)  # the activation of the stage, before pooling (LPIPS taps pre-pool ReLUs)
            x = layer(x)
        h = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return taps, self.net.head(F.silu(self.net.fc(h)))

    def forward(self, a, b):
        self.net.eval()
        fa, la = self._features(a)
        fb, lb = self._features(b)
        p1 = sum((_normalize(u) - _normalize(v)).pow(2).sum(1).mean((1, 2)) for u, v in zip(fa, fb))  # (B,)
        p2 = (la - lb).pow(2).mean(1)  # (B,)
        return p1.mean(), p2.mean()


class LPIPS(nn.Module):
    """LPIPS with VGG16 (Zhang et al. 2018, arXiv 1801.03924; the official STARFlow ``misc/lpips.py``) from a
    local folder: ``vgg16.safetensors`` (torchvision ``features.*`` names) and ``lpips_vgg.safetensors`` (the
    ``lin0..lin4.model.1.weight`` 1x1 convolutions of richzhang/PerceptualSimilarity v0.1). Images in [-1, 1]."""

    CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
    TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16.features
    SHIFT, SCALE = (-0.030, -0.088, -0.188), (0.458, 0.448, 0.450)

    def __init__(self, folder: str | Path):
        super().__init__()
        from genkit.runtime.files import load_safetensors

        folder = Path(folder)
        layers, cin = [], 3
        for v in self.CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
                cin = v
        self.features = nn.Sequential(*layers)
        chns = (64, 128, 256, 512, 512)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in chns)
        for name in ("vgg16.safetensors", "lpips_vgg.safetensors"):
            if not (folder / name).is_file():
                raise ConfigError(f"LPIPS folder '{folder}' has no {name} (see genkit train-ae --help)")
        vgg = {k.removeprefix("features."): v for k, v in load_safetensors(folder / "vgg16.safetensors").items()
               if k.startswith("features.")}
        self.features.load_state_dict(vgg)
        lin = load_safetensors(folder / "lpips_vgg.safetensors")
        for i, conv in enumerate(self.lins):
            conv.weight.data.copy_(lin[f"lin{i}.model.1.weight"])
        self.register_buffer("shift", torch.tensor(self.SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(self.SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def _taps(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x, out = (x - self.shift) / self.scale, []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.TAPS:
                out.append(x)
        return out

    def forward(self, a, b):
        self.eval()
        d = sum(lin((_normalize(u) - _normalize(v)).pow(2)).mean((1, 2, 3))
                for lin, u, v in zip(self.lins, self._taps(a), self._taps(b)))  # (B,)
        return d.mean(), torch.zeros((), device=a.device)


class _LayerNorm2d(nn.LayerNorm):
    def forward(self, x):  # (B, C, H, W): normalise over C
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class _CNBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.layer_scale = nn.Parameter(torch.full((d, 1, 1), 1e-6))
        self.block = nn.ModuleList([nn.Conv2d(d, d, 7, padding=3, groups=d), nn.Identity(), nn.LayerNorm(d, eps=1e-6),
                                    nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)])

    def forward(self, x):
        h = self.block[0](x).permute(0, 2, 3, 1)  # (B, H, W, C)
        for layer in self.block[2:]:
            h = layer(h)
        return x + self.layer_scale * h.permute(0, 3, 1, 2)


class ConvNeXtLogits(nn.Module):
    """ConvNeXt-S (Liu et al. 2022, arXiv 2201.03545) ImageNet logits from a local folder holding
    ``convnext_small.safetensors`` with torchvision's parameter names, for the official second perceptual term:
    MSE between the logits of the two images, each resized to 224 (bilinear, antialiased) and ImageNet-normalised
    (official ``PerceptualLoss`` with ``convnext_s``). Images in [-1, 1]; returns (0, P2)."""

    DEPTHS, DIMS = (3, 3, 27, 3), (96, 192, 384, 768)

    def __init__(self, folder: str | Path | None):
        """``folder=None`` builds the architecture with random weights (tests)."""
        super().__init__()
        from genkit.runtime.files import load_safetensors

        path = None if folder is None else Path(folder) / "convnext_small.safetensors"
        if path is not None and not path.is_file():
            raise ConfigError(f"ConvNeXt folder '{folder}' has no convnext_small.safetensors (torchvision names)")
        d0 = self.DIMS[0]
        feats = [nn.Sequential(nn.Conv2d(3, d0, 4, stride=4), _LayerNorm2d(d0, eps=1e-6))]
        for i, (n, d) in enumerate(zip(self.DEPTHS, self.DIMS)):
            feats.append(nn.Sequential(*[_CNBlock(d) for _ in range(n)]))
            if i < 3:
                feats.append(nn.Sequential(_LayerNorm2d(d, eps=1e-6), nn.Conv2d(d, self.DIMS[i + 1], 2, stride=2)))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(_LayerNorm2d(self.DIMS[-1], eps=1e-6), nn.Flatten(1),
                                        nn.Linear(self.DIMS[-1], 1000))
        if path is not None:
            try:
                self.load_state_dict(load_safetensors(path))
            except RuntimeError as e:
                raise ConfigError(f"'{path}' is not a torchvision convnext_small state dict ({str(e)[:200]})") from None
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def logits(self, x):
        x = _resize((x + 1) / 2, 224)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        h = self.features((x - self.mean) / self.std)
        return self.classifier(F.adaptive_avg_pool2d(h, 1))

    def forward(self, a, b):
        self.eval()
        return torch.zeros((), device=a.device), (self.logits(a) - self.logits(b)).pow(2).mean()


class PerceptualPair(nn.Module):
    """P1 from the first network, P2 from the second (official: LPIPS and ConvNeXt-S)."""

    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, a, b):
        p1, _ = self.first(a, b)
        _, p2 = self.second(a, b)
        return p1, p2


def build_perceptual(kind: str, source: str, second: str = ""):
    """P1 network ``kind`` (``classifier``: the shipped classifier of ``source``, ``lpips:DIR``, ``none``) and P2
    network ``second`` (empty: the first one's own second term, i.e. the classifier's logits; ``convnext:DIR``;
    ``classifier``) -> a module returning (P1, P2), or None."""
    if kind == "none":
        return None

    def one(k: str, key: str):
        if k == "classifier":
            from genkit.eval.features import has_classifier

            if not has_classifier(source):
                raise ConfigError(f"{key}=classifier: no shipped classifier for source '{source}'; use "
                                  "lpips:DIR / convnext:DIR folders or none")
            return ClassifierPerceptual(source)
        if k.startswith("lpips:"):
            return LPIPS(k.split(":", 1)[1])
        if k.startswith("convnext:"):
            return ConvNeXtLogits(k.split(":", 1)[1])
        raise ConfigError(f"{key}: '{k}' is not classifier, lpips:DIR, convnext:DIR or none")

    first = one(kind, "loss.perceptual")
    return first if not second else PerceptualPair(first, one(second, "loss.perceptual2"))


# ------------------------------------------------------------------------------------------------ GAN
class _Blur(nn.Module):
    """Anti-aliased 2x downsampling with the [1,3,3,1] binomial filter and 'same' padding (official BlurBlock)."""

    def __init__(self):
        super().__init__()
        k = torch.tensor([1.0, 3.0, 3.0, 1.0])
        k = k[:, None] * k[None, :]
        self.register_buffer("kernel", (k / k.sum())[None, None])

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = (max((math.ceil(n / 2) - 1) * 2 + 4 - n, 0) for n in (h, w))
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.kernel.expand(x.shape[1], -1, -1, -1), stride=2, groups=x.shape[1])


class Discriminator(nn.Module):
    """The official ``NLayerDiscriminator`` (MaskGIT-style): 5x5 conv, ``stages`` x (3x3 conv, blur 2x down,
    GroupNorm, LeakyReLU 0.1), adaptive max-pool to ``pool`` x ``pool``, 1x1 conv, 5x5 conv to a logit map.
    Official: width 128, 3 stages, pool 16, 32 groups; genkit caps the groups at the channel count."""

    def __init__(self, channels: int = 3, width: int = 128, stages: int = 3, pool: int = 16):
        super().__init__()
        act = lambda: nn.LeakyReLU(0.1)  # noqa: E731
        self.block_in = nn.Sequential(nn.Conv2d(channels, width, 5, padding=2), act())
        blocks, cin = [], width
        for i in range(stages):
            cout = width * 2**i
            blocks += [nn.Conv2d(cin, cout, 3, padding=1), _Blur(), nn.GroupNorm(min(32, cout), cout), act()]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveMaxPool2d(pool)
        self.to_logits = nn.Sequential(nn.Conv2d(cin, cin, 1), act(), nn.Conv2d(cin, 1, 5, padding=2))

    def forward(self, x):
        return self.to_logits(self.pool(self.blocks(self.block_in(x))))  # (B, 1, pool, pool)


def hinge_d_loss(logits_real, logits_fake):
    """Hinge loss of the discriminator (taming-transformers ``hinge_d_loss``, as official)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class GANLoss(nn.Module):
    """The discriminator with the LeCam EMAs (official weight 0.001, decay 0.999); a module so that its state is
    checkpointed with the run."""

    def __init__(self, disc: Discriminator, lecam_weight: float = 1e-3, lecam_decay: float = 0.999):
        super().__init__()
        self.disc = disc
        self.lecam_weight, self.lecam_decay = lecam_weight, lecam_decay
        self.register_buffer("ema_real", torch.zeros(1))
        self.register_buffer("ema_fake", torch.zeros(1))

    def generator_loss(self, fake01):
        """-mean D(x^) with the discriminator's parameters frozen (gradients reach only x^)."""
        self.disc.requires_grad_(False)
        try:
            return -self.disc(fake01).mean()
        finally:
            self.disc.requires_grad_(True)

    def forward(self, real01, fake01):
        """Discriminator loss (hinge + LeCam) on detached images; updates the LeCam EMAs."""
        lr, lf = self.disc(real01.detach()), self.disc(fake01.detach())
        loss = hinge_d_loss(lr, lf)
        lecam = torch.zeros((), device=real01.device)
        if self.lecam_weight > 0:
            lecam = (F.relu(lr.mean() - self.ema_fake).pow(2).mean()
                     + F.relu(self.ema_real - lf.mean()).pow(2).mean()) * self.lecam_weight
            with torch.no_grad():
                self.ema_real.lerp_(lr.mean().detach().view(1), 1 - self.lecam_decay)
                self.ema_fake.lerp_(lf.mean().detach().view(1), 1 - self.lecam_decay)
        return loss + lecam, {"d_loss": float(loss.detach()), "lecam": float(lecam.detach()),
                              "logits_real": float(lr.detach().mean()),
                              "logits_fake": float(lf.detach().mean())}


class DecoderLoss(nn.Module):
    """The official generator objective: ``l2 + perceptual_weight * (P1 + w2 P2) / (1 + w2) + gan_weight *
    (-mean D(x^))`` on images in [0, 1] (``ReconstructionLoss_Single_Stage._forward_generator``)."""

    def __init__(self, perceptual=None, *, perceptual_weight: float = 1.1, second_weight: float = 0.1,
                 gan: GANLoss | None = None, gan_weight: float = 0.1):
        super().__init__()
        self.perceptual, self.gan = perceptual, gan
        self.perceptual_weight, self.second_weight, self.gan_weight = perceptual_weight, second_weight, gan_weight

    def forward(self, real01, fake01):
        l2 = F.mse_loss(fake01, real01)
        total, parts = l2, {"l2": float(l2.detach())}
        if self.perceptual is not None and self.perceptual_weight > 0:
            p1, p2 = self.perceptual(real01 * 2 - 1, fake01 * 2 - 1)
            p = (p1 + self.second_weight * p2) / (1 + self.second_weight)
            total = total + self.perceptual_weight * p
            parts.update(p1=float(p1.detach()), p2=float(p2.detach()))
        if self.gan is not None and self.gan_weight > 0:
            g = self.gan.generator_loss(fake01)
            total = total + self.gan_weight * g
            parts["g_loss"] = float(g.detach())
        return total, parts
