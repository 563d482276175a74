"""``genkit train-flow``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.flows.train import FlowRecipe


def train_flow(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/train-flow"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train a Transformer autoregressive normalizing flow on images: TarFlow (arXiv 2412.06329) on pixels, or
    STARFlow (model=starflow, arXiv 2506.06276): deep-shallow blocks (arch.layers_per_block=[1,1,1,5]), in the
    latent space of a diffusers AutoencoderKL folder (latent.ae=DIR), conditioned on class labels or on caption
    states of a text encoder (text.encoder=minilm or a folder), with STARFlow guidance at sampling.

    Writes config.yaml, log.jsonl, checkpoints/, model/ (config.json + model.safetensors + data.json),
    samples.png and metrics.json (test bits/dim, or test NLL in nats/dim for latent flows) to --out.
    Rerunning the same command continues from the newest complete checkpoint (runtime.resume=auto).

    Example: genkit train-flow recipes/train-flow/tarflow-digits.yaml train.steps=500 --out runs/digits

    Example: genkit train-flow recipes/train-flow/starflow-mnist5k.yaml latent.ae=runs/ae-mnist5k/ae --out runs/sf
    """
    cfg = load_recipe(FlowRecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.flows.train import train_flow as run

    m = run(cfg, out, quiet=quiet)
    if "test_bpd" in m:
        typer.echo(f"test bits/dim: {m['test_bpd']:.4f}   (train {m.get('train_bpd_eval', float('nan')):.4f})")
    if "test_nll" in m:
        typer.echo(f"test NLL: {m['test_nll']:.4f} nats/dim of noisy latents   "
                   f"(train {m.get('train_nll_eval', float('nan')):.4f})")
    if "samples_png" in m:
        typer.echo(f"samples: {m['samples_png']}")
    typer.echo(f"run folder: {out}")


train_flow.__doc__ += "\n\n" + keys_epilog(FlowRecipe)
