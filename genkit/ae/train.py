"""``genkit train-ae``: the autoencoders of latent flows, written as diffusers ``AutoencoderKL`` folders.

Two modes:

* ``mode=scratch`` trains a small KL autoencoder (Kingma & Welling 2014; the SD ``AutoencoderKL`` architecture
  of diffusers) from nothing: ``L2 + kl_weight * KL(q(z|x) || N(0, I))`` (+ the optional perceptual and GAN
  terms below). This is for CPU-scale work, where no pretrained VAE exists offline. At the end the latent
  ``scaling_factor`` is set to 1 / std of the training latents (the recipe that gave SD's 0.18215).
* ``mode=finetune-decoder`` is STARFlow's decoder fine-tuning (arXiv 2506.06276; official apple/ml-starflow
  ``finetune_decoder.py``): the encoder is frozen, the decoder (with ``post_quant_conv``) learns to map the
  noisy latents the flow produces, ``z = scale * sample(q(z|x)) + noise_std * eps`` (official 0.3), back to
  the image, with the official loss of ``genkit.ae.losses`` (L2 + perceptual + 0.1 hinge GAN, LeCam). The
  discriminator is stepped by its own optimizer: the official unscaled branch calls the *generator's*
  ``optimizer.step()`` after the discriminator's backward pass (``disc_loss.backward(); optimizer.step()``),
  so the discriminator never learns there; genkit does not copy that.

Batches, posterior samples and latent noise are functions of (seed, step), so a resumed run equals an
uninterrupted one. The run folder gets ``ae/`` (the diffusers folder), ``recon.png`` (test images over their
reconstructions) and ``metrics.json`` with the test PSNR (dB, images in [0, 1], mean over images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from genkit.config import field
from genkit.data.batches import batch_indices, step_generator
from genkit.data.config import ImageDataConfig
from genkit.data.grid import save_grid
from genkit.data.images import ImageData
from genkit.errors import ConfigError
from genkit.runtime import Runtime, RuntimeConfig
from genkit.runtime.files import replace_dir
from genkit.runtime.loop import batch_problems, warmup_cosine_lr


@dataclass
class AEArch:
    """A diffusers AutoencoderKL built from scratch (``mode=scratch``); side / 2^(len(channels) - 1) latents."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 32],
                                          help="channels per resolution (each extra entry halves the side)")
    layers_per_block: int = field(1, help="ResNet blocks per resolution (decoder: one more)", min=1)
    latent_channels: int = field(4, help="latent channels", min=1)
    norm_num_groups: int = field(8, help="GroupNorm groups (must divide every channel count)", min=1)
    mid_attention: bool = field(False, help="self-attention in the middle block (SD: true)")


@dataclass
class AELossConfig:
    kl_weight: float = field(1e-6, help="weight of KL(q(z|x) || N(0,I)) (scratch mode; taming/official 1e-6)",
                             min=0.0)
    perceptual: str = field("classifier", help="perceptual network P1: classifier (genkit's shipped classifier of "
                            "the data source), lpips:DIR (vgg16.safetensors + lpips_vgg.safetensors; official), or none")
    perceptual2: str = field("", help="network of the second term P2: empty = the first network's (the classifier's "
                             "logits MSE), convnext:DIR (convnext_small.safetensors, torchvision names; official)")
    perceptual_weight: float = field(1.1, help="weight of the perceptual average (official 1.1)", min=0.0)
    second_weight: float = field(0.1, help="weight of the second perceptual term (classifier logits MSE; "
                                 "official ConvNeXt-S logits) inside the average (official 0.1)", min=0.0)
    gan_weight: float = field(0.1, help="weight of the hinge-GAN generator loss (official 0.1; 0 = no GAN)",
                              min=0.0)
    lecam_weight: float = field(1e-3, help="LeCam regularisation of the discriminator (official 0.001)", min=0.0)
    disc_width: int = field(32, help="discriminator width (official 128)", min=4)
    disc_stages: int = field(2, help="discriminator stages (official 3)", min=1)
    disc_pool: int = field(8, help="discriminator max-pool side (official 16)", min=1)


@dataclass
class AETrainConfig:
    steps: int = field(1000, help="optimizer steps", min=1)
    batch_size: int = field(32, help="global batch size", min=1)
    lr: float = field(1e-3, help="peak AdamW learning rate (autoencoder and discriminator)", min=0.0)
    min_lr: float = field(1e-5, help="learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = field(50, help="linear warm-up steps (official fine-tuning: 10000)", min=0)
    weight_decay: float = field(1e-4, help="AdamW weight decay (official 1e-4)", min=0.0)
    beta2: float = field(0.999, help="AdamW beta2 (official 0.999)", min=0.0, max=1.0)
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    noise_std: float = field(0.3, help="finetune-decoder: std of the noise added to the scaled latents "
                             "(official 0.3, the flow's training noise)", min=0.0)


@dataclass
class AERecipe:
    """Recipe of ``genkit train-ae``."""

    mode: Literal["scratch", "finetune-decoder"] = field("scratch", help="train a new autoencoder, or fine-tune "
                                                         "the decoder of ae=DIR on noisy latents (STARFlow)")
    ae: str = field("", help="finetune-decoder: the diffusers AutoencoderKL folder to start from", exists=True)
    arch: AEArch = field(default_factory=AEArch, help="architecture (scratch mode)")
    data: ImageDataConfig = field(default_factory=ImageDataConfig, help="images")
    loss: AELossConfig = field(default_factory=AELossConfig, help="loss")
    train: AETrainConfig = field(default_factory=AETrainConfig, help="optimisation")
    eval_images: int = field(500, help="test images for the final PSNR (0 = skip)", min=0)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = batch_problems(self.train.batch_size, self.runtime.grad_accum)
        if self.mode == "finetune-decoder" and not self.ae:
            p.append("ae: mode=finetune-decoder needs the autoencoder folder to fine-tune (ae=DIR)")
        if self.mode == "scratch" and self.ae:
            p.append("ae: mode=scratch builds a new autoencoder; give ae=DIR only with mode=finetune-decoder")
        bad = [c for c in self.arch.block_out_channels if c % self.arch.norm_num_groups]
        if bad:
            p.append(f"arch.norm_num_groups: {self.arch.norm_num_groups} does not divide channels {bad}")
        return p


def build_ae(a: AEArch, channels: int, size: int):
    from diffusers import AutoencoderKL

    n = len(a.block_out_channels)
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(a.block_out_channels),
                         layers_per_block=a.layers_per_block, latent_channels=a.latent_channels,
                         norm_num_groups=a.norm_num_groups, sample_size=size, scaling_factor=1.0,
                         mid_block_add_attention=a.mid_attention)


def psnr(x, y) -> torch.Tensor:
    """(B,) PSNR in dB of images in [-1, 1], measured on [0, 1]."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


class AEPass(nn.Module):
    """One reconstruction pass (the module the runtime prepares, so DDP sees a forward):
    scratch: x -> z = mean + std * eps -> decode; finetune-decoder (official ``finetune_decoder.py``): the frozen
    encoder's scaled sample plus ``noise_std`` * eps2 -> decode(z / scale)."""

    def __init__(self, ae, finetune: bool, scale: float, noise_std: float):
        super().__init__()
        self.ae, self.finetune, self.scale, self.noise_std = ae, finetune, scale, noise_std

    def forward(self, x, eps, eps2):
        if self.finetune:
            with torch.no_grad():
                d = self.ae.encode(x).latent_dist
                z = (d.mean + d.std * eps) * self.scale + self.noise_std * eps2  # (B, c, h, w)
            return self.ae.decode(z / self.scale).sample, torch.zeros((), device=x.device)
        d = self.ae.encode(x).latent_dist
        xr = self.ae.decode(d.mean + d.std * eps).sample  # (B, C, H, W)
        return xr, d.kl().mean()  # KL summed over latent dims, mean over the batch (taming convention)


def _decoder_params(ae):
    return list(ae.decoder.parameters()) + (list(ae.post_quant_conv.parameters()) if ae.post_quant_conv else [])


def train_ae(cfg: AERecipe, out: str | Path, *, quiet: bool = False) -> dict:
    from genkit.ae.losses import DecoderLoss, Discriminator, GANLoss, build_perceptual
    from genkit.models.autoencoder import latent_scale, load_autoencoder, read_ae_config

    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed, t, lc = cfg.runtime.seed, cfg.train, cfg.loss
    train, test = cfg.data.load("train"), cfg.data.load("test")
    c, h, w = train.shape
    finetune = cfg.mode == "finetune-decoder"
    torch.manual_seed(seed)
    if finetune:
        src = read_ae_config(cfg.ae)
        ae = load_autoencoder(cfg.ae)
        if int(ae.config.in_channels) != c:
            raise ConfigError(f"ae: '{cfg.ae}' takes {ae.config.in_channels}-channel images, the data has {c}")
        scale = float(src.get("scaling_factor") or 0.0) or latent_scale(ae, train.to_unit()[:2000])
        ae.encoder.requires_grad_(False)
        if ae.quant_conv is not None:
            ae.quant_conv.requires_grad_(False)
        params = _decoder_params(ae)
    else:
        if h != w or h % 2 ** (len(cfg.arch.block_out_channels) - 1):
            raise ConfigError(f"data: {h}x{w} images do not fit {len(cfg.arch.block_out_channels) - 1} halvings "
                              "(set data.pad_to, e.g. 32 for MNIST)")
        ae, scale = build_ae(cfg.arch, c, h), 1.0
        params = list(ae.parameters())
    ae.train()
    net = AEPass(ae, finetune, scale, t.noise_std)
    rt.write_config(cfg)
    perceptual = build_perceptual(lc.perceptual, cfg.data.source, lc.perceptual2) if lc.perceptual_weight > 0 \
        else None
    gan = GANLoss(Discriminator(c, lc.disc_width, lc.disc_stages, lc.disc_pool), lc.lecam_weight) \
        if lc.gan_weight > 0 else None
    loss_fn = DecoderLoss(perceptual, perceptual_weight=lc.perceptual_weight, second_weight=lc.second_weight,
                          gan=gan, gan_weight=lc.gan_weight)
    opt = torch.optim.AdamW(params, lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    objs = [net, opt]
    if gan is not None:
        dopt = torch.optim.AdamW(gan.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
        objs += [gan, dopt]
    prepared = rt.prepare(*objs)
    net_p, opt = prepared[:2]
    if gan is not None:
        gan_p, dopt = prepared[2:]
        loss_fn.gan = rt.unwrap(gan_p)
    config = {"model_type": "genkit-ae-pass", "ae": dict(ae.config)}
    meta = rt.resume(net_p, opt)
    start = meta["step"] if meta else 0
    lat = (int(ae.config.latent_channels), h // 2 ** (len(ae.config.block_out_channels) - 1),
           w // 2 ** (len(ae.config.block_out_channels) - 1))
    images = train.to_unit()  # (N, C, H, W) bin centres in [-1, 1]
    micro = t.batch_size // cfg.runtime.grad_accum
    t0, last = time.time(), {}
    with rt.progress(t.steps, initial=start, description=f"train-ae {cfg.mode}") as bar:
        for step in range(start, t.steps):
            lr = warmup_cosine_lr(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps)
            for o in [opt] + ([dopt] if gan is not None else []):
                for group in o.param_groups:
                    group["lr"] = lr
            idx = batch_indices(len(train), t.batch_size, step, seed)
            x_all = images[idx]
            shape = (len(idx),) + lat
            eps1 = torch.randn(shape, generator=step_generator(seed, step, stream=21))  # posterior sample
            eps2 = torch.randn(shape, generator=step_generator(seed, step, stream=22))  # latent noise
            sums: dict[str, float] = {}
            fakes = []
            for a in range(cfg.runtime.grad_accum):
                mine = rt.shard(micro)
                x = x_all[a * micro : (a + 1) * micro][mine].to(rt.device)
                e1 = eps1[a * micro : (a + 1) * micro][mine].to(x)
                e2 = eps2[a * micro : (a + 1) * micro][mine].to(x)
                with rt.autocast():
                    xr, kl = net_p(x, e1, e2)
                    loss, parts = loss_fn(x * 0.5 + 0.5, xr * 0.5 + 0.5)
                    loss = loss + lc.kl_weight * kl
                rt.check_finite(loss, step)
                rt.backward(loss / cfg.runtime.grad_accum)
                parts["kl"] = float(kl.detach())
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v / cfg.runtime.grad_accum
                fakes.append((x, xr.detach()))
            gnorm = rt.clip_grad_norm_(params, t.grad_clip) if t.grad_clip > 0 else float("nan")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if gan is not None:  # discriminator step, with its own optimizer
                for x, xr in fakes:
                    with rt.autocast():
                        dl, dparts = gan_p(x * 0.5 + 0.5, xr * 0.5 + 0.5)
                    rt.backward(dl / cfg.runtime.grad_accum)
                    for k, v in dparts.items():
                        sums[k] = sums.get(k, 0.0) + v / cfg.runtime.grad_accum
                dopt.step()
                dopt.zero_grad(set_to_none=True)
            done = step + 1
            if done % cfg.runtime.log_every == 0 or done == t.steps:
                last = {k: rt.mean(v) for k, v in sums.items()}
                last.update(lr=lr, grad_norm=gnorm, train_psnr=rt.mean(float(psnr(x, xr.float()).mean().detach())))
                rt.log(done, **last)
            bar.update(1, **({"psnr": last["train_psnr"]} if last else {}))
            if cfg.runtime.checkpoint_every and done % cfg.runtime.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, net_p, opt, config=config)
    rt.save_checkpoint(t.steps, net_p, opt, config=config)
    seconds = time.time() - t0
    ae = rt.unwrap(net_p).ae.eval()
    metrics = {"mode": cfg.mode, "steps": t.steps, "params": sum(p.numel() for p in ae.parameters()),
               "train_seconds": round(seconds, 2), **{f"final_{k}": v for k, v in last.items()}}
    if rt.is_main:
        if not finetune:
            scale = latent_scale(ae, images[:2000].to(rt.device), seed=seed)
        ae.register_to_config(scaling_factor=scale)
        metrics["scaling_factor"] = scale
        metrics["latent_shape"] = list(lat)
        save_diffusers(ae, rt.out / "ae")
        metrics["ae"] = str(rt.out / "ae")
        if cfg.eval_images:
            metrics.update(evaluate_ae(ae, test, cfg.eval_images, scale, t.noise_std, seed, rt.out / "recon.png"))
            metrics["samples_png"] = str(rt.out / "recon.png")  # the grid trackers receive (runtime.log_with)
    rt.write_metrics(metrics)
    rt.wait()
    return metrics


def save_diffusers(ae, folder: Path) -> Path:
    """``ae.save_pretrained`` (safetensors) into a temporary sibling, then renamed onto ``folder``."""
    tmp = folder.with_name(f".{folder.name}.tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    ae.save_pretrained(str(tmp), safe_serialization=True)
    return replace_dir(tmp, folder)


@torch.no_grad()
def evaluate_ae(ae, test: ImageData, n: int, scale: float, noise_std: float, seed: int, png: Path | None) -> dict:
    """Test PSNR of decode(mean latent) and of decode(latent + noise_std * eps) (the flow's noisy latents)."""
    x = test.to_unit()[:n]
    g = torch.Generator().manual_seed(seed + 7)
    clean, noisy = [], []
    for i in range(0, len(x), 250):
        xb = x[i : i + 250]
        m = ae.encode(xb).latent_dist.mean
        clean.append(ae.decode(m).sample.clamp(-1, 1))
        zn = m + noise_std / scale * torch.randn(m.shape, generator=g)
        noisy.append(ae.decode(zn).sample.clamp(-1, 1))
    clean, noisy = torch.cat(clean), torch.cat(noisy)
    if png is not None:
        k = min(32, len(x))
        save_grid(torch.cat([x[:k], clean[:k], noisy[:k]]), png, nrow=k)
    return {"test_psnr": float(psnr(x, clean).mean()), "test_psnr_noisy": float(psnr(x, noisy).mean()),
            "eval_images": int(len(x))}

