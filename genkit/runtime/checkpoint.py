"""Checkpoints: ``checkpoints/step-00000100/`` holding

- ``model/config.json`` + ``model/model.safetensors``: the weights as an HF-style folder;
- ``ema.safetensors``: the EMA weights (when the run keeps an EMA);
- ``<name>.safetensors``: other modules the loop keeps beside the model (``extra``: RL's reference policy);
- ``state/``: optimizer and RNG states through Accelerate's ``save_state`` (safetensors for weights;
  loaded back with ``weights_only=True``);
- ``meta.json``: the step and loop state, written last.

A checkpoint is written into ``.step-XXXXXXXX.tmp`` and renamed when complete, so ``resume=auto``
never sees a partial one; only the newest ``keep_last`` are kept.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from genkit.errors import RunError
from genkit.runtime.files import atomic_write_json, load_safetensors, save_safetensors

_NAME = re.compile(r"^step-(\d{8})$")


def find_latest_checkpoint(folder: str | Path) -> Path | None:
    """The newest complete checkpoint under ``folder`` (a run folder or its ``checkpoints/``)."""
    folder = Path(folder)
    if (folder / "checkpoints").is_dir():
        folder = folder / "checkpoints"
    if not folder.is_dir():
        return None
    done = [p for p in folder.iterdir() if _NAME.match(p.name) and (p / "meta.json").is_file()]
    return max(done, key=lambda p: int(_NAME.match(p.name).group(1))) if done else None


def find_model_folder(path: str | Path, *, weights_file: bool = True) -> Path | None:
    """The model folder behind ``path``: ``path`` itself or ``path/model`` when it holds ``config.json`` (and
    ``model.safetensors`` when ``weights_file``; sharded checkpoints have none), else the newest complete
    checkpoint's ``model/``; None when there is none."""
    p = Path(path)
    for cand in (p, p / "model"):
        if (cand / "config.json").is_file() and (not weights_file or (cand / "model.safetensors").is_file()):
            return cand
    ck = find_latest_checkpoint(p)
    if ck is not None and (ck / "model" / "config.json").is_file():
        return ck / "model"
    return None


def save_model_folder(folder: str | Path, state_dict: dict, config: dict) -> Path:
    """An HF-style model folder (``config.json`` + ``model.safetensors``), each file written atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(state_dict, folder / "model.safetensors")
    atomic_write_json(folder / "config.json", config)
    return folder


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int = 2):
        self.root = Path(root)
        self.keep_last = keep_last

    def latest(self) -> Path | None:
        return find_latest_checkpoint(self.root)

    def save(self, rt, step: int, model, optimizer, *, config: dict, ema=None, meta=None, extra=None) -> Path:
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".step-{step:08d}.tmp"
        if rt.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        rt.wait()
        rt.accelerator.save_state(str(tmp / "state"), safe_serialization=True)
        if rt.is_main:
            sd = rt.accelerator.get_state_dict(model)
            save_model_folder(tmp / "model", sd, config)
            if ema is not None:
                save_safetensors(ema.state_dict(), tmp / "ema.safetensors")
            for name, module in (extra or {}).items():
                save_safetensors(module.state_dict(), tmp / f"{name}.safetensors")
            atomic_write_json(tmp / "meta.json", {"step": step, "saved_at": time.time(), **(meta or {})})
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self._prune()
        rt.wait()
        return final

    def _prune(self) -> None:
        done = sorted((p for p in self.root.iterdir() if _NAME.match(p.name)), key=lambda p: p.name)
        for p in done[: -self.keep_last]:
            shutil.rmtree(p, ignore_errors=True)
        for p in self.root.glob(".step-*.tmp"):  # leftovers of a killed save
            shutil.rmtree(p, ignore_errors=True)

    def load(self, rt, path: str | Path, model, optimizer, *, ema=None, extra=None) -> dict:
        path = Path(path)
        if not (path / "meta.json").is_file() or not (path / "state").is_dir():
            raise RunError(f"'{path}' is not a complete genkit checkpoint (no meta.json or state/)")
        try:
            rt.accelerator.load_state(str(path / "state"))
        except Exception as e:  # corrupt or mismatched state: one line, not a traceback
            raise RunError(f"could not restore checkpoint '{path}': {type(e).__name__}: {e}") from e
        if ema is not None:
            if (path / "ema.safetensors").is_file():
                ema.load_state_dict(load_safetensors(path / "ema.safetensors"))
        for name, module in (extra or {}).items():
            if not (path / f"{name}.safetensors").is_file():
                raise RunError(f"checkpoint '{path}' has no {name}.safetensors: it was not written by this command")
            module.load_state_dict(load_safetensors(path / f"{name}.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        meta["path"] = str(path)
        return meta
