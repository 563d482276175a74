"""TarFlowLM (arXiv 2507.00425) against an AR Transformer and a masked-diffusion LM of the same size.

    python3 benchmarks/tarflowlm.py                       # hours on 2 busy CPU cores, one thread per run
    python3 benchmarks/tarflowlm.py --steps 300           # a quick look
    python3 benchmarks/tarflowlm.py --blocks 2 --steps 3000   # the recipe's size (6 blocks x 128)

One run folder per model under benchmarks/results/tarflowlm/, all on the same data (shakespeare27: 4.75M
characters in text8's alphabet, contiguous 90/5/5 split), windows of 64 characters, the same steps, batch and
optimiser settings, and the same Transformer depth x width (3 flow layers x --blocks blocks, width 128; the AR
and MDLM baselines get 3 x --blocks blocks of the same width):

* ``mixd``:   TarFlowLM [mixd, mix1, mix1], progressive (recipes/train-flow/tarflowlm-shakespeare.yaml), with
              ``eval.baseline=[ar, mdlm]``: the causal Transformer LM and genkit's LLaDA-style masked
              diffusion LM trained in the same run (``mixd/baseline-ar``, ``mixd/baseline-mdlm``;
              ``--baselines-with NAME --baselines ar`` trains them in another model's run instead);
* ``mix1``:   TarFlowLM [mix1, mix1, mix1], progressive;
* ``affine``: TarFlowLM [affine, affine, affine] (TarFlow's layers), progressive;
* optional: ``mixd-joint`` ([mixd, mix1, mix1] with all layers trained together) and ``mixd-only`` (one Mix-d
  layer holding all 3 x --blocks blocks: the paper's reduction to an AR model, at the AR baseline's size).

Printed and saved (benchmarks/results/tarflowlm.json, tarflowlm.png): test bits per character (the ELBO for
TarFlowLM and MDLM, the exact NLL for AR), parameters, training wall-clock with the load average beside it,
the steps at which each model's held-out bpc (every --eval-every steps, first 256 test windows) first reached
2.0, and text samples. Verdicts on the issue's targets: AR <= 2.0 bpc, Mix-d within 0.15 bpc of AR, and
bpc(affine) > bpc(Mix-1) > bpc(Mix-d). Rerunning resumes unfinished runs and reuses finished ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RECIPE = REPO / "recipes" / "train-flow" / "tarflowlm-shakespeare.yaml"
MODELS = {
    "mixd": ["arch.layers=[mixd,mix1,mix1]"],
    "mix1": ["arch.layers=[mix1,mix1,mix1]"],
    "affine": ["arch.layers=[affine,affine,affine]"],
    # optional rows (--models ...,mixd-joint,mixd-only):
    "mixd-joint": ["arch.layers=[mixd,mix1,mix1]", "train.progressive=false"],  # all layers trained together
    "mixd-only": ["arch.layers=[mixd]"],  # one Mix-d layer with all 3 x --blocks blocks: the AR reduction
}


def run_model(name: str, extra: list[str], args, root: Path) -> dict:
    from genkit import config as C
    from genkit.flows.lm_train import TarFlowLMRecipe, train_tarflowlm

    out = root / name
    done = out / "metrics.json"
    if done.is_file() and (out / "model").is_dir() and not args.fresh:
        m = json.loads(done.read_text())
        wanted = [b for e in extra if e.startswith("eval.baseline=") for b in e.split("=")[1].strip("[]").split(",")]
        if m.get("steps") == args.steps and all(f"{b}_test_bpc" in m for b in wanted):
            print(f"[{name}] reusing {done}")
            return m
    blocks = 3 * args.blocks if name == "mixd-only" else args.blocks  # the same depth in one layer
    overrides = [*extra, f"train.steps={args.steps}", f"eval.eval_every={args.eval_every}",
                 f"arch.layers_per_block={blocks}", f"eval.max_windows={args.max_windows}", "runtime.threads=1",
                 "runtime.log_every=50"]
    cfg = C.load(TarFlowLMRecipe, RECIPE, overrides)
    load0 = os.getloadavg()[0]
    t0 = time.time()
    m = train_tarflowlm(cfg, out, quiet=args.quiet)
    m["wall_seconds_total"] = round(time.time() - t0, 1)
    m["load_avg_start"], m["load_avg_end"] = round(load0, 2), round(os.getloadavg()[0], 2)
    return m


def curve(run: Path) -> list[tuple[int, float, float]]:
    """(step, seconds, held-out bpc) from a run's log.jsonl (the eval_every lines)."""
    pts = []
    for line in (run / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "test_bpc" in r:
            pts.append((int(r["step"]), float(r["time"]), float(r["test_bpc"])))
    return pts


def first_below(pts, level: float):
    return next(((s, t) for s, t, b in pts if b <= level), (None, None))


def samples(run: Path, n: int = 2) -> list[str]:
    f = run / "samples.txt"
    if not f.is_file():
        return []
    return [l for l in f.read_text().splitlines() if l.startswith("[")][:n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=1, help="Transformer blocks per flow layer")
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--max-windows", type=int, default=0, help="test windows of the final figure (0 = all)")
    ap.add_argument("--models", default="mixd,mix1,affine")
    ap.add_argument("--baselines", default="ar,mdlm", help="same-size baselines trained in one model's run")
    ap.add_argument("--baselines-with", default="mixd", help="the model whose run trains the baselines")
    ap.add_argument("--fresh", action="store_true", help="retrain finished runs")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    res_dir = Path(args.out)
    root = res_dir / "tarflowlm"
    root.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(1)
    rows = {}
    baselines = [b for b in args.baselines.split(",") if b]
    for name in args.models.split(","):
        extra = MODELS[name] + ([f"eval.baseline=[{','.join(baselines)}]"]
                                if name == args.baselines_with and baselines else [])
        m = run_model(name, extra, args, root)
        rows[name] = {"params": m["params"], "test_bpc": m["test_bpc"], "train_seconds": m["train_seconds"],
                      "load_avg": [m.get("load_avg_start"), m.get("load_avg_end")], "run": str(root / name)}
        if name == args.baselines_with:
            for b in baselines:
                bm = json.loads((root / name / f"baseline-{b}" / "metrics.json").read_text())
                rows[b] = {"params": bm["params"], "test_bpc": bm["test_bpc"], "train_seconds": bm["train_seconds"],
                           "load_avg": rows[name]["load_avg"], "run": str(root / name / f"baseline-{b}")}
    for name, r in rows.items():
        run = Path(r["run"])
        pts = curve(run)
        r["heldout_curve"] = pts
        r["steps_to_2.0"], r["seconds_to_2.0"] = first_below(pts, 2.0)
        r["samples"] = samples(run)
        r["steps"] = args.steps
    verdict = {}
    if "ar" in rows:
        ar = rows["ar"]["test_bpc"]
        verdict["ar_at_most_2.0"] = ar <= 2.0
        verdict["ar_minutes"] = round(rows["ar"]["train_seconds"] / 60, 1)
        for name in ("mixd", "mixd-joint", "mixd-only"):
            if name in rows:
                verdict[f"{name}_minus_ar"] = round(rows[name]["test_bpc"] - ar, 4)
                verdict[f"{name}_within_0.15_of_ar"] = rows[name]["test_bpc"] - ar <= 0.15
    if {"affine", "mix1", "mixd"} <= rows.keys():
        verdict["affine>mix1>mixd"] = rows["affine"]["test_bpc"] > rows["mix1"]["test_bpc"] > rows["mixd"]["test_bpc"]
    result = {"data": "shakespeare27 (90/5/5 contiguous), windows of 64", "steps": args.steps,
              "batch_size": 64, "blocks_per_flow_layer": args.blocks, "width": 128, "models": rows,
              "verdict": verdict, "torch_threads": 1}
    from genkit.runtime import atomic_write_json

    atomic_write_json(res_dir / "tarflowlm.json", result)
    print(f"\n{'model':8s} {'params':>9s} {'test bpc':>9s} {'train min':>9s} {'steps to 2.0':>12s}  load avg")
    for name, r in rows.items():
        print(f"{name:8s} {r['params']:9d} {r['test_bpc']:9.4f} {r['train_seconds'] / 60:9.1f} "
              f"{str(r['steps_to_2.0']):>12s}  {r['load_avg']}")
    print("verdict:", json.dumps(verdict))
    for name, r in rows.items():
        for s in r["samples"]:
            print(f"  {name}: {s}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in rows.items():
            pts = r["heldout_curve"]
            if pts:
                ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=f"{name} ({r['test_bpc']:.3f})")
        ax.axhline(2.0, color="grey", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("held-out bits/char (256 windows)")
        ax.set_title(f"shakespeare27, {args.steps} steps, batch 64 x 64 chars")
        ax.legend()
        fig.tight_layout()
        tmp = res_dir / ".tarflowlm.png.tmp.png"
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, res_dir / "tarflowlm.png")
    except Exception as e:  # the figure is a convenience; the JSON is the record
        print(f"(no plot: {e})")


if __name__ == "__main__":
    main()
