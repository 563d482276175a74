"""The runtime end to end on TarFlow: run folder, exact resume after SIGKILL, 2 processes = 1 process,
non-finite loss, checkpoint atomicity and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support import REPO, kill_at_checkpoint, run_genkit

# dropout off: its masks come from each rank's own RNG stream (seed + rank), so only a dropout-free model can
# match one process bit for bit; everything else (rows, dequantization noise, label drops) is rank-independent
TINY = ["recipes/train-flow/tarflow-digits.yaml", "arch.width=32", "arch.num_blocks=2", "arch.layers_per_block=1",
        "arch.dropout=0",
        "train.batch_size=32", "train.warmup_steps=2", "eval.samples=0", "eval.test_bpd=false", "runtime.log_every=1"]


def weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_run_folder_contents(tmp_path):
    out = tmp_path / "run"
    p = run_genkit("train-flow", *TINY, "train.steps=6", "runtime.checkpoint_every=3", "eval.samples=4",
                   "eval.test_bpd=true", "--out", out, "-q")
    assert "test bits/dim" in p.stdout
    for f in ("config.yaml", "log.jsonl", "metrics.json", "samples.png", "model/config.json",
              "model/model.safetensors", "checkpoints/step-00000006/meta.json"):
        assert (out / f).is_file(), f
    m = json.loads((out / "metrics.json").read_text())
    assert m["seed"] == 0 and "torch" in m["versions"] and m["test_bpd"] > 0
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 6
    # sampling and bpd evaluation from the run folder
    run_genkit("sample", "--ckpt", out, "--n", "8", "--out", tmp_path / "s", "-q")
    assert (tmp_path / "s" / "samples.png").is_file() and (tmp_path / "s" / "samples.npz").is_file()
    e = run_genkit("eval", "bpd", "--ckpt", out, "--data", "digits", "--split", "test")
    assert abs(json.loads(e.stdout)["value"] - m["test_bpd"]) < 1e-6


def test_resume_after_sigkill_matches_uninterrupted(tmp_path):
    args = [*TINY, "arch.width=64", "train.steps=120", "runtime.checkpoint_every=10", "runtime.keep_last=2"]
    ref = tmp_path / "ref"
    run_genkit("train-flow", *args, "--out", ref, "-q")

    out = tmp_path / "killed"
    killed_at = kill_at_checkpoint(["train-flow", *args], out, 30)
    assert 30 <= killed_at < 120

    run_genkit("train-flow", *args, "--out", out, "-q")  # the same command again: runtime.resume=auto
    recs = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    firsts = [r["step"] for r in recs if r.get("event") == "first_batch"]
    assert firsts == [0, killed_at], "the second run must continue from the newest complete checkpoint"
    assert max_diff(weights(ref), weights(out)) < 1e-6


LAUNCHERS = {
    # accelerate 1.x: `launch --cpu --num_processes N` starts ONE process (simple launcher); on a GPU-less
    # machine `--multi_gpu` goes through torchrun and genkit's runtime then runs MULTI_CPU over gloo.
    "accelerate": [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu",
                   "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                   "no", "-m", "genkit"],
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "genkit"],
}


@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_processes_equal_one_with_same_global_batch(tmp_path, launcher):
    args = [*TINY, "train.steps=4", "train.batch_size=16", "runtime.checkpoint_every=0"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_genkit("train-flow", *args, "--out", one, "-q")
    # the torchrun case also feeds TensorBoard: trackers run on rank 0 only, and must not break the
    # processes' last synchronisation (Accelerator.end_training would destroy the process group)
    tracker = ["runtime.log_with=tensorboard"] if launcher == "torchrun" else []
    cmd = [*LAUNCHERS[launcher], "train-flow", *args, *tracker, "--out", str(two), "-q"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    if tracker:
        assert len(list((two / "tracking" / "genkit").glob("events.out.tfevents.*"))) == 1
    m = json.loads((two / "metrics.json").read_text())
    assert m["world_size"] == 2
    first = [json.loads(l) for l in (two / "log.jsonl").read_text().splitlines()][0]
    r0, r1 = first["rows_by_rank"]
    assert len(r0) == len(r1) == 8 and not set(r0) & set(r1), "each rank must see different rows"
    one_first = [json.loads(l) for l in (one / "log.jsonl").read_text().splitlines()][0]
    assert one_first["rows_by_rank"][0] == r0 + r1, "together the ranks see the 1-process global batch"
    assert max_diff(weights(one), weights(two)) < 1e-4


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    from genkit import config as C
    from genkit.errors import RunError
    from genkit.flows import train as T

    real_build = T.build_flow

    def poisoned(*a, **k):
        model = real_build(*a, **k)
        fwd, calls = model.forward, {"n": 0}

        def forward(x, y=None):
            calls["n"] += 1
            z, logdet = fwd(x, y)
            return (z * float("nan"), logdet) if calls["n"] > 7 else (z, logdet)

        model.forward = forward
        return model

    monkeypatch.setattr(T, "build_flow", poisoned)
    cfg = C.load(T.FlowRecipe, REPO / TINY[0], TINY[1:] + ["train.steps=20", "runtime.checkpoint_every=3"])
    out = tmp_path / "nan"
    with pytest.raises(RunError, match="non-finite loss at step 7.*step-00000006"):
        T.train_flow(cfg, out, quiet=True)
    good = load_file(str(out / "checkpoints" / "step-00000006" / "model" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in good.values())
    assert not (out / "model").exists()


def test_partial_checkpoint_is_ignored(tmp_path):
    from genkit.runtime import find_latest_checkpoint

    ck = tmp_path / "checkpoints"
    (ck / "step-00000005").mkdir(parents=True)
    (ck / "step-00000005" / "meta.json").write_text("{}")
    (ck / ".step-00000010.tmp").mkdir()  # killed mid-save
    (ck / "step-00000020").mkdir()  # no meta.json: incomplete
    assert find_latest_checkpoint(tmp_path).name == "step-00000005"


def test_cli_errors_are_one_line(tmp_path):
    p = run_genkit("train-flow", "recipes/train-flow/tarflow-digits.yaml", "train.lr=fast", "arch.depth=3",
                   "runtime.mixed_precision=fp8", "--dry-run", check=False)
    assert p.returncode == 2
    assert "3 problems" in p.stderr and "train.lr" in p.stderr and "arch.depth" in p.stderr
    assert "runtime.mixed_precision" in p.stderr and "Traceback" not in p.stderr
    p = run_genkit("sample", "--ckpt", tmp_path / "nothing", check=False)
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
    p = run_genkit("sample", "--ckpt", tmp_path / "nothing", env={"GENKIT_DEBUG": "1"}, check=False)
    assert "Traceback" in p.stderr
    p = run_genkit("train-flow", "recipes/train-flow/tarflow-digits.yaml", "data.source=cifar", "train.steps=1",
                   "--out", tmp_path / "x", check=False)
    assert p.returncode == 2 and "unknown image source 'cifar'" in p.stderr


def test_dry_run_prints_resolved_config():
    p = run_genkit("train-flow", "recipes/train-flow/tarflow-digits.yaml", "train.lr=0.002", "--dry-run")
    assert "lr: 0.002" in p.stdout and "mixed_precision: 'no'" in p.stdout


def test_help_lists_working_commands():
    p = run_genkit("--help")
    for c in ("train-flow", "sample", "eval"):
        assert c in p.stdout
