"""`genkit rl`: coupled-GRPO fine-tuning of a masked diffusion LM (DiffuCoder, Gong et al., arXiv 2506.20639).

One step of the loop (official: apple/ml-diffucoder `src/open_r1/coupled_grpo.py`, `DiffuGRPOTrainer`, with
`recipes/config_coupled_code.yaml`):

1. rollouts: `train.prompts_per_step` training prompts, `rollout.num_generations` completions each, decoded by
   Dream's `entropy` order (genkit's `decode_entropy`) at `rollout.temperature` with top_p 0.95, one token per
   pass (`diffusion_steps` = `max_completion_length` in the official recipe);
2. rewards (`genkit.dllm.rl.rewards`, programs run in the sandbox), leave-one-out advantages per group;
3. old and reference log-probabilities of every iteration's masks (no gradient), then `train.num_iterations`
   optimizer updates, each with its own masks (`coupled_grpo.per_token_logps`) and the clipped loss
   (`CoupledGRPOLoss`) reduced as sum(loss * mask) / sum(mask) over the rollout batch;
4. every `train.ref_sync_steps` optimizer updates the reference becomes alpha * policy + (1 - alpha) * reference
   (TRL's `SyncRefModelCallback`, `ref_model_mixup_alpha` 0.6 by default, which the official recipe keeps).

Where genkit differs from the official code, and why:
* randomness is keyed on (seed, step): rollout chunk c of step s decodes with `step_generator(seed, s, 10_000 +
  c)`, iteration j draws its masks from `step_generator(seed, s, 20_000 + j)` for the whole rollout batch; so a
  resumed run equals an uninterrupted one and W processes equal one (the official code draws a mask seed from
  the global RNG and re-seeds every process with it);
* iteration j uses mask draw j. In the official code the draw index is `self._step % num_iterations` counted
  over gradient-accumulation micro-batches after the increment, so with `gradient_accumulation_steps` =
  `num_iterations` = 2 (its recipe) a micro-batch meets the same mask in both of its updates;
* the loss is normalised by the mask count of the whole rollout batch (each process scales its sum by
  W / global count) instead of per micro-batch, so that the update does not depend on how the batch is split;
* log-probabilities see the prompt's key-padding mask (the official `get_logits` calls the model without
  the attention mask it used for generation, so left padding is attended to);
* with num_iterations = 1 the reference log-probabilities are computed too (the official code reads a
  variable it only defines when num_iterations > 1).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from genkit.config import field, to_dict
from genkit.data.batches import batch_indices, step_generator
from genkit.errors import ConfigError
from genkit.runtime import Runtime, RuntimeConfig
from genkit.runtime.loop import warmup_cosine_lr

from ..decoding import decode_entropy
from ..decoding.common import is_shifted
from ..io import encode_prompt, load_dllm, read_jsonl, write_jsonl, write_model_folder
from .coupled_grpo import CoupledGRPOLoss, completion_mask, draw_masks, group_advantages, per_token_logps
from .rewards import REWARDS, Grader, check_rewards

ROLLOUT_STREAM, MASK_STREAM, EVAL_STREAM = 10_000, 20_000, 30_000


@dataclass
class RLDataConfig:
    task: str = field("", help="built-in task to generate (pyfunc, sudoku, add, ...); '' = the init run's "
                      "data/train.jsonl and data/test.jsonl, else data.train_file")
    options: dict = field(default_factory=dict, help="task options, e.g. data.options.examples=4")
    n_train: int = field(20000, help="generated training rows", min=1)
    n_test: int = field(500, help="generated test rows", min=0)
    seed: int = field(0, help="seed of the generated data (the SFT run's, so that its test split stays held out)")
    train_file: str = field("", help="JSONL of training prompts ({prompt, task, meta} or {prompt, tests})",
                            exists=True)
    test_file: str = field("", help="JSONL of test rows for the final evaluation", exists=True)
    chat: bool | None = field(None, help="wrap prompts in the tokenizer's chat template (default: as the init "
                              "run's genkit.json says, else no)")


@dataclass
class RolloutConfig:
    """Dream `entropy` decoding of the rollouts (official `_generate_and_score_completions`)."""

    temperature: float = field(1.0, help="sampling temperature (the official recipe's generation_temperature "
                               "1.0; the trainer's own default is 1.2)", min=0.0)
    top_p: float = field(0.95, help="nucleus filter (official 0.95 when temperature > 0, else 1.0)", min=0.0,
                         max=1.0)
    gen_length: int = field(0, help="completion tokens (0 = the init model's genkit.json gen_length)", min=0)
    steps: int = field(0, help="decoding passes (0 = gen_length: one token per pass, as the official recipe's "
                       "diffusion_steps = max_completion_length)", min=0)
    num_generations: int = field(10, help="completions per prompt (official 10)", min=1)
    batch_size: int = field(10, help="rollouts decoded together (official generation_batch_size 10); each "
                            "chunk has its own (seed, step, chunk) generator", min=1)
    eot_token: str = field("", help="end-of-turn token that ends the loss mask, inclusive ('' = the tokenizer's "
                           "EOS; DiffuCoder: <|im_end|>)")


@dataclass
class RLTrainConfig:
    method: Literal["coupled", "decoupled", "full-mask"] = field(
        "coupled", help="log-prob estimator: coupled (complementary pair + full mask), decoupled (two independent "
        "masks + full mask), full-mask (d1's one-pass estimator)")
    steps: int = field(100, help="rollout batches; each gives train.num_iterations optimizer updates", min=1)
    prompts_per_step: int = field(8, help="prompts per rollout batch (official: 8 x 10 generations)", min=1)
    num_iterations: int = field(2, help="optimizer updates per rollout batch (official 2)", min=1)
    lr: float = field(1e-6, help="peak AdamW learning rate (official 1e-6 for a 7B model)", min=0.0)
    min_lr_ratio: float = field(0.1, help="cosine decay to lr * this (official cosine_with_min_lr, "
                                "min_lr_rate 0.1)", min=0.0, max=1.0)
    warmup_steps: int = field(0, help="linear warm-up, in optimizer updates", min=0)
    weight_decay: float = field(0.1, help="AdamW weight decay (official 0.1)", min=0.0)
    beta2: float = field(0.99, help="AdamW beta2 (official 0.99)", min=0.0, max=1.0)
    grad_clip: float = field(0.2, help="gradient-norm clip (official max_grad_norm 0.2; 0 = off)", min=0.0)
    epsilon: float = field(0.5, help="PPO clip range of the ratio (official 0.5)", min=0.0)
    beta: float = field(0.01, help="KL penalty weight, k3 estimator (official 0.01; 0 = no reference)", min=0.0)
    ref_sync_steps: int = field(64, help="mix the policy into the reference every N optimizer updates "
                                "(official 64; 0 = never)", min=0)
    ref_mixup_alpha: float = field(0.6, help="reference <- alpha * policy + (1 - alpha) * reference at a sync "
                                   "(TRL's default 0.6, kept by the official recipe; 1 = copy)", min=0.0, max=1.0)
    advantage: Literal["loo", "mean"] = field("loo", help="loo: r_i minus the mean of the group's other "
                                              "rewards (official); mean: minus the group mean")
    scale_rewards: bool = field(False, help="divide advantages by the group's std + 1e-4 (official recipe: false)")
    t_min: float = field(0.2, help="mask ratio t ~ U(t_min, t_max), one per estimate (official 0.2)", min=0.0,
                         max=1.0)
    t_max: float = field(0.8, help="(official 0.8)", min=0.0, max=1.0)
    rewards: dict = field(default_factory=lambda: {"task": 1.0},
                          help=f"reward name -> weight ({', '.join(REWARDS)}); official code: code 2.0, "
                          "code_format 0.5")
    reward_workers: int = field(2, help="sandbox processes running programs in parallel", min=1)
    max_minutes: float = field(0.0, help="stop after this many minutes of training (0 = no limit)", min=0.0)


@dataclass
class RLEvalConfig:
    n: int = field(200, help="test rows evaluated at the end (0 = none)", min=0)
    samples: int = field(10, help="sampled completions per row for sampled pass@1 and pass@k", min=1)
    ks: list[int] = field(default_factory=lambda: [1, 10], help="k of the sampled pass@k")
    before: bool = field(False, help="also evaluate the init model (eval_before_* keys)")
    batch_size: int = field(100, help="rows decoded together", min=1)
    seed: int = field(1234, help="seed of the sampled evaluation (the same for every run, so runs compare)")
    every: int = field(0, help="also evaluate every N steps during training, into log.jsonl (0 = only at the end)",
                       min=0)
    every_samples: int = field(4, help="sampled completions per row of those evaluations", min=1)


@dataclass
class RLRecipe:
    """Recipe of `genkit rl`."""

    init: str = field("", help="the model to start from: a `genkit train-dllm` run, a model or checkpoint folder",
                      exists=True)
    data: RLDataConfig = field(default_factory=RLDataConfig, help="prompts")
    rollout: RolloutConfig = field(default_factory=RolloutConfig, help="rollouts")
    train: RLTrainConfig = field(default_factory=RLTrainConfig, help="optimisation")
    eval: RLEvalConfig = field(default_factory=RLEvalConfig, help="evaluation at the end")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        if not self.init:
            p.append("init: give the model to start from, e.g. init=runs/pyfunc-sft (a genkit train-dllm run)")
        if self.data.task and self.data.train_file:
            p.append("data.train_file: give data.task or data.train_file, not both")
        t = self.train
        p += check_rewards(t.rewards)
        for k, v in t.rewards.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                p.append(f"train.rewards.{k}: the weight must be a number, got {v!r}")
        if t.t_min >= t.t_max or t.t_min <= 0 or t.t_max >= 1:
            p.append(f"train.t_min/t_max: need 0 < t_min < t_max < 1, got {t.t_min}, {t.t_max}")
        if t.advantage == "loo" and self.rollout.num_generations < 2:
            p.append("rollout.num_generations: leave-one-out advantages need at least 2 completions per prompt")
        rows = t.prompts_per_step * self.rollout.num_generations
        if rows % self.runtime.grad_accum:
            p.append(f"runtime.grad_accum: {self.runtime.grad_accum} does not divide the {rows} rollouts per step")
        if rows % self.rollout.batch_size:
            p.append(f"rollout.batch_size: {self.rollout.batch_size} does not divide the {rows} rollouts per step "
                     "(train.prompts_per_step x rollout.num_generations)")
        bad_k = [k for k in self.eval.ks if k < 1 or k > self.eval.samples]
        if bad_k:
            p.append(f"eval.ks: {bad_k} must lie in 1..eval.samples ({self.eval.samples})")
        return p


# ------------------------------------------------------------------------------------------- data
def load_rows(cfg: RLRecipe, init_run: Path) -> tuple[list[dict], list[dict]]:
    """Training prompts and test rows: a generated task, data.train_file, or the init run's data/ folder."""
    from ..tasks import make_task_data

    d = cfg.data
    if d.task:
        return make_task_data(d.task, d.n_train, d.n_test, d.seed, **d.options)
    if d.train_file:
        return read_jsonl(d.train_file), read_jsonl(d.test_file) if d.test_file else []
    for folder in (init_run, *list(init_run.parents)[:3]):
        if (folder / "data" / "train.jsonl").is_file():
            test = folder / "data" / "test.jsonl"
            return read_jsonl(folder / "data" / "train.jsonl"), read_jsonl(test) if test.is_file() else []
    raise ConfigError(f"data: '{init_run}' has no data/train.jsonl; set data.task or data.train_file")


def prompt_tensor(tok, rows: list[dict], P: int, chat: bool) -> torch.Tensor:
    """Prompts left-padded to P columns with the pad id, (N, P) int64 (P fixed for the run: one layout)."""
    ids = torch.full((len(rows), P), tok.pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        p = encode_prompt(tok, str(r["prompt"]), chat=chat)
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids


def prompt_lengths(tok, rows, chat) -> list[int]:
    return [len(encode_prompt(tok, str(r["prompt"]), chat=chat)) for r in rows]


def layout(pad: torch.Tensor, T: int, device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key padding (B, T) and position ids (B, T) of left-padded rows, or (None, None) without padding."""
    if not bool((pad > 0).any()):
        return None, None
    ar = torch.arange(T)
    return (ar[None] >= pad[:, None]).to(device), (ar[None] - pad[:, None]).clamp_min(0).to(device)


def eot_id_of(tok, eot_token: str) -> int:
    if not eot_token:
        return int(tok.eos_id)
    if hasattr(tok, "tok"):  # Hugging Face tokenizer
        ids = tok.tok.convert_tokens_to_ids([eot_token])
        if ids and ids[0] is not None and ids[0] != tok.tok.unk_token_id:
            return int(ids[0])
    elif hasattr(tok, "stoi") and eot_token in tok.stoi:
        return int(tok.stoi[eot_token])
    raise ConfigError(f"rollout.eot_token: {eot_token!r} is not a token of this tokenizer")


def completion_texts(tok, completions: torch.Tensor, eot: int) -> list[str]:
    """Decoded completions, each cut before its first end-of-turn token."""
    out = []
    for row in completions.tolist():
        cut = row.index(eot) if eot in row else len(row)
        out.append(tok.decode(row[:cut]))
    return out


# ------------------------------------------------------------------------------------------- rollouts
@torch.no_grad()
def rollout(model, prompts: torch.Tensor, pad: torch.Tensor, *, gen_length: int, steps: int, temperature: float,
            top_p: float, generator: torch.Generator | None, trace: bool = False):
    """Dream `entropy` decoding of a chunk of left-padded prompts; (completions (B, G), trace or None)."""
    mask = torch.arange(prompts.shape[1])[None] >= pad[:, None]
    res = decode_entropy(model, prompts, gen_length=gen_length, steps=steps, temperature=temperature,
                         top_p=top_p if temperature > 0 else None, prompt_mask=mask, generator=generator,
                         trace=trace)
    return res.generated.cpu(), res.trace


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], prompts: torch.Tensor, pad: torch.Tensor, *, gen_length: int, steps: int,
             temperature: float, top_p: float, samples: int, ks: list[int], batch_size: int, seed: int,
             grader: Grader, eot: int) -> dict:
    """Greedy pass@1, sampled pass@1 / pass@k, mean reward and AR-ness of the sampled completions' orders.

    pass@1 greedy: entropy decoding at temperature 0; sampled: `samples` completions per row at the rollout
    temperature and top_p, pass@k by the unbiased estimator, averaged over rows. A row passes when the task
    grades it correct (pyfunc: every hidden assert). AR-ness (genkit.eval.arness, DiffuCoder Sec. 3) of the
    sampled decoding orders: local@1 and global@1.
    """
    from genkit.eval.arness import arness_of_order
    from genkit.eval.passk import pass_at_k

    N = len(rows)
    out: dict = {}
    greedy = []
    for s in range(0, N, batch_size):
        comp, _ = rollout(model, prompts[s:s + batch_size], pad[s:s + batch_size], gen_length=gen_length,
                          steps=steps, temperature=0.0, top_p=1.0, generator=None)
        greedy += completion_texts(tok, comp, eot)
    gg = grader.grade(rows, greedy)
    out["greedy_pass@1"] = sum(bool(g["correct"]) for g in gg) / max(1, N)
    # sampled: row i repeated `samples` times, chunks keyed on (seed, chunk)
    idx = torch.arange(N).repeat_interleave(samples)
    texts, orders = [], []
    for c, s in enumerate(range(0, len(idx), batch_size)):
        part = idx[s:s + batch_size]
        comp, tr = rollout(model, prompts[part], pad[part], gen_length=gen_length, steps=steps,
                           temperature=temperature, top_p=top_p, generator=step_generator(seed, c, EVAL_STREAM),
                           trace=True)
        texts += completion_texts(tok, comp, eot)
        orders += tr
    sg = grader.grade([rows[int(i)] for i in idx], texts)
    correct = torch.tensor([bool(g["correct"]) for g in sg]).view(N, samples).sum(1).tolist()
    for k in ks:
        out[f"sampled_pass@{k}"] = sum(pass_at_k(samples, c, k) for c in correct) / max(1, N)
    out["sampled_score"] = sum(float(g.get("score", bool(g["correct"]))) for g in sg) / max(1, len(sg))
    ar = [arness_of_order(o, gen_length, ks=(1,)) for o in orders]
    ar = [a for a in ar if a["tokens"]]
    out["arness_local@1"] = sum(a["local@1"] for a in ar) / max(1, len(ar))
    out["arness_global@1"] = sum(a["global@1"] for a in ar) / max(1, len(ar))
    out["n"] = N
    return out


# ------------------------------------------------------------------------------------------- the loop
def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the sandboxed programs): a cost that does not
    depend on how loaded a shared machine is, unlike the wall-clock."""
    import os

    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def train_rl(cfg: RLRecipe, out: str | Path, *, quiet: bool = False) -> dict:
    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed, t, ro = cfg.runtime.seed, cfg.train, cfg.rollout
    init = Path(cfg.init)
    policy, tok, info = load_dllm(init)
    if tok is None:
        raise ConfigError(f"init: '{init}' has no tokenizer next to the model")
    chat = bool(info.get("chat", False)) if cfg.data.chat is None else cfg.data.chat
    G = ro.gen_length or int(info.get("gen_length") or 0)
    if G <= 0:
        raise ConfigError("rollout.gen_length: the init model has no genkit.json gen_length; set rollout.gen_length")
    steps_dec = ro.steps or G
    eot = eot_id_of(tok, ro.eot_token)
    train, test = load_rows(cfg, init)
    if not train:
        raise ConfigError("data: no training prompts")
    bad = [r.get("_line", i) for i, r in enumerate(train) if "prompt" not in r]
    if bad:
        raise ConfigError(f"data: rows without 'prompt' (lines {bad[:5]})")
    test = test[:cfg.eval.n]
    lens = prompt_lengths(tok, train + test, chat)
    P = max(lens)
    train_ids, test_ids = prompt_tensor(tok, train, P, chat), prompt_tensor(tok, test, P, chat)
    train_pad = torch.tensor([P - n for n in lens[:len(train)]])
    test_pad = torch.tensor([P - n for n in lens[len(train):]])
    T = P + G
    shifted = is_shifted(policy)
    mask_id = int(policy.config.mask_token_id)
    if rt.is_main:
        data_dir = rt.out / "data"
        if not (data_dir / "test.jsonl").is_file():
            write_jsonl(data_dir / "test.jsonl", test)
    rt.write_config(cfg)

    R = t.prompts_per_step * ro.num_generations  # rollouts per step (global)
    if R % rt.world_size or (R // rt.world_size) % ro.batch_size:
        raise ConfigError(f"rollout.batch_size: each of the {rt.world_size} processes decodes {R // rt.world_size} "
                          f"of the {R} rollouts per step, which must be a multiple of {ro.batch_size}")
    if (R // rt.world_size) % cfg.runtime.grad_accum:
        raise ConfigError(f"runtime.grad_accum: {cfg.runtime.grad_accum} does not divide the "
                          f"{R // rt.world_size} rollouts of each process")
    reference = copy.deepcopy(policy).to(rt.device).eval().requires_grad_(False) if t.beta else None
    opt = torch.optim.AdamW(policy.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    model, opt = rt.prepare(policy, opt)
    extra = {"reference": reference} if reference is not None else None
    meta = rt.resume(model, opt, extra=extra)
    start = meta["step"] if meta else 0
    net = rt.unwrap(model)
    loss_fn = CoupledGRPOLoss(t.epsilon, t.beta)
    grader = Grader(workers=t.reward_workers)
    weights = {k: float(v) for k, v in t.rewards.items()}
    updates_total = t.steps * t.num_iterations
    mine = rt.shard(R)
    per_rank = R // rt.world_size
    micro = per_rank // cfg.runtime.grad_accum
    model_config = net.config.to_dict()
    n_params = sum(p.numel() for p in net.parameters())

    def lr_at(update: int) -> float:
        return warmup_cosine_lr(update, lr=t.lr, min_lr=t.lr * t.min_lr_ratio, warmup_steps=t.warmup_steps,
                                steps=updates_total)

    metrics: dict = {"params": n_params, "method": t.method, "prompt_length": P, "gen_length": G}
    if cfg.eval.before and cfg.eval.n and test:
        net.eval()
        before = evaluate(net, tok, test, test_ids, test_pad, gen_length=G, steps=steps_dec,
                          temperature=ro.temperature, top_p=ro.top_p, samples=cfg.eval.samples, ks=cfg.eval.ks,
                          batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, grader=grader, eot=eot)
        metrics.update({f"eval_before_{k}": v for k, v in before.items()})

    t0, cpu0, last, done = time.time(), cpu_seconds(), {}, start
    with rt.progress(t.steps, initial=start, description=f"rl {t.method}") as bar:
        for step in range(start, t.steps):
            tic = time.time()
            net.eval()
            prompt_idx = batch_indices(len(train), t.prompts_per_step, step, seed)  # (prompts,)
            rows_idx = prompt_idx.repeat_interleave(ro.num_generations)  # (R,) groups of num_generations
            my_idx = rows_idx[mine]
            comps = []
            for c in range(per_rank // ro.batch_size):  # this process's chunks, keyed by their global index
                sl = my_idx[c * ro.batch_size:(c + 1) * ro.batch_size]
                chunk = mine.start // ro.batch_size + c
                comp, _ = rollout(net, train_ids[sl], train_pad[sl], gen_length=G, steps=steps_dec,
                                  temperature=ro.temperature, top_p=ro.top_p,
                                  generator=step_generator(seed, step, ROLLOUT_STREAM + chunk))
                comps.append(comp)
            comp = torch.cat(comps)  # (R/W, G)
            t_roll = time.time() - tic
            texts = completion_texts(tok, comp, eot)
            my_rows = [train[int(i)] for i in my_idx]
            per_fn = {name: torch.tensor(REWARDS[name](my_rows, texts, grader), dtype=torch.float32)
                      for name in weights}
            local = sum(w * per_fn[name] for name, w in weights.items())  # (R/W,)
            rewards = rt.gather(local).reshape(-1)  # (R,) in global order
            adv = group_advantages(rewards, ro.num_generations, t.advantage, t.scale_rewards)[mine]  # (R/W,)
            t_reward = time.time() - tic - t_roll

            ids = torch.cat([train_ids[my_idx], comp], 1).to(rt.device)  # (R/W, T)
            am, pos = layout(train_pad[my_idx], T, rt.device)
            lmask = completion_mask(comp, eot).to(rt.device)  # (R/W, G)
            n_tok = float(rt.gather(lmask.sum().float()).sum())  # mask count of the whole rollout batch
            draws = [draw_masks(R, G, step_generator(seed, step, MASK_STREAM + j), t.method, t.t_min, t.t_max)
                     .rows(mine) for j in range(t.num_iterations)]
            parts = [slice(a * micro, (a + 1) * micro) for a in range(cfg.runtime.grad_accum)]

            def est(m, j, part, shifted=shifted):
                return per_token_logps(m, ids[part], P, draws[j].rows(part), method=t.method, mask_id=mask_id,
                                       attention_mask=None if am is None else am[part],
                                       position_ids=None if pos is None else pos[part], shifted=shifted)

            with torch.no_grad():  # old and reference log-probs, per iteration's masks
                # iteration 0 runs on the weights that decoded the rollouts: its old log-probs are the current
                # ones, detached (the official code computes them in a separate pass; same values)
                olds = [None] + [torch.cat([est(net, j, q) for q in parts]) for j in range(1, t.num_iterations)]
                refs = [torch.cat([est(reference, j, q) for q in parts]) for j in range(t.num_iterations)] \
                    if reference is not None else None

            model.train()
            stats = {"loss": 0.0, "kl": 0.0, "clip": 0.0}
            gnorm = float("nan")
            for j in range(t.num_iterations):
                update = step * t.num_iterations + j
                for group in opt.param_groups:
                    group["lr"] = lr_at(update)
                for a, q in enumerate(parts):
                    with rt.no_sync(model, skip=a < len(parts) - 1):
                        with rt.autocast():
                            lp = est(model, j, q)  # (micro, G)
                        old = olds[j][q] if olds[j] is not None else lp.detach()
                        ref = refs[j][q] if refs is not None else None
                        per_tok, info_ = loss_fn(lp, old, ref, adv[q].to(rt.device))
                        m = lmask[q].float()
                        loss = (per_tok * m).sum() * rt.world_size / max(n_tok, 1.0)
                        rt.check_finite(loss, step)
                        rt.backward(loss)
                    with torch.no_grad():
                        stats["loss"] += float(loss) / rt.world_size / t.num_iterations
                        if info_["kl"] is not None:
                            stats["kl"] += float((info_["kl"] * m).sum()) / max(n_tok, 1.0) / t.num_iterations
                        stats["clip"] += float((info_["clipped"] * m).sum()) / max(n_tok, 1.0) / t.num_iterations
                gnorm = rt.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else float("nan")
                opt.step()
                opt.zero_grad(set_to_none=True)
                if reference is not None and t.ref_sync_steps and (update + 1) % t.ref_sync_steps == 0:
                    with torch.no_grad():  # TRL SyncRefModelCallback._sync_target_model
                        for rp, pp in zip(reference.parameters(), net.parameters()):
                            rp.mul_(1.0 - t.ref_mixup_alpha).add_(pp.detach(), alpha=t.ref_mixup_alpha)
            done = step + 1
            grouped = rewards.view(-1, ro.num_generations)
            last = {"reward": float(rewards.mean()), "reward_std": float(grouped.std(1).mean()),
                    "zero_std_ratio": float((grouped.std(1) < 1e-6).float().mean()),
                    "completion_length": float(rt.gather(lmask.sum(1).float().mean()).mean()),
                    "loss": rt.mean(stats["loss"]) * rt.world_size, "kl": rt.mean(stats["kl"]) * rt.world_size,
                    "clip_ratio": rt.mean(stats["clip"]) * rt.world_size, "lr": lr_at(done * t.num_iterations - 1),
                    "grad_norm": gnorm, "rollout_seconds": round(t_roll, 3), "reward_seconds": round(t_reward, 3),
                    "step_seconds": round(time.time() - tic, 3)}
            for name in weights:
                last[f"rewards/{name}"] = float(rt.gather(per_fn[name].mean()).mean())
            out_of_time = t.max_minutes and (time.time() - t0) > 60 * t.max_minutes
            if cfg.eval.every and cfg.eval.n and test and done % cfg.eval.every == 0 and rt.is_main:
                net.eval()
                curve = evaluate(net, tok, test, test_ids, test_pad, gen_length=G, steps=steps_dec,
                                 temperature=ro.temperature, top_p=ro.top_p, samples=cfg.eval.every_samples, ks=[1],
                                 batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, grader=grader, eot=eot)
                last.update({f"eval/{k}": v for k, v in curve.items() if k != "n"})
            if done % cfg.runtime.log_every == 0 or done == t.steps or out_of_time or "eval/greedy_pass@1" in last:
                rt.log(done, **last)
            bar.update(1, reward=last["reward"], kl=last["kl"])
            if cfg.runtime.checkpoint_every and done % cfg.runtime.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, model, opt, config=model_config, extra=extra)
            if out_of_time:
                break
    rt.save_checkpoint(done, model, opt, config=model_config, extra=extra)
    train_seconds = time.time() - t0
    metrics.update({"steps": done, "updates": done * t.num_iterations, "train_seconds": round(train_seconds, 2),
                    "train_cpu_seconds": round(cpu_seconds() - cpu0, 2), "rollouts_per_step": R})
    metrics.update({f"final_{k}": v for k, v in last.items()})
    try:
        from genkit.eval.sandbox import isolation_level

        metrics["sandbox_isolation"] = isolation_level()
    except ImportError:
        metrics["sandbox_isolation"] = None
    net.eval()
    if rt.is_main:
        write_model_folder(rt.out / "model", net, tok, {**{k: v for k, v in info.items() if k != "folder"},
                                                        "gen_length": G, "rl": to_dict(cfg)})
        if cfg.eval.n and test:
            after = evaluate(net, tok, test, test_ids, test_pad, gen_length=G, steps=steps_dec,
                             temperature=ro.temperature, top_p=ro.top_p, samples=cfg.eval.samples, ks=cfg.eval.ks,
                             batch_size=cfg.eval.batch_size, seed=cfg.eval.seed, grader=grader, eot=eot)
            metrics.update({f"eval_{k}": v for k, v in after.items()})
    rt.write_metrics(metrics)
    rt.wait()
    return metrics
