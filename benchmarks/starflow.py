"""STARFlow on MNIST-5k (padded to 32x32, 4 x 8 x 8 latents): every figure of issue 18 beside its baseline.

    python benchmarks/starflow.py                  # everything, 3 seeds (hours on 2 shared cores)
    python benchmarks/starflow.py --seeds 1 --steps 1500 --only ae,flows,guidance   # a shorter pass

One run writes benchmarks/results/starflow.json and PNG grids under benchmarks/results/starflow/; every model it
trains is a run folder there too (a part whose folder already holds metrics.json is reused: --fresh retrains).
Parts:

ae        genkit train-ae recipes/train-ae/ae-mnist5k.yaml: test PSNR of reconstructions (mean latent) and of
          latents + N(0, 0.3^2) noise, with the training-log timeline (seconds to 22 dB).
flows     deep-shallow [1, 1, 1, 5] vs uniform [2, 2, 2, 2] (same parameter count, same steps, same seeds), both
          class-conditional latent STARFlows (recipes/train-flow/starflow-mnist5k.yaml): test NLL (nats/dim of
          the noisy scaled latents) and fd-mnist of 1,000 samples (w = 0, Tweedie, decoded, centre 28x28 crop).
pixel     latent STARFlow (16 tokens) vs a pixel TarFlow (49 tokens, 28x28, patch 4, [2, 2, 2, 2] x 128) trained
          for the same wall-clock time (its steps set from the two models' step times measured back to back):
          sampling speed (100 samples in one batch, best of 3, the latent pipeline timed in parts: flow, decode,
          Tweedie + decode) and fd-mnist.
finetune  decoder fine-tuning (recipes/train-ae/finetune-decoder-mnist5k.yaml) vs Tweedie denoising of the latent:
          fd-mnist of the same 1,000 sampled latents decoded four ways.
guidance  STARFlow guidance (and TarFlow's, same model) at w = 0 .. 8: class accuracy of 500 samples under the
          shipped MNIST classifier, fd-mnist, share of finite samples.
text      text-conditioned STARFlow (recipes/train-flow/starflow-mnist5k-text.yaml, MiniLM): class accuracy of
          samples prompted with the 3 training templates vs 2 held-out templates.

fd-mnist is the Frechet distance on genkit's shipped MNIST classifier features (genkit.eval.features), not an
Inception FID. Wall-clock figures depend on the machine's load: the JSON records the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from genkit import config as C  # noqa: E402
from genkit.data.grid import save_grid  # noqa: E402
from genkit.data.images import crop_to  # noqa: E402
from genkit.eval.image_metrics import evaluate_images  # noqa: E402
from genkit.runtime import atomic_write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
ROOT = RESULTS / "starflow"
QUICK: list[str] = []  # --quick: extra overrides of the autoencoder runs
LATENT_RECIPE = "recipes/train-flow/starflow-mnist5k.yaml"
TEXT_RECIPE = "recipes/train-flow/starflow-mnist5k-text.yaml"
HELD_OUT = ["a picture of the digit {name}", "an image showing the number {name}"]


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def done(run: Path) -> dict | None:
    f = run / "metrics.json"
    return json.loads(f.read_text()) if f.is_file() else None


def _train_run(name: str, recipe: str, overrides: list[str], fresh: bool, recipe_cls, train) -> tuple[dict, Path]:
    """A finished run under ROOT/name is reused (unless fresh); else it is trained from the recipe."""
    run = ROOT / name
    if not fresh and (m := done(run)) is not None:
        print(f"[{name}] reusing {run}")
        return m, run
    if fresh and run.exists():
        shutil.rmtree(run)
    cfg = C.load(recipe_cls, recipe, overrides)
    print(f"[{name}] training {recipe} {' '.join(overrides)}  (load {load()})", flush=True)
    return train(cfg, run, quiet=True), run


def train_flow_run(name: str, recipe: str, overrides: list[str], fresh: bool) -> tuple[dict, Path]:
    from genkit.flows.train import FlowRecipe, train_flow

    return _train_run(name, recipe, overrides, fresh, FlowRecipe, train_flow)


def train_ae_run(name: str, recipe: str, overrides: list[str], fresh: bool) -> tuple[dict, Path]:
    from genkit.ae.train import AERecipe, train_ae

    return _train_run(name, recipe, overrides, fresh, AERecipe, train_ae)


def load_space(run: Path):
    """(model, FlowSpace) of a finished train-flow run (the recipe from its config.yaml)."""
    from genkit.flows.starflow import StarFlow
    from genkit.flows.tarflow import TarFlow
    from genkit.flows.train import FlowRecipe, FlowSpace

    cfg = C.load(FlowRecipe, str(run / "config.yaml"))
    train = cfg.data.load("train")
    space = FlowSpace(cfg, train)
    cls = StarFlow if cfg.model == "starflow" else TarFlow
    return cls.from_pretrained(run / "model").eval(), space


def score(images: torch.Tensor, labels=None, metrics=("fd", "classify")) -> dict:
    x = crop_to(images, 28) if images.shape[-1] != 28 else images
    r = evaluate_images(x.float(), "mnist5k", labels=labels, metrics=metrics)
    keep = ("fd-mnist", "acc-mnist", "label_entropy_ratio-mnist")
    return {k: r[k] for k in keep if k in r}


def sample(model, space, n: int, *, seed: int, guidance: float = 0.0, kind: str = "starflow", denoise=True,
           codec=None, batch: int = 250, resample: bool = False, stats: dict | None = None):
    from genkit.flows.train import sample_images

    nc = 10
    xs, ys = [], []
    for i in range(0, n, batch):
        m = min(batch, n - i)
        labels = torch.arange(i, i + m) % nc
        xs.append(sample_images(model, space, m, seed=seed + i, labels=labels, guidance=guidance, guidance_kind=kind,
                                denoise_latents=denoise, codec=codec, resample_nonfinite=resample, stats=stats))
        ys.append(labels)
    return torch.cat(xs), torch.cat(ys)


# ------------------------------------------------------------------------------------------------------- parts
def part_ae(args, res):
    m, run = train_ae_run("ae", "recipes/train-ae/ae-mnist5k.yaml", list(QUICK), args.fresh)
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "train_psnr" in line]
    first22 = next((r for r in log if r["train_psnr"] >= 22.0), None)
    res["ae"] = {"test_psnr": m["test_psnr"], "test_psnr_noisy_latent": m["test_psnr_noisy"],
                 "steps": m["steps"], "train_seconds": m["train_seconds"], "params": m["params"],
                 "scaling_factor": m["scaling_factor"], "latent_shape": m["latent_shape"],
                 "first_log_at_22db": first22 and {"step": first22["step"], "seconds": first22["time"],
                                                   "train_psnr": first22["train_psnr"]},
                 "timeline": [(r["step"], round(r["time"], 1), round(r["train_psnr"], 2)) for r in log],
                 "target": ">= 22 dB within 10 min", "recon_png": str(run / "recon.png")}
    when = f"{first22['step']} steps / {first22['time']:.0f} s" if first22 else "never"
    print(f"[ae] test PSNR {m['test_psnr']:.2f} dB after {m['steps']} steps ({m['train_seconds']:.0f} s); "
          f"first logged train PSNR >= 22 dB: {when}", flush=True)
    return run / "ae"


def part_flows(args, res, ae: Path):
    rows = {"[1,1,1,5]": [], "[2,2,2,2]": []}
    runs = {}
    for seed in range(args.seeds):
        for arch in rows:
            tag = arch.strip("[]").replace(",", "")
            m, run = train_flow_run(f"ds-{tag}-s{seed}", LATENT_RECIPE,
                                    [f"latent.ae={ae}", f"arch.layers_per_block={arch}", f"runtime.seed={seed}",
                                     f"train.steps={args.steps}"], args.fresh)
            model, space = load_space(run)
            st = {}
            x, y = sample(model, space, args.n_fd, seed=1000 * seed, resample=True, stats=st)
            s = score(x, y)
            rows[arch].append({"seed": seed, "test_nll": m["test_nll"], **s, "params": m["params"],
                               "train_seconds": m["train_seconds"], "non_finite_redrawn": st["non_finite"]})
            if seed == 0:
                save_grid(x[:100], ROOT / f"samples-{tag}.png", nrow=10)
                runs[arch] = run
            print(f"[flows] {arch} seed {seed}: test NLL {m['test_nll']:.4f} nats/dim, fd-mnist {s['fd-mnist']:.2f}",
                  flush=True)
    summary = {}
    for arch, r in rows.items():
        summary[arch] = {k: _mean_std([v[k] for v in r]) for k in ("test_nll", "fd-mnist", "acc-mnist")}
        summary[arch]["params"] = r[0]["params"]
    ds, un = summary["[1,1,1,5]"], summary["[2,2,2,2]"]
    res["deep_shallow"] = {"runs": rows, "summary": summary, "steps": args.steps, "seeds": args.seeds,
                           "deep_shallow_minus_uniform": {k: ds[k]["mean"] - un[k]["mean"]
                                                          for k in ("test_nll", "fd-mnist")}}
    return runs["[1,1,1,5]"]


def _mean_std(v):
    t = torch.tensor(v, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(v) > 1 else 0.0, "n": len(v)}


def _step_time(model, x, y, steps: int = 6) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        out = model(x, y)
        z, ld = out[0], out[1]
        loss = 0.5 * z.pow(2).mean() - ld.mean() / z[0].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def part_pixel(args, res, ae: Path, latent_run: Path):
    from genkit.flows.train import FlowRecipe, build_flow

    lat_cfg = C.load(FlowRecipe, str(latent_run / "config.yaml"))
    # the MNIST-5k TarFlow recipe, class-conditional; no weight EMA: at a few hundred steps a 0.995 EMA still
    # averages in the first, untrained weights (test bpd 3.52 with it vs the raw weights' train bpd 2.74 at 833 steps)
    pix_args = ["recipes/train-flow/tarflow-mnist5k.yaml", ["data.conditional=true", "arch.layers_per_block=2",
                                                            "arch.num_blocks=4", "eval.samples=0", "train.ema_decay=0",
                                                            "runtime.threads=1"]]
    pix_cfg = C.load(FlowRecipe, pix_args[0], pix_args[1])
    torch.manual_seed(0)
    lat_model, pix_model = build_flow(lat_cfg, (4, 8, 8), 10), build_flow(pix_cfg, (1, 28, 28), 10)
    b = lat_cfg.train.batch_size
    y = torch.arange(b) % 10
    t_lat = _step_time(lat_model, torch.randn(b, 4, 8, 8), y)
    t_pix = _step_time(pix_model, torch.randn(b, 1, 28, 28), y)
    lat_m = done(latent_run)
    pix_steps = max(1, round(lat_m["steps"] * t_lat / t_pix))
    m_pix, pix_run = train_flow_run("pixel-tarflow", pix_args[0], pix_args[1] + [f"train.steps={pix_steps}",
                                                                                f"train.batch_size={b}"], args.fresh)
    lat, space = load_space(latent_run)
    pix, pspace = load_space(pix_run)
    # sampling speed: 100 samples in one batch, best of 3, interleaved; the latent pipeline timed in its parts
    from genkit.flows.train import latents_to_images, sample_flow

    labels = torch.arange(100) % 10
    t = {"latent_flow": [], "decode": [], "tweedie_decode": [], "pixel_flow": []}
    for r in range(3):
        t0 = time.perf_counter()
        z = sample_flow(lat, 100, seed=r, labels=labels, clamp=False)
        t1 = time.perf_counter()
        latents_to_images(lat, z, space.codec)
        t2 = time.perf_counter()
        latents_to_images(lat, z, space.codec, sigma=space.cfg.latent.noise_std, labels=labels)
        t3 = time.perf_counter()
        sample_flow(pix, 100, seed=r, labels=labels)
        t4 = time.perf_counter()
        for k, v in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
            t[k].append(v)
    best = {k: min(v) for k, v in t.items()}
    speed = {"flow_only": best["pixel_flow"] / best["latent_flow"],
             "flow_and_decode (fine-tuned decoder path)": best["pixel_flow"] / (best["latent_flow"] + best["decode"]),
             "flow_tweedie_decode": best["pixel_flow"] / (best["latent_flow"] + best["tweedie_decode"])}
    st_l, st_p = {}, {}
    xl, yl = sample(lat, space, args.n_fd, seed=0, resample=True, stats=st_l)
    xp, yp = sample(pix, pspace, args.n_fd, seed=0, resample=True, stats=st_p)
    sl, sp = score(xl, yl), score(xp, yp)
    save_grid(xp[:100], ROOT / "samples-pixel-tarflow.png", nrow=10)
    res["latent_vs_pixel"] = {
        "latent": {"tokens": 16, "steps": lat_m["steps"], "train_seconds": lat_m["train_seconds"], **sl,
                   "params": lat_m["params"], "non_finite_of_n": st_l["non_finite"]},
        "pixel": {"tokens": 49, "steps": m_pix["steps"], "train_seconds": m_pix["train_seconds"], **sp,
                  "params": m_pix["params"], "test_bpd": m_pix.get("test_bpd"), "non_finite_of_n": st_p["non_finite"]},
        "fd_note": "non-finite samples are redrawn (resample_nonfinite, as the official evaluate_fid.py redraws)",
        "step_seconds_measured_back_to_back": {"latent": t_lat, "pixel": t_pix},
        "sample100_seconds_best_of_3": best, "sampling_speedup": speed, "target_speedup": 2.5, "load": load()}
    print(f"[pixel] sampling speed-up {', '.join(f'{k} {v:.2f}x' for k, v in speed.items())}; fd-mnist latent "
          f"{sl['fd-mnist']:.2f} vs pixel {sp['fd-mnist']:.2f} (non-finite before redraw: {st_l['non_finite']} vs "
          f"{st_p['non_finite']} of {args.n_fd}); train {lat_m['train_seconds']:.0f} s vs {m_pix['train_seconds']:.0f} s",
          flush=True)


def part_finetune(args, res, ae: Path, latent_run: Path):
    from genkit.flows.train import latents_to_images, sample_flow
    from genkit.models.autoencoder import load_codec

    m, run = train_ae_run("ae-ft", "recipes/train-ae/finetune-decoder-mnist5k.yaml", [f"ae={ae}", *QUICK],
                          args.fresh)
    model, space = load_space(latent_run)
    ft, _ = load_codec(run / "ae", scaling_factor=space.codec.scale)
    zs, ys = [], []
    for i in range(0, args.n_fd, 250):
        labels = torch.arange(i, i + 250) % 10
        zs.append(sample_flow(model, 250, seed=i, labels=labels, clamp=False))
        ys.append(labels)
    z, y = torch.cat(zs), torch.cat(ys)
    sigma = space.cfg.latent.noise_std
    ways = {"original_decoder": (space.codec, 0.0), "tweedie+original_decoder": (space.codec, sigma),
            "finetuned_decoder": (ft, 0.0), "tweedie+finetuned_decoder": (ft, sigma)}
    out = {}
    for name, (codec, s) in ways.items():
        x = latents_to_images(model, z, codec, sigma=s, labels=y)
        out[name] = score(x, y)
        save_grid(x[:100], ROOT / f"decode-{name}.png", nrow=10)
    a, b = out["finetuned_decoder"]["fd-mnist"], out["tweedie+original_decoder"]["fd-mnist"]
    res["decoder_finetune"] = {"fd": out, "finetune_metrics": {k: m.get(k) for k in ("test_psnr", "test_psnr_noisy",
                                                                                      "steps", "train_seconds")},
                               "finetuned_vs_tweedie_fd_ratio": a / b, "target_ratio": 0.9}
    print(f"[finetune] fd-mnist fine-tuned decoder {a:.2f} vs Tweedie {b:.2f} (ratio {a / b:.3f})", flush=True)


def part_guidance(args, res, latent_run: Path):
    model, space = load_space(latent_run)
    ws = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    rows = {}
    for kind in ("starflow", "tarflow"):
        rows[kind] = []
        for w in ws:
            x, y = sample(model, space, args.n_guid, seed=0, guidance=w, kind=kind)
            finite = float(torch.isfinite(x).all(dim=(1, 2, 3)).double().mean())
            s = score(torch.nan_to_num(x), y)
            rows[kind].append({"w": w, **s, "finite": finite})
            if kind == "starflow" and w in (0.0, 2.0, 8.0):
                save_grid(x[:100], ROOT / f"guidance-w{w:g}.png", nrow=10)
            print(f"[guidance] {kind} w={w}: acc {s['acc-mnist']:.3f} fd {s['fd-mnist']:.2f} finite {finite:.3f}",
                  flush=True)
    acc = {r["w"]: r["acc-mnist"] for r in rows["starflow"]}
    res["guidance"] = {"rows": rows, "acc_w0": acc[0.0], "acc_w2": acc[2.0],
                       "finite_w8": rows["starflow"][-1]["finite"], "n": args.n_guid}


def part_text(args, res, ae: Path):
    from genkit.flows.train import latents_to_images, sample_flow
    from genkit.models.text import encode_states, template_prompts

    m, run = train_flow_run("text", TEXT_RECIPE, [f"latent.ae={ae}", f"train.steps={args.steps}"], args.fresh)
    model, space = load_space(run)
    names = space.captions.class_names
    L = space.cfg.text.max_length
    null = space.captions.states(torch.tensor([space.captions.empty]))
    out = {}
    for split, templates in (("train_templates", space.captions.templates), ("held_out_templates", HELD_OUT)):
        prompts, labels = template_prompts(names, templates)
        states = encode_states(prompts, L).hidden
        for w in (0.0, 2.0):
            xs, ys = [], []
            reps = max(1, math.ceil(args.n_text / len(prompts)))
            idx = torch.arange(len(prompts)).repeat(reps)[: args.n_text]
            for i in range(0, len(idx), 250):
                sl = idx[i : i + 250]
                txt = states[sl]
                z = sample_flow(model, len(sl), seed=i, txt=txt, txt_null=null.expand(len(sl), -1, -1),
                                guidance=w, clamp=False)
                xs.append(latents_to_images(model, z, space.codec, sigma=space.cfg.latent.noise_std, txt=txt))
                ys.append(torch.tensor(labels)[sl])
            x, y = torch.cat(xs), torch.cat(ys)
            out[f"{split}_w{w:g}"] = score(x, y)
            if w == 2.0:
                save_grid(x[:100], ROOT / f"text-{split}.png", nrow=10)
            print(f"[text] {split} w={w}: acc {out[f'{split}_w{w:g}']['acc-mnist']:.3f}", flush=True)
    res["text"] = {"templates": space.captions.templates, "held_out": HELD_OUT, "acc": out,
                   "gap_points_w2": 100 * (out["train_templates_w2"]["acc-mnist"]
                                           - out["held_out_templates_w2"]["acc-mnist"]),
                   "gap_points_w0": 100 * (out["train_templates_w0"]["acc-mnist"]
                                           - out["held_out_templates_w0"]["acc-mnist"]),
                   "test_nll": m["test_nll"], "target_gap_points": 5}


def main():
    global RESULTS, ROOT
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds of the deep-shallow comparison")
    ap.add_argument("--steps", type=int, default=3000, help="training steps of the latent flows")
    ap.add_argument("--n-fd", type=int, default=1000, help="samples per fd-mnist")
    ap.add_argument("--n-guid", type=int, default=500, help="samples per guidance weight")
    ap.add_argument("--n-text", type=int, default=500, help="samples per template split")
    ap.add_argument("--only", default="ae,flows,pixel,finetune,guidance,text", help="comma-separated parts")
    ap.add_argument("--fresh", action="store_true", help="retrain parts whose run folders exist")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (starflow.json, starflow/)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 20-step autoencoders, tiny sample counts")
    args = ap.parse_args()
    RESULTS, ROOT = args.out, args.out / "starflow"
    if args.quick:
        QUICK.extend(["train.steps=20", "eval_images=50"])
    torch.set_num_threads(1)
    ROOT.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "starflow.json"
    res = json.loads(out.read_text()) if out.is_file() else {}
    parts = args.only.split(",")
    res["settings"] = {**vars(args), "load_at_start": load()}
    # every invocation's settings are kept: a rerun of some parts must not hide how the reused parts were run
    res.setdefault("invocations", []).append({**res["settings"], "out": str(args.out),
                                              "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())})
    ae = part_ae(args, res)  # every later part needs the autoencoder (reused when trained)
    atomic_write_json(out, res)
    latent_run = ROOT / "ds-1115-s0"
    if "flows" in parts:
        latent_run = part_flows(args, res, ae)
        atomic_write_json(out, res)
    for name, fn in (("pixel", lambda: part_pixel(args, res, ae, latent_run)),
                     ("finetune", lambda: part_finetune(args, res, ae, latent_run)),
                     ("guidance", lambda: part_guidance(args, res, latent_run)),
                     ("text", lambda: part_text(args, res, ae))):
        if name in parts:
            fn()
            atomic_write_json(out, res)
    res["load_at_end"] = load()
    atomic_write_json(out, res)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
