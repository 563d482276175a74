"""Samplers on analytic Gaussian mixtures: exact quality vs NFE, TADA against its baselines, same noise.

    python benchmarks/samplers_mixtures.py            # full run (3 mixtures x 2 grids x 3 seeds x 5 NFE)
    python benchmarks/samplers_mixtures.py --quick    # smoke run (1000 samples, one seed, NFE 5 and 10)

For NFE in {3, 5, 7, 10, 35}, two sigma grids (Karras rho = 7 on 0.002..80, and "uniform-t": the same ends,
uniform in the time t of TADA's N = 2 system, i.e. the noise levels TADA's grid="uniform" queries) and noise
seeds {0, 1, 2}: Heun, DPM-Solver++(2M), UniPC (diffusers' default: UniP-2 + UniC, B(h) = e^h - 1; and
its order-1 variant "unipc-1", UniP-1 + UniC-1, the strongest UniPC on these mixtures), TADA (arXiv
2506.21757) with its defaults N = 2, k = 1, Adams-Bashforth order 3, and with order 2, plus three TADA
ablations (N = 1: no augmented variables, i.e. AB-3 on the flow-matching velocity;
N = 3; k = 2), on recipes/mixtures/{ring2d, grid2d, mix16d}.yaml with the exact mixture denoiser. Every sampler
of a (mixture, grid, seed) cell starts from the same VE noise and queries the denoiser at the same sigmas
(Heun at its own (NFE+1)/2 steps); NFE is what an NFECounter saw. Metrics (genkit.eval.mixture): sliced W2
to 20k exact samples, mode-mass TV, mean exact log-density; the noise floors (an exact sample set of the same
size) are reported alongside. The verdict compares TADA with every baseline cell by cell (mean over seeds and
per seed) and checks the target "TADA (defaults) below DPM-Solver++(2M) in sliced W2 at NFE 5 and 10 on every
mixture, Karras grid".
Writes benchmarks/results/samplers_mixtures.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's genkit, not an installed one

from genkit.eval.mixture import mean_log_density, mode_tv, reference_mode_masses, sliced_w2  # noqa: E402
from genkit.models.denoisers import NFECounter, load_denoiser  # noqa: E402
from genkit.runtime import atomic_write_bytes, atomic_write_json  # noqa: E402
from genkit.samplers import MIN_NFE, SAMPLERS, sigmas_for_nfe  # noqa: E402

NFES = [3, 5, 7, 10, 35]
GRIDS = ["karras", "uniform-t"]
SEEDS = [0, 1, 2]
MIXTURES = ["ring2d", "grid2d", "mix16d"]
METRICS = ("sliced_w2", "mode_tv", "log_density")
BASELINES = ["heun", "dpmpp-2m", "unipc", "unipc-1"]
TADA_MAIN = ["tada", "tada p=2"]  # the paper's defaults (AB order 3) and AB order 2


def variants():
    """(label, registry name, knobs) of every sampler run."""
    return [("heun", "heun", {}), ("dpmpp-2m", "dpmpp-2m", {}), ("unipc", "unipc", {}),
            ("unipc-1", "unipc", {"order": 1}),
            ("tada", "tada", {}), ("tada p=2", "tada", {"solver_order": 2}),
            ("tada N=1", "tada", {"order": 1}), ("tada N=3", "tada", {"order": 3}), ("tada k=2", "tada", {"k": 2.0})]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="samples per run")
    ap.add_argument("--quick", action="store_true", help="1000 samples, seed 0, NFE 5 and 10 only")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "samplers_mixtures.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    payload = run(1000 if args.quick else args.n, [0] if args.quick else SEEDS, [5, 10] if args.quick else NFES)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, payload)
    plot(payload, args.out.with_suffix(".png"))
    print("\n".join(verdict_table(payload)))
    print(json.dumps(payload["verdict"]["target"], indent=1))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def run(n: int, seeds: list[int], nfes: list[int]) -> dict:
    """Every variant on every mixture, grid, seed and NFE; the payload (config, floors, rows, summary, verdict)."""
    results, floors = [], {}
    t_start = time.time()
    for mix_name in MIXTURES:
        gm = load_denoiser(REPO / "recipes" / "mixtures" / f"{mix_name}.yaml")
        g = torch.Generator().manual_seed(100)
        ref = gm.sample(20_000, generator=g)
        masses = reference_mode_masses(gm, 200_000, seed=200)
        exact = gm.sample(n, generator=g)
        floors[mix_name] = {"sliced_w2": sliced_w2(exact, ref), "mode_tv": mode_tv(gm, exact, masses),
                            "log_density": mean_log_density(gm, ref)}
        for seed in seeds:
            noise = torch.randn(n, gm.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            for grid in GRIDS:
                for label, name, knobs in variants():
                    for nfe in nfes:
                        if nfe < MIN_NFE[name]:
                            continue
                        sigmas = sigmas_for_nfe(name, nfe, schedule=grid)
                        counter = NFECounter(gm)
                        extra = {"generator": torch.Generator().manual_seed(seed + 1000)} if name == "tada" else {}
                        t0 = time.time()
                        out = SAMPLERS[name](counter, noise * sigmas[0], sigmas, **knobs, **extra)
                        row = {"mixture": mix_name, "grid": grid, "seed": seed, "sampler": label, "name": name,
                               "knobs": knobs, "nfe_requested": nfe, "nfe": counter.calls,
                               "seconds": round(time.time() - t0, 3), "sliced_w2": sliced_w2(out, ref),
                               "mode_tv": mode_tv(gm, out, masses), "log_density": mean_log_density(gm, out)}
                        results.append(row)
                        print(f"{mix_name:7s} {grid:9s} seed {seed} {label:14s} nfe={row['nfe']:2d}  "
                              f"sw2={row['sliced_w2']:.4f}  tv={row['mode_tv']:.4f}  "
                              f"logp={row['log_density']:9.3f}", flush=True)
    payload = {"config": {"nfes": nfes, "seeds": seeds, "grids": GRIDS, "n_samples": n,
                          "schedule": "sigma 0.002..80; karras rho=7 or uniform in TADA's t (N=2, k=1)",
                          "n_ref": 20_000, "n_proj": 128, "torch": torch.__version__,
                          "python": platform.python_version(), "seconds": round(time.time() - t_start, 1)},
               "floors": floors, "results": results}
    payload["summary"] = summarize(results)
    payload["verdict"] = verdict(payload)
    return payload


def summarize(results: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds of every metric per (mixture, grid, sampler, requested NFE)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["mixture"], r["grid"], r["sampler"], r["nfe_requested"]), []).append(r)
    out = []
    for (mix, grid, label, nfe), rows in groups.items():
        row = {"mixture": mix, "grid": grid, "sampler": label, "nfe_requested": nfe, "nfe": rows[0]["nfe"],
               "seeds": len(rows)}
        for m in METRICS:
            vals = [r[m] for r in rows]
            row[m] = statistics.fmean(vals)
            row[m + "_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        out.append(row)
    return out


def verdict(payload: dict, max_nfe: int = 10) -> dict:
    """Cell by cell (mixture, grid, NFE <= max_nfe, metric sliced_w2 / mode_tv; lower is better): does TADA
    (defaults, and AB order 2) beat each baseline in the mean over seeds, and on how many seeds? Plus the
    issue's target: TADA defaults below DPM-Solver++(2M) in sliced W2 at NFE 5 and 10 on every mixture
    (Karras grid), in the mean and on every seed."""
    rows, summ = payload["results"], payload["summary"]
    mean = {(r["mixture"], r["grid"], r["sampler"], r["nfe_requested"]): r for r in summ}
    per_seed = {(r["mixture"], r["grid"], r["sampler"], r["nfe_requested"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    cells = []
    for mix in MIXTURES:
        for grid in GRIDS:
            for nfe in sorted({r["nfe_requested"] for r in rows if r["nfe_requested"] <= max_nfe}):
                for metric in ("sliced_w2", "mode_tv"):
                    for tada in TADA_MAIN:
                        if (mix, grid, tada, nfe) not in mean:
                            continue
                        t = mean[(mix, grid, tada, nfe)][metric]
                        cell = {"mixture": mix, "grid": grid, "nfe": nfe, "metric": metric, "tada": tada,
                                "tada_value": t, "baselines": {}}
                        for b in BASELINES:
                            if (mix, grid, b, nfe) not in mean:
                                continue
                            wins = sum(per_seed[(mix, grid, tada, nfe, s)][metric]
                                       < per_seed[(mix, grid, b, nfe, s)][metric] for s in seeds)
                            cell["baselines"][b] = {"value": mean[(mix, grid, b, nfe)][metric],
                                                    "tada_wins": t < mean[(mix, grid, b, nfe)][metric],
                                                    "seeds_won": f"{wins}/{len(seeds)}"}
                        cell["beats_all"] = all(v["tada_wins"] for v in cell["baselines"].values())
                        cells.append(cell)
    target = {"rule": "TADA (N=2, k=1, AB-3, Karras grid) < dpmpp-2m in sliced W2 at NFE 5 and 10 on ring2d, "
                      "grid2d and mix16d: mean over seeds and every seed", "cells": []}
    for mix in MIXTURES:
        for nfe in (5, 10):
            if (mix, "karras", "tada", nfe) not in mean:
                continue
            t, d = mean[(mix, "karras", "tada", nfe)], mean[(mix, "karras", "dpmpp-2m", nfe)]
            every = all(per_seed[(mix, "karras", "tada", nfe, s)]["sliced_w2"]
                        < per_seed[(mix, "karras", "dpmpp-2m", nfe, s)]["sliced_w2"] for s in seeds)
            target["cells"].append({"mixture": mix, "nfe": nfe, "tada": t["sliced_w2"], "dpmpp-2m": d["sliced_w2"],
                                    "met_in_mean": t["sliced_w2"] < d["sliced_w2"], "met_every_seed": every})
    target["met"] = bool(target["cells"]) and all(c["met_in_mean"] and c["met_every_seed"] for c in target["cells"])
    return {"cells": cells, "target": target,
            "count": {t: {m: f"{sum(c['beats_all'] for c in cells if c['tada'] == t and c['metric'] == m)}/"
                             f"{sum(1 for c in cells if c['tada'] == t and c['metric'] == m)}"
                          for m in ("sliced_w2", "mode_tv")} for t in TADA_MAIN}}


def verdict_table(payload: dict) -> list[str]:
    """Markdown: one row per (mixture, grid, NFE), sliced W2 mean over seeds of every sampler, the verdict of
    TADA (defaults) and TADA p=2 against the best baseline."""
    mean = {(r["mixture"], r["grid"], r["sampler"], r["nfe_requested"]): r for r in payload["summary"]}
    cols = BASELINES + TADA_MAIN
    lines = ["| mixture | grid | NFE | " + " | ".join(cols) + " | TADA vs best baseline | TADA p=2 vs best |",
             "|" + "---|" * (len(cols) + 5)]
    nfes = sorted({k[3] for k in mean})
    for mix in MIXTURES:
        for grid in GRIDS:
            for nfe in nfes:
                vals = {c: mean[(mix, grid, c, nfe)]["sliced_w2"] for c in cols if (mix, grid, c, nfe) in mean}
                if len(vals) < len(cols):
                    continue
                best = min(BASELINES, key=lambda b: vals[b])

                def call(t):
                    return (f"{'win' if vals[t] < vals[best] else 'loss'} ({vals[t] / vals[best]:.2f}x "
                            f"{best})")
                lines.append(f"| {mix} | {grid} | {nfe} | " + " | ".join(f"{vals[c]:.3f}" for c in cols)
                             + f" | {call('tada')} | {call('tada p=2')} |")
    return lines


def plot(payload, path):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summ = payload["summary"]
    labels = list(dict.fromkeys(r["sampler"] for r in summ))
    fig, axes = plt.subplots(len(MIXTURES), 2 * len(GRIDS), figsize=(6 * len(GRIDS) * 2 / 1.5, 3.6 * len(MIXTURES)))
    for i, mix in enumerate(MIXTURES):
        for j, (metric, grid) in enumerate([(m, g) for m in ("sliced_w2", "mode_tv") for g in GRIDS]):
            ax = axes[i, j]
            for label in labels:
                rows = sorted((r for r in summ if r["mixture"] == mix and r["grid"] == grid and r["sampler"] == label),
                              key=lambda r: r["nfe"])
                main = label in BASELINES + TADA_MAIN
                ax.errorbar([r["nfe"] for r in rows], [r[metric] for r in rows], [r[metric + "_std"] for r in rows],
                            ls="--" if label.startswith("tada") else "-", marker="o", ms=3 if main else 2,
                            lw=2.0 if main else 0.8, alpha=1.0 if main else 0.6, label=label, capsize=2)
            ax.axhline(payload["floors"][mix][metric], color="k", lw=0.8, ls=":", label="exact samples")
            ax.set_xscale("log")
            ax.set_yscale("log")
            nfes = payload["config"]["nfes"]
            ax.set_xticks(nfes, [str(v) for v in nfes])
            ax.minorticks_off()
            ax.set_xlabel("NFE")
            ax.set_title(f"{mix}, {grid} grid: {metric} (mean +- std, {payload['config']['seeds'].__len__()} seeds)",
                         fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


if __name__ == "__main__":
    main()
