"""Coupled-GRPO on a CPU-scale code task: estimator variance, and SFT vs RL (coupled, decoupled, full-mask).

    python benchmarks/rl.py                              # the whole benchmark (hours on 2 shared cores)
    python benchmarks/rl.py --sft runs/pyfunc-sft        # reuse an SFT run of recipes/train-dllm/pyfunc.yaml
    python benchmarks/rl.py --seeds 0 --steps 20 --quick # smoke test (numbers meaningless)

1. SFT: `genkit train-dllm recipes/train-dllm/pyfunc.yaml` (0.45M parameters, 1500 steps) into
   benchmarks/results/rl/sft (reused when present).
2. (a) Estimator variance at equal forward passes (3 per estimate): 64 rollouts of the SFT model (8 test prompts
   x 8 entropy-decoded completions, temperature 1.0, top_p 0.95); for each, 32 mask draws of the coupled and the
   decoupled estimator (`genkit.dllm.rl.per_token_logps`); variance over the draws of the completion's summed
   log-prob estimate (and per token), averaged over rollouts. Claim: coupled <= 0.5 x decoupled. And the
   full-mask estimator's bias against a 256-draw estimate of the ELBO E_{t~U(0,1)} (1/t) sum_masked log p.
3. (b) `genkit rl recipes/rl/pyfunc-coupled.yaml` from the SFT model with train.method = coupled, decoupled,
   full-mask, each for --seeds (runtime.seed), the same number of steps (same rollouts and updates), a
   held-out curve every --every steps; the SFT model is evaluated with the same evaluation (200 test rows,
   greedy pass@1; 10 samples per row at temperature 1.0 for sampled pass@1 and pass@10; AR-ness of the sampled
   orders). Aim: coupled RL raises sampled pass@1 by >= 4 points over SFT (mean of the seeds).

Measured (README, genkit rl section): (a) 223 s at load 6-7; (b) with --seeds 0,1,2 --steps 40 --every 20
--set train.lr=2e-4 on the 1500-step SFT run, 3819 s (9 runs of 4-8 min + the SFT evaluations) at load 2.3-3.7.
--skip-variance keeps part (a) of a stored rl.json.

Writes benchmarks/results/rl.json and rl.png. Runs are resumable: a finished RL run (metrics.json with the same
config) is reused, an interrupted one continues from its checkpoint. Wall-clock figures are printed with the
machine load beside them; the step counts are the budget.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
OUT = RESULTS / "rl"
METHODS = ("coupled", "decoupled", "full-mask")


def load() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def genkit(*args, log: Path | None = None):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("GENKIT_DEBUG", None)
    cmd = [sys.executable, "-m", "genkit", *map(str, args)]
    print("$", " ".join(cmd[2:]), flush=True)
    with open(log or os.devnull, "w") as f:
        p = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        raise SystemExit(f"failed ({p.returncode}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))


# ------------------------------------------------------------------------------------------- SFT
def train_sft(out: Path, quick: bool) -> Path:
    if (out / "model" / "model.safetensors").is_file():
        print(f"SFT: reusing {out}")
        return out
    extra = ["train.steps=60", "data.n_train=2000", "eval.n=20"] if quick else []
    t0 = time.time()
    genkit("train-dllm", "recipes/train-dllm/pyfunc.yaml", *extra, "--out", out, "-q", log=out.parent / "sft.log")
    print(f"SFT: {time.time() - t0:.0f} s (load {load()})")
    return out


# ------------------------------------------------------------------------------------------- (a) variance
def variance_part(sft: Path, *, prompts: int = 8, gens: int = 8, draws: int = 32, elbo_draws: int = 256,
                  seed: int = 0) -> dict:
    import torch

    from genkit.data.batches import step_generator
    from genkit.dllm.io import load_dllm, read_jsonl
    from genkit.dllm.rl import completion_mask, draw_masks, per_token_logps
    from genkit.dllm.rl.train import prompt_lengths, prompt_tensor, rollout

    torch.set_num_threads(1)
    model, tok, info = load_dllm(sft)
    G = int(info["gen_length"])
    rows = read_jsonl(sft / "data" / "test.jsonl")[:prompts]
    lens = prompt_lengths(tok, rows, False)
    P = max(lens)
    ids = prompt_tensor(tok, rows, P, False).repeat_interleave(gens, 0)  # (R, P)
    pad = torch.tensor([P - n for n in lens]).repeat_interleave(gens)
    comp, _ = rollout(model, ids, pad, gen_length=G, steps=G, temperature=1.0, top_p=0.95,
                      generator=step_generator(seed, 0, 77))
    x = torch.cat([ids, comp], 1)  # (R, T)
    T = x.shape[1]
    ar = torch.arange(T)
    am, pos = (ar[None] >= pad[:, None]), (ar[None] - pad[:, None]).clamp_min(0)
    lmask = completion_mask(comp, tok.eos_id).float()  # (R, G)
    M = model.config.mask_token_id
    t0 = time.time()
    est = {}
    with torch.no_grad():
        for method in ("coupled", "decoupled"):
            vals = []
            for d in range(draws):
                draw = draw_masks(len(x), G, step_generator(seed, d, 1 if method == "coupled" else 2), method)
                vals.append(per_token_logps(model, x, P, draw, method=method, mask_id=M, attention_mask=am,
                                            position_ids=pos))
            est[method] = torch.stack(vals)  # (draws, R, G)
        full = per_token_logps(model, x, P, None, method="full-mask", mask_id=M, attention_mask=am, position_ids=pos)
        # the ELBO: E_{t ~ U(0,1)} (1/t) sum_n 1[n masked] log p(o_n | x_t), each token masked with probability t
        g = step_generator(seed, 0, 3)
        elbo = []
        for _ in range(elbo_draws):
            t = 1e-3 + (1 - 1e-3) * float(torch.rand((), generator=g))  # LLaDA's p = (1 - eps) t + eps
            u = torch.rand(comp.shape, generator=g)
            noisy = torch.cat([ids, comp.masked_fill(u < t, M)], 1)
            logp = torch.log_softmax(model(noisy, attention_mask=am, position_ids=pos)[:, P:].float(), -1)
            lp = logp.gather(-1, comp[..., None]).squeeze(-1)  # (R, G)
            elbo.append(((u < t).float() * lp * lmask).sum(1) / t)
        elbo = torch.stack(elbo)  # (elbo_draws, R)
    seconds = time.time() - t0
    out = {"rollouts": len(x), "draws": draws, "elbo_draws": elbo_draws, "seconds": round(seconds, 1),
           "mean_completion_tokens": float(lmask.sum(1).mean())}
    seq = {m: (e * lmask).sum(2) for m, e in est.items()}  # (draws, R) summed log-prob estimates
    for m in est:
        out[f"{m}_seq_var"] = float(seq[m].var(0).mean())
        tok_var = est[m].var(0)  # (R, G)
        out[f"{m}_token_var"] = float((tok_var * lmask).sum() / lmask.sum())
        out[f"{m}_mean_minus_elbo"] = float((seq[m].mean(0) - elbo.mean(0)).mean())
    out["seq_var_ratio_coupled_over_decoupled"] = out["coupled_seq_var"] / out["decoupled_seq_var"]
    out["token_var_ratio_coupled_over_decoupled"] = out["coupled_token_var"] / out["decoupled_token_var"]
    f1 = (full * lmask).sum(1)  # (R,) the full-mask estimate (deterministic)
    e = elbo.mean(0)
    out["elbo_mean"] = float(e.mean())
    out["elbo_stderr_mean"] = float((elbo.std(0) / elbo_draws ** 0.5).mean())
    out["full_mask_mean"] = float(f1.mean())
    out["full_mask_bias"] = float((f1 - e).mean())
    out["full_mask_relative_bias"] = float(((f1 - e) / e.abs()).mean())
    out["claim_coupled_le_half_decoupled"] = out["seq_var_ratio_coupled_over_decoupled"] <= 0.5
    return out


# ------------------------------------------------------------------------------------------- (b) RL runs
def eval_sft(sft: Path, n: int, samples: int, seed: int, ks=(1, 10)) -> dict:
    import torch

    from genkit.dllm.io import load_dllm, read_jsonl
    from genkit.dllm.rl.rewards import Grader
    from genkit.dllm.rl.train import evaluate, prompt_lengths, prompt_tensor

    torch.set_num_threads(1)
    model, tok, info = load_dllm(sft)
    G = int(info["gen_length"])
    test = read_jsonl(sft / "data" / "test.jsonl")[:n]
    train = read_jsonl(sft / "data" / "train.jsonl")
    P = max(prompt_lengths(tok, train + test, False))  # the layout the RL runs use
    lens = prompt_lengths(tok, test, False)
    return evaluate(model, tok, test, prompt_tensor(tok, test, P, False), torch.tensor([P - x for x in lens]),
                    gen_length=G, steps=G, temperature=1.0, top_p=0.95, samples=samples, ks=list(ks), batch_size=100,
                    seed=seed, grader=Grader(), eot=tok.eos_id)


def rl_run(sft: Path, method: str, seed: int, overrides: list[str], out: Path) -> dict:
    args = ["rl", "recipes/rl/pyfunc-coupled.yaml", f"init={sft}", f"train.method={method}", f"runtime.seed={seed}",
            *overrides]
    if (out / "metrics.json").is_file() and (out / "config.yaml").is_file():
        from genkit import config as C
        from genkit.commands.common import load_recipe
        from genkit.dllm.rl.train import RLRecipe

        if C.dump(load_recipe(RLRecipe, args[1:])) == (out / "config.yaml").read_text():
            print(f"reusing {out}")
            return read_run(out)
        raise SystemExit(f"{out} holds a run with another config: remove it or use another --out")
    t0 = time.time()
    genkit(*args, "--out", out, "-q", log=out.parent / f"{out.name}.log")
    print(f"  {method} seed {seed}: {time.time() - t0:.0f} s (load {load()})", flush=True)
    return read_run(out)


def read_run(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    logs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {"metrics": m, "log": logs}


def mean_std(xs):
    n = len(xs)
    mu = sum(xs) / n
    sd = (sum((x - mu) ** 2 for x in xs) / (n - 1)) ** 0.5 if n > 1 else 0.0
    return mu, sd


def keys_for(k: int) -> tuple[str, ...]:
    return ("greedy_pass@1", "sampled_pass@1", f"sampled_pass@{k}", "sampled_score", "arness_local@1",
            "arness_global@1")


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(21, 4.5))
    v = res.get("variance")
    if v:
        names = ["coupled", "decoupled"]
        ax[0].bar(names, [v[f"{n}_seq_var"] for n in names], color=["C0", "C1"])
        ax[0].set_title(f"(a) variance of the summed log-prob estimate\n{v['draws']} draws x {v['rollouts']} "
                        f"rollouts, 3 passes each: ratio {v['seq_var_ratio_coupled_over_decoupled']:.2f}")
        ax[0].set_ylabel("variance over mask draws (nats^2)")
    b = res.get("rl")
    if b:
        for i, m in enumerate(b["methods"]):
            curves, rew = {}, {}
            for run in b["runs"][m]:
                for r in run["curve"]:
                    curves.setdefault(r["step"], []).append(r["sampled_pass@1"])
                for step, r in run["reward"]:
                    rew.setdefault(step, []).append(r)
            steps = sorted(curves)
            ax[1].plot([0] + steps, [b["sft_curve"]["sampled_pass@1"]] + [sum(curves[s]) / len(curves[s])
                                                                           for s in steps], "o-", color=f"C{i}",
                       label=m)
            xs = sorted(rew)
            ys = [sum(rew[s]) / len(rew[s]) for s in xs]
            w = max(1, len(xs) // 15)  # moving average over w steps
            sm = [sum(ys[max(0, j - w + 1):j + 1]) / len(ys[max(0, j - w + 1):j + 1]) for j in range(len(ys))]
            ax[2].plot(xs, sm, color=f"C{i}", label=m)
        ax[1].set_xlabel("RL step (rollout batch)")
        ax[1].set_ylabel(f"sampled pass@1, {b['curve_samples']} samples x {b['sft']['n']} test rows")
        ax[1].set_title("(b) held-out curve (step 0 = SFT), mean over seeds")
        ax[1].legend()
        ax[2].set_xlabel("RL step (rollout batch)")
        ax[2].set_ylabel("mean rollout reward (share of asserts passed)")
        ax[2].set_title("(b) training reward, mean over seeds, moving average")
        ax[2].legend()
        labels = list(keys_for(b["k"])[:3])
        groups = ["sft", *b["methods"]]
        w = 0.8 / len(groups)
        for j, g in enumerate(groups):
            vals = [b["sft"][k] if g == "sft" else b["summary"][g][k][0] for k in labels]
            errs = [0 if g == "sft" else b["summary"][g][k][1] for k in labels]
            ax[3].bar([x + j * w for x in range(len(labels))], vals, w, yerr=errs, label=g,
                      color="gray" if g == "sft" else f"C{j - 1}")
        ax[3].set_xticks([x + w * (len(groups) - 1) / 2 for x in range(len(labels))], labels)
        ax[3].set_title(f"(b) final, {len(b['seeds'])} seeds x {b['steps']} steps (std over seeds)")
        ax[3].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sft", type=Path, help="an SFT run of recipes/train-dllm/pyfunc.yaml (default: train one)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=150, help="RL steps (rollout batches) per run: the budget")
    ap.add_argument("--every", type=int, default=25, help="held-out curve every N steps")
    ap.add_argument("--set", nargs="*", default=[], help="extra `genkit rl` overrides for every run (key=value)")
    ap.add_argument("--skip-variance", action="store_true")
    ap.add_argument("--skip-rl", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny settings: a smoke test of the script")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    res = {"load_at_start": load()}
    sft = a.sft or train_sft(a.out / "sft", a.quick)
    res["sft_run"] = str(sft)
    name = "rl_quick" if a.quick else "rl"
    if a.skip_variance and (RESULTS / f"{name}.json").is_file():  # keep part (a) of an earlier run
        prev = json.loads((RESULTS / f"{name}.json").read_text())
        if "variance" in prev:
            res["variance"] = prev["variance"]
            res["variance_from"] = {k: prev.get(k) for k in ("sft_run", "load_at_start", "load_at_end")}
    if not a.skip_variance:
        kw = dict(prompts=2, gens=4, draws=4, elbo_draws=8) if a.quick else {}
        res["variance"] = variance_part(sft, **kw)
        v = res["variance"]
        print(f"(a) variance of the summed estimate over {v['draws']} draws x {v['rollouts']} rollouts: coupled "
              f"{v['coupled_seq_var']:.3f}, decoupled {v['decoupled_seq_var']:.3f}, ratio "
              f"{v['seq_var_ratio_coupled_over_decoupled']:.3f} (per token {v['token_var_ratio_coupled_over_decoupled']:.3f})"
              f"; full-mask bias vs the {v['elbo_draws']}-draw ELBO {v['full_mask_bias']:.3f} nats "
              f"({100 * v['full_mask_relative_bias']:.1f}%, ELBO {v['elbo_mean']:.3f})", flush=True)
    if not a.skip_rl:
        seeds = [int(s) for s in a.seeds.split(",")]
        methods = a.methods.split(",")
        n, samples = (8, 4) if a.quick else (200, 10)
        K = min(10, samples)
        KEYS = keys_for(K)
        overrides = [f"train.steps={a.steps}", f"eval.every={a.every}", f"eval.n={n}", f"eval.samples={samples}",
                     f"eval.ks=[1,{K}]", *a.set]
        if a.quick:
            overrides += ["eval.every_samples=2", "rollout.num_generations=4", "rollout.batch_size=16",
                          "train.prompts_per_step=4"]
        sft_eval = eval_sft(sft, n, samples, 1234, ks=(1, K))
        every_samples = 2 if a.quick else 4
        sft_curve = eval_sft(sft, n, every_samples, 1234, ks=(1,))
        b = {"methods": methods, "seeds": seeds, "k": K, "steps": a.steps, "overrides": overrides, "sft": sft_eval,
             "sft_curve": sft_curve, "curve_samples": every_samples, "runs": {}, "summary": {}}
        print(f"(b) SFT: greedy pass@1 {sft_eval['greedy_pass@1']:.3f}, sampled pass@1 "
              f"{sft_eval['sampled_pass@1']:.3f}, pass@{K} {sft_eval[f'sampled_pass@{K}']:.3f}",
              flush=True)
        runs = {}
        for s in seeds:  # seed-major: every method has its seed-0 run before any gets a second seed
            for m in methods:
                runs[m, s] = rl_run(sft, m, s, overrides, a.out / f"{m}-s{s}")
        for m in methods:
            b["runs"][m] = []
            for s in seeds:
                r = runs[m, s]
                mm = r["metrics"]
                b["runs"][m].append({
                    "seed": s, **{k: mm.get(f"eval_{k}") for k in KEYS},
                    "train_seconds": mm["train_seconds"], "steps": mm["steps"],
                    "curve": [{"step": x["step"], **{k[5:]: v for k, v in x.items() if k.startswith("eval/")}}
                              for x in r["log"] if "eval/greedy_pass@1" in x],
                    "reward": [(x["step"], x["reward"]) for x in r["log"]]})
            summ = {}
            for k in KEYS:
                xs = [run[k] for run in b["runs"][m] if run[k] is not None]
                summ[k] = mean_std(xs) if xs else (None, None)
            summ["minutes_mean"] = sum(r["train_seconds"] for r in b["runs"][m]) / 60 / len(seeds)
            for k in KEYS[:3]:
                if summ[k][0] is not None and k in sft_eval:
                    summ[f"delta_{k}_points"] = 100 * (summ[k][0] - sft_eval[k])
            b["summary"][m] = summ
            print(f"  {m}: " + ", ".join(f"{k} {summ[k][0]:.3f}+-{summ[k][1]:.3f}" for k in KEYS[:3])
                  + f"; delta sampled pass@1 {summ.get('delta_sampled_pass@1_points', float('nan')):+.1f} points, "
                  f"{summ['minutes_mean']:.1f} min/run", flush=True)
        if "coupled" in b["summary"]:
            d = b["summary"]["coupled"].get("delta_sampled_pass@1_points")
            b["claim_coupled_plus_4_points_sampled_pass@1"] = d is not None and d >= 4.0
        res["rl"] = b
    res["seconds"] = round(time.time() - t_start, 1)
    res["load_at_end"] = load()
    from genkit.runtime import atomic_write_json

    atomic_write_json(RESULTS / f"{name}.json", res)
    plot(res, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / f'{name}.json'} and {RESULTS / f'{name}.png'}")


if __name__ == "__main__":
    main()
