"""The ``genkit`` command line: a thin Typer app that only wires commands.

Each command lives in ``genkit/commands/<name>.py``; this file lists them in one flat table and turns
known errors into one line (exit 2 for usage/config, 1 for a failed run).  ``GENKIT_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import os
import sys

import click
import typer

from genkit.commands import decode as decode_cmd
from genkit.commands import distill as distill_cmd
from genkit.commands import eval as eval_cmd
from genkit.commands import recaption as recaption_cmd
from genkit.commands import rl as rl_cmd
from genkit.commands import sample as sample_cmd
from genkit.commands import train_ae as train_ae_cmd
from genkit.commands import train_diffusion as train_diffusion_cmd
from genkit.commands import train_dllm as train_dllm_cmd
from genkit.commands import train_flow as train_flow_cmd
from genkit.errors import GenkitError

app = typer.Typer(
    name="genkit",
    help="genkit: train normalizing flows, sample, decode and evaluate generative models - one CLI, one runtime.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

# name -> command function (only commands that work are registered)
COMMANDS = {
    "train-flow": train_flow_cmd.train_flow,
    "train-ae": train_ae_cmd.train_ae,
    "train-diffusion": train_diffusion_cmd.train_diffusion,
    "train-dllm": train_dllm_cmd.train_dllm,
    "distill": distill_cmd.distill,
    "rl": rl_cmd.rl,
    "sample": sample_cmd.sample,
    "decode": decode_cmd.decode,
    "recaption": recaption_cmd.recaption,
}
SUBAPPS = {
    "eval": eval_cmd.app,
}

_EXTRA = {"allow_extra_args": False, "ignore_unknown_options": False}
for _name, _fn in COMMANDS.items():
    app.command(_name, context_settings=_EXTRA)(_fn)
for _name, _sub in SUBAPPS.items():
    app.add_typer(_sub, name=_name)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="print the version and exit")):
    if version:
        import genkit

        typer.echo(f"genkit {genkit.__version__}")
        raise typer.Exit()


def _cli_exceptions() -> tuple[tuple, tuple, tuple]:
    """(Exit, Abort, ClickException) classes of click and of Typer's vendored click (Typer >= 0.20 raises its
    own copies, which are not click's classes), so that bad usage is one message under either Typer."""
    exits, aborts = [click.exceptions.Exit, typer.Exit], [click.exceptions.Abort, typer.Abort]
    usage = [click.ClickException]
    try:
        from typer._click import exceptions as vendored
    except ImportError:
        vendored = None
    if vendored is not None:
        usage.append(vendored.ClickException)
    return tuple(set(exits)), tuple(set(aborts)), tuple(set(usage))


_EXIT, _ABORT, _USAGE = _cli_exceptions()


def _fail(message: str, code: int) -> int:
    hint = "" if os.environ.get("GENKIT_DEBUG") else "  (set GENKIT_DEBUG=1 for a traceback)"
    print(f"genkit: error: {message}{hint}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``genkit ...`` and ``python -m genkit ...`` (also under accelerate launch / torchrun)."""
    debug = bool(os.environ.get("GENKIT_DEBUG"))
    try:
        rv = app(args=argv, prog_name="genkit", standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except GenkitError as e:
        if debug:
            raise
        return _fail(str(e), e.exit_code)
    except _EXIT as e:
        return e.exit_code
    except _ABORT:
        return _fail("aborted", 1)
    except _USAGE as e:
        e.show()
        return e.exit_code
    except KeyboardInterrupt:
        return _fail("interrupted; completed checkpoints are kept (rerun with runtime.resume=auto)", 1)
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as e:
        if debug:
            raise
        return _fail(f"{e.strerror or e}: {e.filename}" if getattr(e, "filename", None) else str(e), 1)


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
