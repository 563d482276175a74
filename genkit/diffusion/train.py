"""``genkit train-diffusion``: EDM training of small diffusion teachers on images (Karras et al. 2022,
"Elucidating the Design Space of Diffusion-Based Generative Models", arXiv 2206.00364).

The loop reads top to bottom: build the runtime and components, then one loop (accumulate, clip, step,
EMA, log, checkpoint).  Batches, noise, noise levels and label drops are functions of (seed, step)
(``genkit.data.batches``), so a resumed run equals an uninterrupted one and W processes equal one process
with the same global batch.  The final ``model/`` folder holds the EMA weights as a teacher folder
(``genkit.diffusion.io``); at the end the run samples with Heun (35 NFE) and 1-step Euler and, for the
built-in sources, scores both with the shipped classifier's Frechet distance (``fd-digits`` etc.).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from genkit.config import field
from genkit.data.batches import batch_indices, step_generator
from genkit.data.grid import save_grid, save_samples_npz
from genkit.data.config import ImageDataConfig
from genkit.diffusion.io import EDMTeacher, teacher_config
from genkit.diffusion.loss import EDMLoss
from genkit.diffusion.networks import UNet, UNetConfig
from genkit.errors import ConfigError
from genkit.models.denoisers import EDMPrecond
from genkit.runtime import EMA, Runtime, RuntimeConfig
from genkit.runtime.checkpoint import save_model_folder
from genkit.runtime.loop import batch_problems, warmup_cosine_lr


DiffusionDataConfig = ImageDataConfig  # the data section of diffusion recipes


@dataclass
class UNetArch:
    """The raw network F (genkit/diffusion/networks.py); D = EDMPrecond(F)."""

    model_channels: int = field(32, help="channels at full resolution (a multiple of 8)", min=8)
    channel_mult: list[int] = field(default_factory=lambda: [1, 2], help="channel multiplier per resolution")
    num_blocks: int = field(1, help="residual blocks per resolution (decoder: one more)", min=1)
    attn_resolutions: list[int] = field(default_factory=lambda: [4], help="resolutions with self-attention")
    num_heads: int = field(4, help="attention heads", min=1)
    dropout: float = field(0.0, help="dropout in the residual blocks", min=0.0, max=1.0)
    embedding: Literal["positional", "fourier"] = field("positional", help="noise-level embedding")


@dataclass
class DiffusionTrainConfig:
    steps: int = field(3000, help="optimizer steps", min=1)
    batch_size: int = field(128, help="global batch size (split over processes and accumulation)", min=1)
    lr: float = field(2e-3, help="peak Adam learning rate", min=0.0)
    min_lr: float = field(1e-4, help="learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = field(100, help="linear warm-up steps", min=0)
    beta2: float = field(0.999, help="Adam beta2", min=0.0, max=1.0)
    weight_decay: float = field(0.0, help="AdamW weight decay", min=0.0)
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    ema_halflife_steps: float = field(200.0, help="EMA half-life in optimizer steps (EDM specifies it in images)",
                                      min=0.0)
    ema_rampup: float = field(0.05, help="EMA half-life is at most this fraction of the steps done (EDM "
                              "ema_rampup_ratio; 0 = off)", min=0.0)
    p_mean: float = field(-1.2, help="mean of ln(sigma) during training (EDM P_mean)")
    p_std: float = field(1.2, help="std of ln(sigma) during training (EDM P_std)", min=0.0)
    sigma_data: float = field(0.5, help="data standard deviation of the preconditioning", min=0.0)


@dataclass
class DiffusionEvalConfig:
    samples: int = field(64, help="samples in the final samples.png grid (0 = none)", min=0)
    sampler: Literal["heun", "euler", "dpmpp-2m", "unipc", "tada"] = field("heun", help="sampler of the final samples")
    nfe: int = field(35, help="denoiser evaluations of the final samples (Heun: 2 steps - 1)", min=1)
    sigma_min: float = field(0.002, help="smallest sampling sigma (Karras schedule)", min=0.0)
    sigma_max: float = field(80.0, help="largest sampling sigma (Karras schedule)", min=0.0)
    rho: float = field(7.0, help="Karras schedule exponent", min=0.0)
    guidance: float = field(0.0, help="classifier-free guidance weight w (0 = conditional, see diffusion/io.py)")
    metric_samples: int = field(1000, help="samples scored with the shipped classifier's Frechet distance for "
                                "the final sampler and 1-step Euler (0 = skip)", min=0)


@dataclass
class DiffusionRecipe:
    """Recipe of ``genkit train-diffusion``."""

    model: Literal["edm-unet"] = field("edm-unet", help="network family")
    arch: UNetArch = field(default_factory=UNetArch, help="architecture")
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig, help="data")
    train: DiffusionTrainConfig = field(default_factory=DiffusionTrainConfig, help="optimisation")
    eval: DiffusionEvalConfig = field(default_factory=DiffusionEvalConfig, help="evaluation at the end")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        p += batch_problems(self.train.batch_size, self.runtime.grad_accum)
        if not self.arch.channel_mult:
            p.append("arch.channel_mult: give at least one multiplier")
        if self.eval.sigma_min >= self.eval.sigma_max:
            p.append(f"eval.sigma_min: {self.eval.sigma_min} must be below eval.sigma_max {self.eval.sigma_max}")
        return p


def build_unet(cfg: DiffusionRecipe, shape: tuple[int, int, int], num_classes: int) -> UNet:
    c, h, w = shape
    if h != w:
        raise ConfigError(f"data: the UNet needs square images, got {h}x{w}: set data.image_size")
    a = cfg.arch
    try:
        ucfg = UNetConfig(img_size=h, channels=c, model_channels=a.model_channels, channel_mult=tuple(a.channel_mult),
                          num_blocks=a.num_blocks, attn_resolutions=tuple(a.attn_resolutions), num_heads=a.num_heads,
                          dropout=a.dropout, num_classes=num_classes if cfg.data.conditional else 0,
                          embedding=a.embedding)
    except ConfigError as e:
        raise ConfigError([f"arch: {p}" for p in e.problems]) from None
    return UNet(ucfg)


def lr_at(step: int, t: DiffusionTrainConfig) -> float:
    """Linear warm-up then cosine decay from ``lr`` to ``min_lr``."""
    return warmup_cosine_lr(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps)


def ema_decay_at(step: int, t: DiffusionTrainConfig) -> float:
    """EDM's EMA: half-life ``min(halflife, rampup * steps_done)`` (training/training_loop.py), as a decay."""
    hl = t.ema_halflife_steps
    if t.ema_rampup > 0:
        hl = min(hl, (step + 1) * t.ema_rampup)
    return 0.5 ** (1.0 / max(hl, 1e-8))


def make_batch(y_all: torch.Tensor, labels: torch.Tensor | None, idx: torch.Tensor, cfg: DiffusionRecipe,
               num_classes: int, seed: int, step: int):
    """The global batch of ``step``: clean images, standard-normal noise and sigma draws, (dropped) labels."""
    y = y_all[idx]  # (B, C, H, W) in [-1, 1]
    noise = torch.randn(y.shape, generator=step_generator(seed, step, stream=4))
    sigma_normal = torch.randn((y.shape[0],), generator=step_generator(seed, step, stream=5))
    lab = None
    if cfg.data.conditional:
        lab = labels[idx].clone()
        drop = torch.rand(lab.shape, generator=step_generator(seed, step, stream=3)) < cfg.data.label_drop
        lab[drop] = num_classes  # the null class
    return y, noise, sigma_normal, lab


def train_diffusion(cfg: DiffusionRecipe, out: str | Path, *, quiet: bool = False) -> dict:
    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed = cfg.runtime.seed
    train = cfg.data.load("train")
    torch.manual_seed(seed)  # same initial weights on every rank
    net = build_unet(cfg, train.shape, train.num_classes)
    t, e = cfg.train, cfg.eval
    data_info = {"source": cfg.data.source, "split_seed": cfg.data.split_seed, "shape": list(train.shape),
                 "levels": train.levels, "num_classes": train.num_classes if cfg.data.conditional else 0,
                 "class_names": train.class_names, "image_size": cfg.data.image_size,
                 "channels": cfg.data.channels}
    model_config = teacher_config(net, t.sigma_data, e.sigma_min, e.sigma_max, data_info)
    rt.write_config(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    ema = EMA(net, half_life_steps=t.ema_halflife_steps) if t.ema_halflife_steps > 0 else None
    model, opt = rt.prepare(net, opt)
    denoiser = EDMPrecond(model, sigma_data=t.sigma_data)  # D = EDMPrecond(F), F possibly DDP-wrapped
    loss_fn = EDMLoss(t.p_mean, t.p_std, t.sigma_data)
    meta = rt.resume(model, opt, ema=ema)
    start = meta["step"] if meta else 0
    n_params = sum(p.numel() for p in model.parameters())
    y_all = train.to_unit()  # (N, C, H, W) bin centres in [-1, 1]
    micro = t.batch_size // cfg.runtime.grad_accum
    t0, seen, last = time.time(), 0, {}
    with rt.progress(t.steps, initial=start, description="train-diffusion") as bar:
        for step in range(start, t.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, t)
            idx = batch_indices(len(train), t.batch_size, step, seed)
            y, noise, sigma_normal, lab = make_batch(y_all, train.labels, idx, cfg, train.num_classes, seed, step)
            model.train()
            total = torch.zeros((), device=rt.device)
            for a in range(cfg.runtime.grad_accum):
                sl = slice(a * micro, (a + 1) * micro)
                mine = rt.shard(micro)
                yb, nb, sb = y[sl][mine].to(rt.device), noise[sl][mine], sigma_normal[sl][mine]
                lb = lab[sl][mine].to(rt.device) if lab is not None else None
                with rt.no_sync(model, skip=a < cfg.runtime.grad_accum - 1):
                    with rt.autocast():
                        loss = loss_fn(denoiser, yb, nb, sb, class_labels=lb).mean()
                    rt.check_finite(loss, step)
                    rt.backward(loss / cfg.runtime.grad_accum)
                total += loss.detach() / cfg.runtime.grad_accum
            gnorm = rt.clip_grad_norm_(model.parameters(), t.grad_clip) if t.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.decay = ema_decay_at(step, t)
                ema.update(rt.unwrap(model))
            seen += t.batch_size
            done = step + 1
            if done % cfg.runtime.log_every == 0 or done == t.steps:
                last = {"loss": rt.mean(total), "lr": lr_at(step, t), "grad_norm": gnorm}
                rt.log(done, **last)
            bar.update(1, **({"loss": last["loss"]} if last else {}))
            if cfg.runtime.checkpoint_every and done % cfg.runtime.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, model, opt, config=model_config, ema=ema)
    rt.save_checkpoint(t.steps, model, opt, config=model_config, ema=ema)
    train_seconds = time.time() - t0
    final = rt.unwrap(model)
    if ema is not None:
        final.load_state_dict(ema.weights_for(final))
    final.eval()
    metrics = {"model": cfg.model, "params": n_params, "steps": t.steps, "train_seconds": round(train_seconds, 2),
               "images_per_second": round(seen / max(train_seconds, 1e-9), 2)}
    metrics.update({f"final_{k}": v for k, v in last.items()})
    if rt.is_main:
        save_model_folder(rt.out / "model", dict(final.state_dict()), model_config)
        teacher = EDMTeacher(final, t.sigma_data, e.sigma_min, e.sigma_max, data_info).eval()
        metrics.update(final_evaluation(teacher, cfg, rt.out, seed=seed, device=rt.device, quiet=quiet))
    rt.write_metrics(metrics)
    rt.wait()
    return metrics


@torch.no_grad()
def generate(denoiser, n: int, *, sampler: str = "heun", nfe: int = 35, seed: int = 0, labels=None,
             guidance: float = 0.0, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
             batch_size: int = 500, device="cpu") -> torch.Tensor:
    """``n`` samples in [-1, 1] from a teacher: x ~ N(0, sigma_max^2 I), then ``sampler`` on the Karras
    schedule that spends ``nfe`` evaluations.  The noise of batch b comes from (seed, b) only."""
    from genkit.samplers import get_sampler, sigmas_for_nfe

    fn = get_sampler(sampler)
    sigmas = sigmas_for_nfe(sampler, nfe, sigma_min, sigma_max, rho).to(device)
    shape = tuple(denoiser.shape)
    out = []
    for b, i in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - i)
        x = torch.randn((m, *shape), generator=step_generator(seed, b, stream=13), dtype=torch.float64)
        x = (x * sigmas[0]).float().to(device)
        cond = {}
        if labels is not None:
            cond = {"class_labels": torch.as_tensor(labels[i : i + m]).to(device), "cfg": guidance}
        out.append(fn(denoiser, x, sigmas, cond=cond).clamp(-1, 1).cpu())
    return torch.cat(out)


def final_evaluation(teacher: EDMTeacher, cfg: DiffusionRecipe, out: Path, *, seed: int, device="cpu",
                     quiet: bool = False) -> dict:
    """samples.png / samples.npz with the recipe's sampler, and (built-in sources) fd-<source> of that
    sampler and of 1-step Euler on ``eval.metric_samples`` samples (plus class accuracy when conditional)."""
    e = cfg.eval
    res = {}
    nc = teacher.num_classes
    kw = dict(seed=seed, guidance=e.guidance, sigma_min=e.sigma_min, sigma_max=e.sigma_max, rho=e.rho, device=device)
    if e.samples:
        labels = (torch.arange(e.samples) % nc) if nc else None
        x = generate(teacher, e.samples, sampler=e.sampler, nfe=e.nfe, labels=labels, **kw)
        save_grid(x, out / "samples.png", nrow=nc or None)
        save_samples_npz(out / "samples.npz", **({"images": x, "labels": labels} if nc else {"images": x}))
        res["samples_png"] = str(out / "samples.png")
    from genkit.eval.features import has_classifier

    if e.metric_samples and has_classifier(cfg.data.source):
        from genkit.eval.image_metrics import evaluate_images

        n = e.metric_samples
        labels = (torch.arange(n) % nc) if nc else None
        for name, nfe in ((e.sampler, e.nfe), ("euler", 1)):
            t0 = time.time()
            x = generate(teacher, n, sampler=name, nfe=nfe, labels=labels, **kw)
            seconds = time.time() - t0
            m = evaluate_images(x, cfg.data.source, labels=labels, metrics=("fd", "classify"),
                                split_seed=cfg.data.split_seed)
            tag = f"{name}_nfe{nfe}"
            for k, v in m.items():
                res[f"{k}_{tag}"] = v
            res[f"sample_seconds_{tag}"] = round(seconds, 2)
    return res
