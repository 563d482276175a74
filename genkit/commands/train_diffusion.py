"""``genkit train-diffusion``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.diffusion.train import DiffusionRecipe


def train_diffusion(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/train-diffusion"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train an EDM diffusion teacher (Karras et al. 2022, arXiv 2206.00364) on images.

    Writes config.yaml, log.jsonl, checkpoints/, model/ (the EMA teacher: config.json + model.safetensors,
    loadable as a denoiser with genkit.diffusion.io.load_edm_teacher), samples.png, samples.npz and
    metrics.json (with fd-<source> of the final sampler and of 1-step Euler) to --out. Rerunning the same
    command continues from the newest complete checkpoint (runtime.resume=auto).

    Example: genkit train-diffusion recipes/train-diffusion/edm-digits.yaml --out runs/edm-digits
    """
    cfg = load_recipe(DiffusionRecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.diffusion.train import train_diffusion as run

    m = run(cfg, out, quiet=quiet)
    for k, v in m.items():
        if k.startswith(("fd-", "acc-")):
            typer.echo(f"{k}: {v:.4f}")
    if "samples_png" in m:
        typer.echo(f"samples: {m['samples_png']}")
    typer.echo(f"run folder: {out}")


train_diffusion.__doc__ += "\n\n" + keys_epilog(DiffusionRecipe)
