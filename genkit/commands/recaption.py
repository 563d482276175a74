"""``genkit recaption``."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, QUIET_HELP, dry_run, keys_epilog, load_recipe
from genkit.recaption.pipeline import RecaptionConfig


def recaption(
    shards: str = typer.Argument(..., help="webdataset shards: 'data/part-{000000..000127}.tar', a glob, a folder "
                                 "of .tar files, 'https://host/part-{000000..000127}.tar', 'pipe:COMMAND' (e.g. "
                                 "'pipe:aws s3 cp s3://b/part-000000.tar -'), or s3:// gs:// hf:// URLs through "
                                 "fsspec (pip install 'genkit[remote]'); '::' joins several",
                                 show_default=False, metavar="SHARDS"),
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False,
                                               metavar="[RECIPE.yaml] [KEY=VALUE]..."),
    model: Path = typer.Option(..., "--model", "-m", help="local folder of a vision-language model "
                               "(transformers image-text-to-text, e.g. a LLaVA checkpoint); never downloads"),
    out: Path = typer.Option(..., "--out", "-o", help="local or mounted output folder: NAME.parquet + "
                             "NAME.done.json per shard (NAME.failed.json for a shard whose stream failed after the "
                             "retries), config.yaml, log.jsonl, metrics.json"),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="re-caption only the samples whose status "
                                      "is 'error' in shards already done"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="allow the model folder's own "
                                           "Python code to run (only for folders you trust)"),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help=QUIET_HELP),
):
    """Rewrite the captions of webdataset shards with a vision-language model (Recap-DataComp-1B recipe).

    Streams every image through the model (greedy, paper prompt, 128 new tokens by default) and writes,
    per input shard, NAME.parquet (key, re_caption, org_caption, sha256, status, error) and then
    NAME.done.json. Rerunning the same command skips finished shards; bad samples are recorded with
    status 'error' and a reason. Remote shards (http(s)://, pipe:, fsspec URLs) are streamed; a shard
    whose stream fails is re-read from its start ('retries', 'retry_backoff', 'stall_timeout'), without
    captioning any sample twice. Runs unchanged under `accelerate launch --num_processes N -m genkit`.

    Example: genkit recaption 'data/part-{000000..000127}.tar' --model models/llava-1.5-7b-hf --out recap
    """
    cfg = load_recipe(RecaptionConfig, args)
    if dry_run_:
        dry_run(cfg)
        return
    from genkit.recaption.pipeline import recaption as run

    m = run(cfg, shards, model, out, retry_failed=retry_failed, trust_remote_code=trust_remote_code, quiet=quiet)
    if "shards_total" in m:  # the process that wrote metrics.json
        failed = (f", {m['shards_failed_total']} failed after {cfg.retries} retries (reasons in NAME.failed.json; "
                  "rerun the same command to retry them)") if m["shards_failed_total"] else ""
        typer.echo(f"captioned {m['samples_ok']} images ({m['samples_failed']} failed) in {m['wall_seconds']:.1f}s, "
                   f"{m['images_per_second']:.2f} images/s; {m['shards_complete']}/{m['shards_total']} shards done"
                   f"{failed}")
        typer.echo(f"output folder: {out}")


recaption.__doc__ += "\n\n" + keys_epilog(RecaptionConfig)
