"""The captioner: a vision-language model from a local folder, and batched greedy generation.

Anything ``transformers`` loads as an image-text-to-text model (``AutoModelForImageTextToText`` +
``AutoProcessor``) from a local folder works; the LLaVA family (``LlavaForConditionalGeneration``, e.g.
``llava-hf/llava-1.5-7b-hf`` as used by Recap-DataComp-1B, arXiv 2406.08478, with LLaMA-3-8B) is the
tested path.  Nothing is ever downloaded (``local_files_only=True``); remote code runs only when the
caller passes ``trust_remote_code=True`` (the CLI's explicit ``--trust-remote-code``).

Every check that can fail (folder, config, model family, processor, weights) runs in :func:`load_vlm`,
before any shard is touched, and fails with one :class:`~genkit.errors.ConfigError`.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genkit.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# remote-code models declare their auto classes in config.auto_map
_VLM_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq")


@dataclass
class VLM:
    """A loaded captioner and the facts generation and provenance need."""

    model: Any
    processor: Any
    path: Path
    config_sha256: str
    model_type: str
    device: torch.device
    dtype: torch.dtype
    pad_id: int
    eos_ids: list[int]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` = bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_vlm_folder(path: str | Path, *, trust_remote_code: bool = False):
    """The model's config, after checking that ``path`` is a local folder holding a VLM (else ConfigError)."""
    p = Path(path).expanduser()
    if not p.exists():
        hint = ("; genkit never downloads: fetch it first, e.g. `hf download llava-hf/llava-1.5-7b-hf "
                "--local-dir models/llava-1.5-7b` and pass that folder") if "/" in str(path) else ""
        raise ConfigError(f"--model: folder '{path}' does not exist{hint}")
    if not p.is_dir():
        raise ConfigError(f"--model: '{path}' is a file; give the model folder (with config.json)")
    if not (p / "config.json").is_file():
        raise ConfigError(f"--model: '{path}' has no config.json: not a transformers model folder")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ConfigError(f"--model: '{path}' needs its own Python code to load; if you trust it, "
                              "pass --trust-remote-code") from None
        raise ConfigError(f"--model: cannot read the config of '{path}': {e}") from None
    except OSError as e:
        raise ConfigError(f"--model: cannot read the config of '{path}': {e}") from None
    model_type = getattr(config, "model_type", "") or ""
    auto_map = getattr(config, "auto_map", None) or {}
    remote_vlm = trust_remote_code and any(k in auto_map for k in _VLM_AUTO_CLASSES)
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and not remote_vlm:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ConfigError(f"--model: '{path}' holds a '{model_type or '?'}' model ({arch}), not a vision-language "
                          "(image-text-to-text) model such as LLaVA")
    return config


def load_vlm(path: str | Path, *, device: torch.device | str = "cpu", dtype: str = "auto",
             trust_remote_code: bool = False, attn_implementation: str = "") -> VLM:
    """Load model + processor from a local folder onto ``device`` in eval mode (ConfigError on any problem)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    p = Path(path).expanduser()
    config = check_vlm_folder(p, trust_remote_code=trust_remote_code)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, device)
    _quiet_transformers()
    try:
        processor = AutoProcessor.from_pretrained(p, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"--model: cannot load the processor of '{path}': {e}") from None
    tok = getattr(processor, "tokenizer", None)
    if getattr(processor, "image_processor", None) is None or tok is None:
        raise ConfigError(f"--model: '{path}' has no image processor + tokenizer (processor_config.json, "
                          "preprocessor_config.json, tokenizer files): not a usable vision-language model folder")
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if device.type == "cuda":
        kwargs["device_map"] = {"": str(device)}  # weights straight to this rank's GPU, not via host RAM
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            p, dtype=torch_dtype, local_files_only=True, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ConfigError(f"--model: cannot load the weights of '{path}': {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = tok.eos_token_id if eos is None else eos
    eos_ids = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    if pad is None:
        pad = eos_ids[0] if eos_ids else 0
    return VLM(model=model, processor=processor, path=p.resolve(), config_sha256=config_hash(p),
               model_type=config.model_type, device=device, dtype=torch_dtype, pad_id=int(pad),
               eos_ids=[int(e) for e in eos_ids])


def config_hash(path: str | Path) -> str:
    """sha256 of the folder's config.json bytes (provenance: which model wrote these captions)."""
    return hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest()


def _quiet_transformers() -> None:
    """Silence transformers' per-call advisories (e.g. the torchvision-less image processor fallback)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass
    logging.getLogger("transformers").setLevel(logging.ERROR)


# ------------------------------------------------------------------------------------------ generation
def generation_config(vlm: VLM, max_new_tokens: int):
    """The model's generation config forced to greedy decoding (the paper's setting), without sampling knobs."""
    gc = copy.deepcopy(vlm.model.generation_config)
    gc.do_sample = False
    gc.num_beams = 1
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    gc.temperature = None
    gc.top_p = None
    gc.top_k = None
    gc.pad_token_id = vlm.pad_id
    gc.eos_token_id = vlm.eos_ids or None
    return gc


def to_device(vlm: VLM, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move a collated batch to the model's device; floating tensors (pixels) take the model's dtype."""
    nb = vlm.device.type == "cuda"
    return {k: v.to(vlm.device, dtype=vlm.dtype, non_blocking=nb) if v.is_floating_point()
            else v.to(vlm.device, non_blocking=nb) for k, v in inputs.items()}


@torch.inference_mode()
def generate_captions(vlm: VLM, inputs: dict[str, torch.Tensor], max_new_tokens: int, gen_config=None
                      ) -> tuple[list[str], list[int]]:
    """Greedy captions for one left-padded batch: ``(texts, generated token counts)``.

    Only the new tokens are decoded: the prompt occupies the first ``L`` positions of every row because
    padding is on the left.
    """
    gc = gen_config if gen_config is not None else generation_config(vlm, max_new_tokens)
    batch = to_device(vlm, inputs)
    prompt_len = batch["input_ids"].shape[1]                      # (B, L)
    out = vlm.model.generate(**batch, generation_config=gc)       # (B, L + T)
    new = out[:, prompt_len:].cpu()                               # (B, T)
    counts = []
    for row in new.tolist():
        n = len(row)
        for i, t in enumerate(row):
            if t in vlm.eos_ids:
                n = i + 1
                break
        counts.append(n)
    texts = vlm.processor.batch_decode(new, skip_special_tokens=True)
    return [unicodedata.normalize("NFC", t).strip() for t in texts], counts
