"""Samplers on analytic Gaussian mixtures: exact quality vs NFE, every sampler side by side.

    python benchmarks/samplers_mixtures.py            # full run (~10 CPU-minutes)
    python benchmarks/samplers_mixtures.py --quick    # smoke run

For NFE in {3, 5, 7, 10, 15, 20, 35}: euler, heun, dpmpp-2m and tada (N in {2, 3} x k in {1, 2, 4}, plus
two ablations: N = 1, i.e. the same integrator without momentum, and extrapolation in lambda) on recipes/mixtures/{ring2d, grid2d, mix16d}.yaml with the
exact mixture denoiser; Karras sigmas (rho 7, 0.002..80). Every sampler starts from the same VE noise; NFE
is what an NFECounter saw (Heun spends 2N - 1, so an even request runs one fewer). Metrics
(genkit.eval.mixture): sliced W2 to 20k exact samples, mode-mass TV, mean exact log-density; the noise
floors (an exact sample set of the same size) are reported alongside.
Writes benchmarks/results/samplers_mixtures.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from genkit.eval.mixture import mean_log_density, mode_tv, reference_mode_masses, sliced_w2
from genkit.models.denoisers import NFECounter, load_denoiser
from genkit.samplers import MIN_NFE, SAMPLERS, sigmas_for_nfe

REPO = Path(__file__).resolve().parents[1]
NFES = [3, 5, 7, 10, 15, 20, 35]
MIXTURES = ["ring2d", "grid2d", "mix16d"]


def variants():
    """(label, registry name, knobs) of every sampler run."""
    out = [("euler", "euler", {}), ("heun", "heun", {}), ("dpmpp-2m", "dpmpp-2m", {})]
    for order in (2, 3):
        for k in (1.0, 2.0, 4.0):
            out.append((f"tada N={order} k={k:g}", "tada", {"order": order, "k": k}))
    # ablations: the same integrator without momentum (N = 1: plain VE, DEIS-like), and AB in lambda
    out.append(("tada N=1 (no momentum)", "tada", {"order": 1}))
    out.append(("tada N=2 k=1 (AB in lambda)", "tada", {"order": 2, "k": 1.0, "ab_variable": "lambda"}))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="samples per run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1000 samples, NFE 5 and 10 only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "samplers_mixtures.json")
    args = ap.parse_args()
    nfes = [5, 10] if args.quick else NFES
    n = 1000 if args.quick else args.n
    torch.set_num_threads(1)

    results, floors = [], {}
    t_start = time.time()
    for mix_name in MIXTURES:
        gm = load_denoiser(REPO / "recipes" / "mixtures" / f"{mix_name}.yaml")
        g = torch.Generator().manual_seed(args.seed + 100)
        ref = gm.sample(20_000, generator=g)
        masses = reference_mode_masses(gm, 200_000, seed=args.seed + 200)
        exact = gm.sample(n, generator=g)
        floors[mix_name] = {"sliced_w2": sliced_w2(exact, ref), "mode_tv": mode_tv(gm, exact, masses),
                            "log_density": mean_log_density(gm, ref)}
        noise = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float64)
        for label, name, knobs in variants():
            for nfe in nfes:
                if nfe < MIN_NFE[name]:
                    continue
                sigmas = sigmas_for_nfe(name, nfe)
                counter = NFECounter(gm)
                extra = {"generator": torch.Generator().manual_seed(args.seed + 1)} if name == "tada" else {}
                t0 = time.time()
                out = SAMPLERS[name](counter, noise * sigmas[0], sigmas, **knobs, **extra)
                row = {"mixture": mix_name, "sampler": label, "name": name, "knobs": knobs,
                       "nfe_requested": nfe, "nfe": counter.calls, "seconds": round(time.time() - t0, 3),
                       "sliced_w2": sliced_w2(out, ref), "mode_tv": mode_tv(gm, out, masses),
                       "log_density": mean_log_density(gm, out)}
                results.append(row)
                print(f"{mix_name:7s} {label:28s} nfe={row['nfe']:2d}  sw2={row['sliced_w2']:.4f}  "
                      f"tv={row['mode_tv']:.4f}  logp={row['log_density']:9.3f}", flush=True)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": {"nfes": nfes, "n_samples": n, "seed": args.seed, "schedule": "karras rho=7 0.002..80",
                          "n_ref": 20_000, "n_proj": 128, "torch": torch.__version__,
                          "python": platform.python_version(), "seconds": round(time.time() - t_start, 1)},
               "floors": floors, "results": results}
    args.out.write_text(json.dumps(payload, indent=1))
    plot(payload, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(payload, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("sliced_w2", "sliced W2 (log)", True), ("mode_tv", "mode-mass TV", False),
               ("log_density", "mean log p (exact)", False)]
    fig, axes = plt.subplots(len(MIXTURES), len(metrics), figsize=(15, 4 * len(MIXTURES)))
    labels = list(dict.fromkeys(r["sampler"] for r in payload["results"]))
    for i, mix in enumerate(MIXTURES):
        for j, (key, title, logy) in enumerate(metrics):
            ax = axes[i, j]
            for label in labels:
                rows = [r for r in payload["results"] if r["mixture"] == mix and r["sampler"] == label]
                style = "--" if label.startswith("tada") else "-"
                width = 2.5 if label in ("dpmpp-2m", "tada N=2 k=1") else 1.2
                ax.plot([r["nfe"] for r in rows], [r[key] for r in rows], style, marker="o", ms=3, lw=width,
                        label=label)
            ax.axhline(payload["floors"][mix][key], color="k", lw=0.8, ls=":", label="exact samples")
            if logy:
                ax.set_yscale("log")
            if key == "log_density":  # the low-NFE failures go far below; keep the interesting range
                ax.set_ylim(payload["floors"][mix][key] - 8, payload["floors"][mix][key] + 1)
            ax.set_xlabel("NFE")
            ax.set_title(f"{mix}: {title}")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
