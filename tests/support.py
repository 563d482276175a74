"""Shared test helpers (importable from any test folder: pytest's ``pythonpath`` includes tests/)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def run_genkit(*args, env=None, timeout=600, check=True):
    """Run ``python -m genkit ...`` in a subprocess from the repo root; returns CompletedProcess."""
    e = dict(os.environ)
    e.pop("GENKIT_DEBUG", None)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "genkit", *map(str, args)], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"genkit {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p
