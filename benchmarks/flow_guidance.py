"""TarFlow sampling knobs on the digits flows, side by side in one run (issue 15, items 1-4).

    python benchmarks/flow_guidance.py                              # trains the two digits flows it lacks
    python benchmarks/flow_guidance.py --uncond RUN --cond RUN      # reuse trained runs

1. Unconditional flow (``recipes/train-flow/tarflow-digits.yaml``): fd-digits of attention-temperature guidance
   at weights w in {0, 0.5, 1, 2} for attention temperatures tau in {0.5, 0.7, 1.5, 2} (constant schedule), and
   the annealed schedule at the best tau. This is the measurement behind genkit's default tau for unconditional
   flows (``genkit.flows.train.UNCOND_ATTN_TEMP``); the official default (1.0) turns the guidance off.
2. Class-conditional flow (``recipes/train-flow/tarflow-digits-cond.yaml``, Gaussian noise augmentation): class
   accuracy and fd-digits at CFG w in {0, 1, 2}, constant vs annealed schedule, with and without the denoising
   step, and how many of the N samples came out non-finite (``resample_nonfinite`` redraws them).

fd-digits is the Frechet distance on the shipped digits classifier's features (not Inception FID); the reference
images are bin centres (k + 0.5) / L * 2 - 1, so samples of a flow trained on the official mapping k / (L-1) * 2 - 1
(Gaussian noise runs) are mapped to bin centres before scoring. Writes benchmarks/results/flow_guidance.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from genkit.eval.image_metrics import evaluate_images  # noqa: E402
from genkit.flows.io import load_flow  # noqa: E402
from genkit.flows.train import sample_flow  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402
from samplers import ensure_run  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def to_reference_pixels(x: torch.Tensor, info: dict, levels: int) -> torch.Tensor:
    """Samples in the run's pixel convention -> the bin-centre convention of the fd reference images."""
    if info.get("pixels") != "k/(L-1)*2-1":
        return x
    k = (x + 1) / 2 * (levels - 1)  # continuous level
    return ((k + 0.5) / levels * 2 - 1).clamp(-1, 1)


def score(x, info, labels=None):
    ok = torch.isfinite(x).flatten(1).all(1)
    xs = to_reference_pixels(x[ok], info, info.get("levels", 17))
    m = evaluate_images(xs, "digits", labels=None if labels is None else labels[ok], metrics=("fd", "classify"))
    out = {"fd-digits": round(m["fd-digits"], 4)}
    if labels is not None:
        out["acc"] = round(m["acc-digits"], 4)
    return out


def part_uncond(args, res):
    flow, info = load_flow(ensure_run(args.uncond, "train-flow", "recipes/train-flow/tarflow-digits.yaml",
                                      "tarflow-digits"))
    rows = []
    base = None
    for tau in (0.5, 0.7, 1.5, 2.0):
        for w in (0.0, 0.5, 1.0, 2.0):
            if w == 0.0 and base is not None:
                rows.append({**base, "attn_temp": tau})
                continue
            t0 = time.time()
            x = sample_flow(flow, args.n, seed=1, guidance=w, attn_temp=tau)
            row = {"attn_temp": tau, "cfg": w, "schedule": "constant", **score(x, info),
                   "seconds": round(time.time() - t0, 2)}
            base = row if w == 0.0 else base
            rows.append(row)
            print(f"uncond tau {tau} w {w}: fd-digits {row['fd-digits']:.3f}", flush=True)
    best = min((r for r in rows if r["cfg"] > 0), key=lambda r: r["fd-digits"])
    for w in (0.5, 1.0, 2.0):
        x = sample_flow(flow, args.n, seed=1, guidance=w, attn_temp=best["attn_temp"], annealed=True)
        rows.append({"attn_temp": best["attn_temp"], "cfg": w, "schedule": "annealed", **score(x, info)})
        print(f"uncond tau {best['attn_temp']} w {w} annealed: fd-digits {rows[-1]['fd-digits']:.3f}", flush=True)
    res["uncond"] = rows
    res["uncond_unguided_fd"] = base["fd-digits"]
    res["uncond_best"] = best
    res["uncond_best_by_tau"] = {str(t): min(r["fd-digits"] for r in rows if r["attn_temp"] == t and r["cfg"] > 0)
                                 for t in (0.5, 0.7, 1.5, 2.0)}
    atomic_write_json(args.out, res)


def part_cond(args, res):
    flow, info = load_flow(ensure_run(args.cond, "train-flow", "recipes/train-flow/tarflow-digits-cond.yaml",
                                      "tarflow-digits-cond"))
    labels = torch.arange(args.n) % flow.config.num_classes
    rows = []
    for w in (0.0, 1.0, 2.0):
        for schedule in ("constant", "annealed") if w else ("constant",):
            for denoise in (False, True):
                stats: dict = {}
                t0 = time.time()
                x = sample_flow(flow, args.n, seed=2, guidance=w, labels=labels, annealed=schedule == "annealed",
                                denoise_sigma=info["noise_sigma"] if denoise else 0.0, stats=stats)
                row = {"cfg": w, "schedule": schedule, "denoise": denoise, "non_finite": stats["non_finite"],
                       **score(x, info, labels), "seconds": round(time.time() - t0, 2)}
                rows.append(row)
                print(f"cond w {w} {schedule} denoise={denoise}: acc {row['acc']:.4f} fd-digits "
                      f"{row['fd-digits']:.3f} non-finite {row['non_finite']}", flush=True)
    stats = {}
    x = sample_flow(flow, args.n, seed=2, guidance=2.0, labels=labels, denoise_sigma=info["noise_sigma"],
                    resample_nonfinite=True, stats=stats)
    res["cond_resample_w2_denoised"] = {"finite": int(torch.isfinite(x).flatten(1).all(1).sum()), "n": args.n,
                                        **stats, **score(x, info, labels)}
    res["cond"] = rows
    atomic_write_json(args.out, res)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--uncond", type=Path, help="unconditional TarFlow digits run (default: train one)")
    ap.add_argument("--cond", type=Path, help="class-conditional TarFlow digits run (default: train one)")
    ap.add_argument("--n", type=int, default=1000, help="samples per setting")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--parts", default="uncond,cond")
    ap.add_argument("--out", type=Path, default=RESULTS / "flow_guidance.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"n": args.n, "metric": "fd-digits (shipped digits classifier, not Inception FID)"}
    parts = args.parts.split(",")
    if "uncond" in parts:
        part_uncond(args, res)
    if "cond" in parts:
        part_cond(args, res)
    atomic_write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("uncond", "cond")}, indent=1))


if __name__ == "__main__":
    main()
