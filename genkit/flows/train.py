"""``genkit train-flow``: maximum-likelihood training of a Transformer autoregressive flow on images.

The loop reads top to bottom: build the runtime and components, then one loop (accumulate, clip, step,
EMA, log, checkpoint).  Batches, dequantization noise and label drops are functions of (seed, step)
(``genkit.data.batches``), so a resumed run equals an uninterrupted one and W processes equal one
process with the same global batch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from genkit.config import field
from genkit.data.batches import batch_indices, step_generator
from genkit.data.grid import save_grid
from genkit.data.config import ImageDataConfig
from genkit.data.images import ImageData
from genkit.errors import ConfigError
from genkit.eval.bpd import bits_per_dim, dequantize
from genkit.runtime import EMA, Runtime, RuntimeConfig, atomic_write_json
from genkit.runtime.checkpoint import save_model_folder
from genkit.runtime.loop import batch_problems, warmup_cosine_lr


@dataclass
class FlowDataConfig(ImageDataConfig):
    noise: Literal["uniform", "gaussian"] = field(
        "uniform", help="uniform: (k+u)/L*2-1, u~U[0,1) (likelihood runs, exact bits/dim); gaussian: the official "
        "TarFlow input k/(L-1)*2-1 plus N(0, noise_std^2) (sample quality, denoise=true at sampling)")
    noise_std: float = field(0.05, help="sigma of the Gaussian noise augmentation, in [-1,1] pixel units", min=0.0)


@dataclass
class TarFlowArch:
    """TarFlow architecture (arXiv 2412.06329, Sec. 3); see genkit/flows/tarflow.py."""

    patch_size: int = field(2, help="patch side; tokens are C*p*p-dimensional", min=1)
    num_blocks: int = field(4, help="flow blocks (each a causal transformer over the permuted tokens)", min=1)
    layers_per_block: int = field(2, help="transformer layers per flow block", min=1)
    width: int = field(128, help="transformer width (channels)", min=8)
    head_dim: int = field(32, help="attention head dimension", min=4)
    expansion: int = field(4, help="MLP expansion ratio", min=1)
    dropout: float = field(0.0, help="dropout in the transformer", min=0.0, max=1.0)


@dataclass
class FlowTrainConfig:
    steps: int = field(2000, help="optimizer steps", min=1)
    batch_size: int = field(128, help="global batch size (split over processes and accumulation)", min=1)
    lr: float = field(1e-3, help="peak AdamW learning rate", min=0.0)
    min_lr: float = field(1e-5, help="learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = field(100, help="linear warm-up steps", min=0)
    weight_decay: float = field(1e-4, help="AdamW weight decay", min=0.0)
    beta2: float = field(0.95, help="AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    ema_decay: float = field(0.0, help="EMA decay of the weights (0 = no EMA)", min=0.0, max=1.0)


@dataclass
class FlowEvalConfig:
    test_bpd: bool = field(True, help="compute test bits/dim at the end of training")
    eval_every: int = field(0, help="also compute test bits/dim every N steps (0 = only at the end)", min=0)
    samples: int = field(64, help="samples for the final samples.png grid (0 = none)", min=0)
    guidance: float = field(0.0, help="guidance weight of the final samples (CFG for class-conditional flows, "
                            "attention-temperature guidance for unconditional ones; see genkit sample)", min=0.0)


@dataclass
class FlowRecipe:
    """Recipe of ``genkit train-flow``."""

    model: Literal["tarflow"] = field("tarflow", help="flow family")
    arch: TarFlowArch = field(default_factory=TarFlowArch, help="architecture")
    data: FlowDataConfig = field(default_factory=FlowDataConfig, help="data")
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig, help="optimisation")
    eval: FlowEvalConfig = field(default_factory=FlowEvalConfig, help="evaluation at the end")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        p += batch_problems(self.train.batch_size, self.runtime.grad_accum)
        return p


def flow_recipe_class(model: str):
    """The recipe class of a flow family (``model=...``): each family has its own arch/data/train/eval keys."""
    if model == "tarflow":
        return FlowRecipe
    if model == "tarflowlm":
        from genkit.flows.lm_train import TarFlowLMRecipe

        return TarFlowLMRecipe
    raise ConfigError(f"model: {model!r} is not one of 'tarflow', 'tarflowlm'")


def load_flow_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None):
    """Load a train-flow recipe: ``model`` (from the overrides, else the YAML, else 'tarflow') picks the class."""
    from genkit import config as C

    model = C.parse_overrides(overrides or []).get("model")
    if model is None and recipe is not None:
        model = C._read_yaml(recipe).get("model")
    return C.load(flow_recipe_class(str(model or "tarflow")), recipe, overrides)


def build_flow(cfg: FlowRecipe, shape: tuple[int, int, int], num_classes: int):
    from genkit.flows.tarflow import TarFlow, TarFlowConfig

    c, h, w = shape
    if h != w:
        raise ConfigError(f"data: TarFlow needs square images, got {h}x{w}: set data.image_size")
    if h % cfg.arch.patch_size:
        raise ConfigError(f"arch.patch_size: {cfg.arch.patch_size} does not divide the image size {h}")
    a = cfg.arch
    mcfg = TarFlowConfig(img_size=h, channels=c, patch_size=a.patch_size, num_blocks=a.num_blocks,
                         layers_per_block=a.layers_per_block, channels_model=a.width, head_dim=a.head_dim,
                         num_classes=num_classes if cfg.data.conditional else 0, expansion=a.expansion,
                         dropout=a.dropout)
    return TarFlow(mcfg)


def lr_at(step: int, t: FlowTrainConfig) -> float:
    """Linear warm-up then cosine decay from ``lr`` to ``min_lr``."""
    return warmup_cosine_lr(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps)


def full_range(ints: torch.Tensor, levels: int) -> torch.Tensor:
    """``k / (L-1) * 2 - 1``: levels 0 and L-1 land on -1 and +1 (the official TarFlow input, torchvision's
    ToTensor + Normalize((0.5,), (0.5,)) for L = 256). Not the bin centres of ``ImageData.to_unit``."""
    return ints.float() / (levels - 1) * 2 - 1


def make_inputs(data: ImageData, idx: torch.Tensor, cfg: FlowRecipe, seed: int, step: int):
    """Model inputs of the global batch ``idx`` at ``step``: dequantized/noised images and (dropped) labels."""
    ints = data.ints[idx]
    g = step_generator(seed, step, stream=2)
    if cfg.data.noise == "uniform":  # (k + u) / L * 2 - 1: exact bits/dim (genkit.eval.bpd)
        x = dequantize(ints, data.levels, torch.rand(ints.shape, generator=g))
    else:  # official TarFlow input: ToTensor + Normalize(0.5, 0.5) = k / (L-1) * 2 - 1, plus N(0, noise_std^2)
        x = full_range(ints, data.levels) + cfg.data.noise_std * torch.randn(ints.shape, generator=g)
    y = None
    if cfg.data.conditional:
        y = data.labels[idx].clone()
        drop = torch.rand(y.shape, generator=step_generator(seed, step, stream=3)) < cfg.data.label_drop
        y[drop] = data.num_classes  # the null label
    return x, y


def flow_log_prob(model):
    """``log p(v, y)`` in nats per sample, for a flow ``model(x, y) -> (z, logdet)`` with a N(0, I) prior."""

    def fn(v, y):
        z, logdet = model(v, y)
        d = z[0].numel()
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) + logdet

    return fn


class ImageObjective:
    """What the shared loop (`fit`) needs to train a TarFlow on images: the global batch of a step, the
    loss of a micro-batch (NLL in nats per dimension), the logged figures and the learning rate."""

    key = "bpd"  # the figure on the progress bar

    def __init__(self, cfg: FlowRecipe, train: ImageData, test: ImageData):
        self.cfg, self.train, self.test = cfg, train, test
        self.dims = int(torch.tensor(train.shape).prod())
        self.log_bin = self.dims * math.log(2.0 / train.levels)  # see genkit.eval.bpd

    def prepare_step(self, step: int, model, opt) -> float:
        lr = lr_at(step, self.cfg.train)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def batch(self, step: int):
        idx = batch_indices(len(self.train), self.cfg.train.batch_size, step, self.cfg.runtime.seed)
        return idx, make_inputs(self.train, idx, self.cfg, self.cfg.runtime.seed, step)

    def loss(self, model, x, y):
        z, logdet = model(x, y)
        # per-dim NLL in nats over v in [-1,1]^D (the constant 0.5 log 2pi keeps it a true NLL)
        return (0.5 * z.float().flatten(1).pow(2).sum(1) - logdet.float()).mean() / self.dims \
            + 0.5 * math.log(2 * math.pi)

    def report(self, loss: float) -> dict:
        return {"loss": loss, "train_bpd": (loss * self.dims - self.log_bin) / (self.dims * math.log(2))}

    def evaluate(self, model, rt) -> dict:
        return {"test_bpd": evaluate_bpd(model, self.test, rt)}


def fit(rt: Runtime, model, opt, objective, t, *, model_config: dict, ema=None, eval_every: int = 0,
        description: str = "train-flow") -> dict:
    """The train-flow loop, shared by every flow family (images: `ImageObjective`; text:
    `genkit.flows.lm_train`): resume, then per step the objective's learning rate and global batch, gradient
    accumulation over this rank's shards, clip, step, EMA, log, checkpoint; a final checkpoint at the end.

    ``objective`` provides ``prepare_step(step, model, opt) -> lr``, ``batch(step) -> (rows, tensors)`` (the
    global batch, a function of (seed, step): resumed runs and W processes equal one uninterrupted process),
    ``loss(model, *tensors) -> scalar``, ``report(loss) -> dict``, ``evaluate(model, rt) -> dict`` and ``key``.
    Returns the loop's figures: start step, last logged values, training seconds, rows seen."""
    meta = rt.resume(model, opt, ema=ema)
    start = meta["step"] if meta else 0
    accum = rt.cfg.grad_accum
    micro = t.batch_size // accum
    t0, seen, last = time.time(), 0, {}
    with rt.progress(t.steps, initial=start, description=description) as bar:
        for step in range(start, t.steps):
            lr = objective.prepare_step(step, model, opt)
            idx, inputs = objective.batch(step)
            model.train()
            total = torch.zeros((), device=rt.device)
            for a in range(accum):
                sl = slice(a * micro, (a + 1) * micro)
                mine = rt.shard(micro)
                if step == start and a == 0:  # which rows each rank trains on (rank-disjoint shards)
                    rt.log(step, event="first_batch", rows_by_rank=rt.gather(idx[sl][mine]).tolist())
                part = [None if v is None else v[sl][mine].to(rt.device) for v in inputs]
                with rt.no_sync(model, skip=a < accum - 1):
                    with rt.autocast():
                        loss = objective.loss(model, *part)
                    rt.check_finite(loss, step)
                    rt.backward(loss / accum)
                total += loss.detach() / accum
            gnorm = rt.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(rt.unwrap(model))
            seen += t.batch_size
            done = step + 1
            if done % rt.cfg.log_every == 0 or done == t.steps:
                last = {**objective.report(rt.mean(total)), "lr": lr, "grad_norm": gnorm}
                if eval_every and done % eval_every == 0:
                    last.update(objective.evaluate(rt.unwrap(model), rt))
                rt.log(done, **last)
            bar.update(1, **({objective.key: last[f"train_{objective.key}"]} if last else {}))
            if rt.cfg.checkpoint_every and done % rt.cfg.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, model, opt, config=model_config, ema=ema)
    rt.save_checkpoint(t.steps, model, opt, config=model_config, ema=ema)
    if not last and rt.is_main and (rt.out / "log.jsonl").is_file():  # resumed after the last step: last figures
        logged = [json.loads(line) for line in (rt.out / "log.jsonl").read_text().splitlines()]
        last = next(({k: v for k, v in r.items() if k not in ("step", "time")} for r in reversed(logged)
                     if "loss" in r), {})
    return {"start": start, "last": last, "train_seconds": time.time() - t0, "seen": seen}


def train_flow(cfg, out: str | Path, *, quiet: bool = False) -> dict:
    """``genkit train-flow``: TarFlow on images, or TarFlowLM on text (``model=tarflowlm``)."""
    if getattr(cfg, "model", "tarflow") == "tarflowlm":
        from genkit.flows.lm_train import train_tarflowlm

        return train_tarflowlm(cfg, out, quiet=quiet)
    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed = cfg.runtime.seed
    train, test = cfg.data.load("train"), cfg.data.load("test")
    torch.manual_seed(seed)  # same initial weights on every rank
    model = build_flow(cfg, train.shape, train.num_classes)
    model_config = model.config.to_dict()
    rt.write_config(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    model, opt = rt.prepare(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    objective = ImageObjective(cfg, train, test)
    run = fit(rt, model, opt, objective, t, model_config=model_config, ema=ema, eval_every=cfg.eval.eval_every)
    train_seconds = run["train_seconds"]
    final = rt.unwrap(model)
    if ema is not None:
        final.load_state_dict(ema.weights_for(final))
    final.eval()
    metrics = {"model": cfg.model, "params": n_params, "steps": t.steps, "train_seconds": round(train_seconds, 2),
               "images_per_second": round(run["seen"] / max(train_seconds, 1e-9), 2)}
    metrics.update({f"final_{k}": v for k, v in run["last"].items()})
    if rt.is_main:
        save_model_folder(rt.out / "model", {k: v for k, v in final.state_dict().items()}, model_config)
        sigma = cfg.data.noise_std if cfg.data.noise == "gaussian" else (2.0 / train.levels) / math.sqrt(12.0)
        atomic_write_json(rt.out / "model" / "data.json", {
            "source": cfg.data.source, "split_seed": cfg.data.split_seed, "levels": train.levels,
            "shape": list(train.shape), "num_classes": train.num_classes if cfg.data.conditional else 0,
            "noise": cfg.data.noise, "noise_sigma": sigma,
            "pixels": "k/(L-1)*2-1" if cfg.data.noise == "gaussian" else "(k+u)/L*2-1"})
        if cfg.eval.test_bpd:
            metrics["test_bpd"] = evaluate_bpd(final, test, rt, None)
            metrics["train_bpd_eval"] = evaluate_bpd(final, train.subset(range(min(len(train), len(test)))), rt,
                                                     None)
        if cfg.eval.samples:
            x = sample_flow(final, cfg.eval.samples, seed=seed, guidance=cfg.eval.guidance,
                            num_classes=train.num_classes if cfg.data.conditional else 0, device=rt.device)
            save_grid(x, rt.out / "samples.png")
            metrics["samples_png"] = str(rt.out / "samples.png")
    rt.write_metrics(metrics)
    rt.wait()
    return metrics


@torch.no_grad()
def evaluate_bpd(model, data: ImageData, rt, ema=None) -> float:
    model.eval()
    return bits_per_dim(flow_log_prob(model), data, batch_size=256, device=rt.device)


# Attention temperature of the second ("unconditional") pass when a flow without classes is guided and no
# attn_temp is given. The official code's default is 1.0, which makes that pass identical to the first, so
# `cfg=W` would do nothing; its --attn_temp help suggests 0.5 or 1.5. genkit picks UNCOND_ATTN_TEMP (see
# the README's TarFlow section for the digits measurement behind it). Class-conditional flows use 1.0.
UNCOND_ATTN_TEMP = 1.5
MAX_REDRAWS = 100  # resample_nonfinite: rounds of fresh noise before giving up


def default_attn_temp(model) -> float:
    """1.0 for a class-conditional flow (guidance contrasts the label with the null label), else UNCOND_ATTN_TEMP."""
    return 1.0 if model.config.num_classes else UNCOND_ATTN_TEMP


@torch.no_grad()
def sample_flow(model, n: int, *, seed: int = 0, guidance: float = 0.0, num_classes: int = 0, labels=None,
                device="cpu", temperature: float = 1.0, attn_temp: float | None = None, guide_what: str = "ab",
                annealed: bool = False, denoise_sigma: float = 0.0, resample_nonfinite: bool = False,
                stats: dict | None = None) -> torch.Tensor:
    """Draw ``n`` images in [-1, 1]: z ~ N(0, temperature^2 I), reverse pass with the KV cache, optional
    score-based denoising, then ``clamp(-1, 1)``.

    Guidance (``TarFlow.reverse``): weight ``guidance`` on ``guide_what`` ('a', 'b' or 'ab'), the second pass at
    attention temperature ``attn_temp`` (None: ``default_attn_temp``), the weight ramped as g (i+1)/(T-1) with
    ``annealed`` (official ``evaluate_fid.py``). ``denoise_sigma`` > 0 applies ``denoise`` *before* the clamp, as
    the official ``evaluate_fid.py`` and ``sample.ipynb`` do. Strong guidance can overflow exp(alpha) in a rare
    sample (the official sampler has no clamp either): ``stats['non_finite']`` counts the samples that came out
    non-finite, ``stats['redrawn']`` the draws made to replace them: with ``resample_nonfinite`` their noise is
    redrawn (fresh draws, seeded) until all ``n`` are finite (the official ``evaluate_fid.py`` redraws the whole batch while it holds a NaN).
    Conditional models get labels ``0..num_classes-1`` cycled (or ``labels``)."""
    from genkit.errors import RunError
    from genkit.flows.tarflow import denoise

    c = model.config
    shape = (c.channels, c.img_size, c.img_size)
    y = None
    if c.num_classes:
        y = (torch.as_tensor(labels) if labels is not None else torch.arange(n) % c.num_classes).to(device)
    temp = default_attn_temp(model) if attn_temp is None else attn_temp

    def draw(rows: torch.Tensor, attempt: int) -> torch.Tensor:  # (len(rows), C, H, W) finished images
        g = step_generator(seed, attempt, stream=11)
        z = temperature * torch.randn((n, *shape), generator=g)[rows].to(device)  # row r keeps its own draw
        yr = None if y is None else y[rows.to(y.device)]
        x = model.reverse(z, yr, guidance=guidance, guide_what=guide_what, attn_temp=temp, annealed_guidance=annealed)
        if denoise_sigma > 0:
            x = denoise(model, x, yr, denoise_sigma)
        return x

    x = draw(torch.arange(n), 0)  # (n, C, H, W)
    bad = ~torch.isfinite(x).flatten(1).all(1)  # (n,)
    non_finite, attempt, redrawn = int(bad.sum()), 0, 0
    while resample_nonfinite and bad.any():
        attempt += 1
        if attempt > MAX_REDRAWS:
            raise RunError(f"{int(bad.sum())} of {n} samples stayed non-finite after {MAX_REDRAWS} redraws: "
                           "lower the guidance weight")
        rows = bad.nonzero().flatten().cpu()
        x[bad] = draw(rows, attempt)
        redrawn += len(rows)
        bad = ~torch.isfinite(x).flatten(1).all(1)
    if stats is not None:
        stats["non_finite"] = stats.get("non_finite", 0) + non_finite
        stats["redrawn"] = stats.get("redrawn", 0) + redrawn
    return x.clamp(-1, 1)
