"""``genkit train-dllm``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, OUT_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.dllm.train import DLLMRecipe


def train_dllm(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    out: Path = typer.Option(Path("runs/train-dllm"), "--out", "-o", help=OUT_HELP),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Train a tiny LLaDA-style masked diffusion LM with LLaDA's SFT loss on {prompt, answer} pairs.

    The data is a built-in task (sudoku, sudoku-pack, add, long-add, reasoning-gym tasks), generated into
    --out/data/{train,test}.jsonl, or a JSONL of your own. Writes config.yaml, log.jsonl, checkpoints/,
    model/ (config.json + model.safetensors + tokenizer.json + genkit.json, loadable by
    LLaDAModel.from_pretrained and by `genkit decode --model`) and metrics.json (with test accuracy).

    Example: genkit train-dllm recipes/train-dllm/sudoku-pack.yaml train.steps=200 --out runs/sudoku-pack
    """
    cfg = load_recipe(DLLMRecipe, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.dllm.train import train_dllm as run

    m = run(cfg, out, quiet=quiet)
    if m.get("test_accuracy") is not None:
        typer.echo(f"test accuracy: {m['test_accuracy']:.4f} over {m['test_n']} rows ({m['test_decoder']}, "
                   f"mean passes {m['test_mean_nfe']:.1f})")
    typer.echo(f"model: {out / 'model'}   run folder: {out}")


train_dllm.__doc__ += "\n\n" + keys_epilog(DLLMRecipe)
