"""``genkit recaption``: rewrite the captions of webdataset shards with a VLM, resumable and exactly-once.

This is the Recap-DataComp-1B pipeline (Li et al., "What If We Recaption Billions of Web Images with
LLaMA-3?", arXiv 2406.08478, Sec. 3): a LLaVA-style captioner, prompted with "Please generate a
detailed caption of this image. Please be as descriptive as possible.", greedy decoding, at most 128
new tokens.  The authors released the captions, not the pipeline; this is one that survives billions.

Layout of ``--out`` (one set of files per input shard ``NAME.tar``, plus run files):

- ``NAME.parquet``: one row per sample, keyed by ``key`` (the sample's webdataset key), with
  ``re_caption``, ``org_caption`` (NFC, mojibake repaired), ``sha256`` (of the image bytes),
  ``status`` (``ok``/``error``), ``error`` (the reason), ``width``, ``height``, ``num_tokens``.
  *Why Parquet, not JSONL*: typed columns, compressed (zstd), read directly by pandas, DuckDB, Spark and
  HF ``datasets`` (the tools img2dataset/datatrove users join captions with), and a file without its
  footer is unreadable rather than silently short, so a half-written table can never pass for a whole
  one.  Its appendability, JSONL's one advantage, buys nothing here: a shard's table is written once.
- ``NAME.tar`` (``write_tar=true``): the input shard with ``KEY.re_caption.txt`` added to good samples.
- ``NAME.done.json``, written **last**: counts, throughput, provenance (model folder and the sha256 of
  its config.json, prompt, generation parameters, dtype, seed, genkit and library versions).
- ``NAME.failed.json``: a shard whose stream still failed after ``retries`` re-reads (connection dropped,
  HTTP 404, stall, failed ``pipe:`` command) gets this record (URL, attempts, each error) and **no** done
  marker, so a rerun of the same command tries it again; the run goes on with the other shards, and the
  summary line and ``metrics.json`` (``shards_failed``, ``shards_failed_total``) count it.  It is removed
  once the shard completes.
- ``config.yaml`` (before work), ``log.jsonl`` (one line per finished or failed shard), ``metrics.json``.

Shards are read through webdataset's openers (local paths, ``pipe:COMMAND``, ``http(s)://``) or fsspec
(``s3://``, ``gs://``, ``hf://``), see :mod:`genkit.recaption.shards`; the output is always a local or
mounted folder.  A shard whose stream fails is re-read from its start with a doubling back-off; the samples
handed on before the failure are skipped on the re-read (their keys are checked), so none is captioned or
written twice.

Every file is written to a temporary name and renamed (:mod:`genkit.runtime.files`), and a shard counts
as done only when its marker exists and its table has the marker's row count.  Hence *exactly once*:
a killed run leaves whole files or nothing, and a rerun of the same command skips done shards and
redoes the others from scratch.  ``retry_failed`` re-captions only the rows whose status is ``error``
(after a filter was relaxed, a transient failure, a fixed decoder) and merges them by key.

Scale: under ``accelerate launch``/``torchrun`` rank ``r`` of ``N`` takes shards ``r, r + N, ...`` of
the expanded list (brace order; globs and folders sorted; deterministic, independent of what is already
done, so every shard has exactly one owner); ranks never exchange captions, and the last rank to finish
merges the per-rank metrics.  Memory is flat in the number of shards: samples stream through DataLoader workers and only the rows of
the shards in flight are held.
"""

from __future__ import annotations

import json
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from genkit.config import field
from genkit.errors import ConfigError, RunError
from genkit.recaption.data import (
    COLUMNS,
    ImageChecks,
    PromptEncoder,
    ShardStream,
    ShardTask,
    StreamPolicy,
    spool_path,
)
from genkit.recaption.shards import TarWriter, expand_shards, iter_tar_samples, kind, shard_name

PAPER_PROMPT = "Please generate a detailed caption of this image. Please be as descriptive as possible."


@dataclass
class RecaptionConfig:
    """How ``genkit recaption`` captions (the ``--model``, SHARDS and ``--out`` are command-line options)."""

    prompt: str = field(PAPER_PROMPT, help="instruction given with each image; '{caption}' is replaced by the "
                        "sample's original caption")
    prompt_format: str = field("auto", help="'auto' (the processor's chat template, else LLaVA-1.5's "
                               "'USER: <image>\\n{prompt} ASSISTANT:'), 'chat', or a format with {prompt} and <image>")
    caption_chars: int = field(1000, help="at most this many characters of the original caption go into {caption}",
                               min=0)
    max_new_tokens: int = field(128, help="generated tokens per caption at most (greedy decoding)", min=1)
    batch_size: int = field(16, help="images per generate call (left-padded)", min=1)
    num_workers: int = field(4, help="DataLoader worker processes decoding and preprocessing images (0 = inline)",
                             min=0)
    prefetch: int = field(4, help="batches prepared ahead by each worker", min=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        "auto", help="model precision: auto = bfloat16 on CUDA, float32 on CPU")
    attn_implementation: str = field("", help="transformers attention kernel (sdpa, flash_attention_2, eager; "
                                     "empty = transformers' default)")
    seed: int = field(0, help="global seed (greedy decoding does not depend on it; recorded for provenance)")
    cpu: bool = field(False, help="force the CPU even when a GPU is present")
    threads: int = field(0, help="torch CPU threads in the main process (0 = torch's default)", min=0)
    min_image_side: int = field(8, help="images with a smaller side (px) are recorded as errors", min=1)
    max_image_pixels: int = field(64_000_000, help="images with more pixels are recorded as errors (before "
                                  "decoding)", min=1)
    max_aspect_ratio: float = field(40.0, help="images more elongated than this are recorded as errors", min=1.0)
    retries: int = field(3, help="times a shard whose stream fails (connection dropped, HTTP error, stall, failed "
                         "pipe command) is re-read from its start; samples already captioned are not redone", min=0)
    retry_backoff: float = field(2.0, help="seconds before the first retry of a shard, doubled for each next one "
                                 "(at most 60)", min=0.0)
    stall_timeout: float = field(120.0, help="seconds an http(s):// or pipe: stream may go without delivering 64 KiB "
                                 "before it is killed and retried (0 = wait forever)", min=0.0)
    write_tar: bool = field(False, help="also write NAME.tar: the input shard plus KEY.<tar_field> captions")
    tar_field: str = field("re_caption.txt", help="field (extension) of the new caption in the output tar")

    def validate(self) -> list[str]:
        problems = []
        if not self.prompt.strip():
            problems.append("prompt: must not be empty")
        if self.prompt_format not in ("auto", "chat") and "{prompt}" not in self.prompt_format:
            problems.append("prompt_format: must be 'auto', 'chat' or a format string containing {prompt}")
        if not self.tar_field or "/" in self.tar_field:
            problems.append("tar_field: must be a non-empty extension such as re_caption.txt")
        return problems

    def image_checks(self) -> ImageChecks:
        return ImageChecks(self.min_image_side, self.max_image_pixels, self.max_aspect_ratio)


# ----------------------------------------------------------------------------------------- outputs
def output_paths(out: Path, name: str) -> dict[str, Path]:
    return {"parquet": out / f"{name}.parquet", "tar": out / f"{name}.tar", "done": out / f"{name}.done.json",
            "failed": out / f"{name}.failed.json"}


def _schema():
    import pyarrow as pa

    s, i = pa.string(), pa.int32()
    types = {"key": s, "re_caption": s, "org_caption": s, "sha256": s, "status": s, "error": s,
             "width": i, "height": i, "num_tokens": i}
    return pa.schema([(c, types[c]) for c in COLUMNS])


def read_table(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist()


def read_done(out: Path, name: str) -> dict | None:
    """The shard's done marker if the shard is complete (marker readable, table present with its row count)."""
    paths = output_paths(out, name)
    try:
        done = json.loads(paths["done"].read_text())
        import pyarrow.parquet as pq

        if pq.ParquetFile(paths["parquet"]).metadata.num_rows != done["counts"]["samples"]:
            return None
    except Exception:  # noqa: BLE001 - a missing, partial or foreign file: the shard is not done
        return None
    return done


def _clean_tmp(out: Path, names: set[str]) -> None:
    """Remove temporary files that a killed run left for these shards (only this rank writes them).

    One directory scan for all shards (not one glob per shard: folders hold 100k+ outputs).
    """
    for entry in os.scandir(out):
        n = entry.name
        if not (n.startswith(".") and n.endswith(".tmp")):
            continue
        # .NAME.parquet.XXXX.tmp etc., and .NAME.source.tmp (a remote shard's bytes kept for write_tar)
        for marker in (".source.tmp", ".parquet.", ".done.json.", ".failed.json.", ".tar."):
            if marker in n and n[1: n.rindex(marker)] in names:
                try:
                    os.unlink(entry.path)
                except OSError:
                    pass
                break


def write_shard(out: Path, name: str, rows: list[dict], *, meta: dict) -> Path:
    """Write ``NAME.parquet`` atomically (temporary name, fsync, rename), provenance in its metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from genkit.runtime import atomic_write_bytes

    table = pa.Table.from_pylist(rows, schema=_schema())
    table = table.replace_schema_metadata({"genkit": json.dumps(meta, default=str)})
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return atomic_write_bytes(output_paths(out, name)["parquet"], buf.getvalue().to_pybytes())


def write_tar_copy(src: str | Path, dst: Path, captions: dict[str, str], field_name: str) -> Path:
    """Copy the local shard ``src`` to ``dst`` (atomically) adding ``KEY.<field_name>`` after each captioned
    sample (a remote shard's bytes were copied to a local spool file while it was read)."""
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            w = TarWriter(f)
            seen: dict[str, int] = {}
            for raw in iter_tar_samples(str(src)):
                if not raw.fields:
                    continue
                n = seen[raw.key] = seen.get(raw.key, 0) + 1
                for ext, data in raw.fields.items():
                    w.add(f"{raw.key}.{ext}", data)
                if n == 1 and raw.key in captions:  # later duplicates of a key are error rows
                    w.add(f"{raw.key}.{field_name}", captions[raw.key].encode("utf-8"))
            w.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return dst


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """Old rows with those re-done replaced by key (order kept); new keys appended."""
    by_key = {r["key"]: r for r in new}
    merged = [by_key.pop(r["key"], r) for r in old]
    return merged + list(by_key.values())


def counts(rows: list[dict]) -> dict:
    ok = sum(r["status"] == "ok" for r in rows)
    return {"samples": len(rows), "ok": ok, "error": len(rows) - ok}


# ----------------------------------------------------------------------------------------- the run
@dataclass
class _Open:
    """A shard in flight in the main process."""

    rows: list
    t0: float
    tokens: int = 0
    retried: bool = False


class _Finisher:
    """Finalises shards (Parquet, optional tar, done marker) on one background thread."""

    def __init__(self, out: Path, cfg: RecaptionConfig, provenance: dict, settings: dict, rank: int, world: int):
        self.out, self.cfg, self.provenance, self.settings = out, cfg, provenance, settings
        self.rank, self.world = rank, world
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recaption-writer")
        self.pending: list[Future] = []

    def submit(self, task: ShardTask, state: _Open, t_end: float, stream: dict | None = None) -> None:
        self.pending.append(self.pool.submit(self._finish, task, state, t_end, stream or {}))
        while len(self.pending) > 2:  # bound the rows held by a slow writer
            self.pending.pop(0).result()

    def fail(self, task: ShardTask, stream: dict) -> None:
        """A shard given up after its retries: ``NAME.failed.json`` says why, no done marker (a rerun retries it)."""
        self.pending.append(self.pool.submit(self._fail, task, stream))

    def _fail(self, task: ShardTask, stream: dict) -> None:
        from genkit.runtime import atomic_write_json

        name = shard_name(task.url)
        errors = stream.get("errors", [])
        atomic_write_json(output_paths(self.out, name)["failed"], {
            "shard": task.url, "attempts": stream.get("attempts", 0), "errors": errors, "rank": self.rank,
            "failed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        line = {"shard": name, "rank": self.rank, "status": "failed", "attempts": stream.get("attempts", 0),
                "error": errors[-1] if errors else None}
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")

    def _finish(self, task: ShardTask, state: _Open, t_end: float, stream: dict) -> dict:
        name = shard_name(task.url)
        paths = output_paths(self.out, name)
        rows = state.rows
        if task.only_keys is not None:
            rows = merge_rows(read_table(paths["parquet"]), rows)
        c = counts(rows)
        seconds = max(t_end - state.t0, 1e-9)
        meta = {"shard": task.url, **self.provenance}
        write_shard(self.out, name, rows, meta=meta)
        outputs = {"parquet": paths["parquet"].name}
        if self.cfg.write_tar:
            caps = {r["key"]: r["re_caption"] for r in rows if r["status"] == "ok" and r["re_caption"] is not None}
            local = kind(task.url) == "local"
            src = task.url if local else spool_path(self.out, task.url)
            write_tar_copy(src, paths["tar"], caps, self.cfg.tar_field)
            if not local:
                Path(src).unlink(missing_ok=True)
            outputs["tar"] = paths["tar"].name
        done_now = len(state.rows)
        ok_now = sum(r["status"] == "ok" for r in state.rows)
        done = {
            "shard": task.url,
            "outputs": outputs,
            "counts": c,
            "this_run": {"samples": done_now, "ok": ok_now, "retry_failed": task.only_keys is not None,
                         "seconds": round(seconds, 3), "images_per_second": ok_now / seconds,
                         "generated_tokens": state.tokens, "tokens_per_second": state.tokens / seconds},
            # attempts, the error of each failed one, and how many samples (handed on before the last
            # failure) the successful re-read skipped
            "stream": {"attempts": stream.get("attempts", 1), "errors": stream.get("errors", []),
                       "skipped": stream.get("skipped", 0)},
            "rank": self.rank, "world_size": self.world,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "settings": self.settings,
            "provenance": self.provenance,
        }
        from genkit.runtime import atomic_write_json

        atomic_write_json(paths["done"], done)  # last: the shard now counts as done
        paths["failed"].unlink(missing_ok=True)  # an earlier run's failure record is obsolete
        line = {"shard": name, "rank": self.rank, "status": "done", **c, "seconds": round(seconds, 3),
                "images_per_second": round(ok_now / seconds, 3), "generated_tokens": state.tokens}
        with open(self.out / "log.jsonl", "a") as f:  # O_APPEND: whole lines from concurrent ranks
            f.write(json.dumps(line) + "\n")
        return done

    def close(self) -> None:
        try:
            for fut in self.pending:
                fut.result()
        finally:
            self.pool.shutdown(wait=True)


def plan(shards: list[str], out: Path, rank: int, world: int, *, retry_failed: bool, settings: dict
         ) -> tuple[list[ShardTask], int]:
    """This rank's shards still to do (rank-strided over the sorted list) and how many were skipped."""
    tasks, skipped = [], 0
    mine = shards[rank::world]
    _clean_tmp(out, {shard_name(p) for p in mine})
    for path in mine:
        name = shard_name(path)
        done = read_done(out, name)
        if done is None:
            tasks.append(ShardTask(len(tasks), path))
            continue
        diff = [k for k in settings if done.get("settings", {}).get(k) != settings[k]]
        if diff:
            raise ConfigError(f"--out: shard '{name}' in {out} was captioned with other settings ({', '.join(diff)} "
                              "differ): rerun with the same model and settings, or use another --out")
        if retry_failed and done["counts"]["error"]:
            bad = frozenset(r["key"] for r in read_table(output_paths(out, name)["parquet"]) if r["status"] != "ok")
            tasks.append(ShardTask(len(tasks), path, only_keys=bad))
        else:
            skipped += 1
    return tasks, skipped


def recaption(cfg: RecaptionConfig, shards_spec: str, model: str | os.PathLike, out: str | os.PathLike, *,
              retry_failed: bool = False, trust_remote_code: bool = False, quiet: bool = False) -> dict:
    """Caption every sample of ``shards_spec`` with the VLM folder ``model`` into ``out``; returns the metrics.

    Runs as one process or as one rank of many (``accelerate launch`` / ``torchrun``).  All configuration
    problems (shards, model folder, output settings) raise :class:`ConfigError` before any shard is read.
    """
    import torch
    from torch.utils.data import DataLoader

    from genkit.recaption.model import generate_captions, generation_config, load_vlm
    from genkit.runtime import Progress, process_info

    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", str(out)) or str(out).startswith("pipe:"):
        raise ConfigError(f"--out '{out}': the output must be a local or mounted folder (shards may be remote)")
    out = Path(out)
    shards = expand_shards(shards_spec)
    pi = process_info(cpu=cfg.cpu)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(model, device=pi.device, dtype=cfg.dtype, trust_remote_code=trust_remote_code,
                   attn_implementation=cfg.attn_implementation)
    try:
        encoder = PromptEncoder(vlm.processor, cfg.prompt, cfg.prompt_format, cfg.caption_chars)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    gen_cfg = generation_config(vlm, cfg.max_new_tokens)
    settings = {  # what decides the captions: a done shard made with other settings is refused
        "model_config_sha256": vlm.config_sha256, "prompt": cfg.prompt, "prompt_format": cfg.prompt_format,
        "caption_chars": cfg.caption_chars, "max_new_tokens": cfg.max_new_tokens, "decoding": "greedy",
        "dtype": str(vlm.dtype).removeprefix("torch."),
    }
    provenance = {
        "model": str(vlm.path), "model_type": vlm.model_type, "model_config_sha256": vlm.config_sha256,
        "prompt": cfg.prompt, "prompt_format": cfg.prompt_format,
        "generation": {"do_sample": False, "num_beams": 1, "max_new_tokens": cfg.max_new_tokens,
                       "batch_size": cfg.batch_size, "dtype": settings["dtype"]},
        "seed": cfg.seed, "versions": _versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    if pi.is_main:
        _write_config(out / "config.yaml", cfg, shards_spec, model, retry_failed)
    tasks, skipped = plan(shards, out, pi.rank, pi.world_size, retry_failed=retry_failed, settings=settings)

    policy = StreamPolicy(retries=cfg.retries, backoff=cfg.retry_backoff, stall_timeout=cfg.stall_timeout,
                          spool_dir=str(out) if cfg.write_tar else None)
    stream = ShardStream(tasks, encoder, cfg.image_checks(), batch_size=cfg.batch_size, pad_id=vlm.pad_id,
                         policy=policy)
    loader = DataLoader(stream, batch_size=None, num_workers=cfg.num_workers,
                        prefetch_factor=cfg.prefetch if cfg.num_workers else None,
                        pin_memory=pi.device.type == "cuda")
    finisher = _Finisher(out, cfg, provenance, settings, pi.rank, pi.world_size)
    open_: dict[int, _Open] = {}
    n_ok = n_err = n_tok = 0
    n_failed = n_retried = n_retries = 0
    t0 = time.perf_counter()
    model_s = 0.0
    desc = f"recaption {pi.rank}/{pi.world_size}" if pi.world_size > 1 else "recaption"
    try:
        with Progress(len(tasks), description=desc, enabled=not quiet, unit="shard") as bar:
            for chunk in loader:
                now = time.perf_counter()
                for s, _ in chunk.rows:
                    if s not in open_:
                        open_[s] = _Open([], now)
                if chunk.gen_rows:
                    tm = time.perf_counter()
                    texts, ntoks = _generate_robust(vlm, chunk.inputs, cfg.max_new_tokens, gen_cfg, generate_captions)
                    model_s += time.perf_counter() - tm
                    for pos, text, nt in zip(chunk.gen_rows, texts, ntoks):
                        s, row = chunk.rows[pos]
                        if isinstance(text, Exception):
                            msg = (str(text).strip().splitlines() or [""])[0][:300]
                            row["status"], row["error"] = "error", f"generation failed ({type(text).__name__}: {msg})"
                            continue
                        row["re_caption"], row["num_tokens"] = text, nt
                        open_[s].tokens += nt
                        n_tok += nt
                for s, row in chunk.rows:
                    open_[s].rows.append(row)
                    if row["status"] == "ok":
                        n_ok += 1
                    else:
                        n_err += 1
                for s in chunk.finished:
                    state = open_.pop(s, None) or _Open([], time.perf_counter())
                    info = chunk.streams.get(s, {})
                    n_retried += info.get("attempts", 1) > 1
                    n_retries += info.get("attempts", 1) - 1
                    finisher.submit(tasks[s], state, time.perf_counter(), info)
                for s in chunk.failed:  # given up after the retries: its rows are dropped, no done marker
                    state = open_.pop(s, None) or _Open([], time.perf_counter())
                    ok = sum(r["status"] == "ok" for r in state.rows)
                    n_ok, n_err, n_tok = n_ok - ok, n_err - (len(state.rows) - ok), n_tok - state.tokens
                    info = chunk.streams.get(s, {})
                    n_failed += 1
                    n_retries += max(info.get("attempts", 1) - 1, 0)
                    finisher.fail(tasks[s], info)
                wall = time.perf_counter() - t0
                bar.update(len(chunk.finished) + len(chunk.failed), img_s=n_ok / wall, tok_s=n_tok / wall,
                           failed=n_err)
        finisher.close()
    except KeyboardInterrupt:
        raise RunError("interrupted: finished shards are kept; rerun the same command to continue") from None
    finally:
        finisher.pool.shutdown(wait=False, cancel_futures=True)
    wall = time.perf_counter() - t0
    rank_metrics = {
        "rank": pi.rank, "shards_assigned": len(tasks) + skipped, "shards_skipped": skipped,
        "shards_done": len(tasks) - n_failed, "shards_failed": n_failed, "shards_retried": n_retried,
        "stream_retries": n_retries, "samples_ok": n_ok, "samples_failed": n_err, "generated_tokens": n_tok,
        "wall_seconds": round(wall, 3), "model_seconds": round(model_s, 3),
        "images_per_second": n_ok / wall if wall else 0.0, "generated_tokens_per_second": n_tok / wall if wall else 0.0,
    }
    return _write_metrics(out, shards, pi.rank, pi.world_size, rank_metrics, cfg.seed)


def _generate_robust(vlm, inputs, max_new_tokens, gen_cfg, generate_captions):
    """Generate for the batch; if that fails, per sample, so one bad input fails alone (as an exception)."""
    import torch

    try:
        return generate_captions(vlm, inputs, max_new_tokens, gen_cfg)
    except Exception as e:  # noqa: BLE001
        n = inputs["input_ids"].shape[0]
        if n == 1:
            return [e], [0]
        if vlm.device.type == "cuda":
            torch.cuda.empty_cache()
    texts, ntoks = [], []
    for i in range(n):
        one = {k: v[i: i + 1] for k, v in inputs.items()}
        # drop the left padding of this row so it is generated exactly as alone
        keep = int(one["attention_mask"].sum()) if "attention_mask" in one else one["input_ids"].shape[1]
        one = {k: (v[:, -keep:] if v.dim() >= 2 and v.shape[1] == inputs["input_ids"].shape[1] and
                   (k.endswith("ids") or k.endswith("mask")) else v) for k, v in one.items()}
        try:
            t, c = generate_captions(vlm, one, max_new_tokens, gen_cfg)
            texts.append(t[0])
            ntoks.append(c[0])
        except Exception as e:  # noqa: BLE001
            texts.append(e)
            ntoks.append(0)
    return texts, ntoks


def _versions() -> dict:
    from genkit.runtime import software_versions

    v = software_versions()
    for mod in ("transformers", "pyarrow"):
        try:
            v[mod] = __import__(mod).__version__
        except ImportError:  # pragma: no cover
            pass
    return v


def _write_config(path: Path, cfg: RecaptionConfig, shards_spec: str, model, retry_failed: bool) -> None:
    import yaml

    from genkit.runtime import atomic_write_text

    doc = {"command": "recaption", "shards": shards_spec, "model": str(model), "retry_failed": retry_failed,
           **asdict(cfg)}
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


def _write_metrics(out: Path, shards: list[str], rank: int, world: int, mine: dict, seed: int) -> dict:
    """Per-rank figures; the last rank to finish (it sees every rank's file) writes the merged metrics.json.

    Every rank writes its own file before listing the others', so whichever finishes last sees them all:
    no collective call, no barrier that a slow rank could time out.
    """
    from genkit.runtime import atomic_write_json

    if world > 1:
        atomic_write_json(out / f"metrics.rank-{rank:05d}-of-{world:05d}.json", mine)
        files = [out / f"metrics.rank-{r:05d}-of-{world:05d}.json" for r in range(world)]
        if not all(f.exists() for f in files):
            return mine
        try:
            per_rank = [json.loads(f.read_text()) for f in files]
        except (OSError, ValueError):
            return mine
    else:
        per_rank = [mine]
    summed = {k: sum(m[k] for m in per_rank) for k in ("shards_done", "shards_skipped", "shards_failed",
                                                         "shards_retried", "stream_retries", "samples_ok",
                                                         "samples_failed", "generated_tokens")}
    wall = max(m["wall_seconds"] for m in per_rank)
    busy = sum(m["model_seconds"] for m in per_rank) / max(sum(m["wall_seconds"] for m in per_rank), 1e-9)
    totals = {"shards_total": len(shards), "shards_complete": 0, "shards_failed_total": 0, "samples_ok_total": 0,
              "samples_failed_total": 0}
    for p in shards:
        done = read_done(out, shard_name(p))
        if done is not None:
            totals["shards_complete"] += 1
            totals["samples_ok_total"] += done["counts"]["ok"]
            totals["samples_failed_total"] += done["counts"]["error"]
        elif output_paths(out, shard_name(p))["failed"].exists():
            totals["shards_failed_total"] += 1  # given up after its retries (NAME.failed.json says why)
    metrics = {**summed, "wall_seconds": wall,
               "images_per_second": summed["samples_ok"] / wall if wall else 0.0,
               "generated_tokens_per_second": summed["generated_tokens"] / wall if wall else 0.0,
               # share of the wall time spent in generate: well below 100% = the model waits for data
               # (raise num_workers) or for writes
               "model_busy_percent": round(100 * busy, 2),
               **totals, "seed": seed, "world_size": world, "versions": _versions()}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
