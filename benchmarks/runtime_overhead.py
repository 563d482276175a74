"""genkit's training step against a bare PyTorch loop, same model and batches, in one process (issue 15, item 8).

    python benchmarks/runtime_overhead.py                    # 500 steps x 4 alternating repeats, one thread
    python benchmarks/runtime_overhead.py --steps 200 --repeats 2

Model and data: the digits TarFlow of ``recipes/train-flow/tarflow-digits.yaml`` (0.41M parameters, batch 128,
uniform dequantization, dropout 0.1). All sides start from the same initial weights and train on the same
batches (``genkit.flows.train.make_inputs``: rows, dequantization noise of step s), one torch thread.

* genkit: ``genkit.flows.train.train_flow`` with the recipe's runtime (Accelerate, EMA 0.995, gradient clip 1.0,
  log every 50 steps to log.jsonl, checkpoint every 500 steps, the rich progress bar unless --quiet). Wall: its
  own ``train_seconds`` (first step to the last checkpoint written; test bits/dim and samples off) of a run of
  steps + 1 minus that of a 1-step run, so both carry the final checkpoint and the longer one the 500-step one.
* bare: the recipe's forward and NLL, ``loss.backward()``, ``torch.optim.AdamW.step()``, nothing else.
* bare+clip+ema: the bare loop plus the recipe's gradient-norm clip and weight EMA written inline (the part of
  genkit's step that is the recipe's algorithm rather than the runtime).

They alternate ``--repeats`` times (bare, bare+clip+ema, genkit, bare, ...) so a change in the machine's load hits
all; the figures are the median of each side, in steps per wall second and per CPU second of this process (the
CPU figure moves less with other processes' load, though not at all is too much to hope on shared cores). To
name what costs the difference, each extra piece of genkit's step is then timed alone (CPU ms per step,
amortised over its cadence): batch construction, gradient clip, EMA, Accelerate's optimizer/backward/autocast
wrappers, the finite-loss check, logging, checkpointing and the progress bar (its update call and its refresh
thread, which redraws only on a terminal). Writes benchmarks/results/runtime_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit import config as C  # noqa: E402
from genkit.data.batches import batch_indices  # noqa: E402
from genkit.flows.train import FlowRecipe, build_flow, lr_at, make_inputs, train_flow  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RECIPE = REPO / "recipes" / "train-flow" / "tarflow-digits.yaml"


def recipe(steps: int) -> FlowRecipe:
    return C.load(FlowRecipe, RECIPE, [f"train.steps={steps}", "eval.test_bpd=false", "eval.samples=0",
                                       "runtime.threads=1"])


def nll_of(model, x, y, dims):
    """The recipe's loss: per-dim NLL in nats (genkit.flows.train.train_flow)."""
    z, logdet = model(x, y)
    return (0.5 * z.float().flatten(1).pow(2).sum(1) - logdet.float()).mean() / dims + 0.5 * math.log(2 * math.pi)


def bare_run(cfg: FlowRecipe, train, steps: int, *, clip: bool = False, ema: bool = False) -> tuple[float, float]:
    """(wall, CPU) seconds of ``steps`` bare steps: forward, backward, AdamW step (and the same batches); with
    ``clip`` / ``ema`` also the recipe's gradient-norm clip and weight EMA, written inline (the ablation rungs)."""
    seed, t = cfg.runtime.seed, cfg.train
    torch.manual_seed(seed)
    model = build_flow(cfg, train.shape, train.num_classes)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    params = list(model.parameters())
    shadow = [p.detach().clone() for p in params] if ema else None
    dims = int(torch.tensor(train.shape).prod())
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, t)
        x, y = make_inputs(train, batch_indices(len(train), t.batch_size, step, seed), cfg, seed, step)
        loss = nll_of(model, x, y, dims)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, t.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            with torch.no_grad():
                torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - t.ema_decay)
    return time.perf_counter() - t0, time.process_time() - c0


def genkit_run(steps: int, quiet: bool) -> tuple[float, float]:
    """(wall, CPU) seconds of ``steps`` genkit steps. Wall: train_flow's own ``train_seconds`` of a run of
    steps + 1 minus that of a 1-step run (the same checkpoint cadence: one every 500 steps, plus the final one
    both have). CPU: the process time of the two whole calls, subtracted the same way (setup cancels)."""
    out = []
    for n in (1, steps + 1):
        with tempfile.TemporaryDirectory() as d:
            c0 = time.process_time()
            m = train_flow(recipe(n), Path(d) / "run", quiet=quiet)
            out.append((float(m["train_seconds"]), time.process_time() - c0))
    return out[1][0] - out[0][0], out[1][1] - out[0][1]


def timed(fn, reps: int) -> float:
    """Median CPU ms of ``fn()`` over ``reps`` calls (after one warm-up call)."""
    fn()
    out = []
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        out.append(1e3 * (time.process_time() - t0))
    return statistics.median(out)


def paired(fa, fb, reps: int) -> tuple[float, float]:
    """Median CPU ms of ``fa()`` and ``fb()``, calls interleaved so both see the same conditions."""
    fa(), fb()
    a, b = [], []
    for _ in range(reps):
        t0 = time.process_time()
        fa()
        a.append(1e3 * (time.process_time() - t0))
        t0 = time.process_time()
        fb()
        b.append(1e3 * (time.process_time() - t0))
    return statistics.median(a), statistics.median(b)


def components(cfg: FlowRecipe, train, reps: int) -> dict:
    """ms per training step of each piece genkit adds to the bare step, amortised over its cadence."""
    from genkit.runtime import EMA, Runtime
    from genkit.runtime.progress import Progress

    seed, t = cfg.runtime.seed, cfg.train
    dims = int(torch.tensor(train.shape).prod())
    torch.manual_seed(seed)
    model = build_flow(cfg, train.shape, train.num_classes).train()
    x, y = make_inputs(train, batch_indices(len(train), t.batch_size, 0, seed), cfg, seed, 0)
    res = {}
    res["batch construction (make_inputs)"] = timed(
        lambda: make_inputs(train, batch_indices(len(train), t.batch_size, 7, seed), cfg, seed, 7), reps)

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        nll_of(model, x, y, dims).backward()

    res["(reference) forward + backward"] = timed(fwd_bwd, reps)
    fwd_bwd()
    ema = EMA(model, 0.995)
    res["EMA update"] = timed(lambda: ema.update(model), reps)
    with tempfile.TemporaryDirectory() as d:
        rt = Runtime(cfg.runtime, Path(d) / "run", quiet=True)
        m1, m2 = (build_flow(cfg, train.shape, train.num_classes).train() for _ in range(2))
        for m in (m1, m2):
            nll_of(m, x, y, dims).backward()
        plain = torch.optim.AdamW(m1.parameters(), lr=1e-6, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
        opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-6, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
        pm, popt = rt.prepare(m2, opt2)
        a, b = paired(plain.step, popt.step, reps)
        res["(reference) AdamW step"] = a
        res["Accelerate optimizer wrapper (step - plain AdamW step)"] = b - a
        a, b = paired(lambda: torch.nn.utils.clip_grad_norm_(m1.parameters(), 1.0),
                      lambda: rt.clip_grad_norm_(pm.parameters(), 1.0), reps)
        res["gradient-norm clip (Accelerate's)"] = b
        leaf = torch.ones((), requires_grad=True)
        loss = leaf.detach() * 2

        def acc_backward():
            with rt.no_sync(pm, skip=False), rt.autocast():
                out = leaf * 2.0
            rt.backward(out)

        def plain_backward():
            (leaf * 2.0).backward()

        a, b = paired(plain_backward, acc_backward, reps)
        res["Accelerate backward + autocast/no_sync contexts (- plain)"] = b - a
        res["finite-loss check"] = timed(lambda: rt.check_finite(loss.detach(), 0), reps)
        log_every, ck_every = cfg.runtime.log_every, cfg.runtime.checkpoint_every
        total = torch.tensor(1.0)

        def log_once():
            rt.log(1, loss=rt.mean(total), train_bpd=rt.mean(total), lr=1e-3, grad_norm=1.0)

        res[f"logging (every {log_every} steps)"] = timed(log_once, reps) / log_every
        cfg_dict = pm.config.to_dict()
        n = [0]

        def save():
            n[0] += 1
            rt.save_checkpoint(n[0], pm, popt, config=cfg_dict, ema=ema)

        res[f"checkpoint (every {ck_every} steps)"] = timed(save, max(3, reps // 20)) / ck_every
        with Progress(10 ** 9, description="bench", enabled=True) as bar:
            res["progress bar update"] = timed(lambda: bar.update(1, bpd=2.0), reps)
    res["progress bar refresh thread (CPU ms per second of training)"] = bar_thread_ms_per_s()
    return {k: round(v, 4) for k, v in res.items()}


def bar_thread_ms_per_s(seconds: float = 5.0) -> float:
    """CPU ms per wall second that the rich bar costs while the loop sleeps (its 10 Hz refresh thread, which
    redraws only on a terminal), minus the same loop without a bar."""
    from genkit.runtime.progress import Progress

    def run(enabled):
        with Progress(10 ** 6, description="train-flow", enabled=enabled) as bar:
            c0, t0 = time.process_time(), time.time()
            while time.time() - t0 < seconds:
                bar.update(1, bpd=2.0)
                time.sleep(0.1)
            return 1e3 * (time.process_time() - c0) / seconds

    return run(True) - run(False)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=500, help="training steps per timed run")
    ap.add_argument("--repeats", type=int, default=4, help="alternating bare/genkit runs")
    ap.add_argument("--reps", type=int, default=200, help="repetitions of each component timing")
    ap.add_argument("--quiet", action="store_true", help="genkit without its progress bar")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime_overhead.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = recipe(args.steps)
    train = cfg.data.load("train")
    print(f"load average {os.getloadavg()}", flush=True)
    load = os.getloadavg()
    runs = {"bare": [], "bare+clip+ema": [], "genkit": []}
    for r in range(args.repeats):
        runs["bare"].append(bare_run(cfg, train, args.steps))
        runs["bare+clip+ema"].append(bare_run(cfg, train, args.steps, clip=True, ema=True))
        runs["genkit"].append(genkit_run(args.steps, args.quiet))
        print(f"repeat {r}: " + ", ".join(f"{k} {args.steps / v[-1][0]:.2f} steps/s wall, "
                                          f"{args.steps / v[-1][1]:.2f} steps/s CPU" for k, v in runs.items()),
              flush=True)
    wall = {k: statistics.median(args.steps / w for w, _ in v) for k, v in runs.items()}
    cpu = {k: statistics.median(args.steps / c for _, c in v) for k, v in runs.items()}
    comp = components(cfg, train, args.reps)
    bare_ms = 1e3 / cpu["bare"]
    comp["progress bar refresh thread"] = round(comp.pop("progress bar refresh thread (CPU ms per second of "
                                                        "training)") / wall["genkit"], 4)  # per step
    extra = {k: v for k, v in comp.items() if not k.startswith("(reference)")}
    res = {"steps": args.steps, "repeats": args.repeats, "threads": 1, "recipe": str(RECIPE.relative_to(REPO)),
           "progress_bar": not args.quiet,
           "load_average_at_start": [round(v, 2) for v in load],
           "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
           "bare_steps_per_s": round(wall["bare"], 3), "genkit_steps_per_s": round(wall["genkit"], 3),
           "ratio_genkit_over_bare": round(wall["genkit"] / wall["bare"], 4),
           "overhead_percent": round(100 * (wall["bare"] / wall["genkit"] - 1), 2),
           "bare_steps_per_cpu_s": round(cpu["bare"], 3), "genkit_steps_per_cpu_s": round(cpu["genkit"], 3),
           "cpu_ratio_genkit_over_bare": round(cpu["genkit"] / cpu["bare"], 4),
           "cpu_overhead_percent": round(100 * (cpu["bare"] / cpu["genkit"] - 1), 2),
           "bare_clip_ema_steps_per_s": round(wall["bare+clip+ema"], 3),
           "bare_clip_ema_steps_per_cpu_s": round(cpu["bare+clip+ema"], 3),
           "cpu_overhead_percent_vs_bare_clip_ema": round(100 * (cpu["bare+clip+ema"] / cpu["genkit"] - 1), 2),
           "target_within_10_percent": {"wall": wall["genkit"] / wall["bare"] >= 1 / 1.1,
                                        "cpu": cpu["genkit"] / cpu["bare"] >= 1 / 1.1},
           "runs_wall_cpu_seconds": {k: [[round(w, 3), round(c, 3)] for w, c in v] for k, v in runs.items()},
           "bare_cpu_ms_per_step": round(bare_ms, 3), "genkit_cpu_ms_per_step": round(1e3 / cpu["genkit"], 3),
           "components_cpu_ms_per_step": comp,
           "components_sum_ms": round(sum(extra.values()), 3),
           "components_percent_of_bare": {k: round(100 * v / bare_ms, 2) for k, v in extra.items()}}
    atomic_write_json(args.out, res)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
