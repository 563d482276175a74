"""``genkit train-ae``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.ae.train import AERecipe
from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe


def train_ae(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/train-ae"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train the autoencoder of a latent flow (STARFlow, arXiv 2506.06276) as a diffusers AutoencoderKL folder.

    mode=scratch trains a small KL autoencoder from nothing (CPU-scale work, no pretrained VAE offline);
    mode=finetune-decoder ae=DIR freezes the encoder of DIR and fine-tunes its decoder on latents plus
    N(0, 0.3^2) noise with the official loss (L2 + perceptual + 0.1 hinge GAN). Offline the perceptual terms
    use genkit's shipped classifier of the data source (loss.perceptual=classifier); LPIPS weights are taken
    by folder (loss.perceptual=lpips:DIR with vgg16.safetensors + lpips_vgg.safetensors).

    Writes config.yaml, log.jsonl, checkpoints/, ae/ (config.json + diffusion_pytorch_model.safetensors, with
    the latent scaling_factor), recon.png and metrics.json (test PSNR) to --out; reruns resume.

    Example: genkit train-ae recipes/train-ae/ae-mnist5k.yaml --out runs/ae-mnist5k
    """
    cfg = load_recipe(AERecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.ae.train import train_ae as run

    m = run(cfg, out, quiet=quiet)
    if "test_psnr" in m:
        typer.echo(f"test PSNR: {m['test_psnr']:.2f} dB   (latents + noise: {m['test_psnr_noisy']:.2f} dB)")
    typer.echo(f"autoencoder: {out / 'ae'}   scaling_factor {m.get('scaling_factor', float('nan')):.4g}")


train_ae.__doc__ += "\n\n" + keys_epilog(AERecipe)
