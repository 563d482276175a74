"""Recaption throughput: the full pipeline vs a bare ``model.generate`` loop, shards over HTTP vs local files,
and peak memory vs shard count.

    python benchmarks/recaption_throughput.py            # ~10 min on 2 busy CPU cores; JSON to benchmarks/results/
    python benchmarks/recaption_throughput.py --parts http   # only the HTTP-vs-local comparison

Side by side in one process, on the same randomly initialised LLaVA folder (CLIP ViT + Llama, built from a
config, no download) and the same real photos (crops of scikit-learn's and scikit-image's sample images,
digits, LFW faces, packed into webdataset shards):

- **bare**: every image decoded and preprocessed up front, batches collated in memory, then only
  ``model.generate`` is timed (the ceiling: a model that never waits for data).
- **pipeline**: ``genkit.recaption.recaption`` on the shards, end to end after model loading: streaming tar
  reads, checks, decoding and preprocessing in a DataLoader worker, generation, Parquet + done markers.

overhead = 1 - pipeline images/s / bare images/s (the issue asks for at most 10%).

HTTP: the same shards served by a threaded HTTP server on 127.0.0.1 (``genkit.recaption.testing.ShardServer``,
plain GET) and read through webdataset's ``curl`` opener, against the same shards read as local files, in
the same run: (1) the whole pipeline, repeats alternating local / HTTP, overhead = 1 - HTTP images/s / local
images/s (best vs best and the median of back-to-back pairs); (2) reading alone (every sample of the
memory-test shards through ``iter_tar_samples``, no model), MB/s and the added time per shard (curl start,
connection, the drain and status check of the stream); (3) streaming rate on one large shard (``--big-mb``,
the bench photos repeated under new keys, nearer real 100 MB-1 GB shards): local file, HTTP, ``pipe:cat``.
The server runs in the benchmark's own process (it shares the GIL with the reader), so the HTTP figures are
a pessimistic bound for a remote server.  Repeats alternate the two;
reported are best vs best, the median over back-to-back pairs, and, immune to the load of other jobs on a
shared CPU, the share of each pipeline run's wall time spent outside ``generate`` (data waits, writes).
On a 2-core CPU the model runs on one thread and the decoding worker on the other, the CPU analogue of a GPU
fed by CPU workers.

Peak memory: the pipeline in a fresh process over 2 and then 20 shards (same shard size); peak RSS of the
main process and of the worker must not grow with the number of shards (streaming), nor may the main
process's RSS keep growing from the first to the second half of the 20-shard run.  For scale: keeping the
pixels of finished samples would add ~0.6 MiB per image here, ~190 MiB for the 288 extra images of 20 shards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL_SIZE = dict(image_size=224, patch_size=16, hidden=384, layers=6, heads=6, vision_hidden=192, vision_layers=4)


def build_inputs(folder: Path, n_shards: int, per_shard: int, seed: int = 0) -> list[Path]:
    from genkit.recaption import testing as T

    T.build_tiny_llava(folder / "model", **MODEL_SIZE)
    return T.make_shards(folder / "shards", n_shards, per_shard, seed=seed)


def bare_loop(model_dir: Path, shards: list[Path], cfg) -> dict:
    """Pre-decode everything, then time only generate on the same batches the pipeline would form."""
    from genkit.recaption.data import ImageChecks, PromptEncoder, collate, prepare_sample
    from genkit.recaption.model import generate_captions, generation_config, load_vlm
    from genkit.recaption.shards import iter_tar_samples

    vlm = load_vlm(model_dir, device="cpu", dtype="float32")
    enc = PromptEncoder(vlm.processor, cfg.prompt)
    items = []
    for p in shards:
        for raw in iter_tar_samples(p):
            _, inputs = prepare_sample(raw, enc, ImageChecks())
            items.append(inputs)
    batches = [collate(items[i:i + cfg.batch_size], vlm.pad_id) for i in range(0, len(items), cfg.batch_size)]
    gc = generation_config(vlm, cfg.max_new_tokens)
    generate_captions(vlm, batches[0], cfg.max_new_tokens, gc)  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    tokens = 0
    for b in batches:
        _, counts = generate_captions(vlm, b, cfg.max_new_tokens, gc)
        tokens += sum(counts)
    dt = time.perf_counter() - t0
    return {"images": len(items), "seconds": dt, "images_per_second": len(items) / dt, "tokens": tokens}


def pipeline(model_dir: Path, shards: list[Path] | str, cfg, out: Path) -> dict:
    from genkit.recaption import recaption

    spec = shards if isinstance(shards, str) else "::".join(map(str, shards))
    m = recaption(cfg, spec, model_dir, out, quiet=True)
    return {"images": m["samples_ok"], "failed": m["samples_failed"], "seconds": m["wall_seconds"],
            "images_per_second": m["images_per_second"], "tokens": m["generated_tokens"],
            "model_busy_percent": m["model_busy_percent"]}


def read_only(urls: list[str]) -> dict:
    """Every sample of ``urls`` through ``iter_tar_samples`` (no decoding, no model): seconds and bytes."""
    from genkit.recaption.shards import iter_tar_samples

    t0 = time.perf_counter()
    n = nbytes = 0
    for u in urls:
        for raw in iter_tar_samples(u, stall_timeout=60):
            n += 1
            nbytes += sum(len(v) for v in raw.fields.values())
    dt = time.perf_counter() - t0
    return {"samples": n, "field_bytes": nbytes, "seconds": dt, "mb_per_second": nbytes / dt / 1e6}


def big_shard(folder: Path, src: Path, mb: float) -> Path:
    """One shard of about ``mb`` MB: the samples of ``src`` repeated under new keys."""
    from genkit.recaption import testing as T
    from genkit.recaption.shards import iter_tar_samples

    samples = [s.fields for s in iter_tar_samples(str(src))]
    per = sum(len(v) + 1024 for f in samples for v in f.values()) / len(samples)
    n = max(1, int(mb * 1e6 / per))
    return T.write_tar(folder / "big-000000.tar", [(f"{i:08d}", samples[i % len(samples)]) for i in range(n)])


def http_vs_local(model_dir: Path, bench: list[Path], read_shards: list[Path], cfg, tmp: Path, repeats: int,
                  big_mb: float) -> dict:
    """The pipeline and bare reading over HTTP from 127.0.0.1 against local files, alternating, same run."""
    from genkit.recaption.testing import ShardServer

    folder = bench[0].parent
    big = big_shard(tmp / "big", bench[0], big_mb)
    runs = {"local": [], "http": []}
    reads = {"local": [], "http": []}
    bigs = {"local": [], "http": [], "pipe": []}
    with ShardServer(folder) as srv, ShardServer(big.parent) as big_srv:
        http_spec = "::".join(srv.url(p.name) for p in bench)
        for r in range(repeats):
            runs["local"].append(pipeline(model_dir, bench, cfg, tmp / f"http-cmp-local-{r}"))
            runs["http"].append(pipeline(model_dir, http_spec, cfg, tmp / f"http-cmp-http-{r}"))
            reads["local"].append(read_only([str(p) for p in read_shards]))
            reads["http"].append(read_only([srv.url(p.name) for p in read_shards]))
            bigs["local"].append(read_only([str(big)]))
            bigs["http"].append(read_only([big_srv.url(big.name)]))
            bigs["pipe"].append(read_only([f"pipe:cat {big}"]))
            print(f"http repeat {r}: pipeline local {runs['local'][-1]['images_per_second']:.2f} img/s, "
                  f"http {runs['http'][-1]['images_per_second']:.2f} img/s; read local "
                  f"{reads['local'][-1]['mb_per_second']:.1f} MB/s, http {reads['http'][-1]['mb_per_second']:.1f} MB/s; "
                  f"big shard local {bigs['local'][-1]['mb_per_second']:.0f} MB/s, http "
                  f"{bigs['http'][-1]['mb_per_second']:.0f} MB/s, pipe:cat {bigs['pipe'][-1]['mb_per_second']:.0f} MB/s",
                  flush=True)
        requests = sum(srv.requests.values())
    best = {k: max(v, key=lambda x: x["images_per_second"]) for k, v in runs.items()}
    paired = statistics.median(1 - h["images_per_second"] / lo["images_per_second"]
                               for lo, h in zip(runs["local"], runs["http"]))
    rbest = {k: min(v, key=lambda x: x["seconds"]) for k, v in reads.items()}
    return {
        "pipeline_local_images_per_second": best["local"]["images_per_second"],
        "pipeline_http_images_per_second": best["http"]["images_per_second"],
        "http_pipeline_overhead_percent": round(100 * (1 - best["http"]["images_per_second"]
                                                       / best["local"]["images_per_second"]), 2),
        "http_pipeline_overhead_paired_median_percent": round(100 * paired, 2),
        "read_local_mb_per_second": round(rbest["local"]["mb_per_second"], 1),
        "read_http_mb_per_second": round(rbest["http"]["mb_per_second"], 1),
        "read_shards": len(read_shards),
        "read_added_ms_per_shard": round(1000 * (rbest["http"]["seconds"] - rbest["local"]["seconds"])
                                         / len(read_shards), 2),
        "big_shard_mb": round(big.stat().st_size / 1e6, 1),
        **{f"big_shard_{k}_mb_per_second": round(max(x["mb_per_second"] for x in v), 1) for k, v in bigs.items()},
        "http_requests": requests,
        "runs": runs, "reads": reads, "big_reads": bigs,
    }


def _rss_mib() -> float:
    """Current resident set size of this process (Linux /proc; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def peak_memory_child(model_dir: str, spec: str, out: str, overrides: list[str]) -> None:
    """Run in a fresh process: print peak RSS (MiB) of this process and of its DataLoader worker(s).

    The main process's RSS is also sampled every 50 ms while shards stream: its maximum over the first and
    the second half of the captioning time shows whether memory keeps growing with shards or plateaus once
    the allocator is warm (the whole-process peak is set by model loading).
    """
    import threading

    from genkit import config as C
    from genkit.recaption import RecaptionConfig, recaption

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.05):
            samples.append((time.perf_counter(), _rss_mib()))

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    m = recaption(C.load(RecaptionConfig, None, overrides), spec, model_dir, out, quiet=True)
    stop.set()
    t.join()
    t_end = samples[-1][0] if samples else 0.0
    t_start = t_end - m["wall_seconds"]  # captioning started after model loading
    run = [r for ts, r in samples if ts >= t_start]
    half = len(run) // 2
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_peak_rss_mib": round(self_mb, 1), "worker_peak_rss_mib": round(child_mb, 1),
                      "main_rss_first_half_max_mib": round(max(run[:half] or [0.0]), 1),
                      "main_rss_second_half_max_mib": round(max(run[half:] or [0.0]), 1),
                      "images": m["samples_ok"], "shards": m["shards_done"]}))


def measure_memory(model_dir: Path, shards: list[Path], out: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--child", str(model_dir), "::".join(map(str, shards)), str(out), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", choices=["throughput", "http", "memory"],
                    default=["throughput", "http", "memory"], help="which comparisons to run")
    ap.add_argument("--shards", type=int, default=4, help="shards for the throughput comparison")
    ap.add_argument("--per-shard", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--num-workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the model (both sides)")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--http-repeats", type=int, default=3)
    ap.add_argument("--big-mb", type=float, default=64.0, help="size of the large shard for the streaming rate")
    ap.add_argument("--mem-per-shard", type=int, default=16)
    ap.add_argument("--mem-shards", type=int, nargs=2, default=[2, 20])
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recaption_throughput.json")
    args = ap.parse_args()

    from genkit import config as C
    from genkit.recaption import RecaptionConfig
    from genkit.recaption.pipeline import _versions
    from genkit.runtime import atomic_write_json

    torch.set_num_threads(args.threads)
    overrides = [f"batch_size={args.batch_size}", f"max_new_tokens={args.max_new_tokens}",
                 f"num_workers={args.num_workers}", f"threads={args.threads}", "prefetch=4"]
    cfg = C.load(RecaptionConfig, None, overrides)
    result = {
        "benchmark": "recaption_throughput",
        "model": {"kind": "random LLaVA (CLIP ViT + Llama) built from a config", **MODEL_SIZE},
        "settings": {**vars(args), "out": str(args.out)},
        "device": "cpu",
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(os.getloadavg()),
    }
    summary_keys = []
    with tempfile.TemporaryDirectory(prefix="recap-bench-") as tmp:
        tmp = Path(tmp)
        shards = build_inputs(tmp, max(args.shards, *args.mem_shards), max(args.per_shard, args.mem_per_shard))
        model_dir = tmp / "model"
        bench = shards[: args.shards]
        if "throughput" in args.parts:
            runs = {"bare": [], "pipeline": []}
            for r in range(args.repeats):
                runs["bare"].append(bare_loop(model_dir, bench, cfg))
                runs["pipeline"].append(pipeline(model_dir, bench, cfg, tmp / f"out-{r}"))
                print(f"repeat {r}: bare {runs['bare'][-1]['images_per_second']:.2f} img/s, "
                      f"pipeline {runs['pipeline'][-1]['images_per_second']:.2f} img/s", flush=True)
            best = {k: max(v, key=lambda x: x["images_per_second"]) for k, v in runs.items()}
            overhead = 1 - best["pipeline"]["images_per_second"] / best["bare"]["images_per_second"]
            # back-to-back pairs share the machine's load better than bests do: median of the pair ratios
            paired = statistics.median(1 - p["images_per_second"] / b["images_per_second"]
                                       for b, p in zip(runs["bare"], runs["pipeline"]))
            # load-independent: within each pipeline run, the share of wall time NOT spent in generate
            in_run = statistics.median(1 - p["model_busy_percent"] / 100 for p in runs["pipeline"])
            result.update({
                "bare_images_per_second": best["bare"]["images_per_second"],
                "pipeline_images_per_second": best["pipeline"]["images_per_second"],
                "pipeline_overhead_percent": round(100 * overhead, 2),
                "pipeline_overhead_paired_median_percent": round(100 * paired, 2),
                "pipeline_time_outside_generate_percent": round(100 * in_run, 2),
                # verdict on the load-robust figures (a best-of is one lucky run on a shared CPU)
                "overhead_at_most_10_percent": max(paired, in_run) <= 0.10,
                "runs": runs,
            })
            summary_keys += ["bare_images_per_second", "pipeline_images_per_second", "pipeline_overhead_percent",
                             "pipeline_overhead_paired_median_percent", "pipeline_time_outside_generate_percent",
                             "overhead_at_most_10_percent"]
        if "http" in args.parts:
            http = http_vs_local(model_dir, bench, shards[: max(args.mem_shards)], cfg, tmp, args.http_repeats,
                                 args.big_mb)
            result["http"] = http
            summary_keys += [f"http.{k}" for k in http if k not in ("runs", "reads", "big_reads")]
        if "memory" in args.parts:
            mem_overrides = [f"batch_size={args.batch_size}", "max_new_tokens=4", f"num_workers={args.num_workers}",
                             f"threads={args.threads}"]
            memory = {}
            for n in args.mem_shards:
                memory[f"{n}_shards"] = measure_memory(model_dir, shards[:n], tmp / f"mem-{n}", mem_overrides)
                print(f"{n} shards: {memory[f'{n}_shards']}", flush=True)
            lo, hi = (memory[f"{n}_shards"] for n in args.mem_shards)
            result.update({
                "peak_memory": memory,
                "main_rss_growth_mib": round(hi["main_peak_rss_mib"] - lo["main_peak_rss_mib"], 1),
                "main_rss_growth_second_half_mib": round(hi["main_rss_second_half_max_mib"]
                                                         - hi["main_rss_first_half_max_mib"], 1),
                "worker_rss_growth_mib": round(hi["worker_peak_rss_mib"] - lo["worker_peak_rss_mib"], 1),
            })
            summary_keys += ["main_rss_growth_mib", "main_rss_growth_second_half_mib", "worker_rss_growth_mib"]
    result["load_average_at_end"] = list(os.getloadavg())
    result["versions"] = _versions()
    atomic_write_json(args.out, result)

    def get(k):
        return result["http"][k[5:]] if k.startswith("http.") else result[k]

    print(json.dumps({**{k: get(k) for k in summary_keys}, "load_average_at_start": result["load_average_at_start"],
                      "load_average_at_end": result["load_average_at_end"]}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        peak_memory_child(*sys.argv[2:5], sys.argv[5:])
    else:
        main()
