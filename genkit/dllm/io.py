"""Reading and writing what `train-dllm` and `decode` exchange: JSONL rows, model folders, the SFT layout.

A model folder is `config.json` + `model.safetensors` (LLaDA format, loadable by `LLaDAModel.from_pretrained`
and by the official LLaDA code; or an official Dream / DiffuCoder folder, loaded by `DreamModel`), a tokenizer (genkit's `tokenizer.json`, or Hugging Face tokenizer files)
and, for models trained by genkit, `genkit.json` (the task, gen_length, prompt format) that `genkit decode`
uses as defaults.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from genkit.errors import ConfigError

INFO_FILE = "genkit.json"


# ------------------------------------------------------------------------------------------- JSONL
def read_jsonl(path: str | os.PathLike, *, strict: bool = True) -> list[dict]:
    """Rows of a JSONL file (gzipped when it ends in .gz), each with `_line` (1-based line number).

    strict: a bad line (blank, malformed JSON, not an object) is a ConfigError naming it; otherwise it
    becomes `{"_error": ..., "_line": n}` so that a results file keeps one record per input line. Blank
    lines at the end of the file are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data file '{path}' does not exist")
    if path.suffix == ".gz":  # HumanEval.jsonl.gz, EvalPlus's HumanEvalPlus / MbppPlus releases
        import gzip

        try:
            lines = gzip.decompress(path.read_bytes()).decode("utf-8").splitlines()
        except (OSError, EOFError, UnicodeDecodeError) as e:
            raise ConfigError(f"data file '{path}' is not a readable gzip of UTF-8 text ({e})") from None
    else:
        lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for n, line in enumerate(lines, 1):
        text, err = line.strip(), None
        row = None
        if not text:
            err = "empty line"
        else:
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                err = f"malformed JSON ({e.msg} at column {e.colno})"
            else:
                if not isinstance(row, dict):
                    err = f"expected a JSON object, got {type(row).__name__}"
        if err is not None:
            if strict:
                raise ConfigError(f"{path}:{n}: {err}")
            rows.append({"_error": err, "_line": n})
            continue
        row["_line"] = n
        rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    from genkit.runtime import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# ------------------------------------------------------------------------------------------- model folders
def resolve_model_folder(path: str | os.PathLike) -> Path:
    """A model folder from a run folder (`run/model`), a checkpoint folder (`ckpt/model`) or the folder itself."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"model folder '{path}' does not exist")
    from genkit.runtime.checkpoint import find_model_folder

    folder = find_model_folder(path, weights_file=False)  # LLaDA-8B is sharded: no model.safetensors
    if folder is not None:
        return folder
    raise ConfigError(f"'{path}' holds no config.json: pass a model folder (config.json + model.safetensors), "
                      "a genkit run folder or a checkpoint folder")


def load_dllm(path: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, dtype=None,
              device: str | torch.device = "cpu"):
    """(model, tokenizer or None, info dict) from a model/run/checkpoint folder.

    The folder's config.json picks the class: Dream / DiffuCoder folders (model_type 'Dream', architectures
    ['DreamModel']) load as genkit's `DreamModel` (shifted logits), everything else as `LLaDAModel`. Refuses,
    with one line, folders that are neither or have no mask id. `tokenizer` overrides where the tokenizer is
    read from (default: the model folder, then the run folder).
    """
    from .dream_model import DreamModel, is_dream_config
    from .model import LLaDAModel
    from .tokenizer import load_tokenizer

    folder = resolve_model_folder(path)
    try:
        dream = is_dream_config(json.loads((folder / "config.json").read_text()))
    except (OSError, ValueError, AttributeError):
        dream = False  # the LLaDA loader reports what is wrong with the file
    cls = DreamModel if dream else LLaDAModel
    model = cls.from_pretrained(folder, dtype=dtype, device=device)
    mask_id = model.config.mask_token_id
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer, mask_id)
        if tok is None:
            raise ConfigError(f"no tokenizer found at '{tokenizer}' (genkit tokenizer.json or Hugging Face files)")
    else:
        tok = None
        # the model folder, else up to the run folder of a checkpoint (run/checkpoints/step-N/model)
        for cand in [folder, *list(folder.parents)[:3]]:
            tok = load_tokenizer(cand, mask_id)
            if tok is not None:
                break
    if tok is not None and dream and hasattr(tok, "stop_ids"):
        tok.stop_ids |= dream_stop_ids(tok, model.config)
    if tok is not None and tok.mask_id != mask_id:
        raise ConfigError(f"the tokenizer's mask id {tok.mask_id} differs from the model's mask_token_id {mask_id}")
    if tok is not None and tok.vocab_size > model.config.embedding_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but the model only "
                          f"{model.config.embedding_size} embeddings: they do not belong together")
    info = {}
    if (folder / INFO_FILE).is_file():
        info = json.loads((folder / INFO_FILE).read_text())
    info["folder"] = str(folder)
    return model, tok, info


def write_model_folder(folder: str | os.PathLike, model, tok, info: dict) -> Path:
    """A model folder: config.json + model.safetensors (`save_pretrained`), the tokenizer (genkit's
    tokenizer.json or the Hugging Face files) and genkit.json = `info` (what `genkit decode` uses as defaults)."""
    from genkit.runtime import atomic_write_json

    folder = model.save_pretrained(folder)
    if hasattr(tok, "save"):
        tok.save(folder)
    else:  # a Hugging Face tokenizer: copy its files next to the model
        tok.tok.save_pretrained(str(folder))
    atomic_write_json(Path(folder) / INFO_FILE, info)
    return Path(folder)


DREAM_STOP_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|dlm_pad|>")


def dream_stop_ids(tok, config) -> set[int]:
    """Token ids that end a Dream / DiffuCoder answer: EOS / padding `<|endoftext|>`, the chat turn's end
    `<|im_end|>` and DiffuCoder's `<|dlm_pad|>` (its demos cut the decoded text at the last two)."""
    ids = {i for i in (config.eos_token_id, config.pad_token_id, tok.eos_id) if i is not None}
    vocab = tok.tok.get_vocab()
    ids |= {vocab[t] for t in DREAM_STOP_TOKENS if t in vocab}
    return ids - {tok.mask_id}


# ------------------------------------------------------------------------------------------- SFT layout
def encode_prompt(tok, text: str, *, chat: bool = False) -> list[int]:
    """Prompt ids: BOS + characters for genkit's char tokenizer, the chat template (optional) for HF ones."""
    if chat:
        text = tok.chat(text)
    return tok.encode(text, bos=True)


def sft_tensors(tok, rows: list[dict], gen_length: int, *, chat: bool = False):
    """Tokenize {prompt, answer} rows for LLaDA SFT.

    Each row is its prompt followed by the answer padded with EOS to `gen_length` tokens (LLaDA's SFT pads
    with EOS and trains on them, so the model learns where an answer ends). Rows are left-padded to the
    longest prompt, as the decoders lay out a batch. Returns ids (N, P + gen_length) int64, pad (N,) int64 =
    padding slots per row, and the prompt length P.
    """
    prompts, answers, problems = [], [], []
    for i, r in enumerate(rows):
        p = encode_prompt(tok, str(r["prompt"]), chat=chat)
        a = tok.encode(str(r["answer"]))
        if len(a) > gen_length:
            problems.append(f"row {r.get('id', i)}: answer has {len(a)} tokens, more than gen_length={gen_length}")
            if len(problems) > 3:
                break
        prompts.append(p)
        answers.append(a)
    if problems:
        raise ConfigError(problems)
    P = max(len(p) for p in prompts)
    ids = torch.full((len(rows), P + gen_length), tok.eos_id, dtype=torch.long)
    pad = torch.zeros(len(rows), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids[i, P - len(p):P] = torch.tensor(p)
        ids[i, P:P + len(a)] = torch.tensor(a, dtype=torch.long)
        pad[i] = P - len(p)
    return ids, pad, P
