"""Experiment trackers (``runtime.log_with``) through Accelerate's tracking API.

Every training command gets them from :class:`genkit.runtime.Runtime`, with no code in the loops:
``write_config`` starts the trackers (``Accelerator.init_trackers``, the resolved config as flat
hyper-parameters), ``log`` sends the numeric values of each ``log.jsonl`` line (``Accelerator.log``, same
step), and ``write_metrics`` sends the final figures (as ``final/<key>``), the final sample grid
(``samples_png`` in the metrics) as an image where the tracker takes images, then each tracker's
``finish`` (what ``end_training`` does, without its ``destroy_process_group``: the loops still
synchronise the processes after ``write_metrics``, which runs on the main process only).
``log.jsonl`` stays the source of truth.

Offline by default:

- ``tensorboard``: event files under ``RUN/tracking/<project>/`` (``tensorboard --logdir RUN/tracking``).
- ``wandb``: ``mode=offline`` under ``RUN/tracking/wandb/`` unless ``WANDB_MODE`` is set in the environment
  (``WANDB_MODE=online`` to stream; or ``wandb sync RUN/tracking/wandb/offline-run-*`` later).
- ``mlflow``: a SQLite store ``RUN/tracking/mlflow.db`` with artifacts in ``RUN/tracking/mlartifacts``
  unless ``MLFLOW_TRACKING_URI`` is set (MLflow 3 refuses its old file store).
- ``trackio``: local-first (its own local database; ``trackio show`` opens the dashboard).

Resumed runs append to the same tracker run: TensorBoard writes a new event file into the same folder,
and the W&B run id, the MLflow run id and the trackio run name are kept in ``RUN/tracking/runs.json`` and
passed back on resume (W&B ``resume="allow"``, MLflow ``run_id``, trackio ``resume="allow"``); the
hyper-parameters are stored once, by the fresh run.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from genkit.errors import ConfigError, RunError

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")
EXTRA = "pip install 'genkit[tracking]'"
_PIP = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def parse_log_with(value: str) -> list[str]:
    """``"none"`` -> [], ``"all"`` -> ["all"], ``"tensorboard,wandb"`` -> both (unknown names raise ValueError)."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    if not names or names == ["none"]:
        return []
    bad = [n for n in names if n not in (*TRACKERS, "all")]
    if bad or ("none" in names):
        raise ValueError(f"unknown tracker '{(bad or ['none'])[0]}': use none, {', '.join(TRACKERS)}, all, "
                         "or a comma list such as tensorboard,wandb")
    return ["all"] if "all" in names else list(dict.fromkeys(names))


def _available(name: str) -> bool:
    from accelerate.utils import imports

    return bool(getattr(imports, f"is_{name}_available")())


def problems(value: str, key: str = "runtime.log_with") -> list[str]:
    """Configuration problems of ``runtime.log_with``: unknown names, trackers that are not installed."""
    try:
        names = parse_log_with(value)
    except ValueError as e:
        return [f"{key}: {e}"]
    if names == ["all"]:
        if not any(_available(n) for n in TRACKERS):
            return [f"{key}: 'all' but no tracker is installed: {EXTRA}"]
        return []
    return [f"{key}: {n} is not installed: {EXTRA} (or pip install {_PIP[n]})" for n in names if not _available(n)]


def accelerator_kwargs(value: str, out: Path) -> dict:
    """Extra ``Accelerator(...)`` arguments: ``log_with`` and the project folders (RUN, RUN/tracking)."""
    names = parse_log_with(value)
    if not names:
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": names,
            "project_config": ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "tracking"))}


def flatten(d, prefix: str = "") -> dict:
    """A nested config as flat ``a.b.c`` hyper-parameters of types every tracker takes (bool/int/float/str)."""
    flat = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "."))
        elif isinstance(v, (bool, int, float, str)):
            flat[key] = v
        elif v is None:
            flat[key] = "none"
        else:
            flat[key] = json.dumps(v, default=str) if isinstance(v, (list, tuple)) else str(v)
    return flat


def scalars(values: dict) -> dict[str, float]:
    """The numeric values of a log line (a tensor, int or float; not the step, the time, flags or text)."""
    import torch

    out = {}
    for k, v in values.items():
        if k in ("step", "time") or isinstance(v, bool):
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if isinstance(v, (int, float)):
            out[k] = float(v)
    return out


class Trackers:
    """The trackers of one run (main process only; a no-op when ``runtime.log_with=none``)."""

    def __init__(self, accelerator, value: str, out: Path, project: str):
        self.acc = accelerator
        self.names = parse_log_with(value)
        self.out = Path(out)
        self.project = project
        self.started = False
        self.last_step = 0

    @property
    def enabled(self) -> bool:
        return bool(self.names) and self.acc.is_main_process

    def _ids_path(self) -> Path:
        return self.out / "tracking" / "runs.json"

    def start(self, config: dict, *, resuming: bool) -> None:
        """``init_trackers`` with offline defaults; the config goes in as hyper-parameters on a fresh run."""
        if not self.enabled or self.started:
            return
        from genkit.runtime.files import atomic_write_json

        folder = self.out / "tracking"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            ids = json.loads(self._ids_path().read_text()) if resuming else {}
        except (OSError, ValueError):
            ids = {}
        run_name = self.out.resolve().name
        init = {
            "wandb": {"dir": str(folder), "mode": os.environ.get("WANDB_MODE") or "offline", "name": run_name,
                      "id": ids.get("wandb") or _new_id(), "resume": "allow"},
            "mlflow": {"run_name": run_name, "run_id": ids.get("mlflow"),
                       "logging_dir": (folder / "mlartifacts").resolve().as_uri()},
            "trackio": {"name": ids.get("trackio") or run_name, "resume": "allow"},
        }
        if not os.environ.get("MLFLOW_TRACKING_URI") and any(t.name == "mlflow" for t in self._planned()):
            import mlflow

            mlflow.set_tracking_uri(f"sqlite:///{(folder / 'mlflow.db').resolve()}")
        try:
            self.acc.init_trackers(self.project, config=None if resuming else flatten(config), init_kwargs=init)
        except Exception as e:  # noqa: BLE001 - a tracker that cannot start: one line, not a traceback
            msg = (str(e).strip().splitlines() or [""])[0][:300]
            raise RunError(f"runtime.log_with: a tracker failed to start ({type(e).__name__}: {msg})") from e
        self.started = True
        new = dict(ids)
        for t in self.acc.trackers:
            if t.name == "wandb":
                new["wandb"] = init["wandb"]["id"]
            elif t.name == "mlflow":
                new["mlflow"] = t.tracker.info.run_id
            elif t.name == "trackio":
                new["trackio"] = init["trackio"]["name"]
        if new != ids:
            atomic_write_json(self._ids_path(), new)

    def _planned(self):
        """The tracker classes Accelerate will start (before ``init_trackers``)."""
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        return [LOGGER_TYPE_TO_CLASS[str(t)] for t in self.acc.log_with if str(t) in LOGGER_TYPE_TO_CLASS]

    def log(self, step: int, values: dict) -> None:
        if not (self.enabled and self.started):
            return
        nums = scalars(values)
        if nums:
            self.acc.log(nums, step=step)
            self.last_step = max(self.last_step, step)

    def finish(self, metrics: dict, image: str | os.PathLike | None) -> None:
        """Final figures as ``final/<key>``, the sample grid as an image, then close the trackers."""
        if not (self.enabled and self.started):
            return
        step = self.last_step
        final = {f"final/{k.removeprefix('final_')}": v for k, v in scalars(metrics).items() if math.isfinite(v)}
        if final:
            self.acc.log(final, step=step)
        if image is not None and Path(image).is_file():
            for t in self.acc.trackers:
                _log_image(t, "samples", Path(image), step)
        # Accelerator.end_training() would also destroy the process group, but write_metrics runs on the main
        # process only and the loops still wait for everyone afterwards: close the trackers themselves
        for t in self.acc.trackers:
            t.finish()
        self.acc.trackers = []
        self.started = False


def _log_image(tracker, tag: str, path: Path, step: int) -> None:
    """The final grid in the form each tracker takes (TensorBoard: an image summary; W&B: a ``wandb.Image``;
    MLflow: an artifact; trackio: a ``trackio.Image``)."""
    import numpy as np
    from PIL import Image

    if tracker.name == "tensorboard":
        arr = np.asarray(Image.open(path).convert("RGB"))[None]          # (1, H, W, 3) uint8
        tracker.log_images({tag: arr}, step=step, dataformats="NHWC")
    elif tracker.name == "wandb":
        tracker.log_images({tag: [Image.open(path).convert("RGB")]}, step=step)
    elif tracker.name == "mlflow":
        tracker.log_artifact(str(path))
    elif tracker.name == "trackio":
        import trackio

        tracker.log({tag: trackio.Image(str(path))}, step=step)
    elif hasattr(tracker, "log_images"):  # other Accelerate trackers under log_with=all
        tracker.log_images({tag: [np.asarray(Image.open(path).convert("RGB"))]}, step=step)


def _new_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def check(value: str) -> None:
    """Raise a one-line :class:`ConfigError` for a bad or not installed ``runtime.log_with``."""
    p = problems(value)
    if p:
        raise ConfigError(p[0])
