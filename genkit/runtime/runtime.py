"""The per-process :class:`Runtime`: one Accelerator, one run folder, one progress bar."""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from genkit.config import dump, field
from genkit.errors import RunError
from genkit.runtime.checkpoint import CheckpointManager
from genkit.runtime.files import atomic_write_json
from genkit.runtime.progress import Progress


@dataclass
class RuntimeConfig:
    """How the run executes: precision, accumulation, seeding, checkpoints, logging."""

    mixed_precision: Literal["no", "fp16", "bf16"] = field("no", help="autocast precision for forward passes")
    grad_accum: int = field(1, help="micro-batches per optimizer step (global batch is split into them)", min=1)
    seed: int = field(0, help="base seed; rank r seeds its global RNGs with seed + r")
    cpu: bool = field(False, help="force the CPU even when a GPU is present")
    threads: int = field(0, help="torch CPU threads per process (0 = leave torch's default)", min=0)
    checkpoint_every: int = field(500, help="save a checkpoint every N optimizer steps (0 = only at the end)", min=0)
    keep_last: int = field(2, help="number of most recent checkpoints to keep", min=1)
    log_every: int = field(50, help="write a log.jsonl line every N steps", min=1)
    resume: str = field("auto", help="'auto' = continue from the newest complete checkpoint in --out, "
                        "'never' = start fresh (refuses a folder with checkpoints), or a checkpoint folder")
    log_with: str = field("none", help="experiment trackers fed with log.jsonl's scalars, the config and the final "
                          "samples.png, through Accelerate: none, tensorboard, wandb, mlflow, trackio, all (every "
                          "installed one) or a comma list; offline by default (TensorBoard under RUN/tracking/, W&B "
                          "offline unless WANDB_MODE is set); pip install 'genkit[tracking]'")
    tracker_project: str = field("genkit", help="tracker project name (W&B / trackio project, MLflow experiment, "
                                 "TensorBoard folder RUN/tracking/<name>)")

    def validate(self) -> list[str]:
        from genkit.runtime import tracking

        problems = tracking.problems(self.log_with)
        if self.resume not in ("auto", "never") and not Path(self.resume).is_dir():
            problems.append(f"runtime.resume: '{self.resume}' is not 'auto', 'never' or an existing checkpoint folder")
        if not self.tracker_project.strip() or "/" in self.tracker_project:
            problems.append("runtime.tracker_project: must be a non-empty name without '/'")
        return problems


def software_versions() -> dict:
    import accelerate
    import numpy

    import genkit

    return {
        "genkit": genkit.__version__,
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


class Runtime:
    """Owns the Accelerator and the run folder of one command in one process.

    Usage (a training loop reads top to bottom)::

        rt = Runtime(cfg.runtime, out_dir, quiet=quiet)
        rt.write_config(cfg)                     # before the first step
        model, opt = rt.prepare(model, opt)
        start = rt.resume(model_for_weights, opt, ema)   # 0 when fresh
        for step in range(start, total): ... rt.backward(loss) ... rt.log(step, loss=...)
        rt.write_metrics(metrics)                # last: also closes the trackers (runtime.log_with)

    Trackers (:mod:`genkit.runtime.tracking`) need nothing from the loop: ``write_config`` starts them with
    the config as hyper-parameters, ``log`` mirrors each log.jsonl line's numbers, ``write_metrics`` sends the
    final figures and ``metrics["samples_png"]`` (the final grid) and ends them.
    """

    def __init__(self, cfg: RuntimeConfig, out: str | os.PathLike, *, quiet: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from genkit.runtime import tracking

        self.cfg = cfg
        tracking.check(cfg.log_with)  # a recipe built in code skips load-time validation
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        mp = cfg.mixed_precision
        # cpu=True also on GPU-less machines: Accelerate then runs several processes (torchrun /
        # `accelerate launch --multi_gpu`) as MULTI_CPU over gloo instead of silently as one
        self.out = Path(out)
        self.accelerator = Accelerator(mixed_precision=mp, cpu=cfg.cpu or not torch.cuda.is_available(),
                                       **tracking.accelerator_kwargs(cfg.log_with, self.out))
        self.trackers = tracking.Trackers(self.accelerator, cfg.log_with, self.out, cfg.tracker_project)
        self.quiet = quiet
        set_seed(cfg.seed + self.rank)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.wait()
        self.checkpoints = CheckpointManager(self.out / "checkpoints", keep_last=cfg.keep_last)
        self._t0 = time.time()

    # ------------------------------------------------------------------ process facts
    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def wait(self) -> None:
        self.accelerator.wait_for_everyone()

    # ------------------------------------------------------------------ training helpers
    def prepare(self, *objs):
        return self.accelerator.prepare(*objs)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    def autocast(self):
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def no_sync(self, model, skip: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        return self.accelerator.no_sync(model) if skip and self.world_size > 1 else contextlib.nullcontext()

    def clip_grad_norm_(self, params, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(params, max_norm))

    def mean(self, value: torch.Tensor | float) -> float:
        """Mean of a scalar over all processes (for logging)."""
        t = torch.as_tensor(value, dtype=torch.float32, device=self.device).reshape(1)
        return float(self.accelerator.gather(t).mean())

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate a same-shaped tensor from every process, in rank order (rank dim first)."""
        return self.accelerator.gather(t.to(self.device).unsqueeze(0)).cpu()

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of a global batch of ``n`` rows (n must divide evenly)."""
        if n % self.world_size:
            raise RunError(f"global batch {n} is not divisible by the number of processes {self.world_size}")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def check_finite(self, loss: torch.Tensor, step: int) -> None:
        """Stop with a clear message on a non-finite loss (on any rank); the last good checkpoint stays."""
        bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=self.device)
        if self.world_size > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if float(bad) > 0:
            last = self.checkpoints.latest()
            where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
            raise RunError(f"non-finite loss at step {step}: lower the learning rate or check the data; {where}")

    # ------------------------------------------------------------------ run folder
    def write_config(self, cfg) -> None:
        """Write the fully resolved config to ``config.yaml`` (before the first step) and start the trackers."""
        if self.is_main:
            dump(cfg, self.out / "config.yaml")
            if self.trackers.enabled:
                import yaml

                self.trackers.start(yaml.safe_load((self.out / "config.yaml").read_text()),
                                    resuming=self._will_resume())

    def _will_resume(self) -> bool:
        """Whether ``resume`` will load a checkpoint (the trackers then continue the same run)."""
        if self.cfg.resume == "never":
            return False
        return self.cfg.resume != "auto" or self.checkpoints.latest() is not None

    def log(self, step: int, **values) -> None:
        if not self.is_main:
            return
        rec = {"step": step, "time": round(time.time() - self._t0, 3)}
        rec.update({k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in values.items()})
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        self.trackers.log(step, rec)

    def write_metrics(self, metrics: dict, name: str = "metrics.json") -> Path:
        """Flat final figures plus the seed and the software versions, written atomically.

        ``metrics.json`` is the run's last word: its numbers (as ``final/<key>``) and the grid named by
        ``metrics["samples_png"]`` go to the trackers, which are then closed."""
        path = self.out / name
        if self.is_main:
            out = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
            out.update({"seed": self.cfg.seed, "world_size": self.world_size, "versions": software_versions()})
            atomic_write_json(path, out)
            if name == "metrics.json":
                self.trackers.finish(metrics, metrics.get("samples_png"))
        return path

    def progress(self, total: int, *, initial: int = 0, description: str = "train") -> Progress:
        return Progress(total, initial=initial, description=description, enabled=self.is_main and not self.quiet)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int, model, optimizer=None, *, config: dict, ema=None, meta=None,
                        extra=None) -> Path | None:
        """A complete checkpoint at ``step`` (all processes must call this); ``extra`` = {name: module} saved
        beside the model (e.g. RL's reference policy) and restored by ``resume(..., extra=...)``."""
        return self.checkpoints.save(self, step, model, optimizer, config=config, ema=ema, meta=meta, extra=extra)

    def resume(self, model, optimizer=None, *, ema=None, extra=None) -> dict | None:
        """Restore from ``runtime.resume``; returns the checkpoint's meta (with ``step``) or None when fresh."""
        mode = self.cfg.resume
        if mode == "never":
            if self.checkpoints.latest() is not None:
                raise RunError(f"{self.out} already holds checkpoints: use runtime.resume=auto to continue "
                               "or another --out to start fresh")
            return None
        path = self.checkpoints.latest() if mode == "auto" else Path(mode)
        if path is None:
            return None
        return self.checkpoints.load(self, path, model, optimizer, ema=ema, extra=extra)
