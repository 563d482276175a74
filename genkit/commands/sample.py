"""``genkit sample``: draw samples from a trained model and save a grid, the arrays and metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Literal, Optional

import typer

from genkit.commands.common import ARGS_HELP, DRY_HELP, dry_run, keys_epilog, load_recipe
from genkit.config import field
from genkit.errors import ConfigError


@dataclass
class FlowSampleConfig:
    cfg: float = field(0.0, help="guidance weight: classifier-free for class-conditional flows, "
                       "attention-temperature guidance for unconditional ones (0 = none)")
    denoise: bool = field(False, help="apply the score-based denoising step x + sigma^2 grad log p(x)")
    sigma: float = field(0.0, help="noise level for denoise (0 = the training noise of the run)", min=0.0)
    temperature: float = field(1.0, help="prior temperature: z ~ N(0, T^2 I)", min=0.0)
    seed: int = field(0, help="sampling seed")
    batch_size: int = field(256, help="samples per reverse pass", min=1)
    guidance_kind: Literal["starflow", "tarflow"] = field("starflow", help="STARFlow models: starflow (Gaussian "
                                                          "guidance of arXiv 2506.06276, official cfg 2.5) or tarflow "
                                                          "(extrapolate log-scale and shift), in the deep block")
    annealed: bool = field(False, help="STARFlow: guidance weight x (t+1)/T along the tokens (the official code "
                           "computes this factor and never applies it)")
    prompt: list[str] = field(default_factory=list, help="text STARFlows: prompts, cycled over the samples "
                              "(default: the first training template with each class name)")
    ae: str = field("", help="latent STARFlows: decode with this AutoencoderKL folder instead of the training one "
                    "(e.g. a fine-tuned decoder from genkit train-ae mode=finetune-decoder; then denoise=false)",
                    exists=True)


def sample(
    args: Optional[List[str]] = typer.Argument(None, help=ARGS_HELP, show_default=False),
    ckpt: Optional[Path] = typer.Option(None, "--ckpt", help="a trained flow: run folder, checkpoint or model folder"),
    model: Optional[Path] = typer.Option(None, "--model", help="a diffusion denoiser: genkit teacher folder "
                                         "(train-diffusion), diffusers UNet folder, or a Gaussian-mixture YAML"),
    n: int = typer.Option(64, "--n", min=1, help="number of samples"),
    out: Path = typer.Option(Path("runs/samples"), "--out", "-o", help="output folder"),
    dry_run_: bool = typer.Option(False, "--dry-run", help=DRY_HELP),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
):
    """Sample a trained flow (--ckpt) or a pretrained diffusion denoiser (--model).

    Writes samples.png (image grid, or a scatter plot for 2-D mixtures), samples.npz and metrics.json
    (NFE counted by wrapping the denoiser, seconds, settings; exact metrics for mixtures) to --out.

    Flows: genkit sample --ckpt runs/digits --n 64 cfg=1.5 denoise=true --out runs/digits/samples

    Denoisers: genkit sample --model runs/edm-digits sampler=tada nfe=10 --n 64 --out runs/tada10
    """
    if (ckpt is None) == (model is None):
        raise ConfigError("give exactly one of --ckpt (a trained flow) or --model (a diffusion denoiser)")
    if model is not None:
        return _sample_denoiser(args, model, n, out, dry_run_, quiet)
    cfg = load_recipe(FlowSampleConfig, args)
    if dry_run_:
        dry_run(cfg)
        return
    import torch

    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.flows.io import load_flow
    from genkit.flows.tarflow import denoise
    from genkit.flows.train import sample_flow
    from genkit.runtime import Progress, atomic_write_json, software_versions

    model_, info = load_flow(ckpt)
    if model_.config.to_dict()["model_type"] == "starflow" or cfg.prompt or cfg.ae:
        return _sample_latent(model_, info, cfg, ckpt, n, out, quiet)
    t0 = time.time()
    xs, ys = [], []
    nc = model_.config.num_classes
    with Progress(math.ceil(n / cfg.batch_size), description="sample", enabled=not quiet, unit="batch") as bar:
        for i in range(0, n, cfg.batch_size):
            m = min(cfg.batch_size, n - i)
            labels = (torch.arange(i, i + m) % nc) if nc else None
            x = sample_flow(model_, m, seed=cfg.seed + i, guidance=cfg.cfg, labels=labels,
                            temperature=cfg.temperature)
            if cfg.denoise:
                sigma = cfg.sigma or info.get("noise_sigma", 0.0)
                if sigma <= 0:
                    raise ConfigError("denoise=true needs sigma=... (the run folder does not record its noise level)")
                x = denoise(model_, x, labels, sigma).clamp(-1, 1)
            xs.append(x)
            if labels is not None:
                ys.append(labels)
            bar.update(1)
    x = torch.cat(xs)
    out.mkdir(parents=True, exist_ok=True)
    save_grid(x, out / "samples.png")
    arrays = {"images": x}
    if ys:
        arrays["labels"] = torch.cat(ys)
    save_samples_npz(out / "samples.npz", **arrays)
    seconds = time.time() - t0
    atomic_write_json(out / "metrics.json", {"n": n, "seconds": round(seconds, 3), "samples_per_second": n / seconds,
                                             "ckpt": str(ckpt), **{k: getattr(cfg, k) for k in vars(cfg)},
                                             "versions": software_versions()})
    typer.echo(f"samples: {out / 'samples.png'}  ({n} in {seconds:.1f}s)")


def _sample_latent(model, info: dict, cfg: FlowSampleConfig, ckpt: Path, n: int, out: Path, quiet: bool):
    """STARFlow in a latent space and/or with text: prior -> reverse (deep block first, guided) -> optional
    Tweedie denoising of the latent -> decode with the autoencoder."""
    import torch

    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.flows.train import latents_to_images, sample_flow
    from genkit.runtime import Progress, atomic_write_json, software_versions

    text, latent, nc = info.get("text"), info.get("latent"), model.config.num_classes
    if cfg.prompt and not text:
        what = "class-conditional (labels 0..K-1)" if nc else "not text-conditioned"
        raise ConfigError(f"prompt: this flow is {what}; prompts need a STARFlow trained with text.encoder")
    if cfg.ae and not latent:
        raise ConfigError("ae: this flow models pixels; ae= applies to latent flows only")
    codec = None
    if latent:
        from genkit.models.autoencoder import load_codec

        codec, _ = load_codec(cfg.ae or latent["ae"], scaling_factor=latent["scaling_factor"])
        if int(codec.latent_channels) != model.config.channels:
            raise ConfigError(f"ae: '{cfg.ae or latent['ae']}' has {codec.latent_channels} latent channels, the flow "
                              f"models {model.config.channels}")
    prompts, labels = list(cfg.prompt), None
    if text:
        from genkit.models.text import encode_states, template_prompts

        if not prompts:
            prompts, _ = template_prompts(text["class_names"], text["templates"][:1])
            labels = torch.arange(n) % len(prompts)
        states = encode_states(prompts + [""], text["max_length"], encoder=text["encoder"]).hidden
    elif nc:
        labels = torch.arange(n) % nc
    sigma = (cfg.sigma or info.get("noise_sigma", 0.0)) if cfg.denoise else 0.0
    t0 = time.time()
    xs = []
    with Progress(math.ceil(n / cfg.batch_size), description="sample", enabled=not quiet, unit="batch") as bar:
        for i in range(0, n, cfg.batch_size):
            m = min(cfg.batch_size, n - i)
            rows = torch.arange(i, i + m)
            y = labels[rows] if (labels is not None and nc) else None
            txt = txt_null = None
            if text:
                txt = states[rows % len(prompts)]
                txt_null = states[-1:].expand(m, -1, -1)
            z = sample_flow(model, m, seed=cfg.seed + i, guidance=cfg.cfg, labels=y, temperature=cfg.temperature,
                            txt=txt, txt_null=txt_null, guidance_kind=cfg.guidance_kind, annealed=cfg.annealed,
                            clamp=codec is None)
            if codec is not None:
                x = latents_to_images(model, z, codec, sigma=sigma, labels=y, txt=txt)
            elif sigma > 0:
                from genkit.flows.tarflow import denoise

                x = denoise(model, z, y, sigma, txt=txt).clamp(-1, 1)
            else:
                x = z
            xs.append(x)
            bar.update(1)
    x = torch.cat(xs)
    seconds = time.time() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_grid(x, out / "samples.png")
    arrays = {"images": x}
    if labels is not None:
        arrays["labels"] = labels
    save_samples_npz(out / "samples.npz", **arrays)
    atomic_write_json(out / "metrics.json", {"n": n, "seconds": round(seconds, 3), "samples_per_second": n / seconds,
                                             "ckpt": str(ckpt), "prompts": prompts,
                                             **{k: getattr(cfg, k) for k in vars(cfg)},
                                             "versions": software_versions()})
    typer.echo(f"samples: {out / 'samples.png'}  ({n} in {seconds:.1f}s)")


def _sample_denoiser(args, model: Path, n: int, out: Path, dry: bool, quiet: bool):
    from genkit.samplers.run import DiffusionSampleConfig

    cfg = load_recipe(DiffusionSampleConfig, args)
    if dry:
        dry_run(cfg)
        return
    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.models.denoisers import GaussianMixtureDenoiser, load_denoiser
    from genkit.runtime import Progress, atomic_write_json, software_versions
    from genkit.samplers.run import sample_denoiser

    den = load_denoiser(model)
    with Progress(math.ceil(n / cfg.batch_size), description=f"sample {cfg.sampler}", enabled=not quiet,
                  unit="batch") as bar:
        x, y, info = sample_denoiser(den, n, cfg, progress=bar)
    out.mkdir(parents=True, exist_ok=True)
    metrics = {"n": n, "model": str(model), **info, "settings": {k: getattr(cfg, k) for k in vars(cfg)}}
    if isinstance(den, GaussianMixtureDenoiser):
        from genkit.eval.mixture import mixture_metrics

        metrics.update(mixture_metrics(den, x.double(), seed=cfg.seed))
        if x.shape[1] == 2:
            _scatter(x, den, out / "samples.png")
    else:
        save_grid(x.clamp(-1, 1), out / "samples.png")
    arrays = {"images" if x.dim() == 4 else "samples": x}
    if y is not None:
        arrays["labels"] = y
    save_samples_npz(out / "samples.npz", **arrays)
    metrics["versions"] = software_versions()
    atomic_write_json(out / "metrics.json", metrics)
    typer.echo(f"{cfg.sampler}: {n} samples, {info['nfe']} NFE each, {info['seconds']:.1f}s -> {out}")


def _scatter(x, mixture, path: Path) -> None:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genkit.runtime import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(x[:, 0], x[:, 1], s=2, alpha=0.4, label="samples")
    mu = mixture.means.detach().cpu()
    ax.scatter(mu[:, 0], mu[:, 1], marker="x", c="red", label="modes")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


sample.__doc__ += "\n\n" + keys_epilog(FlowSampleConfig)
