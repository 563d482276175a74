"""One-step distillation with SiD / SiDA / SiD-LSG, side by side with the teachers it distills.

    python benchmarks/distill.py                     # everything (about 3.5 hours on 2 CPU cores from scratch)
    python benchmarks/distill.py --parts mixture     # only the 2-D mixture parts (about 15 min)
    python benchmarks/distill.py --quick             # smoke run (tiny budgets, numbers meaningless)

Parts (each a ``genkit distill`` run through ``genkit.distill.train.distill``; recipes in recipes/distill/):

- ``mixture``: SiD on the exact 8-mode ring (recipes/distill/sid-ring2d.yaml) with alpha in {1.0, 1.2};
  exact sliced W2 / mode-mass TV / log-density of the one-step generator vs the exact teacher's 35-NFE Heun
  and 1-step Euler samples (targets: sliced W2 <= 1.1x Heun-35, mode TV <= 0.05).
- ``sida``: SiDA with a deliberately imperfect MLP teacher (DSM on 2,000 samples) plus 5,000 real samples
  (recipes/distill/sida-ring2d.yaml, adversarial scale 100), the same at the official scale 0.01, and SiD
  from the same teacher without real data; target: SiDA's one-step sliced W2 below the teacher's own 35-NFE Heun.
- ``digits``: SiD on the unconditional digits teacher (recipes/distill/sid-digits.yaml): one-step fd-digits
  vs the teacher's 35-NFE Heun (target <= 1.2x) and 1-step Euler, label entropy (target within 1%).
- ``mnist``: the same on the MNIST-5k teacher of recipes/train-diffusion/edm-mnist5k-cpu.yaml when it exists
  (``--mnist-teacher``; skipped otherwise) with recipes/distill/sid-mnist5k.yaml (fd-mnist; about 75 min on 2 cores).
- ``lsg``: SiD-LSG on the class-conditional digits teacher with kappa_1 = kappa_2 = kappa_4 = kappa in
  {1, 1.5, 2, 3}: class accuracy (alignment) and fd-digits of the one-step generator and of the teacher's
  guided 35-NFE Heun at the same kappa (the analogue of the paper's FID/CLIP table).

Writes benchmarks/results/distill.json and distill.png; run folders go to --runs (default runs/bench-distill).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from genkit import config as C
from genkit.distill.train import DistillRecipe, distill
from genkit.runtime import atomic_write_text

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "distill"
PARTS = ("mixture", "sida", "digits", "mnist", "lsg")


def run(name: str, recipe: str, overrides: list[str], runs: Path, quick: bool) -> dict:
    """One distillation run (resumes if its folder already holds checkpoints)."""
    if quick:
        overrides = overrides + ["train.steps=20", "mixture.fit_steps=50", "eval.metric_samples=500", "eval.every=0",
                                 "eval.teacher_nfe=5", "sida.g_start_images=0", "sida.adv_start_images=0"]
    cfg = C.load(DistillRecipe, RECIPES / recipe, overrides)
    t0 = time.time()
    m = distill(cfg, runs / name, quiet=True)
    m["wall_seconds"] = round(time.time() - t0, 1)
    m["run"] = str(runs / name)
    m["overrides"] = overrides
    print(f"{name}: " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if isinstance(v, float)
                                  and not k.startswith("final_")), flush=True)
    return m


def teacher(m: dict, sampler: str, metric: str):
    """The teacher baseline figure ``teacher_<sampler>_nfe<N>_<metric>`` of a run's metrics (any N)."""
    for k, v in m.items():
        if k.startswith(f"teacher_{sampler}_nfe") and k.endswith("_" + metric) and \
                k[len(f"teacher_{sampler}_nfe"):-len(metric) - 1].isdigit():
            return v
    return None


def reuse_fit(src: Path, dst: Path) -> None:
    """Runs with the same mixture.* keys share the MLP fit (RUN/init/mlp): copy it instead of refitting."""
    import shutil

    if (src / "init").is_dir() and not (dst / "init").exists():
        dst.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / "init", dst / "init")


def mixture_part(runs, quick) -> dict:
    res = {"sid_alpha1.2": run("ring-sid-alpha1.2", "sid-ring2d.yaml", ["sid.alpha=1.2"], runs, quick)}
    reuse_fit(runs / "ring-sid-alpha1.2", runs / "ring-sid-alpha1.0")
    res["sid_alpha1.0"] = run("ring-sid-alpha1.0", "sid-ring2d.yaml", ["sid.alpha=1.0", "eval.teacher_baseline=false"],
                              runs, quick)
    # the official per-sample normaliser (see genkit/distill/sid.py: sid_normaliser)
    reuse_fit(runs / "ring-sid-alpha1.2", runs / "ring-sid-alpha1.2-sample-normaliser")
    res["sid_alpha1.2_sample_normaliser"] = run("ring-sid-alpha1.2-sample-normaliser", "sid-ring2d.yaml",
                                                ["sid.alpha=1.2", "sid.normaliser=sample",
                                                 "eval.teacher_baseline=false"], runs, quick)
    m = res["sid_alpha1.2"]
    heun = teacher(m, "heun", "sliced_w2")
    res["targets"] = {
        "teacher_heun35_sliced_w2": heun, "one_step_sliced_w2": m["sliced_w2"],
        "sliced_w2_ratio_to_heun35": m["sliced_w2"] / heun,
        "sliced_w2_target_met": m["sliced_w2"] <= 1.1 * heun,
        "mode_tv": m["mode_tv"], "mode_tv_target_met": m["mode_tv"] <= 0.05,
        "minutes": m["wall_seconds"] / 60, "within_15_minutes": m["wall_seconds"] <= 900,
        "alpha1.0_sliced_w2": res["sid_alpha1.0"]["sliced_w2"], "alpha1.0_mode_tv": res["sid_alpha1.0"]["mode_tv"],
        "sample_normaliser_sliced_w2": res["sid_alpha1.2_sample_normaliser"]["sliced_w2"],
    }
    return res


def sida_part(runs, quick) -> dict:
    res = {"sida": run("ring-sida-imperfect", "sida-ring2d.yaml", [], runs, quick)}
    # the same imperfect teacher without real data (plain SiD)
    reuse_fit(runs / "ring-sida-imperfect", runs / "ring-sid-imperfect")
    res["sid_same_teacher"] = run("ring-sid-imperfect", "sida-ring2d.yaml", ["method=sid", "sid.alpha=1.2",
                                                                             "eval.teacher_baseline=false"], runs, quick)
    # the official adversarial scale (the recipe uses 100; see recipes/distill/sida-ring2d.yaml)
    reuse_fit(runs / "ring-sida-imperfect", runs / "ring-sida-imperfect-official-scale")
    res["sida_official_scale"] = run("ring-sida-imperfect-official-scale", "sida-ring2d.yaml",
                                     ["sida.loss_scaling_adv=0.01", "eval.teacher_baseline=false"], runs, quick)
    m = res["sida"]
    res["targets"] = {"teacher_heun35_sliced_w2": teacher(m, "heun", "sliced_w2"),
                      "sida_sliced_w2": m["sliced_w2"], "sid_same_teacher_sliced_w2": res["sid_same_teacher"]["sliced_w2"],
                      "sida_official_scale_sliced_w2": res["sida_official_scale"]["sliced_w2"],
                      "sida_beats_teacher": m["sliced_w2"] < teacher(m, "heun", "sliced_w2")}
    return res


def image_part(name, recipe, teacher_recipe, teacher_path, runs, quick, source_key) -> dict:
    if not Path(teacher_path).exists():
        return {"skipped": f"teacher {teacher_path} does not exist (train it: genkit train-diffusion "
                           f"recipes/train-diffusion/{teacher_recipe} --out {teacher_path})"}
    m = run(name, recipe, [f"teacher={teacher_path}"], runs, quick)
    fd_key = "fd-digits" if source_key == "digits" else "fd-mnist"
    ent_key = fd_key.replace("fd-", "label_entropy-")
    one, heun, euler = m.get(fd_key), teacher(m, "heun", fd_key), teacher(m, "euler", fd_key)
    out = {"run": m}
    if one is not None and heun is not None:
        e1, et = m.get(ent_key), teacher(m, "heun", ent_key)
        out["targets"] = {"fd_one_step": one, "fd_teacher_heun35": heun, "fd_teacher_euler1": euler,
                          "fd_ratio_to_heun35": one / heun, "fd_target_met": one <= 1.2 * heun,
                          "far_below_euler1": one < 0.1 * euler,
                          "label_entropy": e1, "label_entropy_teacher": et,
                          "label_entropy_within_1pct": abs(e1 - et) <= 0.01 * et}
    return out


def lsg_part(teacher_path, runs, quick) -> dict:
    if not Path(teacher_path).exists():
        return {"skipped": f"teacher {teacher_path} does not exist (genkit train-diffusion "
                           f"recipes/train-diffusion/edm-digits-cond.yaml --out {teacher_path})"}
    rows = []
    for kappa in (1.0, 1.5, 2.0, 3.0):
        m = run(f"lsg-kappa{kappa}", "sid-lsg-digits.yaml",
                [f"teacher={teacher_path}", f"lsg.kappa1={kappa}", f"lsg.kappa2={kappa}", f"lsg.kappa4={kappa}"], runs,
                quick)
        rows.append({"kappa": kappa, "fd_one_step": m.get("fd-digits"), "acc_one_step": m.get("acc-digits"),
                     "fd_teacher_heun35": teacher(m, "heun", "fd-digits"),
                     "acc_teacher_heun35": teacher(m, "heun", "acc-digits"),
                     "label_entropy_one_step": m.get("label_entropy-digits"), "seconds": m["wall_seconds"],
                     "run": m["run"]})
    return {"table": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    ap.add_argument("--runs", type=Path, default=REPO / "runs" / "bench-distill")
    ap.add_argument("--digits-teacher", default=str(REPO / "runs" / "edm-digits"))
    ap.add_argument("--digits-cond-teacher", default=str(REPO / "runs" / "edm-digits-cond"))
    ap.add_argument("--mnist-teacher", default=str(REPO / "runs" / "edm-mnist5k"))
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "distill.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    parts = [p for p in args.parts.split(",") if p]
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown part(s) {sorted(unknown)}; valid: {', '.join(PARTS)}")
    results = {}
    t_start = time.time()
    for part in parts:
        t0 = time.time()
        if part == "mixture":
            results[part] = mixture_part(args.runs, args.quick)
        elif part == "sida":
            results[part] = sida_part(args.runs, args.quick)
        elif part == "digits":
            results[part] = image_part("digits-sid", "sid-digits.yaml", "edm-digits.yaml", args.digits_teacher,
                                       args.runs, args.quick, "digits")
        elif part == "mnist":
            results[part] = image_part("mnist5k-sid", "sid-mnist5k.yaml", "edm-mnist5k-cpu.yaml",
                                       args.mnist_teacher, args.runs, args.quick, "mnist5k")
        elif part == "lsg":
            results[part] = lsg_part(args.digits_cond_teacher, args.runs, args.quick)
        results[part]["part_seconds"] = round(time.time() - t0, 1)
    # merge with the parts other invocations wrote (re-read now: parts may run as parallel invocations)
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    runs_info = dict(prev.get("invocations", {}))
    runs_info[",".join(parts)] = {"quick": args.quick, "seconds": round(time.time() - t_start, 1),
                                  "cpu_threads": torch.get_num_threads()}
    payload = {"config": {"torch": torch.__version__, "python": platform.python_version(),
                          "machine": platform.machine(), "cpu_count": os.cpu_count()},
               "invocations": runs_info, "results": {**prev.get("results", {}), **results}}
    results = payload["results"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(payload, indent=1, default=str))  # a reader never sees half a file
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    panels = []
    for part, key in (("mixture", "sid_alpha1.2"), ("mixture", "sid_alpha1.0"),
                      ("mixture", "sid_alpha1.2_sample_normaliser"), ("sida", "sida"), ("sida", "sid_same_teacher"),
                      ("sida", "sida_official_scale")):
        m = results.get(part, {}).get(key)
        if m and "samples_png" in m and Path(m["samples_png"]).is_file():
            heun = results[part]["targets"].get("teacher_heun35_sliced_w2", float("nan"))
            panels.append((f"{part}: {key}\nsliced W2 {m['sliced_w2']:.3f} (teacher Heun-35 {heun:.3f}), "
                           f"TV {m['mode_tv']:.3f}", m["samples_png"]))
    for part in ("digits", "mnist"):
        m = results.get(part, {}).get("run")
        if m and "samples_png" in m and Path(m["samples_png"]).is_file():
            t = results[part].get("targets", {})
            panels.append((f"{part}: one-step SiD\nfd {t.get('fd_one_step', float('nan')):.3f} "
                           f"(Heun-35 {t.get('fd_teacher_heun35', float('nan')):.3f})", m["samples_png"]))
    table = results.get("lsg", {}).get("table")
    n = len(panels) + (1 if table else 0)
    if not n:
        return
    cols = min(3, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (title, png) in zip(axes.flat, panels):
        ax.imshow(Image.open(png), cmap="gray")
        ax.set_title(title, fontsize=9)
    if table:
        ax = axes.flat[len(panels)]
        ax.axis("on")
        for who, fd, acc, style in (("one-step SiD-LSG", "fd_one_step", "acc_one_step", "o-"),
                                    ("teacher Heun-35 (CFG)", "fd_teacher_heun35", "acc_teacher_heun35", "s--")):
            pts = [(r[fd], r[acc], r["kappa"]) for r in table if r.get(fd) is not None and r.get(acc) is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=who)
                for x, y, k in pts:
                    ax.annotate(f"{k:g}", (x, y), fontsize=8)
        ax.set_xlabel("fd-digits (lower is better)")
        ax.set_ylabel("class accuracy (alignment)")
        ax.set_title("SiD-LSG: kappa trade-off")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
