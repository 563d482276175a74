"""Feature networks for offline image metrics.

No Inception weights exist offline, so genkit ships one small classifier per built-in image source
(``genkit/assets/classifier-<name>.safetensors``, trained by ``benchmarks/train_classifiers.py``) and
computes Frechet distance, KID and precision/recall on its penultimate features.  The scores carry the
source's name (``fd-digits``, ``fd-mnist``, ``fd-fmnist``) and are **not** comparable with published
Inception FIDs; with ``--inception-weights PATH`` genkit computes the real FID/KID through torch-fidelity's
TF-compatible InceptionV3 and the user's local weights file (:func:`inception_features`).

Classifier: ``len(widths)`` stages of (3x3 conv, SiLU, 3x3 conv, SiLU, 2x2 average pool), an adaptive
average pool to 2x2, a linear layer to ``feature_dim`` with SiLU (the penultimate *features*), and a linear
classifier head.  Input: images in [-1, 1], (N, C, H, W) at the source's resolution.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkit.errors import ConfigError

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# image source -> short name used in metric names (fd-<short>) and asset files (classifier-<short>)
SHORT_NAMES = {"digits": "digits", "mnist5k": "mnist", "fashion-mnist": "fmnist"}


@dataclass
class ClassifierConfig:
    img_size: int = 28  # square image side
    channels: int = 1  # image channels
    widths: tuple[int, ...] = (16, 32, 64)  # conv channels per stage (each stage halves the side)
    feature_dim: int = 128  # penultimate feature dimension (the metric space)
    num_classes: int = 10
    source: str = ""  # the image source it was trained on

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)

    def to_dict(self) -> dict:
        return {"model_type": "genkit-classifier", **asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


class Classifier(nn.Module):
    """Small CNN classifier; :meth:`features` gives the (N, feature_dim) penultimate activations."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = c = config
        layers, cin = [], c.channels
        for w in c.widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1), nn.SiLU(), nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
                       nn.AvgPool2d(2)]
            cin = w
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Linear(cin * 4, c.feature_dim)
        self.head = nn.Linear(c.feature_dim, c.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)  # (N, W, H / 2^S, W / 2^S)
        h = F.adaptive_avg_pool2d(h, 2).flatten(1)  # (N, 4 W)
        return F.silu(self.fc(h))  # (N, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (N, num_classes) logits


def asset_path(source: str) -> Path:
    return ASSETS / f"classifier-{SHORT_NAMES.get(source, source)}.safetensors"


def has_classifier(source: str) -> bool:
    return source in SHORT_NAMES and asset_path(source).is_file()


def metric_name(metric: str, source: str) -> str:
    """``fd`` + ``fashion-mnist`` -> ``fd-fmnist``."""
    return f"{metric}-{SHORT_NAMES[source]}"


def save_classifier(model: Classifier, path: str | Path, metrics: dict | None = None) -> Path:
    """Weights as float16 safetensors (a few hundred KB) with the config and test figures in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"config": json.dumps(model.config.to_dict()), "metrics": json.dumps(metrics or {})}
    save_file(sd, str(path), metadata=meta)
    return path


_CACHE: dict[str, Classifier] = {}


def load_classifier(source: str) -> Classifier:
    """The shipped classifier of a built-in source (float32, eval mode), cached per process."""
    if source not in SHORT_NAMES:
        raise ConfigError(f"no shipped feature classifier for '{source}': use one of {', '.join(SHORT_NAMES)} "
                          "(or --inception-weights PATH for Inception features)")
    if source in _CACHE:
        return _CACHE[source]
    path = asset_path(source)
    if not path.is_file():
        raise ConfigError(f"the classifier weights {path} are missing: run python benchmarks/train_classifiers.py")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    model = Classifier(ClassifierConfig.from_dict(json.loads(meta["config"])))
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.eval().requires_grad_(False)
    _CACHE[source] = model
    return model


def classifier_info(source: str) -> dict:
    """The figures stored with a shipped classifier (test accuracy, ...)."""
    from safetensors import safe_open

    with safe_open(str(asset_path(source)), "pt") as f:
        return json.loads((f.metadata() or {}).get("metrics", "{}"))


@torch.no_grad()
def classifier_outputs(model: Classifier, images: torch.Tensor, batch_size: int = 1000) -> tuple[torch.Tensor,
                                                                                                torch.Tensor]:
    """(features (N, D) float64, logits (N, K) float32) of images in [-1, 1]."""
    c = model.config
    if tuple(images.shape[1:]) != (c.channels, c.img_size, c.img_size):
        raise ConfigError(f"images have shape {tuple(images.shape[1:])} but the '{c.source}' classifier expects "
                          f"{(c.channels, c.img_size, c.img_size)}")
    feats, logits = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(images[i : i + batch_size].float())
        feats.append(f.double())
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


# ---------------------------------------------------------------------------------------------- Inception
def load_inception(weights: str | Path):
    """torch-fidelity's TF-compatible InceptionV3 (2048-d pool features) from a local weights file; never
    downloads.  torchmetrics' ``NoTrainInceptionV3`` (the same network) is the fallback."""
    p = Path(weights)
    if not p.is_file():
        raise ConfigError(f"--inception-weights: '{p}' does not exist (give the local .pth of the TF-ported "
                          "InceptionV3, e.g. weights-inception-2015-12-05-6726825d.pth)")
    errors = []
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        return FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(p))
    except ImportError as e:
        errors.append(f"torch-fidelity: {e}")
    except Exception as e:  # noqa: BLE001 - a broken install (e.g. torchvision) or a bad weights file
        raise ConfigError(f"--inception-weights: torch-fidelity could not load '{p}': {type(e).__name__}: {e}") \
            from None
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(p))
    except ImportError as e:
        errors.append(f"torchmetrics: {e}")
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"--inception-weights: torchmetrics could not load '{p}': {type(e).__name__}: {e}") \
            from None
    raise ConfigError("--inception-weights needs torch-fidelity (pip install torch-fidelity) or torchmetrics with "
                      "torch-fidelity; neither imports here (" + "; ".join(errors) + ")")


@torch.no_grad()
def inception_features(model, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """(N, 2048) float64 Inception features of images in [-1, 1]: quantised to uint8 RGB (grey repeated),
    resized inside the extractor to 299x299 with TF1-compatible bilinear interpolation."""
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].float()
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        out.append(model(x)[0].double())
    return torch.cat(out)
