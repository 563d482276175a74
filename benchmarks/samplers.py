"""Samplers on a trained digits teacher, classifier-free guidance, and TarFlow guidance, in one run.

    python benchmarks/samplers.py                       # trains the teachers it lacks (about 30 min on 2 cores)
    python benchmarks/samplers.py --teacher RUN --cond-teacher RUN --flow RUN   # reuse trained runs

This script measures, beside each other in the same run:

0. every sampler (and TADA's k/N sweep) on the three exact Gaussian mixtures at NFE in {3, ..., 35}
   (`benchmarks/samplers_mixtures.py`, also runnable alone), with the verdict on the target "TADA beats
   DPM-Solver++(2M) and Heun at every NFE <= 10" cell by cell;

1. fd-digits of every sampler (euler, heun, dpmpp-2m, tada) at NFE in {3, 5, 7, 10, 15, 20, 35} on the
   unconditional EDM digits teacher (``genkit train-diffusion recipes/train-diffusion/edm-digits.yaml``);
   the claim: 35-NFE Heun is far below 1-step Euler;
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
from genkit.samplers import MIN_NFE  # noqa: E402
from genkit.samplers.run import DiffusionSampleConfig, sample_denoiser  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
NFES = (3, 5, 7, 10, 15, 20, 35)
SAMPLERS = ("euler", "heun", "dpmpp-2m", "tada")


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


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in SAMPLERS:
        pts = [(r["nfe"], r["fd-digits"]) for r in rows if r["sampler"] == s]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=s)
    ax.set_xlabel("NFE")
    ax.set_ylabel("fd-digits (lower is better)")
    ax.set_yscale("log")
    ax.set_title("EDM digits teacher: quality vs NFE")
    ax.legend()
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
    print(json.dumps({k: v for k, v in res.items() if k not in ("samplers", "mixtures")}, indent=1))


ALL_PARTS = ("mixtures", "samplers", "cfg", "tarflow")


def part_mixtures(args, res):
    """0. exact mixtures: every sampler and the TADA sweep vs NFE, and the verdict on the TADA target."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import samplers_mixtures

    payload = samplers_mixtures.run(args.mixture_n, 0, samplers_mixtures.NFES)
    samplers_mixtures.plot(payload, args.out.with_name("samplers_mixtures.png"))
    res["mixtures"] = payload
    res["mixtures_verdict"] = payload["verdict"]
    atomic_write_json(args.out, res)


def part_samplers(args, res):
    """1. every sampler vs NFE on the unconditional teacher."""
    teacher = load_denoiser(ensure_run(args.teacher, "train-diffusion", "recipes/train-diffusion/edm-digits.yaml",
                                       "edm-digits"))
    rows = []
    for s in SAMPLERS:
        for nfe in (1, *NFES) if s == "euler" else NFES:
            if nfe < MIN_NFE[s]:
                continue
            x, _, info = sample_denoiser(teacher, args.n, DiffusionSampleConfig(sampler=s, nfe=nfe, seed=0))
            m = evaluate_images(x.clamp(-1, 1), "digits", metrics=("fd", "classify"))
            rows.append({"sampler": s, "nfe": info["nfe"], "fd-digits": m["fd-digits"],
                         "label_entropy": m.get("label_entropy-digits"), "seconds": info["seconds"]})
            print(f"{s:9s} nfe {info['nfe']:3d}  fd-digits {m['fd-digits']:8.3f}", flush=True)
    res["samplers"] = rows
    fd = {(r["sampler"], r["nfe"]): r["fd-digits"] for r in rows}
    res["heun35_vs_euler1"] = {"heun_35": fd[("heun", 35)], "euler_1": fd[("euler", 1)],
                               "ratio": fd[("euler", 1)] / fd[("heun", 35)]}
    res["best_at_nfe_le_10"] = {n: min(SAMPLERS, key=lambda s: fd.get((s, n), float("inf"))) for n in (3, 5, 7, 10)}
    plot(rows, args.out.with_suffix(".png"))
    atomic_write_json(args.out, res)



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
