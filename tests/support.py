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


def kill_at_checkpoint(args, out: Path, step: int, timeout: float = 300) -> int:
    """Start ``genkit *args --out out -q``, SIGKILL it as soon as checkpoint `step` is complete, and return the
    newest complete checkpoint's step (the run must not have finished: no ``out/model``)."""
    import signal
    import time

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GENKIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "genkit", *map(str, args), "--out", str(out), "-q"], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = out / "checkpoints" / f"step-{step:08d}" / "meta.json"
    t0 = time.time()
    while not target.exists():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() - t0 < timeout
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model").exists(), "killed too late: the run had finished"
    done = sorted(p.name for p in (out / "checkpoints").iterdir() if not p.name.startswith("."))
    return int(done[-1].split("-")[1])
