"""Find and load a trained flow by local path: a run folder, a checkpoint folder or a model folder."""

from __future__ import annotations

import json
from pathlib import Path

from genkit.errors import ConfigError
from genkit.runtime.checkpoint import find_model_folder


def resolve_model_folder(path: str | Path) -> Path:
    """``RUN`` -> ``RUN/model`` (final weights) or the newest checkpoint's ``model/``; a model folder as is."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"checkpoint '{p}' does not exist: give a run folder (from genkit train-flow --out) "
                          "or a model folder with config.json + model.safetensors")
    folder = find_model_folder(p)
    if folder is not None:
        return folder
    raise ConfigError(f"'{p}' holds no flow weights (no config.json + model.safetensors, no complete checkpoint)")


def load_flow(path: str | Path, device="cpu"):
    """(model, data_info) from a run/checkpoint/model folder; ``data_info`` may be empty."""
    folder = resolve_model_folder(path)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"'{folder / 'config.json'}' is not valid JSON ({e})") from None
    kind = cfg.get("model_type")
    if kind not in ("tarflow", "starflow"):
        raise ConfigError(f"'{folder}' is a '{kind}' model, not a flow genkit can sample (expected model_type "
                          "tarflow or starflow)")
    if kind == "starflow":
        from genkit.flows.starflow import StarFlow as cls
    else:
        from genkit.flows.tarflow import TarFlow as cls

    model = cls.from_pretrained(folder).to(device).eval()
    info_path = folder / "data.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return model, info
