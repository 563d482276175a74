"""Tokenizers for masked diffusion LMs: a character vocabulary built from the data, or a real one by path.

Both expose the same small interface, which is all that `genkit train-dllm` and `genkit decode` use:

    encode(text) -> list[int]            decode(ids) -> str (stops at the first EOS, drops special tokens)
    mask_id, eos_id, pad_id, vocab_size  chat(text) -> str (the chat-template prompt, or text unchanged)

`CharTokenizer` (tiny models trained by genkit) maps every character seen in the data to one id and adds
three special tokens: `<|eos|>` (also the padding token, as in LLaDA's SFT, where the answer is padded with
EOS and the model learns to produce them), `<|mask|>` and `<|bos|>`. It is saved as `tokenizer.json`
(`"type": "genkit-char"`) next to the model's `config.json`.

`HFTokenizer` wraps `transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)` (never
downloads, never runs a folder's code: Dream's `DreamTokenizer` is read as the Qwen2Tokenizer it copies).
LLaDA's tokenizer has no mask token registered; its id comes from the model config (`mask_token_id`, 126336
for LLaDA-8B).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from genkit.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
EOS, MASK, BOS = "<|eos|>", "<|mask|>", "<|bos|>"


class CharTokenizer:
    """One id per character; ids 0, 1, 2 are EOS (= pad), MASK and BOS, then the characters in sorted order."""

    kind = "genkit-char"

    def __init__(self, chars: Iterable[str]):
        chars = sorted(set(chars))
        bad = [c for c in chars if len(c) != 1]
        if bad:
            raise ConfigError(f"a character vocabulary holds single characters, got {bad[:3]}")
        self.specials = [EOS, MASK, BOS]
        self.chars = chars
        self.itos = self.specials + chars
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        if not seen:
            raise ConfigError("cannot build a character vocabulary from empty data")
        return cls(seen)

    eos_id = property(lambda self: 0)
    pad_id = property(lambda self: 0)
    mask_id = property(lambda self: 1)
    bos_id = property(lambda self: 2)
    vocab_size = property(lambda self: len(self.itos))
    has_chat_template = property(lambda self: False)

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        unknown = sorted({c for c in text if c not in self.stoi})
        if unknown:
            raise ConfigError(f"characters {''.join(unknown)!r} are not in this model's vocabulary "
                              f"({''.join(self.chars)!r})")
        ids = [self.stoi[c] for c in text]
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = True) -> str:
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if 0 <= i < len(self.itos) and i >= len(self.specials):
                out.append(self.itos[i])
        return "".join(out)

    def chat(self, text: str) -> str:
        return text

    def save(self, folder: str | os.PathLike) -> Path:
        from genkit.runtime import atomic_write_json

        return atomic_write_json(Path(folder) / TOKENIZER_FILE, {
            "type": self.kind, "eos_token": EOS, "pad_token": EOS, "mask_token": MASK, "bos_token": BOS,
            "vocab": self.itos})

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        raw = json.loads(Path(path).read_text())
        itos = raw["vocab"]
        if itos[:3] != [EOS, MASK, BOS]:
            raise ConfigError(f"{path}: a genkit character vocabulary starts with {EOS}, {MASK}, {BOS}")
        return cls(itos[3:])


class HFTokenizer:
    """A transformers tokenizer from a local folder, with the mask id taken from the model config."""

    kind = "hf"

    def __init__(self, tok, mask_id: int | None = None, stop_ids=()):
        self.tok = tok
        self.stop_ids = set(int(i) for i in stop_ids)  # decode() ends at the first of these (Dream: end of turn)
        mid = mask_id if mask_id is not None else tok.mask_token_id
        if mid is None:
            raise ConfigError("the tokenizer has no mask token and the model config no mask_token_id: "
                              "add mask_token_id to config.json (LLaDA: 126336)")
        self.mask_id = int(mid)
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.bos_id = tok.bos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tok, "chat_template", None))

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        # the chat template already holds BOS; plain prompts get the tokenizer's own special tokens
        return list(self.tok(text, add_special_tokens=not text.startswith(self.tok.bos_token or "\0"))["input_ids"])

    def decode(self, ids: Iterable[int], *, stop_at_eos: bool = False) -> str:
        ids = [int(i) for i in ids if int(i) != self.mask_id]
        stops = self.stop_ids | ({self.eos_id} if stop_at_eos and self.eos_id is not None else set())
        cut = next((n for n, i in enumerate(ids) if i in stops), None)
        if cut is not None:
            ids = ids[:cut]
        return self.tok.decode(ids, skip_special_tokens=True)

    def chat(self, text: str) -> str:
        """LLaDA-Instruct style: one user turn, then the assistant header (add_generation_prompt)."""
        if not self.has_chat_template:
            return text
        return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=False)


def load_tokenizer(folder: str | os.PathLike, mask_id: int | None = None):
    """The tokenizer saved next to a model (`tokenizer.json` of genkit, or HF tokenizer files); None if none.

    `folder` may also be a separate tokenizer folder. Nothing is downloaded.
    """
    folder = Path(folder)
    path = folder if folder.is_file() else folder / TOKENIZER_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e.msg})") from None
        if raw.get("type") == CharTokenizer.kind:
            return CharTokenizer.load(path)
    hf_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if folder.is_dir() and any((folder / f).is_file() for f in hf_files):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError(f"{folder} holds a Hugging Face tokenizer: install transformers to use it") from None
        try:
            if _tokenizer_class(folder) == "DreamTokenizer":
                # Dream / DiffuCoder ship `tokenization_dream.py` (remote code): a copy of transformers'
                # Qwen2Tokenizer (same byte-level BPE files, pre-tokenizer regex, NFC and special tokens),
                # so the folder is read with that class instead of running the folder's code.
                from transformers import Qwen2Tokenizer

                tok = Qwen2Tokenizer.from_pretrained(str(folder), local_files_only=True)
            else:
                tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises many types; one line for the user
            raise ConfigError(f"could not load the tokenizer in {folder}: {str(e).splitlines()[0]}") from None
        return HFTokenizer(tok, mask_id)
    return None


def _tokenizer_class(folder: Path) -> str | None:
    """`tokenizer_class` of a folder's tokenizer_config.json (None when absent or unreadable)."""
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return None
