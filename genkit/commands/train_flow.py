"""``genkit train-flow``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit import config as C
from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog
from genkit.flows.lm_train import TarFlowLMRecipe
from genkit.flows.train import FlowRecipe, load_flow_recipe


def train_flow(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/train-flow"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train a Transformer autoregressive normalizing flow: TarFlow (arXiv 2412.06329) on images; STARFlow
    (model=starflow, arXiv 2506.06276): deep-shallow blocks (arch.layers_per_block=[1,1,1,5]), in the latent space
    of a diffusers AutoencoderKL folder (latent.ae=DIR), conditioned on class labels or on caption states of a text
    encoder (text.encoder=minilm or a folder), with STARFlow guidance at sampling; or TarFlowLM (arXiv 2507.00425,
    model=tarflowlm) on text, with same-size baselines (eval.baseline=ar,mdlm).

    Writes config.yaml, log.jsonl, checkpoints/, model/ (config.json + model.safetensors, and data.json for
    images), samples.png (images) or samples.txt (text) and metrics.json (test bits/dim, test NLL in nats/dim for
    latent flows, or bits/character) to --out. Rerunning the same command continues from the newest complete
    checkpoint (runtime.resume=auto).

    Examples: genkit train-flow recipes/train-flow/tarflow-digits.yaml train.steps=500 --out runs/digits;
    genkit train-flow recipes/train-flow/starflow-mnist5k.yaml latent.ae=runs/ae-mnist5k/ae --out runs/sf;
    genkit train-flow recipes/train-flow/tarflowlm-shakespeare.yaml eval.baseline=ar --out runs/lm
    """
    recipe, overrides = C.split_args(args)
    cfg = load_flow_recipe(recipe, overrides)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.flows.train import train_flow as run

    m = run(cfg, out, quiet=quiet)
    for name in ("test_bpc", "valid_bpc", *(f"{b}_test_bpc" for b in ("ar", "mdlm"))):
        if name in m:
            typer.echo(f"{name.replace('_', ' ')}: {m[name]:.4f}")
    if "samples_txt" in m:
        typer.echo(f"samples: {m['samples_txt']}")
    if "test_bpd" in m:
        typer.echo(f"test bits/dim: {m['test_bpd']:.4f}   (train {m.get('train_bpd_eval', float('nan')):.4f})")
    if "test_nll" in m:
        typer.echo(f"test NLL: {m['test_nll']:.4f} nats/dim of noisy latents   "
                   f"(train {m.get('train_nll_eval', float('nan')):.4f})")
    if "samples_png" in m:
        typer.echo(f"samples: {m['samples_png']}")
    typer.echo(f"run folder: {out}")


train_flow.__doc__ += "\n\n" + keys_epilog(FlowRecipe) + "\n\nWith model=tarflowlm:\n\n" + keys_epilog(TarFlowLMRecipe)
