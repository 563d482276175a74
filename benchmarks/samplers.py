"""Samplers on exact mixtures and a trained digits teacher, classifier-free guidance, TarFlow guidance, in one run.

    python benchmarks/samplers.py                       # trains the teachers it lacks (about 30 min on 2 cores)
    python benchmarks/samplers.py --teacher RUN --cond-teacher RUN --flow RUN   # reuse trained runs
    python benchmarks/samplers.py --parts mixtures,samplers --teacher RUN       # the TADA comparison only

This script measures, beside each other in the same run:

0. the exact Gaussian mixtures (`benchmarks/samplers_mixtures.py`, also runnable alone): Heun,
   DPM-Solver++(2M), UniPC and TADA (arXiv 2506.21757; AB order 3 and 2, plus ablations) at NFE
   {3, 5, 7, 10, 35} on Karras and uniform-in-t grids, 3 noise seeds, with the cell-by-cell verdict and the
   target "TADA below DPM-Solver++(2M) in sliced W2 at NFE 5 and 10 on every mixture";
1. fd-digits on the unconditional EDM digits teacher (``genkit train-diffusion
   recipes/train-diffusion/edm-digits.yaml``) of Heun, DPM-Solver++(2M), UniPC (diffusers' default order 2)
   and TADA (N = 2, k = 1, AB order 3 and 2) at NFE {3, 5, 7, 10, 35} on the same two grids and 3 noise
   seeds (mean and spread), plus 1-step Euler; the claim: 35-NFE Heun is far below 1-step Euler;
2. class accuracy (shipped digits classifier) of the conditional teacher's samples at CFG w in {0, 1, 2, 4};
3. class accuracy of a class-conditional TarFlow's samples at guidance w in {0, 1, 2}.

Writes benchmarks/results/samplers.json, samplers.png (fd-digits vs NFE) and samplers_mixtures.png.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit import config as C  # noqa: E402
from genkit.eval.image_metrics import evaluate_images  # noqa: E402
from genkit.models.denoisers import load_denoiser  # noqa: E402
from genkit.runtime import atomic_write_bytes, atomic_write_json  # noqa: E402
from genkit.samplers.run import DiffusionSampleConfig, sample_denoiser  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NFES = (3, 5, 7, 10, 35)
GRIDS = ("karras", "uniform-t")
SEEDS = (0, 1, 2)
# (label, sampler, knobs of DiffusionSampleConfig)
VARIANTS = (("heun", "heun", {}), ("dpmpp-2m", "dpmpp-2m", {}), ("unipc", "unipc", {}),
            ("tada", "tada", {"ab_order": 3}), ("tada p=2", "tada", {"ab_order": 2}))
BASELINES = ("heun", "dpmpp-2m", "unipc")
TADAS = ("tada", "tada p=2")


def ensure_run(path: Path | None, command: str, recipe: str, name: str) -> Path:
    """Reuse a trained run, or train one with the shipped recipe (resumable: rerunning continues it)."""
    if path is not None:
        return path
    out = RESULTS / name
    if (out / "model" / "config.json").is_file():
        return out
    print(f"training {name} with {recipe} ...", flush=True)
    if command == "train-diffusion":
        from genkit.diffusion.train import DiffusionRecipe, train_diffusion

        train_diffusion(C.load(DiffusionRecipe, REPO / recipe), out, quiet=True)
    else:
        from genkit.flows.train import FlowRecipe, train_flow

        train_flow(C.load(FlowRecipe, REPO / recipe), out, quiet=True)
    return out


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(GRIDS), figsize=(6 * len(GRIDS), 4), sharey=True)
    for ax, grid in zip(axes, GRIDS):
        for label, _, _ in VARIANTS:
            pts = sorted((r["nfe"], r["fd-digits"], r["fd-digits_std"]) for r in summary
                         if r["sampler"] == label and r["grid"] == grid)
            if pts:
                x, y, e = zip(*pts)
                ax.errorbar(x, y, e, marker="o", ls="--" if label.startswith("tada") else "-", capsize=2, label=label)
        ax.set_xlabel("NFE")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(NFES, [str(v) for v in NFES])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"EDM digits teacher, {grid} grid (mean +- std over {len(SEEDS)} seeds)", fontsize=9)
    axes[0].set_ylabel("fd-digits (lower is better)")
    axes[0].legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, help="unconditional EDM digits run (default: train one)")
    ap.add_argument("--cond-teacher", type=Path, help="class-conditional EDM digits run (default: train one)")
    ap.add_argument("--flow", type=Path, help="class-conditional TarFlow digits run (default: train one)")
    ap.add_argument("--n", type=int, default=1000, help="samples per setting")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--mixture-n", type=int, default=5000, help="samples per mixture run")
    ap.add_argument("--parts", default="mixtures,samplers,cfg,tarflow",
                    help="comma-separated parts to run; results of other parts already in --out are kept")
    ap.add_argument("--out", type=Path, default=RESULTS / "samplers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    res: dict = json.loads(args.out.read_text()) if args.out.is_file() and parts != set(ALL_PARTS) \
        else {}
    res.update({"n": args.n, "metric": "fd-digits: Frechet distance on the shipped digits classifier's features "
                                        "(not Inception FID)"})

    if "mixtures" in parts:
        part_mixtures(args, res)
    if "samplers" in parts:
        part_samplers(args, res)
    if "cfg" in parts:
        part_cfg(args, res)
    if "tarflow" in parts:
        part_tarflow(args, res)
    atomic_write_json(args.out, res)
    big = ("samplers", "mixtures", "samplers_summary", "samplers_verdict", "mixtures_verdict")
    print(json.dumps({k: v for k, v in res.items() if k not in big}, indent=1))
    if "mixtures_verdict" in res:
        print(json.dumps({"mixtures_target": res["mixtures_verdict"]["target"]["met"],
                          "mixtures_cells_tada_beats_every_baseline": res["mixtures_verdict"]["count"]}, indent=1))
    if "samplers_verdict" in res:
        print(json.dumps({"digits_cells_tada_beats_every_baseline": res["samplers_verdict"]["count"]}, indent=1))


ALL_PARTS = ("mixtures", "samplers", "cfg", "tarflow")


def part_mixtures(args, res):
    """0. exact mixtures: every sampler vs NFE on two grids and 3 seeds, and the verdict on the TADA target."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import samplers_mixtures

    payload = samplers_mixtures.run(args.mixture_n, samplers_mixtures.SEEDS, samplers_mixtures.NFES)
    samplers_mixtures.plot(payload, args.out.with_name("samplers_mixtures.png"))
    atomic_write_json(args.out.with_name("samplers_mixtures.json"), payload)
    res["mixtures"] = payload
    res["mixtures_verdict"] = payload["verdict"]
    print("\n".join(samplers_mixtures.verdict_table(payload)), flush=True)
    atomic_write_json(args.out, res)


def part_samplers(args, res):
    """1. every sampler vs NFE on the unconditional teacher: two grids, 3 noise seeds, fd-digits."""
    teacher = load_denoiser(ensure_run(args.teacher, "train-diffusion", "recipes/train-diffusion/edm-digits.yaml",
                                       "edm-digits"))
    rows = []

    def measure(label, sampler, knobs, nfe, grid, seed):
        cfg = DiffusionSampleConfig(sampler=sampler, nfe=nfe, seed=seed, schedule=grid, **knobs)
        x, _, info = sample_denoiser(teacher, args.n, cfg)
        m = evaluate_images(x.clamp(-1, 1), "digits", metrics=("fd", "classify"))
        rows.append({"sampler": label, "grid": grid, "seed": seed, "nfe": info["nfe"], "nfe_requested": nfe,
                     "fd-digits": m["fd-digits"], "label_entropy": m.get("label_entropy-digits"),
                     "seconds": info["seconds"]})
        print(f"{label:9s} {grid:9s} seed {seed} nfe {info['nfe']:3d}  fd-digits {m['fd-digits']:8.3f}", flush=True)
        res["samplers"] = rows
        atomic_write_json(args.out, res)

    for seed in SEEDS:
        measure("euler", "euler", {}, 1, "karras", seed)
        for grid in GRIDS:
            for label, sampler, knobs in VARIANTS:
                for nfe in NFES:
                    measure(label, sampler, knobs, nfe, grid, seed)
    summary = summarize_fd(rows)
    res["samplers_summary"] = summary
    fd = {(r["sampler"], r["grid"], r["nfe_requested"]): r["fd-digits"] for r in summary}
    res["heun35_vs_euler1"] = {"heun_35": fd[("heun", "karras", 35)], "euler_1": fd[("euler", "karras", 1)],
                               "ratio": fd[("euler", "karras", 1)] / fd[("heun", "karras", 35)]}
    res["samplers_verdict"] = digits_verdict(rows, summary)
    print("\n".join(digits_table(summary)), flush=True)
    plot(summary, args.out.with_suffix(".png"))
    atomic_write_json(args.out, res)


def summarize_fd(rows):
    """Mean and standard deviation of fd-digits over seeds per (sampler, grid, requested NFE)."""
    import statistics

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["sampler"], r["grid"], r["nfe_requested"]), []).append(r)
    return [{"sampler": s, "grid": g, "nfe_requested": n, "nfe": rs[0]["nfe"], "seeds": len(rs),
             "fd-digits": statistics.fmean(r["fd-digits"] for r in rs),
             "fd-digits_std": statistics.stdev([r["fd-digits"] for r in rs]) if len(rs) > 1 else 0.0}
            for (s, g, n), rs in groups.items()]


def digits_verdict(rows, summary):
    """Per (grid, NFE <= 10): does TADA (AB 3, AB 2) beat each baseline in mean fd-digits, and on how many seeds?"""
    mean = {(r["sampler"], r["grid"], r["nfe_requested"]): r["fd-digits"] for r in summary}
    seed = {(r["sampler"], r["grid"], r["nfe_requested"], r["seed"]): r["fd-digits"] for r in rows}
    cells = []
    for grid in GRIDS:
        for nfe in (n for n in NFES if n <= 10):
            for t in TADAS:
                cell = {"grid": grid, "nfe": nfe, "tada": t, "tada_value": mean[(t, grid, nfe)], "baselines": {}}
                for b in BASELINES:
                    wins = sum(seed[(t, grid, nfe, s)] < seed[(b, grid, nfe, s)] for s in SEEDS)
                    cell["baselines"][b] = {"value": mean[(b, grid, nfe)],
                                            "tada_wins": mean[(t, grid, nfe)] < mean[(b, grid, nfe)],
                                            "seeds_won": f"{wins}/{len(SEEDS)}"}
                cell["beats_all"] = all(v["tada_wins"] for v in cell["baselines"].values())
                cells.append(cell)
    return {"cells": cells, "count": {t: f"{sum(c['beats_all'] for c in cells if c['tada'] == t)}/"
                                         f"{sum(1 for c in cells if c['tada'] == t)}" for t in TADAS}}


def digits_table(summary):
    """Markdown: fd-digits (mean over seeds) per (grid, NFE) of every sampler, TADA's verdict vs the best baseline."""
    mean = {(r["sampler"], r["grid"], r["nfe_requested"]): r for r in summary}
    cols = [v[0] for v in VARIANTS]
    lines = ["| grid | NFE | " + " | ".join(cols) + " | TADA vs best baseline | TADA p=2 vs best |",
             "|" + "---|" * (len(cols) + 4)]
    for grid in GRIDS:
        for nfe in NFES:
            vals = {c: mean[(c, grid, nfe)]["fd-digits"] for c in cols}
            best = min(BASELINES, key=lambda b: vals[b])
            calls = [f"{'win' if vals[t] < vals[best] else 'loss'} ({vals[t] / vals[best]:.2f}x {best})" for t in TADAS]
            lines.append(f"| {grid} | {nfe} | " + " | ".join(
                f"{vals[c]:.2f} +- {mean[(c, grid, nfe)]['fd-digits_std']:.2f}" for c in cols) + " | "
                + " | ".join(calls) + " |")
    return lines


def part_cfg(args, res):
    """2. classifier-free guidance on the conditional teacher: class accuracy vs w."""
    cond = load_denoiser(ensure_run(args.cond_teacher, "train-diffusion",
                                    "recipes/train-diffusion/edm-digits-cond.yaml", "edm-digits-cond"))
    cfg_rows = []
    for w in (0.0, 1.0, 2.0, 4.0):
        x, y, _ = sample_denoiser(cond, args.n, DiffusionSampleConfig(sampler="heun", nfe=35, cfg=w, seed=1))
        m = evaluate_images(x.clamp(-1, 1), "digits", labels=y, metrics=("fd", "classify"))
        cfg_rows.append({"cfg": w, "acc": m["acc-digits"], "fd-digits": m["fd-digits"]})
        print(f"edm cfg {w}: acc {m['acc-digits']:.4f} fd-digits {m['fd-digits']:.3f}", flush=True)
    res["edm_cfg"] = cfg_rows
    atomic_write_json(args.out, res)

    res["edm_acc_rises_with_w"] = all(a["acc"] <= b["acc"] for a, b in zip(cfg_rows, cfg_rows[1:]))


def part_tarflow(args, res):
    """3. TarFlow classifier-free guidance: class accuracy vs w."""
    from genkit.flows.io import load_flow
    from genkit.flows.train import sample_flow

    flow, _ = load_flow(ensure_run(args.flow, "train-flow", "recipes/train-flow/tarflow-digits-cond.yaml",
                                   "tarflow-digits-cond"))
    flow_rows = []
    for w in (0.0, 1.0, 2.0):
        t0 = time.time()
        labels = torch.arange(args.n) % flow.config.num_classes
        x = sample_flow(flow, args.n, seed=2, guidance=w, labels=labels)
        ok = torch.isfinite(x).flatten(1).all(1)  # strong guidance can overflow exp(alpha) in a rare sample
        m = evaluate_images(x[ok], "digits", labels=labels[ok], metrics=("fd", "classify"))
        flow_rows.append({"guidance": w, "acc": m["acc-digits"], "fd-digits": m["fd-digits"],
                          "non_finite_samples": int((~ok).sum()), "seconds": round(time.time() - t0, 2)})
        print(f"tarflow guidance {w}: acc {m['acc-digits']:.4f} fd-digits {m['fd-digits']:.3f}", flush=True)
    res["tarflow_guidance"] = flow_rows
    res["tarflow_acc_rises_with_w"] = all(a["acc"] < b["acc"] for a, b in zip(flow_rows, flow_rows[1:]))
    atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
