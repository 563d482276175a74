"""``genkit sample``: draw samples from a trained model and save a grid, the arrays and metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, dry_run, keys_epilog, load_recipe
from genkit.config import field


@dataclass
class FlowSampleConfig:
    cfg: float = field(0.0, help="guidance weight: classifier-free for class-conditional flows, "
                       "attention-temperature guidance for unconditional ones (0 = none)")
    denoise: bool = field(False, help="apply the score-based denoising step x + sigma^2 grad log p(x)")
    sigma: float = field(0.0, help="noise level for denoise (0 = the training noise of the run)", min=0.0)
    temperature: float = field(1.0, help="prior temperature: z ~ N(0, T^2 I)", min=0.0)
    seed: int = field(0, help="sampling seed")
    batch_size: int = field(256, help="samples per reverse pass", min=1)


def sample(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    ckpt: Path = typer.Option(..., "--ckpt", help="a run folder, checkpoint folder or model folder of a flow"),
    n: int = typer.Option(64, "--n", min=1, help="number of samples"),
    out: Path = typer.Option(Path("runs/samples"), "--out", "-o", help="output folder"),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
):
    """Sample a trained TarFlow: reverse pass with a KV cache, optional guidance and denoising.

    Writes samples.png (grid), samples.npz (images in [-1,1] and labels) and metrics.json to --out.

    Example: genkit sample --ckpt runs/digits --n 64 cfg=1.5 denoise=true --out runs/digits/samples
    """
    cfg = load_recipe(FlowSampleConfig, args)
    if dry_run_:
        dry_run(cfg)
        return
    import torch

    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.flows.io import load_flow
    from genkit.flows.tarflow import denoise
    from genkit.flows.train import sample_flow
    from genkit.runtime import Progress, atomic_write_json, software_versions

    model, info = load_flow(ckpt)
    t0 = time.time()
    xs, ys = [], []
    nc = model.config.num_classes
    with Progress(math.ceil(n / cfg.batch_size), description="sample", enabled=not quiet, unit="batch") as bar:
        for i in range(0, n, cfg.batch_size):
            m = min(cfg.batch_size, n - i)
            labels = (torch.arange(i, i + m) % nc) if nc else None
            x = sample_flow(model, m, seed=cfg.seed + i, guidance=cfg.cfg, labels=labels,
                            temperature=cfg.temperature)
            if cfg.denoise:
                sigma = cfg.sigma or info.get("noise_sigma", 0.0)
                if sigma <= 0:
                    raise typer.BadParameter("denoise=true needs sigma=... (the run folder does not record it)")
                x = denoise(model, x, labels, sigma).clamp(-1, 1)
            xs.append(x)
            if labels is not None:
                ys.append(labels)
            bar.update(1)
    x = torch.cat(xs)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(x, out / "samples.png")
    arrays = {"images": x}
    if ys:
        arrays["labels"] = torch.cat(ys)
    save_samples_npz(out / "samples.npz", **arrays)
    seconds = time.time() - t0
    atomic_write_json(out / "metrics.json", {"n": n, "seconds": round(seconds, 3), "samples_per_second": n / seconds,
                                             "ckpt": str(ckpt), **{k: getattr(cfg, k) for k in vars(cfg)},
                                             "versions": software_versions()})
    typer.echo(f"samples: {out / 'samples.png'}  ({n} in {seconds:.1f}s)")


sample.__doc__ += "\n\n" + keys_epilog(FlowSampleConfig)
