"""The top-level command line: version, bare invocation, and bad usage as one message (no traceback)."""

from support import run_genkit

import genkit


def test_version_prints_and_exits_zero():
    p = run_genkit("--version")
    assert p.stdout.strip() == f"genkit {genkit.__version__}"


def test_bare_genkit_lists_the_commands():
    p = run_genkit(check=False)
    assert p.returncode == 2  # click's no_args_is_help: the help, as a usage error
    assert "train-flow" in p.stdout + p.stderr and "Traceback" not in p.stderr


def test_unknown_option_is_a_usage_error_not_a_traceback():
    p = run_genkit("sample", "--no-such-option", check=False)
    assert p.returncode == 2
    assert "No such option: --no-such-option" in p.stderr
    assert "Traceback" not in p.stderr
