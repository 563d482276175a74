"""``genkit decode``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import DRY_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.dllm.decode import DecodeConfig


def decode(
    args: Optional[List[str]] = typer.Argument(
        None, show_default=False,
        help="A recipe YAML (optional) followed by key=value settings, e.g. algo=wino tau1=0.6 gen_length=256."),
    model: Path = typer.Option(..., "--model", "-m", help="model folder (config.json + *.safetensors: LLaDA, "
                               "MMaDA, Dream or DiffuCoder), or a train-dllm run folder"),
    data: Path = typer.Option(..., "--data", "-d", help="JSONL: prompt (text) or prompt_ids, optional id and "
                              "answer; GSM8K-format lines (question, answer with ####) work too"),
    out: Path = typer.Option(Path("runs/decode"), "--out", "-o", help="output folder (config.yaml, "
                             "results.jsonl, metrics.json)"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the model "
                                             "folder)"),
    trace: bool = typer.Option(False, "--trace", help="record each sample's decoding order (for `genkit eval "
                               "arness`)"),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Decode prompts with a masked diffusion LM (LLaDA, Fast-dLLM, WINO, Dream orders) and grade them.

    Writes results.jsonl line by line as samples finish (id, prompt, output_ids, output, correct, nfe,
    seconds, remasked; an error record for a bad line) and then metrics.json (accuracy, mean NFE,
    tokens/s, wall seconds, settings, seed).

    Example: genkit decode --model runs/sudoku-pack --data runs/sudoku-pack/data/test.jsonl algo=wino tau1=0.6
    tau2=0.9 --out runs/sudoku-pack/wino

    Code benchmarks: genkit decode --model /models/DiffuCoder-7B-Instruct --data HumanEvalPlus.jsonl.gz
    algo=entropy code=instruct gen_length=512 steps=512 dtype=bfloat16 (writes samples.jsonl for
    `genkit eval pass-at-k`).
    """
    from genkit import config as C
    from genkit.dllm.decode import normalise_overrides

    recipe, overrides = C.split_args(args)
    cfg = load_recipe(DecodeConfig, ([recipe] if recipe else []) + normalise_overrides(overrides))
    cfg.knobs()  # unknown knobs for this decoder: one error before anything is loaded
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.dllm.decode import run_decode

    m = run_decode(model, data, cfg, out, tokenizer=str(tokenizer) if tokenizer else None, trace=trace, quiet=quiet)
    acc = "n/a" if m["accuracy"] is None else f"{m['accuracy']:.4f} ({m['n_graded']} graded)"
    nfe = "n/a" if m["mean_nfe"] is None else f"{m['mean_nfe']:.2f}"
    typer.echo(f"{cfg.algo}: accuracy {acc}, mean NFE {nfe}, {m['tokens_per_second']} tokens/s, "
               f"{m['n_errors']} error(s), {m['wall_seconds']} s")
    typer.echo(f"results: {out / 'results.jsonl'}")


decode.__doc__ += "\n\n" + keys_epilog(DecodeConfig)
