"""Helpers shared by the command modules: recipe loading, --dry-run, help epilogues."""

from __future__ import annotations

from pathlib import Path

import typer

from genkit import config as C

ARGS_HELP = "A recipe YAML (optional) followed by key=value overrides with dotted keys, e.g. train.lr=3e-4."
OUT_HELP = "Output run folder (config.yaml, log.jsonl, metrics.json, checkpoints, samples.png)."
DRY_HELP = "Print the fully resolved config and exit."
QUIET_HELP = "No progress bar."


def load_recipe(cls, args: list[str] | None):
    recipe, overrides = C.split_args(args)
    return C.load(cls, recipe, overrides)


def dry_run(cfg) -> None:
    typer.echo(C.dump(cfg), nl=False)


def keys_epilog(cls) -> str:
    """A ``--help`` epilogue listing every recipe key with its default and meaning."""
    rows = C.describe(cls)
    width = max(len(k) for k, _, _ in rows)
    lines = ["Recipe keys (set in the YAML or as key=value):", ""]
    lines += [f"  {k.ljust(width)}  {h} (default: {d})" for k, d, h in rows]
    return "\n\n".join(["\n".join(lines[:2])] + ["\b\n" + "\n".join(lines[2:])])


def default_out(command: str) -> Path:
    return Path("runs") / command
