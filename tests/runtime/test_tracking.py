"""``runtime.log_with``: trackers through Accelerate, fed from the Runtime (no code in the training loops)."""

import json

import numpy as np
import pytest

from genkit.runtime import tracking
from support import kill_at_checkpoint, run_genkit
from test_training_runtime import TINY

pytest.importorskip("tensorboard")


def tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return ea


def test_train_flow_to_tensorboard_equals_log_jsonl_and_a_resumed_run_appends(tmp_path):
    args = ["train-flow", *TINY, "train.steps=30", "runtime.checkpoint_every=10", "eval.samples=4",
            "runtime.threads=1", "runtime.log_with=tensorboard"]
    out = tmp_path / "run"
    killed_at = kill_at_checkpoint(args, out, 10)
    assert 10 <= killed_at < 30
    run_genkit(*args, "--out", out, "-q")  # the same command again: resumes, and so does the tracker run
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    want = {r["step"]: r for r in log if "loss" in r}  # a step logged twice (before the kill, after it): the last
    assert sorted(want) == list(range(1, 31))
    folder = out / "tracking" / "genkit"
    assert len(list(folder.glob("events.out.tfevents.*"))) == 2, "one TensorBoard run, one event file per process"
    ea = tb_scalars(folder)
    for tag in ("loss", "train_bpd", "lr", "grad_norm"):
        got = {e.step: e.value for e in ea.Scalars(tag)}
        assert got == {s: float(np.float32(r[tag])) for s, r in want.items()}, tag  # TensorBoard keeps float32
    assert {e.step: e.value for e in ea.Scalars("loss")} == {s: r["loss"] for s, r in want.items()}  # exact
    m = json.loads((out / "metrics.json").read_text())
    assert ea.Scalars("final/train_bpd")[-1].value == pytest.approx(m["final_train_bpd"], rel=1e-6)
    assert [e.step for e in ea.Images("samples")] == [30]
    # the config went in once, as flat hyper-parameters (Accelerate also saves them as hparams.yml)
    (hp,) = folder.glob("*/hparams.yml")
    import yaml

    hparams = yaml.safe_load(hp.read_text())
    assert hparams["train.steps"] == 30 and hparams["runtime.log_with"] == "tensorboard"
    assert hparams["arch.width"] == 32


def test_tracker_errors_are_one_line_before_any_work(tmp_path):
    out = tmp_path / "o"
    p = run_genkit("train-flow", *TINY, "runtime.log_with=tensorbord", "--out", out, check=False)
    assert p.returncode == 2 and "runtime.log_with: unknown tracker 'tensorbord'" in p.stderr, p.stderr
    missing = next((n for n in ("wandb", "mlflow", "trackio") if not tracking._available(n)), None)
    if missing is not None:
        p = run_genkit("train-dllm", f"runtime.log_with=tensorboard,{missing}", "--out", out, check=False)
        assert p.returncode == 2 and f"{missing} is not installed: pip install 'genkit[tracking]'" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_log_with_parsing_and_flat_hyper_parameters():
    assert tracking.parse_log_with("none") == [] and tracking.parse_log_with("") == []
    assert tracking.parse_log_with("all") == ["all"] and tracking.parse_log_with("tensorboard,all") == ["all"]
    assert tracking.parse_log_with("TensorBoard, wandb,tensorboard") == ["tensorboard", "wandb"]
    with pytest.raises(ValueError, match="unknown tracker 'none'"):
        tracking.parse_log_with("none,wandb")
    flat = tracking.flatten({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": True, "f": "x"})
    assert flat == {"a.b": 1, "a.c": "none", "a.d": "[1, 2]", "e": True, "f": "x"}
    import torch

    assert tracking.scalars({"step": 3, "time": 1.0, "loss": torch.tensor(0.5), "event": "eval", "ok": True,
                             "rows": [1, 2], "n": 4}) == {"loss": 0.5, "n": 4.0}


def logged(out):
    """log.jsonl's numbers as {tag: {step: value}} (the last value of a step logged twice)."""
    want: dict = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in tracking.scalars(rec).items():
            want.setdefault(k, {})[rec["step"]] = float(np.float32(v))
    return want


RING = "recipes/mixtures/ring2d.yaml"
COMMANDS = {  # the smallest runs of the other training commands (their own tests' settings)
    "train-diffusion": ["recipes/train-diffusion/edm-digits.yaml", "train.batch_size=16", "train.warmup_steps=2",
                        "arch.model_channels=8", "arch.num_heads=2", "eval.samples=4", "eval.metric_samples=0",
                        "eval.sampler=euler", "eval.nfe=2"],
    "train-dllm": ["data.task=sudoku", "data.n_train=300", "data.n_test=8", "arch.d_model=32", "arch.n_layers=1",
                   "arch.n_heads=2", "arch.mlp_hidden_size=64", "train.batch_size=8", "train.warmup_steps=2",
                   "eval.n=4"],
    "distill": [f"teacher={RING}", "mixture.width=32", "mixture.depth=2", "mixture.fit_steps=20",
                "mixture.fit_batch=64", "train.batch_size=16", "eval.samples=50", "eval.metric_samples=0"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_training_command_logs_its_scalars_and_grid(tmp_path, command):
    out = tmp_path / "run"
    run_genkit(command, *COMMANDS[command], "train.steps=3", "runtime.checkpoint_every=0", "runtime.log_every=1",
               "runtime.threads=1", "runtime.log_with=tensorboard", "--out", out, "-q")
    want = logged(out)
    assert want, "the run logged numbers"
    ea = tb_scalars(out / "tracking" / "genkit")
    for tag, steps in want.items():
        assert {e.step: e.value for e in ea.Scalars(tag)} == steps, tag
    m = json.loads((out / "metrics.json").read_text())
    assert bool(ea.Tags()["images"]) == bool(m.get("samples_png")), (ea.Tags()["images"], m.get("samples_png"))


@pytest.mark.slow
def test_wandb_offline_and_mlflow_local_continue_the_same_run_on_resume(tmp_path, monkeypatch):
    """Needs `pip install 'genkit[tracking]'` (skipped otherwise): W&B offline, MLflow's local SQLite store."""
    pytest.importorskip("wandb")
    mlflow = pytest.importorskip("mlflow")
    args = ["train-flow", *TINY, "eval.samples=4", "runtime.checkpoint_every=2", "runtime.threads=1",
            "runtime.log_with=wandb,mlflow"]
    out = tmp_path / "run"
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI"):  # the defaults: offline / local
        monkeypatch.delenv(var, raising=False)
    run_genkit(*args, "train.steps=4", "--out", out, "-q")
    ids = json.loads((out / "tracking" / "runs.json").read_text())
    run_genkit(*args, "train.steps=8", "--out", out, "-q")  # resumes at step 4
    assert json.loads((out / "tracking" / "runs.json").read_text()) == ids
    offline = sorted((out / "tracking" / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(ids["wandb"]) for p in offline)  # one W&B run, synced as one
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'tracking' / 'mlflow.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_id == ids["mlflow"] and run.data.params["train.steps"] == "4"  # stored once, fresh run
    hist = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert hist == {s: float(np.float32(v)) for s, v in logged(out)["loss"].items()}
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["samples.png"]
