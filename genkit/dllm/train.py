"""`genkit train-dllm`: supervised training of a (tiny) LLaDA-style masked diffusion LM on prompt/answer pairs.

The loss is LLaDA's SFT loss (Nie et al., arXiv 2502.09992, Sec. 2.3 and the official GUIDELINES.md): the
prompt is never masked; for each row t ~ U(0, 1) and p = (1 - eps) t + eps (eps = 1e-3), every answer token
(EOS padding included) is masked with probability p, and

    loss = mean over rows of  sum_{masked answer tokens} CE(logits, token) / p  /  answer length

which is an upper bound on the answer's negative log-likelihood. `train.t_sampling=stratified` draws the
rows' t as a stratified sample of U(0, 1) (one per interval of width 1/B, shuffled), the same marginal with
less variance per batch (a genkit option; LLaDA draws t independently).

The loop follows `genkit/flows/train.py`: batches and masks are functions of (seed, step), so a resumed run
equals an uninterrupted one and W processes equal one process with the same global batch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from genkit.config import field, to_dict
from genkit.data.batches import batch_indices, step_generator
from genkit.errors import ConfigError
from genkit.runtime import EMA, Runtime, RuntimeConfig
from genkit.runtime.loop import batch_problems, warmup_cosine_lr

from .io import read_jsonl, sft_tensors, write_jsonl, write_model_folder
from .model import LLaDAConfig, LLaDAModel


@dataclass
class DLLMDataConfig:
    task: str = field("", help="built-in task to generate: sudoku, sudoku-pack, add, long-add, basic_arithmetic, "
                      "countdown or rg:<reasoning-gym name> ('' = read train_file)")
    options: dict = field(default_factory=dict, help="task options, e.g. data.options.puzzles=5")
    n_train: int = field(20000, help="generated training rows", min=1)
    n_test: int = field(200, help="generated test rows", min=0)
    seed: int = field(0, help="seed of the generated data (independent of runtime.seed)")
    train_file: str = field("", help="JSONL of {prompt, answer} rows (when task is '')", exists=True)
    test_file: str = field("", help="JSONL of test rows for the final evaluation (optional)", exists=True)
    tokenizer: str = field("", help="a Hugging Face tokenizer folder ('' = a character vocabulary built from "
                           "the data)", exists=True)
    chat: bool = field(False, help="wrap prompts in the tokenizer's chat template (HF tokenizers)")
    gen_length: int = field(0, help="answer region in tokens, EOS-padded (0 = longest answer + 1, rounded up "
                            "to a multiple of 8)", min=0)


@dataclass
class DLLMArch:
    """genkit's LLaDA (genkit/dllm/model.py), initialised with N(0, init_std)."""

    d_model: int = field(128, help="width", min=8)
    n_layers: int = field(4, help="Transformer blocks", min=1)
    n_heads: int = field(4, help="query heads", min=1)
    n_kv_heads: int = field(0, help="key/value heads (0 = n_heads)", min=0)
    mlp_hidden_size: int = field(256, help="SwiGLU hidden size", min=1)
    rope_theta: float = field(10000.0, help="RoPE base", min=1.0)
    init_std: float = field(0.02, help="std of the initial weights", min=0.0)
    weight_tying: bool = field(False, help="LM head shares the embedding matrix")


@dataclass
class DLLMTrainConfig:
    steps: int = field(2000, help="optimizer steps", min=1)
    batch_size: int = field(64, help="global batch size (split over processes and accumulation)", min=1)
    lr: float = field(2e-3, help="peak AdamW learning rate", min=0.0)
    min_lr: float = field(1e-4, help="learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = field(100, help="linear warm-up steps", min=0)
    weight_decay: float = field(0.01, help="AdamW weight decay", min=0.0)
    beta2: float = field(0.99, help="AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    ema_decay: float = field(0.0, help="EMA decay of the weights (0 = no EMA)", min=0.0, max=1.0)
    eps: float = field(1e-3, help="minimum masking probability: p = (1 - eps) t + eps", min=0.0, max=1.0)
    t_sampling: Literal["uniform", "stratified"] = field(
        "uniform", help="t ~ U(0,1) per row (LLaDA) or a stratified sample over the batch (same marginal)")
    max_minutes: float = field(0.0, help="stop early after this many minutes of training (0 = no limit)", min=0.0)
    prefix_cache: float = field(
        0.0, help="share of steps trained through a block-start prefix cache: the prompt's keys/values computed "
        "with the whole answer masked, as WINO's / Fast-dLLM's caches hold them (a genkit option, not in LLaDA; "
        "makes small models tolerate the cache)", min=0.0, max=1.0)
    prefix_cache_after: float = field(0.0, help="share of train.steps done before train.prefix_cache starts (let "
                                      "the model learn the task first)", min=0.0, max=1.0)


@dataclass
class DLLMEvalConfig:
    n: int = field(64, help="test rows decoded at the end for test_accuracy (0 = none)", min=0)
    algo: str = field("fast-dllm", help="decoder of the final evaluation")
    knobs: dict = field(default_factory=lambda: {"tau": 0.9}, help="its knobs (gen_length defaults to the model's)")
    batch_size: int = field(32, help="decoding batch size", min=1)


@dataclass
class DLLMRecipe:
    """Recipe of `genkit train-dllm`."""

    data: DLLMDataConfig = field(default_factory=DLLMDataConfig, help="data")
    arch: DLLMArch = field(default_factory=DLLMArch, help="architecture")
    train: DLLMTrainConfig = field(default_factory=DLLMTrainConfig, help="optimisation")
    eval: DLLMEvalConfig = field(default_factory=DLLMEvalConfig, help="evaluation at the end")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        if not self.data.task and not self.data.train_file:
            p.append("data.task: set a built-in task or data.train_file (a JSONL of {prompt, answer} rows)")
        if self.data.task and self.data.train_file:
            p.append("data.train_file: give data.task or data.train_file, not both")
        p += batch_problems(self.train.batch_size, self.runtime.grad_accum)
        if self.arch.d_model % self.arch.n_heads:
            p.append(f"arch.d_model: {self.arch.d_model} is not divisible by arch.n_heads {self.arch.n_heads}")
        return p


def lr_at(step: int, t: "DLLMTrainConfig") -> float:
    """Linear warm-up then cosine decay from `lr` to `min_lr` (genkit.runtime.loop)."""
    return warmup_cosine_lr(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps)


class LLaDASFTLoss:
    """LLaDA's SFT loss: CE on masked answer tokens, each divided by its masking probability p, per-row
    normalised by the answer length (arXiv 2502.09992 Eq. 5 with the prompt kept clean).

    `corrupt(B, T, G, generator) -> (p, masked)` draws the forward process for a batch; `__call__(model, ids,
    p, masked, G, attention_mask, position_ids) -> (B,)` returns the unreduced per-row losses.
    """

    def __init__(self, mask_id: int, eps: float = 1e-3, t_sampling: str = "uniform"):
        self.mask_id, self.eps, self.t_sampling = mask_id, eps, t_sampling

    def corrupt(self, B: int, T: int, G: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Masking probability p (B,) and which tokens to mask (B, T): answer tokens = the last G columns."""
        if self.t_sampling == "stratified":  # one t per interval [i/B, (i+1)/B), shuffled
            u = torch.rand(B, generator=g)
            t = (torch.randperm(B, generator=g) + u) / B
        else:
            t = torch.rand(B, generator=g)
        p = (1 - self.eps) * t + self.eps  # (B,)
        masked = torch.rand((B, T), generator=g) < p[:, None]  # (B, T)
        masked[:, :T - G] = False  # the prompt is never masked
        return p, masked

    def __call__(self, model, ids, p, masked, G, attention_mask=None, position_ids=None, cached: bool = False):
        """Per-row losses (B,) for clean `ids` (B, T) whose last G columns are the answer.

        `cached` (`train.prefix_cache`): the answer sees the prompt through a block-start prefix cache, the
        prompt's keys/values from a pass (no gradient) over the prompt with the whole answer masked, as WINO's
        and Fast-dLLM's caches hold them while a block is decoded. The prompt is never scored either way.
        """
        noisy = ids.masked_fill(masked, self.mask_id)
        if not cached:
            logits = model(noisy, attention_mask=attention_mask, position_ids=position_ids)  # (B, T, V)
        else:
            B, T = ids.shape
            P = T - G
            with torch.no_grad():
                kv = model(ids.masked_fill(torch.arange(T, device=ids.device) >= P, self.mask_id),
                           attention_mask=attention_mask, position_ids=position_ids, use_cache=True).past_key_values
            kv = [(k[:, :, :P], v[:, :, :P]) for k, v in kv]  # (B, K, P, D): the prompt's entries only
            ans = model(noisy[:, P:], attention_mask=attention_mask, past_key_values=kv,
                        position_ids=None if position_ids is None else position_ids[:, P:])  # (B, G, V)
            logits = torch.cat([ans.new_zeros(B, P, ans.shape[-1]), ans], 1)  # (B, T, V)
        ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")  # (N,)
        w = (1.0 / p)[:, None].expand_as(masked)[masked]  # (N,) the 1/p weight of each masked token
        per_row = torch.zeros(ids.shape[0], device=ids.device).index_add(
            0, masked.nonzero()[:, 0], ce * w)  # (B,)
        return per_row / G


def build_model(cfg: DLLMRecipe, tok, context: int) -> LLaDAModel:
    a = cfg.arch
    mcfg = LLaDAConfig(d_model=a.d_model, n_heads=a.n_heads, n_kv_heads=a.n_kv_heads or None, n_layers=a.n_layers,
                       mlp_hidden_size=a.mlp_hidden_size, vocab_size=tok.vocab_size, rope_theta=a.rope_theta,
                       mask_token_id=tok.mask_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                       weight_tying=a.weight_tying, max_sequence_length=context, init_std=a.init_std)
    return LLaDAModel(mcfg)


def prepare_data(cfg: DLLMRecipe, out: Path, is_main: bool):
    """Train/test rows (generated into out/data/ for a task) and the tokenizer."""
    from .tasks import make_task_data
    from .tokenizer import CharTokenizer, load_tokenizer

    d = cfg.data
    if d.task:
        data_dir = out / "data"
        if (data_dir / "train.jsonl").is_file():  # resumed run: reuse what was generated
            train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")
        else:
            train, test = make_task_data(d.task, d.n_train, d.n_test, d.seed, **d.options)
            if is_main:
                write_jsonl(data_dir / "test.jsonl", test)
                write_jsonl(data_dir / "train.jsonl", train)
    else:
        train = read_jsonl(d.train_file)
        test = read_jsonl(d.test_file) if d.test_file else []
    bad = [r.get("_line", i) for i, r in enumerate(train) if "prompt" not in r or "answer" not in r]
    if bad:
        raise ConfigError(f"data: rows without 'prompt' and 'answer' (lines {bad[:5]})")
    if d.tokenizer:
        tok = load_tokenizer(d.tokenizer)
        if tok is None:
            raise ConfigError(f"data.tokenizer: no tokenizer in '{d.tokenizer}'")
    else:
        tok = CharTokenizer.from_texts(str(r["prompt"]) + str(r["answer"]) for r in train + test)
    return train, test, tok


def train_dllm(cfg: DLLMRecipe, out: str | Path, *, quiet: bool = False) -> dict:
    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed = cfg.runtime.seed
    train, test, tok = prepare_data(cfg, rt.out, rt.is_main)
    if rt.is_main and hasattr(tok, "save"):
        tok.save(rt.out)  # next to the checkpoints too, so that `genkit decode` can read any of them
    rt.wait()
    G = cfg.data.gen_length or 8 * math.ceil((max(len(tok.encode(str(r["answer"]))) for r in train) + 1) / 8)
    ids, pad, P = sft_tensors(tok, train, G, chat=cfg.data.chat)  # (N, P + G), (N,)
    context = 16 * math.ceil((P + G) / 16)
    torch.manual_seed(seed)  # same initial weights on every rank
    model = build_model(cfg, tok, context)
    model.init_weights(torch.Generator().manual_seed(seed))
    model_config = model.config.to_dict()
    rt.write_config(cfg)
    t = cfg.train
    loss_fn = LLaDASFTLoss(tok.mask_id, t.eps, t.t_sampling)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    model, opt = rt.prepare(model, opt)
    meta = rt.resume(model, opt, ema=ema)
    start = meta["step"] if meta else 0
    n_params = sum(p.numel() for p in model.parameters())
    micro = t.batch_size // cfg.runtime.grad_accum
    ar = torch.arange(P + G)
    t0, last, done = time.time(), {}, start
    with rt.progress(t.steps, initial=start, description="train-dllm") as bar:
        for step in range(start, t.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            idx = batch_indices(len(train), t.batch_size, step, seed)
            g = step_generator(seed, step, stream=2)
            # train.prefix_cache: this step's batch sees the prompt through a block-start cache (same on all ranks)
            cached = t.prefix_cache > 0 and step >= t.prefix_cache_after * t.steps and \
                float(torch.rand(1, generator=step_generator(seed, step, stream=3))) < t.prefix_cache
            model.train()
            total = torch.zeros((), device=rt.device)
            for a in range(cfg.runtime.grad_accum):
                rows = idx[a * micro:(a + 1) * micro]
                # masks for the whole global micro-batch, drawn in a fixed order, then this rank's shard:
                # W processes see exactly the masks of one process
                p_row, masked = loss_fn.corrupt(micro, P + G, G, g)
                mine = rt.shard(micro)
                x, rpad, p_row, masked = ids[rows][mine], pad[rows][mine], p_row[mine], masked[mine]
                cut = int(rpad.min())  # drop the padding columns every row of this shard has
                x, rpad, masked = x[:, cut:], rpad - cut, masked[:, cut:]
                T = x.shape[1]
                keep = pos = None
                if bool((rpad > 0).any()):
                    keep = (ar[None, :T] >= rpad[:, None]).to(rt.device)  # (b, T) key padding
                    pos = (ar[None, :T] - rpad[:, None]).clamp_min(0).to(rt.device)  # (b, T)
                with rt.no_sync(model, skip=a < cfg.runtime.grad_accum - 1):
                    with rt.autocast():
                        per_row = loss_fn(model, x.to(rt.device), p_row.to(rt.device), masked.to(rt.device), G,
                                          keep, pos, cached=cached)
                    loss = per_row.mean()
                    rt.check_finite(loss, step)
                    rt.backward(loss / cfg.runtime.grad_accum)
                total += loss.detach() / cfg.runtime.grad_accum
            gnorm = rt.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(rt.unwrap(model))
            done = step + 1
            out_of_time = t.max_minutes and (time.time() - t0) > 60 * t.max_minutes
            if done % cfg.runtime.log_every == 0 or done == t.steps or out_of_time:
                last = {"loss": rt.mean(total), "lr": lr_at(step, t), "grad_norm": gnorm}
                rt.log(done, **last)
            bar.update(1, **({"loss": last["loss"]} if last else {}))
            if cfg.runtime.checkpoint_every and done % cfg.runtime.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, model, opt, config=model_config, ema=ema)
            if out_of_time:
                break
    rt.save_checkpoint(done, model, opt, config=model_config, ema=ema)
    train_seconds = time.time() - t0
    final = rt.unwrap(model)
    if ema is not None:
        final.load_state_dict(ema.weights_for(final))
    final.eval()
    metrics = {"params": n_params, "steps": done, "train_seconds": round(train_seconds, 2),
               "prompt_length": P, "gen_length": G, "vocab_size": tok.vocab_size,
               "rows_per_second": round((done - start) * t.batch_size / max(train_seconds, 1e-9), 2)}
    metrics.update({f"final_{k}": v for k, v in last.items()})
    if rt.is_main:
        write_model_folder(rt.out / "model", final, tok, {
            "task": cfg.data.task or None, "gen_length": G, "block_length": G, "prompt_length": P,
            "chat": cfg.data.chat, "recipe": to_dict(cfg)})
        if cfg.eval.n and test:
            metrics.update(evaluate(final, tok, test[:cfg.eval.n], cfg.eval, G))
    rt.write_metrics(metrics)
    rt.wait()
    return metrics


@torch.no_grad()
def evaluate(model, tok, rows: list[dict], ev: DLLMEvalConfig, gen_length: int) -> dict:
    """Decode test rows with the configured decoder; accuracy and mean passes."""
    from genkit import config as C

    from .decode import DecodeConfig, decode_rows, resolve_knobs, summarise

    dcfg = C.load(DecodeConfig, base={"algo": ev.algo, "batch_size": ev.batch_size, **ev.knobs})
    knobs = resolve_knobs(dcfg, {"gen_length": gen_length})
    t0 = time.perf_counter()
    recs = decode_rows(model, tok, rows, dcfg, knobs)
    m = summarise(recs, time.perf_counter() - t0, knobs["gen_length"])
    return {"test_accuracy": m["accuracy"], "test_mean_nfe": m["mean_nfe"], "test_n": m["n_graded"],
            "test_decoder": ev.algo}
