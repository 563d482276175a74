"""``genkit distill``: one-step generators by Score identity Distillation (SiD, arXiv 2404.04057), with the
adversarial loss of SiDA (arXiv 2410.14919) or the long/short guidance of SiD-LSG (arXiv 2406.01561).

The loop follows the official ``sid_training_loop.py`` (and its SiDA / SiD-LSG versions) and reads top
to bottom: load the teacher, build f_phi (frozen), f_psi and G (copies of the teacher), then per step

1. one f_psi update: x_g = G(z) without gradient, the EDM loss of f_psi on x_g (SiDA: plus the
   discriminator loss of its encoder on real vs generated images; SiD-LSG: guidance kappa_1 and prompt
   dropout), gradients cleaned with ``nan_to_num`` (SiDA: clipped to +-1 per value), Adam step;
2. one G update: the SiD generator loss through f_phi and f_psi (SiDA: 0.5 * (100 L_SiD) + 0.5 * (0.01
   L_adv) after the warm-up; SiD-LSG: guidance kappa_2 = kappa_3 on f_psi and kappa_4 on f_phi), Adam step;
3. EMA of G by half-life (EDM/SiD style ramp-up).

Both optimisers are Adam with beta1 = 0 (official ``sid_train.py``).  The latent z, noise, noise levels,
conditioning and real batches of step s are functions of (seed, s) (``genkit.data.batches``), so a
resumed run equals an uninterrupted one and W processes equal one process with the same global batch;
G, f_psi and both optimisers are restored by Accelerate's ``save_state``.  Rows whose inputs or outputs
are non-finite are dropped from the losses (as the official code drops NaN rows); a step whose every row
is non-finite, or whose loss is, stops the run with one line and keeps the last good checkpoint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from genkit.config import field
from genkit.data.batches import batch_indices, step_generator
from genkit.distill.nets import OneStepGenerator, trainable_copy
from genkit.distill.sid import SiDLoss, guided
from genkit.models.text import DEFAULT_TEMPLATES
from genkit.errors import ConfigError
from genkit.runtime import EMA, Runtime, RuntimeConfig
from genkit.runtime.loop import batch_problems


@dataclass
class SiDConfig:
    """SiD (arXiv 2404.04057) hyper-parameters; defaults are the official ``sid_train.py`` ones."""

    alpha: float = field(1.2, help="alpha of the generator loss (f_phi - f_psi)((f_phi - x_g) - alpha (f_phi - f_psi))")
    sigma_init: float = field(2.5, help="fixed noise level at which G evaluates the teacher network", min=0.0)
    tmax: int = field(800, help="generator-loss noise: t ~ U(0, tmax/1000) on the Karras schedule", min=1, max=1000)
    sigma_min: float = field(0.002, help="Karras schedule sigma_min of the generator-loss noise", min=0.0)
    sigma_max: float = field(80.0, help="Karras schedule sigma_max of the generator-loss noise", min=0.0)
    rho: float = field(7.0, help="Karras schedule rho of the generator-loss noise", min=1.0)
    p_mean: float = field(-1.2, help="fake-score loss: ln sigma ~ N(p_mean, p_std^2) (EDM)")
    p_std: float = field(1.2, help="fake-score loss: std of ln sigma", min=0.0)
    normaliser: Literal["sample", "batch"] = field(
        "sample", help="generator-loss normaliser w: per-sample mean |x_g - f_phi| (official) or its batch mean "
        "(genkit option for low-dimensional data, see genkit/distill/sid.py)")
    schedule: Literal["auto", "edm", "ddpm"] = field(
        "auto", help="noise levels of both losses. edm (official SiD): ln sigma ~ N(p_mean, p_std^2) with the "
        "lambda-weighted x0 loss for f_psi, the Karras ramp up to tmax for G; ddpm (official SiD-LSG for Stable "
        "Diffusion): t ~ U{ddpm_tmin..ddpm_tmax-1} on the teacher's discrete schedule for both, unweighted "
        "epsilon MSE for f_psi; auto: ddpm for diffusers (DDPM-schedule) teachers, edm otherwise")
    ddpm_tmin: int = field(20, help="schedule=ddpm: smallest timestep drawn (official SiD-LSG tmin)", min=0)
    ddpm_tmax: int = field(980, help="schedule=ddpm: timesteps are drawn below this (official SiD-LSG tmax)", min=1)
    loss_scaling: float = field(1.0, help="scale of the fake-score loss (official --ls)", min=0.0)
    loss_scaling_g: float = field(100.0, help="scale of the generator loss (official --lsg)", min=0.0)


@dataclass
class SiDAConfig:
    """SiDA (arXiv 2410.14919) hyper-parameters; defaults are the official ``sida_train.py`` ones."""

    loss_scaling_adv: float = field(0.01, help="scale of G's adversarial loss (official --lsg_gan)", min=0.0)
    loss_scaling_d: float = field(1.0, help="scale of the discriminator loss (official --lsd)", min=0.0)
    g_start_images: int = field(100_000, help="G is not updated until this many images were seen (official "
                                "warm-up: 100k images of f_psi/discriminator only)", min=0)
    adv_start_images: int = field(200_000, help="G's adversarial term is added after this many images "
                                  "(official: 200k; before, G trains on the SiD loss alone)", min=0)
    grad_clip_value: float = field(1.0, help="clip f_psi's gradients to +-this value per entry (0 = off)", min=0.0)
    real: str = field("", help="real images: an image source (digits, mnist5k, a folder); '' = the teacher's "
                      "training source (mixtures: exact samples)")
    init_generator: str = field("", help="SiD2A: start G from this genkit distill run / generator folder")


@dataclass
class LSGConfig:
    """SiD-LSG (arXiv 2406.01561) guidance scales (kappa = 1: no guidance; the official run uses 2 or 4.5)."""

    kappa1: float = field(1.0, help="kappa_1: guidance on f_psi while it trains (official --cfg_train_fake)")
    kappa2: float = field(1.0, help="kappa_2 = kappa_3: guidance on f_psi inside the generator loss "
                          "(official --cfg_eval_fake)")
    kappa4: float = field(1.0, help="kappa_4: guidance on the teacher inside the generator loss "
                          "(official --cfg_eval_real)")
    prompt_dropout: float = field(0.1, help="share of f_psi's training rows made unconditional when kappa1 or "
                                  "kappa2 != 1 (official: 0.1)", min=0.0, max=1.0)


@dataclass
class CondConfig:
    kind: Literal["auto", "none", "class", "text"] = field(
        "auto", help="conditioning: auto (class labels for class teachers, text for cross-attention UNets), "
        "none, class, or text (MiniLM embeddings of template captions)")
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES),
                                 help="caption templates with {name} (class name) or {index}")
    class_names: list[str] = field(default_factory=list, help="class names for the templates ([] = the data's)")
    num_classes: int = field(0, help="classes named by the templates for text-only teachers", min=0)


@dataclass
class MixtureConfig:
    """Mixture teachers have no network to copy: an MLP denoiser is fit first (genkit/distill/nets.py)."""

    teacher_net: Literal["exact", "mlp"] = field("exact", help="f_phi: the exact mixture denoiser or the fitted MLP")
    width: int = field(256, help="MLP width", min=8)
    depth: int = field(4, help="MLP residual blocks", min=1)
    fit_target: Literal["exact", "dsm"] = field("exact", help="fit the MLP to the exact denoiser or by denoising "
                                                "score matching on samples")
    fit_steps: int = field(3000, help="MLP fit steps", min=0)
    fit_batch: int = field(512, help="MLP fit batch size", min=1)
    fit_lr: float = field(1e-3, help="MLP fit learning rate", min=0.0)
    fit_samples: int = field(0, help="DSM fit on this many fixed samples (0 = fresh samples each step)", min=0)
    real_samples: int = field(5000, help="SiDA: exact mixture samples used as the real data", min=1)


@dataclass
class DistillTrainConfig:
    steps: int = field(2000, help="iterations (one f_psi and one G update each)", min=1)
    batch_size: int = field(64, help="global batch size of both updates", min=1)
    lr: float = field(1e-5, help="Adam learning rate of f_psi (official --lr)", min=0.0)
    g_lr: float = field(1e-5, help="Adam learning rate of G (official --glr)", min=0.0)
    beta1: float = field(0.0, help="Adam beta1 of f_psi", min=0.0, max=1.0)
    g_beta1: float = field(0.0, help="Adam beta1 of G (official --g_beta1)", min=0.0, max=1.0)
    beta2: float = field(0.999, help="Adam beta2 of both", min=0.0, max=1.0)
    eps: float = field(1e-8, help="Adam epsilon of both", min=0.0)
    ema_halflife_steps: float = field(100.0, help="EMA half-life of G in iterations (official: 500k images)", min=0.0)
    ema_rampup: float = field(0.05, help="EMA half-life is at most this fraction of the images seen (0 = off)",
                              min=0.0)


@dataclass
class DistillEvalConfig:
    every: int = field(0, help="write samples.png and log metrics of the EMA generator every N iterations "
                       "(0 = only at the end)", min=0)
    samples: int = field(100, help="images in samples.png (mixtures: points in the scatter plot)", min=0)
    metric_samples: int = field(1000, help="samples scored (fd/accuracy/entropy or exact mixture metrics)", min=0)
    teacher_baseline: bool = field(False, help="also score the teacher (Heun at teacher_nfe and 1-step Euler)")
    teacher_nfe: int = field(35, help="NFE of the teacher baseline's Heun sampler", min=3)
    seed: int = field(12345, help="seed of the evaluation noise")


@dataclass
class DistillRecipe:
    """Recipe of ``genkit distill``."""

    method: Literal["sid", "sida", "sid-lsg"] = field("sid", help="sid, sida (adversarial, real data) or sid-lsg "
                                                      "(guided, conditional teachers)")
    teacher: str = field("", help="teacher: genkit train-diffusion run folder, mixture .yaml or diffusers UNet folder",
                         exists=True)
    sid: SiDConfig = field(default_factory=SiDConfig, help="SiD")
    sida: SiDAConfig = field(default_factory=SiDAConfig, help="SiDA")
    lsg: LSGConfig = field(default_factory=LSGConfig, help="SiD-LSG")
    cond: CondConfig = field(default_factory=CondConfig, help="conditioning")
    mixture: MixtureConfig = field(default_factory=MixtureConfig, help="mixture teachers")
    train: DistillTrainConfig = field(default_factory=DistillTrainConfig, help="optimisation")
    eval: DistillEvalConfig = field(default_factory=DistillEvalConfig, help="evaluation")
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig, help="runtime")

    def validate(self) -> list[str]:
        p = []
        if not self.teacher:
            p.append("teacher: missing (a genkit train-diffusion run, a mixture .yaml or a diffusers UNet folder)")
        p += batch_problems(self.train.batch_size, self.runtime.grad_accum)
        k = (self.lsg.kappa1, self.lsg.kappa2, self.lsg.kappa4)
        if self.method != "sid-lsg" and any(v != 1.0 for v in k):
            p.append(f"lsg.kappa*: guidance scales {k} need method=sid-lsg (method is {self.method})")
        if self.sida.init_generator and self.method != "sida":
            p.append("sida.init_generator: only used with method=sida")
        if self.sida.init_generator and not Path(self.sida.init_generator).exists():
            p.append(f"sida.init_generator: '{self.sida.init_generator}' does not exist")
        if self.sid.ddpm_tmin >= self.sid.ddpm_tmax:
            p.append(f"sid.ddpm_tmin: {self.sid.ddpm_tmin} must be below sid.ddpm_tmax={self.sid.ddpm_tmax}")
        return p


def resolve_schedule(cfg: DistillRecipe, setup):
    """(name, discrete sigmas or None): the noise-level schedule of both losses (see ``SiDConfig.schedule``)."""
    sigmas = setup.ddpm_sigmas
    name = cfg.sid.schedule if cfg.sid.schedule != "auto" else ("ddpm" if sigmas is not None else "edm")
    if name == "edm":
        return name, None
    if sigmas is None:
        raise ConfigError(f"sid.schedule=ddpm: teacher '{cfg.teacher}' has no discrete DDPM schedule (a diffusers "
                          "UNet folder has one); use sid.schedule=edm")
    if cfg.sid.ddpm_tmax > len(sigmas):
        raise ConfigError(f"sid.ddpm_tmax: {cfg.sid.ddpm_tmax} exceeds the teacher's {len(sigmas)} timesteps")
    return name, sigmas


# ----------------------------------------------------------------------------------------- helpers


def ema_decay_at(step: int, t: DistillTrainConfig) -> float:
    """Official ``sid_training_loop.py``: half-life min(halflife, rampup * images seen), as a per-step decay
    (0 at step 0, so the EMA starts as G)."""
    hl = t.ema_halflife_steps
    if t.ema_rampup > 0:
        hl = min(hl, step * t.ema_rampup)
    return 0.5 ** (1.0 / max(hl, 1e-8))


def clean_grads(params, clip_value: float = 0.0) -> None:
    """``nan_to_num`` of every gradient (nan -> 0, +-inf -> +-1e5, official loop), then an optional
    per-value clip (SiDA's f_psi update)."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)
    if clip_value > 0:
        torch.nn.utils.clip_grad_value_(params, clip_value)


def load_real(setup, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SiDA's real data: images in [-1, 1] (+ labels) or exact mixture samples."""
    if setup.mixture is not None:
        g = torch.Generator().manual_seed(cfg.runtime.seed + 991)
        return setup.mixture.sample(cfg.mixture.real_samples, generator=g).float(), None
    from genkit.data.images import load_images

    source = cfg.sida.real or setup.data.get("source") or ""
    if not source:
        raise ConfigError("sida.real: give the real images (an image source or folder) for this teacher")
    shape = tuple(setup.shape)
    folder = Path(source).is_dir()
    data = load_images(source, "train", seed=int(setup.data.get("split_seed", 0) or 0),
                       image_size=shape[-1] if folder else None, channels=shape[0] if folder else 1)
    if tuple(data.shape) != shape:
        raise ConfigError(f"sida.real: '{source}' images are {tuple(data.shape)}, the teacher makes {shape}")
    return data.to_unit(), data.labels


def sid2a_init(cfg: DistillRecipe, setup):
    """SiD2A (SiDA paper): G starts from a SiD generator, which must share this run's network and sigma_init
    (G(z) = D(sigma_init z, sigma_init): another sigma_init would feed it inputs it was never trained on)."""
    from genkit.distill.teachers import load_generator

    init, init_cfg = load_generator(cfg.sida.init_generator)
    if float(init_cfg["sigma_init"]) != float(cfg.sid.sigma_init):
        raise ConfigError(f"sid.sigma_init: {cfg.sid.sigma_init} differs from the {init_cfg['sigma_init']} that "
                          f"'{cfg.sida.init_generator}' was distilled with; set sid.sigma_init="
                          f"{init_cfg['sigma_init']} for SiD2A")
    if init_cfg["net"] != setup.net_config:
        raise ConfigError(f"sida.init_generator: '{cfg.sida.init_generator}' was distilled from another "
                          "network than this teacher")
    return init


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def generate(gen, setup, cond, n: int, seed: int, device="cpu", batch_size: int = 500):
    """``n`` one-step samples (fixed noise of ``seed``) and the class each asks for (conditional)."""
    xs, labels = [], None
    if cond.conditional:
        labels = torch.arange(n) % cond.num_classes
    for b, i in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - i)
        z = torch.randn((m, *setup.shape), generator=step_generator(seed, b, stream=41))
        c = None if labels is None else cond.for_labels(labels[i : i + m]).to(device)
        xs.append(gen(z.to(device), c).float().cpu())
    return torch.cat(xs), labels


def score_samples(x, labels, setup, cond, cfg, ref_masses=None) -> dict:
    """Exact mixture metrics, or the shipped classifier's fd / accuracy / label entropy."""
    if setup.mixture is not None:
        from genkit.eval.mixture import mixture_metrics

        m = mixture_metrics(setup.mixture, x, reference_masses=ref_masses, seed=cfg.eval.seed)
        return {k: m[k] for k in ("sliced_w2", "mode_tv", "log_density", "sliced_w2_floor")}
    from genkit.eval.features import has_classifier

    source = setup.data.get("source", "")
    if not has_classifier(source) or tuple(setup.shape) != _classifier_shape(source):
        return {}
    from genkit.eval.image_metrics import evaluate_images

    res = evaluate_images(x.clamp(-1, 1), source, labels=labels, metrics=("fd", "classify"),
                          split_seed=int(setup.data.get("split_seed", 0) or 0))
    return {k: v for k, v in res.items() if not k.startswith(("class_counts", "n_"))}


def _classifier_shape(source: str) -> tuple:
    from genkit.eval.features import load_classifier

    c = load_classifier(source).config
    return (c.channels, c.img_size, c.img_size)


def save_samples(x, labels, setup, cond, path: Path) -> Path:
    if setup.mixture is None:
        from genkit.data.grid import save_grid

        return save_grid(x.clamp(-1, 1), path, nrow=cond.num_classes if cond.conditional else None)
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genkit.runtime.files import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.5, label="generator")
    mu = setup.mixture.means
    ax.scatter(mu[:, 0], mu[:, 1], s=20, c="r", marker="x", label="mixture means")
    ax.set_aspect("equal")
    ax.legend(loc="upper right", fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


@torch.no_grad()
def teacher_samples(setup, cond, n: int, *, sampler: str, nfe: int, kappa: float = 1.0, seed: int = 0,
                    device="cpu", batch_size: int = 500):
    """The teacher's own samples (``sampler`` at ``nfe`` on the Karras schedule 0.002..80), guided with
    ``kappa`` when conditional; the same labels as :func:`generate`."""
    from genkit.samplers import SAMPLERS, sigmas_for_nfe

    sigmas = sigmas_for_nfe(sampler, nfe, 0.002, 80.0, 7.0).to(device)
    labels = (torch.arange(n) % cond.num_classes) if cond.conditional else None
    xs = []
    for b, i in enumerate(range(0, n, batch_size)):
        m = min(batch_size, n - i)
        x = torch.randn((m, *setup.shape), generator=step_generator(seed, b, stream=43)).to(device) * sigmas[0]
        c = None if labels is None else cond.for_labels(labels[i : i + m]).to(device)
        null = None if c is None else cond.null(m).to(device)

        def den(x_, s_, c_=c, null_=null):
            return guided(setup.teacher, x_, s_, c_, null_, kappa)

        xs.append(SAMPLERS[sampler](den, x.float(), sigmas).float().cpu())
    return torch.cat(xs), labels


# ----------------------------------------------------------------------------------------- the loop


def distill(cfg: DistillRecipe, out: str | Path, *, quiet: bool = False) -> dict:
    from genkit.distill.teachers import build_conditioning, fit_mixture_nets, generator_config, load_setup

    rt = Runtime(cfg.runtime, out, quiet=quiet)
    seed = cfg.runtime.seed
    setup = load_setup(cfg)  # one-line ConfigError for a teacher of the wrong kind
    cond = build_conditioning(setup, cfg)  # ... or a method/teacher mismatch
    schedule, ddpm_sigmas = resolve_schedule(cfg, setup)
    init = sid2a_init(cfg, setup) if cfg.method == "sida" and cfg.sida.init_generator else None
    rt.write_config(cfg)
    if setup.mixture is not None:
        fit_mixture_nets(setup, cfg, rt.out, rt, quiet=quiet or not rt.is_main)
    sida, lsg = cfg.method == "sida", cfg.method == "sid-lsg"
    k1, k2, k4 = (cfg.lsg.kappa1, cfg.lsg.kappa2, cfg.lsg.kappa4) if lsg else (1.0, 1.0, 1.0)
    prompt_dropout = cfg.lsg.prompt_dropout if lsg and (k1 != 1.0 or k2 != 1.0) else 0.0  # official rule
    real_x, real_y = load_real(setup, cfg) if sida else (None, None)
    use_real_labels = sida and cond.kind == "class" and real_y is not None
    s = cfg.sid
    loss_fn = SiDLoss(s.alpha, s.tmax, s.sigma_min, s.sigma_max, s.rho, s.p_mean, s.p_std, normaliser=s.normaliser,
                      ddpm_sigmas=ddpm_sigmas, ddpm_tmin=s.ddpm_tmin, ddpm_tmax=s.ddpm_tmax)
    gen_config = generator_config(cfg, setup, cond)

    # f_psi and G start as the teacher (SiD2A: G from a SiD generator)
    torch.manual_seed(seed)
    fake = trainable_copy(setup.net)
    gen = OneStepGenerator(trainable_copy(setup.net), s.sigma_init)
    if init is not None:
        gen.load_state_dict(init.state_dict())
    t = cfg.train
    opt_f = torch.optim.Adam(fake.parameters(), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)
    opt_g = torch.optim.Adam(gen.parameters(), lr=t.g_lr, betas=(t.g_beta1, t.beta2), eps=t.eps)
    ema = EMA(gen, half_life_steps=max(t.ema_halflife_steps, 1e-8))
    gen_p, fake_p, opt_g, opt_f = rt.prepare(gen, fake, opt_g, opt_f)
    gen_u, fake_u = rt.unwrap(gen_p), rt.unwrap(fake_p)
    teacher = setup.teacher.to(rt.device)
    meta = rt.resume(gen_p, opt_g, ema=ema)  # restores G, f_psi and both optimisers (Accelerate state)
    start = meta["step"] if meta else 0
    prior_seconds = float(meta.get("train_seconds", 0.0)) if meta else 0.0  # training time of earlier sessions
    g_eval = copy.deepcopy(gen_u).eval().requires_grad_(False)  # holds the EMA weights for evaluation
    ref_masses = None
    if setup.mixture is not None:
        from genkit.eval.mixture import reference_mode_masses

        ref_masses = reference_mode_masses(setup.mixture, 200_000, seed=cfg.eval.seed)

    def evaluate() -> dict:
        g_eval.load_state_dict(ema.weights_for(g_eval))
        n = max(cfg.eval.metric_samples, cfg.eval.samples)
        if not n:
            return {}
        x, labels = generate(g_eval, setup, cond, n, cfg.eval.seed, rt.device)
        res = {}
        if cfg.eval.samples:
            k = cfg.eval.samples
            save_samples(x[:k], None if labels is None else labels[:k], setup, cond, rt.out / "samples.png")
        if cfg.eval.metric_samples:
            res = score_samples(x[: cfg.eval.metric_samples], None if labels is None else
                                labels[: cfg.eval.metric_samples], setup, cond, cfg, ref_masses)
        return res

    B, accum = t.batch_size, cfg.runtime.grad_accum
    micro = B // accum
    per_rank = B // rt.world_size  # official batch_gpu_total: losses are sums divided by it
    shape = tuple(setup.shape)
    t0, last = time.time(), {}
    rt.log(start, event="start", method=cfg.method, teacher=str(cfg.teacher), kind=setup.kind, schedule=schedule,
           cond=cond.kind, routing_accuracy=cond.routing_accuracy)
    with rt.progress(t.steps, initial=start, description=f"distill {cfg.method}") as bar:
        for step in range(start, t.steps):
            images_seen = step * B  # official cur_nimg before this iteration
            # ------------------------------------------------------------ 1. fake score f_psi
            gen_u.eval().requires_grad_(False)
            fake_p.train().requires_grad_(True)
            z = torch.randn((B, *shape), generator=step_generator(seed, step, stream=21))
            sig_n = torch.randn((B,), generator=step_generator(seed, step, stream=22))
            noise = torch.randn((B, *shape), generator=step_generator(seed, step, stream=23))
            c, _ = cond.sample(B, step_generator(seed, step, stream=24))
            x_real = None
            if sida:
                idx = batch_indices(len(real_x), B, step, seed)
                x_real = real_x[idx]
                if use_real_labels:
                    c = real_y[idx]
            if prompt_dropout > 0:
                c = cond.drop(c, torch.rand((B,), generator=step_generator(seed, step, stream=25)) < prompt_dropout)
            null = cond.null(B)
            tot_f = tot_d = torch.zeros((), device=rt.device)
            dropped_f = 0
            for a in range(accum):
                rows = torch.arange(a * micro, (a + 1) * micro)[rt.shard(micro)]
                cr = None if c is None else c[rows].to(rt.device)
                nr = None if null is None else null[rows].to(rt.device)
                with rt.no_sync(fake_p, skip=a < accum - 1), rt.autocast():
                    with torch.no_grad():
                        x_g = gen_u(z[rows].to(rt.device), cr)  # the official loop gives G the dropped prompts too
                    if sida:
                        lf, ld, bad = loss_fn.discriminator_loss(fake_p, x_g, x_real[rows].to(rt.device),
                                                                 noise[rows], sig_n[rows], cr)
                        lf_s = lf.sum() * s.loss_scaling / per_rank
                        ld_s = ld.sum() * cfg.sida.loss_scaling_d / per_rank
                        total = lf_s + ld_s
                        tot_d = tot_d + ld_s.detach()
                    else:
                        lf, bad = loss_fn(fake_p, x_g, noise[rows], sig_n[rows], cr, nr, k1)
                        lf_s = total = lf.sum() * s.loss_scaling / per_rank
                    if bad == len(rows):
                        total = total * float("nan")
                    rt.check_finite(total, step)
                    rt.backward(total)
                tot_f = tot_f + lf_s.detach()
                dropped_f += bad
            fake_p.eval().requires_grad_(False)
            clean_grads(fake_u.parameters(), cfg.sida.grad_clip_value if sida else 0.0)
            opt_f.step()
            opt_f.zero_grad(set_to_none=True)

            # ------------------------------------------------------------ 2. generator G
            tot_g = tot_adv = torch.zeros((), device=rt.device)
            dropped_g = 0
            g_active = not (sida and images_seen <= cfg.sida.g_start_images)  # official SiDA warm-up
            if g_active:
                gen_p.train().requires_grad_(True)
                z = torch.randn((B, *shape), generator=step_generator(seed, step, stream=31))
                t_u = torch.rand((B,), generator=step_generator(seed, step, stream=32))
                noise = torch.randn((B, *shape), generator=step_generator(seed, step, stream=33))
                c, _ = cond.sample(B, step_generator(seed, step, stream=34))
                if use_real_labels:
                    c = real_y[batch_indices(len(real_x), B, step, seed + 1)]
                adv_on = sida and images_seen > cfg.sida.adv_start_images
                for a in range(accum):
                    rows = torch.arange(a * micro, (a + 1) * micro)[rt.shard(micro)]
                    cr = None if c is None else c[rows].to(rt.device)
                    nr = None if null is None else null[rows].to(rt.device)
                    with rt.no_sync(gen_p, skip=a < accum - 1), rt.autocast():
                        x_g = gen_p(z[rows].to(rt.device), cr)
                        if sida:
                            lg, adv, bad = loss_fn.generator_loss(teacher, fake_u, x_g, noise[rows], t_u[rows], cr,
                                                                  adversarial=True)
                            lg_s = lg.sum() * s.loss_scaling_g / per_rank
                            adv_s = adv.sum() * cfg.sida.loss_scaling_adv / per_rank
                            total = 0.5 * lg_s + 0.5 * adv_s if adv_on else lg_s
                            tot_adv = tot_adv + adv_s.detach()
                        else:
                            lg, bad = loss_fn.generator_loss(teacher, fake_u, x_g, noise[rows], t_u[rows], cr, nr,
                                                             kappa_fake=k2, kappa_real=k4)
                            lg_s = total = lg.sum() * s.loss_scaling_g / per_rank
                        if bad == len(rows):
                            total = total * float("nan")
                        rt.check_finite(total, step)
                        rt.backward(total)
                    tot_g = tot_g + lg_s.detach()
                    dropped_g += bad
                gen_p.eval().requires_grad_(False)
                clean_grads(gen_u.parameters())
                opt_g.step()
                opt_g.zero_grad(set_to_none=True)

            # ------------------------------------------------------------ 3. EMA, log, evaluate, checkpoint
            ema.decay = ema_decay_at(step, t)
            ema.update(gen_u)
            done = step + 1
            if done % cfg.runtime.log_every == 0 or done == t.steps or done == start + 1:
                last = {"loss_fake": rt.mean(tot_f), "loss_g": rt.mean(tot_g), "g_updated": g_active,
                        "dropped_rows": rt.mean(float(dropped_f + dropped_g)) * rt.world_size,
                        "images": done * B}
                if sida:
                    last.update(loss_d=rt.mean(tot_d), loss_adv=rt.mean(tot_adv))
                rt.log(done, **last)
            bar.update(1, **({"loss_g": last["loss_g"]} if last else {}))
            if cfg.eval.every and done % cfg.eval.every == 0 and done < t.steps:
                if rt.is_main:
                    rt.log(done, event="eval", **evaluate())
                rt.wait()
            if cfg.runtime.checkpoint_every and done % cfg.runtime.checkpoint_every == 0 and done < t.steps:
                rt.save_checkpoint(done, gen_p, opt_g, config=gen_config, ema=ema,
                                   meta={"train_seconds": prior_seconds + time.time() - t0})
    session = time.time() - t0
    train_seconds = prior_seconds + session
    rt.save_checkpoint(t.steps, gen_p, opt_g, config=gen_config, ema=ema, meta={"train_seconds": train_seconds})

    metrics = {"method": cfg.method, "teacher": str(cfg.teacher), "kind": setup.kind, "schedule": schedule,
               "cond": cond.kind,
               "steps": t.steps, "batch_size": B, "generator_params": sum(p.numel() for p in gen_u.parameters()),
               "train_seconds": round(train_seconds, 2),  # all sessions of a resumed run
               "seconds_per_iteration": round(session / (t.steps - start) if t.steps > start
                                              else train_seconds / t.steps, 4)}
    if cond.routing_accuracy is not None:
        metrics["text_routing_accuracy"] = cond.routing_accuracy
    metrics.update({f"final_{k}": v for k, v in last.items() if not isinstance(v, bool)})
    if rt.is_main:
        from genkit.runtime.checkpoint import save_model_folder

        metrics.update(evaluate())
        if cfg.eval.samples:
            metrics["samples_png"] = str(rt.out / "samples.png")
        save_model_folder(rt.out / "model", g_eval.state_dict(), gen_config)  # EMA weights
        if cfg.eval.teacher_baseline and cfg.eval.metric_samples:
            n = cfg.eval.metric_samples
            for name, nfe in (("heun", cfg.eval.teacher_nfe), ("euler", 1)):
                t1 = time.time()
                x, labels = teacher_samples(setup, cond, n, sampler=name, nfe=nfe, kappa=k4, seed=cfg.eval.seed,
                                            device=rt.device)
                tag = f"teacher_{name}_nfe{nfe}"
                metrics.update({f"{tag}_{k}": v for k, v in score_samples(x, labels, setup, cond, cfg,
                                                                          ref_masses).items()})
                metrics[f"{tag}_seconds"] = round(time.time() - t1, 2)
    rt.write_metrics(metrics)
    rt.wait()
    return metrics
