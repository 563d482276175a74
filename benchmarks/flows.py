"""TarFlow test bits/dim against three baselines measured in the same run, plus the KV-cache speed-up.

    python benchmarks/flows.py                 # digits + MNIST-5k (about 45 minutes on 2 cores)
    python benchmarks/flows.py --skip-mnist    # digits only (about 10 minutes)

Writes benchmarks/results/flows.json and PNG sample grids beside it.  All models see the same
train/test split and the same bits/dim convention (genkit/eval/bpd.py: uniform dequantization, the
bin-width term included; a uniform model scores log2(levels)).

Baselines:
- per-pixel histogram: an independent categorical over the levels of each pixel (add-one smoothing);
  its bits/dim is the discrete code length exactly;
- full-covariance Gaussian fitted to the dequantized training images (maximum likelihood + 1e-4 ridge);
- MAF (Papamakarios et al. 2017) from zuko, trained on the dequantized data for the same wall-clock
  budget as TarFlow (its best test bpd over evaluations during training is reported too).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit import config as C  # noqa: E402
from genkit.data.batches import batch_indices, step_generator  # noqa: E402
from genkit.data.grid import save_grid  # noqa: E402
from genkit.data.images import load_images  # noqa: E402
from genkit.eval.bpd import bits_per_dim, dequantize  # noqa: E402
from genkit.flows.train import FlowRecipe, sample_flow, train_flow  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402

OUT = REPO / "benchmarks" / "results"


def histogram_bpd(train, test) -> float:
    L = train.levels
    x = train.ints.flatten(1).long()  # (N, D)
    counts = torch.zeros(x.shape[1], L)
    counts.scatter_add_(1, x.T.contiguous(), torch.ones(x.shape[1], x.shape[0]))
    q = (counts + 1) / (counts.sum(1, keepdim=True) + L)  # (D, L)
    xt = test.ints.flatten(1).long()
    return float(-torch.log2(q.gather(1, xt.T.contiguous())).mean())


def gaussian_bpd(train, test) -> float:
    g = step_generator(0, 0, stream=21)
    v = dequantize(train.ints, train.levels, torch.rand(train.ints.shape, generator=g)).flatten(1).double()
    mu = v.mean(0)
    cov = torch.cov(v.T) + 1e-4 * torch.eye(v.shape[1], dtype=torch.float64)
    dist = torch.distributions.MultivariateNormal(mu, covariance_matrix=cov)
    return bits_per_dim(lambda x, y: dist.log_prob(x.flatten(1).double()), test)


def maf_bpd(train, test, seconds: float, seed: int = 0) -> dict:
    import zuko

    torch.manual_seed(seed)
    d = int(np.prod(train.shape))
    flow = zuko.flows.MAF(features=d, transforms=5, hidden_features=(256, 256))
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    t0, step, best, evals = time.time(), 0, float("inf"), []
    lp = lambda x, y: flow().log_prob(x.flatten(1))
    while time.time() - t0 < seconds:
        idx = batch_indices(len(train), 128, step, seed)
        v = dequantize(train.ints[idx], train.levels,
                       torch.rand(train.ints[idx].shape, generator=step_generator(seed, step, stream=2)))
        loss = -flow().log_prob(v.flatten(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            b = bits_per_dim(lp, test)
            best = min(best, b)
            evals.append((step, round(time.time() - t0, 1), b))
    final = bits_per_dim(lp, test)
    return {"test_bpd": final, "best_test_bpd_during_training": min(best, final), "steps": step,
            "seconds": round(time.time() - t0, 1), "curve": evals}


def tarflow_run(recipe: str, out: Path, overrides: list[str]) -> dict:
    cfg = C.load(FlowRecipe, REPO / recipe, overrides + ["runtime.resume=never"])
    if out.exists():
        import shutil

        shutil.rmtree(out)
    t0 = time.time()
    m = train_flow(cfg, out, quiet=False)
    m["wall_seconds"] = round(time.time() - t0, 1)
    return m


def cache_speed(run: Path, n: int = 64, repeats: int = 3) -> dict:
    from genkit.flows.io import load_flow

    model, _ = load_flow(run)
    c = model.config
    z = torch.randn((n, c.channels, c.img_size, c.img_size), generator=torch.Generator().manual_seed(0))
    y = (torch.arange(n) % c.num_classes) if c.num_classes else None
    times = {}
    outs = {}
    with torch.no_grad():
        for use_cache in (True, False):
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                outs[use_cache] = model.reverse(z, y, use_cache=use_cache)
                best = min(best, time.perf_counter() - t0)
            times[use_cache] = best
    return {"seconds_with_cache": times[True], "seconds_without_cache": times[False],
            "speedup": times[False] / times[True],
            "max_abs_diff": float((outs[True] - outs[False]).abs().max()), "n": n}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--skip-mnist", action="store_true", help="digits only")
    ap.add_argument("--skip-digits", action="store_true", help="MNIST-5k only")
    ap.add_argument("--skip-maf", action="store_true", help="no MAF baseline")
    ap.add_argument("--digits-steps", type=int, default=None, help="override the digits recipe's train.steps")
    ap.add_argument("--mnist-steps", type=int, default=None, help="override the MNIST recipe's train.steps")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the issue's budget is 2 cores)")
    ap.add_argument("--out", type=Path, default=OUT, help="folder for runs, PNGs and the JSON")
    ap.add_argument("--json", default="flows.json", help="name of the JSON file in --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    res: dict = {"convention": "bits/dim with uniform dequantization and bin-width term (genkit/eval/bpd.py)",
                 "threads": torch.get_num_threads()}

    # ---------------------------------------------------------------- digits
    if not args.skip_digits:
        digits(args, res)
    if not args.skip_mnist:
        mnist(args, res)
    atomic_write_json(args.out / args.json, res)
    print(json.dumps(res, indent=1, default=str))


def closed_form_baselines(source: str):
    """(train, test, figures) for a source: its split, the uniform, histogram and Gaussian bits/dim."""
    tr, te = load_images(source, "train"), load_images(source, "test")
    res: dict = {"split": f"{len(tr)}/{len(te)} (seed 0)", "uniform_bpd": math.log2(tr.levels),
                 "histogram_bpd": histogram_bpd(tr, te), "gaussian_bpd": gaussian_bpd(tr, te)}
    print(f"{source:7s} histogram {res['histogram_bpd']:.3f}  gaussian {res['gaussian_bpd']:.3f}", flush=True)
    return tr, te, res


def digits(args, res):
    tr, te, dig = closed_form_baselines("digits")
    ov = [f"train.steps={args.digits_steps}"] if args.digits_steps else []
    run = args.out / "tarflow-digits"
    m = tarflow_run("recipes/train-flow/tarflow-digits.yaml", run, ov)
    dig["tarflow"] = {k: m[k] for k in ("test_bpd", "train_bpd_eval", "params", "steps", "train_seconds",
                                        "wall_seconds")}
    print(f"digits  tarflow test {m['test_bpd']:.3f} (train {m['train_bpd_eval']:.3f}) in {m['train_seconds']}s",
          flush=True)
    save_grid(sample_flow(_load(run), 64, seed=1), args.out / "flows_digits_tarflow.png")
    res["digits"] = dig
    atomic_write_json(args.out / args.json, res)  # partial results survive an interrupted MAF run
    if not args.skip_maf:
        dig["maf"] = maf_bpd(tr, te, seconds=m["train_seconds"])
        print(f"digits  maf test {dig['maf']['test_bpd']:.3f} (best {dig['maf']['best_test_bpd_during_training']:.3f})"
              f" in {dig['maf']['seconds']}s", flush=True)
    dig["kv_cache"] = cache_speed(run)
    print(f"digits  kv-cache speed-up {dig['kv_cache']['speedup']:.2f}x  max diff {dig['kv_cache']['max_abs_diff']:.2e}",
          flush=True)
    base = [dig["histogram_bpd"], dig["gaussian_bpd"]] + ([dig["maf"]["test_bpd"]] if "maf" in dig else [])
    dig["tarflow_beats_all_baselines"] = m["test_bpd"] < min(base)
    dig["target_bpd_2.2_met"] = m["test_bpd"] <= 2.2
    res["digits"] = dig
    atomic_write_json(args.out / args.json, res)


def mnist(args, res):
    tr, te, mn = closed_form_baselines("mnist5k")
    ov = [f"train.steps={args.mnist_steps}"] if args.mnist_steps else []
    run = args.out / "tarflow-mnist5k"
    m = tarflow_run("recipes/train-flow/tarflow-mnist5k.yaml", run, ov)
    mn["tarflow"] = {k: m[k] for k in ("test_bpd", "train_bpd_eval", "params", "steps", "train_seconds",
                                       "wall_seconds")}
    mn["target_bpd_2.0_within_30min_met"] = m["test_bpd"] <= 2.0 and m["wall_seconds"] <= 1800
    mn["published_maf_full_mnist_bpd"] = 1.89
    print(f"mnist5k tarflow test {m['test_bpd']:.3f} (train {m['train_bpd_eval']:.3f}) in {m['wall_seconds']}s",
          flush=True)
    save_grid(sample_flow(_load(run), 64, seed=1), args.out / "flows_mnist5k_tarflow.png")
    res["mnist5k"] = mn


def _load(run):
    from genkit.flows.io import load_flow

    return load_flow(run)[0]


if __name__ == "__main__":
    main()
