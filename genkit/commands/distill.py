"""``genkit distill``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.distill.train import DistillRecipe


def distill(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/distill"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Distill a diffusion teacher into a one-step generator: SiD (arXiv 2404.04057), SiDA (2410.14919) or
    SiD-LSG (2406.01561).

    The teacher is a genkit train-diffusion run folder, an analytic mixture .yaml or a diffusers UNet folder.
    Writes config.yaml, log.jsonl, checkpoints/ (G, f_psi and both optimisers), model/ (the EMA generator:
    config.json + model.safetensors, load with genkit.distill.load_generator), samples.png and metrics.json
    (fd/accuracy/label entropy, or exact mixture metrics) to --out. Rerunning the same command continues from
    the newest complete checkpoint (runtime.resume=auto).

    Example: genkit distill recipes/distill/sid-ring2d.yaml method=sid sid.alpha=1.0 --out runs/sid-ring
    """
    cfg = load_recipe(DistillRecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.distill.train import distill as run

    m = run(cfg, out, quiet=quiet)
    keys = ("sliced_w2", "mode_tv", "log_density")
    for k, v in m.items():
        if (k.startswith(("fd-", "acc-", "label_entropy-")) or k in keys) and isinstance(v, float):
            typer.echo(f"{k}: {v:.4f}")
    if "samples_png" in m:
        typer.echo(f"samples: {m['samples_png']}")
    typer.echo(f"generator: {Path(out) / 'model'}")


distill.__doc__ += "\n\n" + keys_epilog(DistillRecipe)
