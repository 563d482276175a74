"""Train the small classifiers whose penultimate features define genkit's offline image metrics
(``fd-digits``, ``fd-mnist``, ``fd-fmnist``, KID, precision/recall, class accuracy) and ship them as
``genkit/assets/classifier-<name>.safetensors`` (float16, a few hundred KB each).

    python benchmarks/train_classifiers.py                       # all three sources
    python benchmarks/train_classifiers.py --sources digits --out /tmp/assets

Training: AdamW with a cosine schedule on the source's train split, inputs dequantized with uniform noise
inside each grey-level bin (so continuous-valued samples are in-distribution) and randomly shifted by up
to ``--shift`` pixels.  The test-split accuracy is printed, stored in the weights' metadata and written to
``--json`` (default benchmarks/results/classifiers.json).  Everything is seeded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit.data.images import load_images  # noqa: E402
from genkit.eval.features import ASSETS, Classifier, ClassifierConfig, SHORT_NAMES, save_classifier  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402

# source -> (architecture, epochs, batch size, peak lr, max shift in pixels)
RECIPES = {
    "digits": (dict(img_size=8, widths=(32, 64), feature_dim=128), 60, 64, 3e-3, 1),
    "mnist5k": (dict(img_size=28, widths=(16, 32, 64), feature_dim=128), 30, 64, 3e-3, 2),
    "fashion-mnist": (dict(img_size=28, widths=(16, 32, 64), feature_dim=128), 6, 128, 3e-3, 2),
}


def shift(x: torch.Tensor, max_shift: int, g: torch.Generator) -> torch.Tensor:
    """Random translation of each image by up to ``max_shift`` pixels (padding with the background -1)."""
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)  # (N, C, H + 2s, W + 2s)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            m = (dy == oy) & (dx == ox)
            out[m] = pad[m, :, oy : oy + h, ox : ox + w]
    return out


@torch.no_grad()
def accuracy(model: Classifier, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    pred = torch.cat([model(x[i : i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    return float((pred == y).float().mean())


def train_one(source: str, seed: int = 0, quiet: bool = False) -> tuple[Classifier, dict]:
    arch, epochs, bs, lr, max_shift = RECIPES[source]
    train, test = load_images(source, "train", seed=0), load_images(source, "test", seed=0)
    torch.manual_seed(seed)
    model = Classifier(ClassifierConfig(channels=train.shape[0], num_classes=train.num_classes, source=source, **arch))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    n = len(train)
    steps = epochs * math.ceil(n / bs)
    t0, step = time.time(), 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            idx = perm[i : i + bs]
            ints = train.ints[idx].float()
            x = (ints + torch.rand(ints.shape, generator=g)) / train.levels * 2 - 1  # dequantized, in [-1, 1]
            x = shift(x, max_shift, g)
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        if not quiet:
            print(f"{source} epoch {epoch + 1}/{epochs} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.eval()
    figures = {"source": source, "test_accuracy": accuracy(model, test.to_unit(), test.labels),
               "train_accuracy": accuracy(model, train.to_unit(), train.labels), "n_train": n, "n_test": len(test),
               "epochs": epochs, "params": sum(p.numel() for p in model.parameters()),
               "train_seconds": round(time.time() - t0, 1), "seed": seed}
    return model, figures


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", type=Path, default=ASSETS, help="folder for classifier-<name>.safetensors")
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "classifiers.json",
                    help="figures of every classifier (merged into an existing file)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = json.loads(args.json.read_text()) if args.json.is_file() else {}
    for source in args.sources:
        model, figures = train_one(source, args.seed)
        path = save_classifier(model, args.out / f"classifier-{SHORT_NAMES[source]}.safetensors", figures)
        figures["file"] = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
        figures["bytes"] = path.stat().st_size
        print(json.dumps(figures), flush=True)
        results[source] = figures
        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
