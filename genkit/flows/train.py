"""``genkit train-flow``: maximum-likelihood training of a Transformer autoregressive flow on images.

``model=tarflow`` (arXiv 2412.06329) models pixels; ``model=starflow`` (arXiv 2506.06276) is the deep-shallow
TarFlow of genkit.flows.starflow, in pixels or in the latent space of a diffusers AutoencoderKL (``latent.ae``),
conditioned on class labels or on caption states (``text.encoder``) in its deep block, with the official
training loss plus ``starflow.latent_norm_reg`` (1e-4) x the mean squares of the shallow blocks' outputs
(official ``--latent_norm_regularization``; the official sum also counts the input latent, a constant).

The loop reads top to bottom: build the runtime and components, then one loop (accumulate, clip, step,
EMA, log, checkpoint).  Batches, dequantization noise, latent samples and noise, label and caption drops are
functions of (seed, step) (``genkit.data.batches``), so a resumed run equals an uninterrupted one and W
processes equal one process with the same global batch.
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
from genkit.flows.latent import CaptionTable, LatentConfig, TextConfig, latent_inputs, posterior_stats
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
    layers_per_block: list[int] = field(default_factory=lambda: [2], help="transformer layers per flow block: one "
                                        "value for every block, or (starflow) one per block, shallow blocks first "
                                        "and the deep block (next to the prior) last, e.g. [1, 1, 1, 5]; a list "
                                        "sets the number of blocks")
    width: int = field(128, help="transformer width (channels)", min=8)
    head_dim: int = field(32, help="attention head dimension", min=4)
    expansion: int = field(4, help="MLP expansion ratio", min=1)
    dropout: float = field(0.0, help="dropout in the transformer", min=0.0, max=1.0)


@dataclass
class StarFlowSwitches:
    """STARFlow's options (arXiv 2506.06276; official t2i config values as defaults); model=starflow only."""

    sos: bool = field(True, help="learned start token: token 0 of every block is transformed too")
    softplus: bool = field(True, help="scale = softplus(a + log(e - 1)) instead of exp(a)")
    soft_clip: float = field(4.0, help="soft-clip the block outputs to c tanh(./c) (0 = off)", min=0.0)
    final_norm: bool = field(True, help="RMSNorm before each block's output projection")
    rope: bool = field(True, help="rotary positions (2-D; 3-D with text) instead of learned position embeddings")
    cond_top_only: bool = field(True, help="labels/text and guidance in the deep block only")
    seq_order: Literal["L2R", "R2L"] = field("L2R", help="L2R: block 0 reads flipped tokens, so the deep block of an "
                                             "even stack reads them in order (official t2i); R2L: TarFlow's order")
    latent_norm_reg: float = field(1e-4, help="weight of the mean squared shallow-block outputs in the loss "
                                   "(official --latent_norm_regularization)", min=0.0)


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
    guidance_kind: Literal["starflow", "tarflow"] = field("starflow", help="starflow: STARFlow's Gaussian guidance "
                                                          "in the deep block; tarflow: extrapolate log-scale and shift "
                                                          "(model=tarflow always uses tarflow)")
    annealed_guidance: bool = field(False, help="scale the guidance weight by (t+1)/T along the tokens (the "
                                    "official STARFlow code computes this factor but never applies it)")
    denoise: bool = field(True, help="latent flows: Tweedie-denoise sampled latents before decoding")


@dataclass
class FlowRecipe:
    """Recipe of ``genkit train-flow``."""

    model: Literal["tarflow", "starflow"] = field("tarflow", help="flow family: tarflow (pixels) or starflow "
                                                  "(deep-shallow, latent space and text optional)")
    arch: TarFlowArch = field(default_factory=TarFlowArch, help="architecture")
    starflow: StarFlowSwitches = field(default_factory=StarFlowSwitches, help="STARFlow options")
    latent: LatentConfig = field(default_factory=LatentConfig, help="autoencoder latent space (starflow)")
    text: TextConfig = field(default_factory=TextConfig, help="text conditioning (starflow)")
    data: FlowDataConfig = field(default_factory=FlowDataConfig, help="data")
    train: FlowTrainConfig = field(default_factory=FlowTrainConfig, help="optimisation")
    eval: FlowEvalConfig = field(default_factory=FlowEvalConfig, help="evaluation at the end")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        p += batch_problems(self.train.batch_size, self.runtime.grad_accum)
        lpb = self.arch.layers_per_block
        if not lpb or min(lpb) < 1:
            p.append(f"arch.layers_per_block: need positive layer counts, got {lpb}")
        elif len(set(lpb)) == 1 and len(lpb) > 1 and len(lpb) != self.arch.num_blocks and self.model == "tarflow":
            p.append(f"arch.layers_per_block: {len(lpb)} values for arch.num_blocks={self.arch.num_blocks}")
        if self.model == "tarflow":
            if len(set(lpb)) > 1:
                p.append("arch.layers_per_block: TarFlow blocks all have the same depth; a deep-shallow list "
                         "needs model=starflow")
            if self.latent.ae:
                p.append("latent.ae: latent spaces need model=starflow")
            if self.text.encoder:
                p.append("text.encoder: text conditioning needs model=starflow")
        if self.text.encoder and self.data.conditional:
            p.append("text.encoder: a flow is conditioned on text or on class labels (data.conditional), not both")
        return p

    @property
    def layers(self) -> list[int]:
        """Layers of every block (a single value repeats over arch.num_blocks, as in the official code)."""
        lpb = self.arch.layers_per_block
        return list(lpb) if len(lpb) > 1 else [lpb[0]] * self.arch.num_blocks

def flow_recipe_class(model: str):
    """The recipe class of a flow family (``model=...``): each family has its own arch/data/train/eval keys."""
    if model in ("tarflow", "starflow"):
        return FlowRecipe
    if model == "tarflowlm":
        from genkit.flows.lm_train import TarFlowLMRecipe

        return TarFlowLMRecipe
    raise ConfigError(f"model: {model!r} is not one of 'tarflow', 'starflow', 'tarflowlm'")


def load_flow_recipe(recipe: str | Path | None = None, overrides: list[str] | None = None):
    """Load a train-flow recipe: ``model`` (from the overrides, else the YAML, else 'tarflow') picks the class."""
    from genkit import config as C

    model = C.parse_overrides(overrides or []).get("model")
    if model is None and recipe is not None:
        model = C._read_yaml(recipe).get("model")
    return C.load(flow_recipe_class(str(model or "tarflow")), recipe, overrides)


def build_flow(cfg: FlowRecipe, shape: tuple[int, int, int], num_classes: int, txt_dim: int = 0):
    """The untrained flow of the recipe on inputs of ``shape`` (pixels, or latents for a latent STARFlow)."""
    from genkit.flows.starflow import StarFlow, StarFlowConfig
    from genkit.flows.tarflow import TarFlow, TarFlowConfig

    c, h, w = shape
    where = "latents" if cfg.latent.ae else "images"
    if h != w:
        raise ConfigError(f"data: {cfg.model} needs square {where}, got {h}x{w}: set data.image_size")
    if h % cfg.arch.patch_size:
        raise ConfigError(f"arch.patch_size: {cfg.arch.patch_size} does not divide the {where}' size {h}")
    a, nc = cfg.arch, num_classes if cfg.data.conditional else 0
    if cfg.model == "starflow":
        sw = cfg.starflow
        try:
            mcfg = StarFlowConfig(img_size=h, channels=c, patch_size=a.patch_size, layers_per_block=cfg.layers,
                                  channels_model=a.width, head_dim=a.head_dim, num_classes=nc, txt_dim=txt_dim,
                                  expansion=a.expansion, dropout=a.dropout, sos=sw.sos, softplus=sw.softplus,
                                  soft_clip=sw.soft_clip, final_norm=sw.final_norm, rope=sw.rope,
                                  cond_top_only=sw.cond_top_only, seq_order=sw.seq_order)
        except ConfigError as e:
            raise ConfigError([f"arch/starflow: {q}" for q in e.problems]) from None
        return StarFlow(mcfg)
    mcfg = TarFlowConfig(img_size=h, channels=c, patch_size=a.patch_size, num_blocks=a.num_blocks,
                         layers_per_block=cfg.layers[0], channels_model=a.width, head_dim=a.head_dim,
                         num_classes=nc, expansion=a.expansion, dropout=a.dropout)
    return TarFlow(mcfg)


def unit(data: ImageData, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` as bin centres (k + 0.5) / L * 2 - 1 (what the autoencoders see), without converting the rest."""
    return (data.ints[idx].float() + 0.5) / data.levels * 2 - 1


class FlowSpace:
    """Where the flow lives and what conditions it: pixels or autoencoder latents (cached posterior stats),
    class labels or caption states. ``inputs(idx, step)`` gives the batch (x, y, txt) of a training step."""

    def __init__(self, cfg: FlowRecipe, train: ImageData, device="cpu"):
        from genkit.models.text import class_names_for

        self.cfg, self.train, self.device = cfg, train, device
        self.codec = self.captions = None
        self.scale_source = ""
        lc = cfg.latent
        if lc.ae:
            from genkit.models.autoencoder import load_codec, read_ae_config

            ae_cfg = read_ae_config(lc.ae)
            if int(ae_cfg.get("in_channels", 3)) != train.shape[0]:
                raise ConfigError(f"latent.ae: '{lc.ae}' encodes {ae_cfg.get('in_channels', 3)}-channel images, the "
                                  f"data has {train.shape[0]} channel(s) (set data.channels, or use another "
                                  "autoencoder)")
            if lc.channels and int(ae_cfg.get("latent_channels", 4)) != lc.channels:
                raise ConfigError(f"latent.channels: the recipe expects {lc.channels} latent channels, '{lc.ae}' has "
                                  f"{ae_cfg.get('latent_channels')}")
            sub = torch.arange(min(len(train), 2000))
            self.codec, self.scale_source = load_codec(lc.ae, images=unit(train, sub),
                                                       scaling_factor=lc.scaling_factor, device=device)
            ds = self.codec.downsample
            if train.shape[1] % ds or train.shape[2] % ds:
                raise ConfigError(f"latent.ae: {train.shape[1]}x{train.shape[2]} images do not fit the autoencoder's "
                                  f"{ds}x downsampling (set data.pad_to or data.image_size)")
            self.shape = (self.codec.latent_channels, train.shape[1] // ds, train.shape[2] // ds)
            self.mean = self.std = None
            if lc.cache:
                self.mean, self.std = posterior_stats(self.codec, train.to_unit(), device=device)
        else:
            self.shape = train.shape
        if cfg.text.encoder and cfg.text.source == "captions":
            from genkit.flows.latent import DataCaptions

            if train.captions is None:
                raise ConfigError(f"text.source=captions: source '{cfg.data.source}' has no captions (an image folder "
                                  "with a NAME.txt beside every image)")
            self.captions = DataCaptions(cfg.text, device)
        elif cfg.text.encoder:
            if train.labels is None:
                raise ConfigError(f"text.encoder: source '{cfg.data.source}' has no labels to fill the caption "
                                  "templates with")
            names = list(cfg.text.class_names) or class_names_for(
                {"source": cfg.data.source, "class_names": train.class_names}, train.num_classes)
            if len(names) != train.num_classes:
                raise ConfigError(f"text.class_names: {len(names)} names for {train.num_classes} classes")
            self.captions = CaptionTable(cfg.text, names)

    @property
    def txt_dim(self) -> int:
        return self.captions.dim if self.captions is not None else 0

    @property
    def latent(self) -> bool:
        return self.codec is not None

    def latents_of(self, images: torch.Tensor, seed: int, step: int, stream: int = 41) -> torch.Tensor:
        """Training inputs of images in [-1, 1] (no cache): scaled posterior samples + noise."""
        from genkit.flows.latent import posterior_stats as stats

        m, s = stats(self.codec, images, device=self.device)
        return latent_inputs(self.codec, m, s, self.cfg.latent.noise_std, seed, step,
                             sample=self.cfg.latent.sample_posterior, stream=stream)

    def inputs(self, idx: torch.Tensor, seed: int, step: int):
        """(x, y, txt) of the global batch ``idx`` at ``step``."""
        cfg, data = self.cfg, self.train
        if self.latent:
            if self.mean is not None:
                x = latent_inputs(self.codec, self.mean[idx], self.std[idx], cfg.latent.noise_std, seed, step,
                                  sample=cfg.latent.sample_posterior)
            else:
                x = self.latents_of(unit(data, idx), seed, step)
            y = None
            if cfg.data.conditional:
                y = data.labels[idx].clone()
                drop = torch.rand(y.shape, generator=step_generator(seed, step, stream=3)) < cfg.data.label_drop
                y[drop] = data.num_classes
        else:
            x, y = make_inputs(data, idx, cfg, seed, step)
        txt = None if self.captions is None else self.captions.batch(data, idx, seed, step)
        return x, y, txt

    def info(self) -> dict:
        """What sampling needs besides the weights (``model/data.json``)."""
        d = {}
        if self.latent:
            d["latent"] = {"ae": str(Path(self.cfg.latent.ae).resolve()), "scaling_factor": self.codec.scale,
                           "shift_factor": self.codec.shift, "scale_source": self.scale_source,
                           "noise_std": self.cfg.latent.noise_std, "shape": list(self.shape)}
        if self.captions is not None:
            t = self.cfg.text
            d["text"] = {"encoder": t.encoder if t.encoder == "minilm" else str(Path(t.encoder).resolve()),
                         "max_length": t.max_length, "source": t.source, "drop": t.drop,
                         "templates": getattr(self.captions, "templates", []),
                         "class_names": getattr(self.captions, "class_names", [])}
        return d


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
    """What the shared loop (`fit`) needs to train a TarFlow or STARFlow on images or latents (``FlowSpace``): the
    global batch of a step (x, y, caption states), the loss of a micro-batch (NLL in nats per dimension, plus
    STARFlow's 1e-4 x mean squared intermediate outputs), the logged figures and the learning rate. The logged
    ``loss`` is the NLL alone (train bits/dim come from it); the regulariser is logged as ``latent_norm``."""

    def __init__(self, cfg: FlowRecipe, space: "FlowSpace", test: ImageData, rt: Runtime | None = None):
        self.cfg, self.space, self.train, self.test, self.rt = cfg, space, space.train, test, rt
        self.dims = int(torch.tensor(space.shape).prod())
        self.log_bin = self.dims * math.log(2.0 / self.train.levels)  # see genkit.eval.bpd
        self.star = cfg.model == "starflow"
        self.reg = cfg.starflow.latent_norm_reg if self.star else 0.0
        self.key = "nll" if space.latent else "bpd"  # the figure on the progress bar
        self._nll = self._norm = 0.0  # this rank's NLL and regulariser of the current step (reg > 0 only)

    def prepare_step(self, step: int, model, opt) -> float:
        self._nll = self._norm = 0.0
        lr = lr_at(step, self.cfg.train)
        for group in opt.param_groups:
            group["lr"] = lr
        return lr

    def batch(self, step: int):
        seed = self.cfg.runtime.seed
        idx = batch_indices(len(self.train), self.cfg.train.batch_size, step, seed)
        return idx, self.space.inputs(idx, seed, step)

    def loss(self, model, x, y, txt=None):
        if self.star:
            z, logdet, inter = model(x, y, txt, return_intermediates=True)
        else:
            z, logdet = model(x, y)
        # per-dim NLL in nats over v in [-1,1]^D (the constant 0.5 log 2pi keeps it a true NLL)
        nll = (0.5 * z.float().flatten(1).pow(2).sum(1) - logdet.float()).mean() / self.dims \
            + 0.5 * math.log(2 * math.pi)
        if self.reg <= 0:
            return nll
        # official: + 1e-4 * sum over the intermediate outputs of mean(h^2)
        norm = sum(h.float().pow(2).mean() for h in inter)
        accum = self.cfg.runtime.grad_accum
        self._nll = self._nll + nll.detach() / accum
        self._norm = self._norm + norm.detach() / accum
        return nll + self.reg * norm

    def report(self, loss: float) -> dict:
        out = {}
        if self.reg > 0:  # fit's figure is NLL + regulariser of the step: log the two apart (every rank reports)
            loss, out["latent_norm"] = self.rt.mean(self._nll), self.rt.mean(self._norm)
        out["loss"] = loss
        if self.space.latent:
            out["train_nll"] = loss
        else:
            out["train_bpd"] = (loss * self.dims - self.log_bin) / (self.dims * math.log(2))
        return out

    def evaluate(self, model, rt) -> dict:
        return evaluate(model, self.space, self.test, rt, self.cfg.runtime.seed)


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
    space = FlowSpace(cfg, train, rt.device)
    torch.manual_seed(seed)  # same initial weights on every rank
    model = build_flow(cfg, space.shape, train.num_classes, space.txt_dim)
    model_config = model.config.to_dict()
    rt.write_config(cfg)
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    model, opt = rt.prepare(model, opt)
    n_params = sum(p.numel() for p in model.parameters())
    objective = ImageObjective(cfg, space, test, rt)
    run = fit(rt, model, opt, objective, t, model_config=model_config, ema=ema, eval_every=cfg.eval.eval_every,
              description=f"train-flow {cfg.model}")
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
        # what the flow (or the autoencoder, for latent flows) saw as pixel values
        pixels = "(k+0.5)/L*2-1" if space.latent else \
            ("k/(L-1)*2-1" if cfg.data.noise == "gaussian" else "(k+u)/L*2-1")
        if space.latent:
            sigma = cfg.latent.noise_std
        else:
            sigma = cfg.data.noise_std if cfg.data.noise == "gaussian" else (2.0 / train.levels) / math.sqrt(12.0)
        atomic_write_json(rt.out / "model" / "data.json", {
            "source": cfg.data.source, "split_seed": cfg.data.split_seed, "levels": train.levels,
            "shape": list(train.shape), "num_classes": train.num_classes if cfg.data.conditional else 0,
            "noise": "gaussian" if space.latent else cfg.data.noise, "noise_sigma": sigma,
            "pixels": pixels, "pad_to": cfg.data.pad_to, **space.info()})
        if cfg.eval.test_bpd:
            metrics.update(evaluate(final, space, test, rt, seed))
            sub = train.subset(range(min(len(train), len(test))))
            metrics.update({f"train_{k.removeprefix('test_')}_eval": v
                            for k, v in evaluate(final, space, sub, rt, seed, train_rows=True).items()})
        if cfg.eval.samples:
            nc = train.num_classes if (cfg.data.conditional or space.captions is not None) else 0
            labels = torch.arange(cfg.eval.samples) % nc if nc else None
            prompts = None
            if cfg.text.encoder and cfg.text.source == "captions":  # the first test captions
                prompts = [test.captions[i % len(test)] for i in range(cfg.eval.samples)]
            x = sample_images(final, space, cfg.eval.samples, seed=seed, labels=labels, prompts=prompts,
                              guidance=cfg.eval.guidance,
                              guidance_kind=cfg.eval.guidance_kind, annealed=cfg.eval.annealed_guidance,
                              denoise_latents=cfg.eval.denoise, device=rt.device)
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
    """1.0 for a class- or text-conditional flow (guidance contrasts the label with the null label, the caption with
    the empty caption), else UNCOND_ATTN_TEMP."""
    return 1.0 if (model.config.num_classes or getattr(model.config, "txt_dim", 0)) else UNCOND_ATTN_TEMP


@torch.no_grad()
def evaluate(model, space: FlowSpace, data: ImageData, rt, seed: int = 0, train_rows: bool = False) -> dict:
    """``test_bpd`` (pixel flows: bits/dim of dequantized images) or ``test_nll`` (latent flows: nats/dim of the
    scaled test latents plus the training noise, both drawn with a fixed seed; captions from the first
    template)."""
    model.eval()
    if not space.latent and space.captions is None:
        return {"test_bpd": evaluate_bpd(model, data, rt)}
    dims = int(torch.tensor(space.shape).prod())
    total, n = 0.0, 0
    for i in range(0, len(data), 256):
        rows = torch.arange(i, min(i + 256, len(data)))
        if space.latent:
            x = space.latents_of(unit(data, rows), seed + 99991, i, stream=51)
        else:
            x, _ = make_inputs(data.subset(rows), torch.arange(len(rows)), space.cfg, seed + 99991, i)
        y = data.labels[rows] if (space.cfg.data.conditional and data.labels is not None) else None
        txt = None if space.captions is None else space.captions.eval_states(data, rows)
        x = x.to(rt.device)
        lp = model.log_prob(x, None if y is None else y.to(rt.device), *([] if txt is None else [txt.to(rt.device)]))
        total += float(-lp.double().sum())
        n += len(rows)
    nll = total / n / dims
    if not space.latent:  # pixel-space text flow: report bits/dim like the others
        return {"test_bpd": (nll * dims - dims * math.log(2.0 / data.levels)) / (dims * math.log(2))}
    return {"test_nll": nll}


@torch.no_grad()
def sample_flow(model, n: int, *, seed: int = 0, guidance: float = 0.0, num_classes: int = 0, labels=None,
                device="cpu", temperature: float = 1.0, attn_temp: float | None = None, guide_what: str = "ab",
                annealed: bool = False, denoise_sigma: float = 0.0, resample_nonfinite: bool = False,
                stats: dict | None = None, txt=None, txt_null=None, guidance_kind: str = "starflow",
                clamp: bool = True) -> torch.Tensor:
    """Draw ``n`` samples of the flow's input space: z ~ N(0, temperature^2 I), reverse pass with the KV cache,
    optional score-based denoising, then ``clamp(-1, 1)`` (``clamp=False`` for the latents of a latent flow).

    Guidance (``TarFlow.reverse``): weight ``guidance`` on ``guide_what`` ('a', 'b' or 'ab'), the second pass at
    attention temperature ``attn_temp`` (None: ``default_attn_temp``), the weight ramped as g (i+1)/(T-1) with
    ``annealed`` (official ``evaluate_fid.py``). STARFlows guide their deep block only, with ``guidance_kind``
    ("starflow": genkit.flows.switches.guide) and take caption states ``txt`` (``txt_null``: the empty caption's,
    the unconditional branch). ``denoise_sigma`` > 0 applies ``denoise`` *before* the clamp, as the official
    ``evaluate_fid.py`` and ``sample.ipynb`` do. Strong guidance can overflow exp(alpha) in a rare sample (the
    official sampler has no clamp either): ``stats['non_finite']`` counts the samples that came out non-finite,
    ``stats['redrawn']`` the draws made to replace them: with ``resample_nonfinite`` their noise is redrawn (fresh
    draws, seeded) until all ``n`` are finite (the official ``evaluate_fid.py`` redraws the whole batch while it
    holds a NaN). Conditional models get labels ``0..num_classes-1`` cycled (or ``labels``)."""
    from genkit.errors import RunError
    from genkit.flows.starflow import StarFlow
    from genkit.flows.tarflow import denoise

    c = model.config
    shape = (c.channels, c.img_size, c.img_size)
    y = None
    if c.num_classes:
        y = (torch.as_tensor(labels) if labels is not None else torch.arange(n) % c.num_classes).to(device)
    temp = default_attn_temp(model) if attn_temp is None else attn_temp

    def draw(rows: torch.Tensor, attempt: int) -> torch.Tensor:  # (len(rows), C, H, W) finished samples
        g = step_generator(seed, attempt, stream=11)
        z = temperature * torch.randn((n, *shape), generator=g)[rows].to(device)  # row r keeps its own draw
        yr = None if y is None else y[rows.to(y.device)]
        tr = None if txt is None else txt[rows].to(device)
        if isinstance(model, StarFlow):
            tn = None if txt_null is None else txt_null[rows].to(device)
            x = model.reverse(z, yr, txt=tr, txt_null=tn, guidance=guidance, guidance_kind=guidance_kind,
                              guide_what=guide_what, attn_temp=temp, annealed_guidance=annealed)
        else:
            x = model.reverse(z, yr, guidance=guidance, guide_what=guide_what, attn_temp=temp,
                              annealed_guidance=annealed)
        if denoise_sigma > 0:
            x = denoise(model, x, yr, denoise_sigma, txt=tr)
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
    return x.clamp(-1, 1) if clamp else x


def sample_images(model, space: FlowSpace, n: int, *, seed: int = 0, labels=None, prompts=None,
                  guidance: float = 0.0, guidance_kind: str = "starflow", annealed: bool = False,
                  denoise_latents: bool = True, device="cpu", codec=None, resample_nonfinite: bool = False,
                  stats: dict | None = None) -> torch.Tensor:
    """Images in [-1, 1] from a trained flow of ``space``: class labels, or ``prompts``, or the first-template
    captions of ``labels``; latent flows denoise (Tweedie) and decode with ``codec`` (default: the training
    autoencoder)."""
    txt = txt_null = None
    if space.captions is not None:
        txt = space.captions.prompt_states(labels, prompts)
        txt_null = space.captions.null(n)
    x = sample_flow(model, n, seed=seed, guidance=guidance, labels=labels if model.config.num_classes else None,
                    device=device, txt=txt, txt_null=txt_null, guidance_kind=guidance_kind, annealed=annealed,
                    clamp=not space.latent, resample_nonfinite=resample_nonfinite, stats=stats)
    if not space.latent:
        return x
    return latents_to_images(model, x, codec or space.codec, sigma=space.cfg.latent.noise_std if denoise_latents
                             else 0.0, labels=labels if model.config.num_classes else None, txt=txt)


def latents_to_images(model, z, codec, *, sigma: float = 0.0, labels=None, txt=None, batch_size: int = 256):
    """Tweedie-denoise sampled latents with the flow's density when ``sigma`` > 0 (official STARFlow
    ``simple_denoising``), then decode to [-1, 1]."""
    from genkit.flows.latent import decode
    from genkit.flows.tarflow import denoise

    if sigma > 0:
        parts = []
        for i in range(0, len(z), batch_size):
            sl = slice(i, i + batch_size)
            y = None if labels is None else torch.as_tensor(labels)[sl].to(z.device)
            parts.append(denoise(model, z[sl], y, sigma, txt=None if txt is None else txt[sl].to(z.device)))
        z = torch.cat(parts)
    with torch.no_grad():
        return decode(codec, z)
