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
from genkit.flows.train import UNCOND_ATTN_TEMP


@dataclass
class FlowSampleConfig:
    cfg: float = field(0.0, help="guidance weight W (0 = none): classifier-free for class-conditional flows, "
                       "attention-temperature guidance for unconditional ones (the second pass at attn_temp)")
    attn_temp: float = field(0.0, help="attention temperature of the guidance pass (0 = auto: 1.0 for "
                             f"class-conditional flows, {UNCOND_ATTN_TEMP} for unconditional ones; official "
                             "default 1.0, which turns unconditional guidance off)", min=0.0)
    guide_what: Literal["a", "b", "ab"] = field("ab", help="what guidance extrapolates: a = log-scales alpha, "
                                                "b = shifts mu, ab = both (official default)")
    cfg_schedule: Literal["constant", "annealed"] = field(
        "constant", help="constant: weight W at every token; annealed: W (i+1)/(T-1) at reverse step i "
        "(what the official evaluate_fid.py always uses)")
    negative_cfg: bool = field(False, help="allow cfg < 0 (guidance away from the label; the official sampler "
                               "ignores negative weights)")
    denoise: bool = field(False, help="score-based denoising x + sigma^2 grad log p(x) before the clip to [-1, 1]; "
                          "exact (Tweedie) for runs trained with data.noise=gaussian")
    sigma: float = field(0.0, help="noise level for denoise (0 = the Gaussian training noise of the run; runs "
                         "trained with uniform dequantization need it set)", min=0.0)
    resample_nonfinite: bool = field(False, help="redraw the noise of samples that come out non-finite (strong "
                                     "guidance can overflow), so all --n images are finite")
    temperature: float = field(1.0, help="prior temperature: z ~ N(0, T^2 I)", min=0.0)
    seed: int = field(0, help="sampling seed")
    batch_size: int = field(256, help="samples per reverse pass", min=1)
    guidance_kind: Literal["starflow", "tarflow"] = field("starflow", help="STARFlow models: starflow (the Gaussian "
                                                          "guidance of arXiv 2506.06276, official cfg 2.5) or tarflow "
                                                          "(extrapolate log-scale and shift), in the deep block only")
    prompt: list[str] = field(default_factory=list, help="text STARFlows: prompts, cycled over the samples "
                              "(default: the first training template with each class name)")
    ae: str = field("", help="latent STARFlows: decode with this AutoencoderKL folder instead of the training one "
                    "(e.g. a decoder fine-tuned by genkit train-ae mode=finetune-decoder; then leave denoise=false)",
                    exists=True)

    def validate(self) -> list[str]:
        if self.cfg < 0 and not self.negative_cfg:
            return [f"cfg: {self.cfg} is negative; use cfg >= 0, or negative_cfg=true to guide away from the label"]
        return []


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

    Flows: genkit sample --ckpt runs/digits-cond --n 100 cfg=2 denoise=true --out runs/digits-cond/cfg2

    Unconditional flows: genkit sample --ckpt runs/digits --n 64 cfg=1 --out runs/digits/cfg1

    STARFlow: genkit sample --ckpt runs/sf-text --n 16 prompt="[a handwritten digit seven]" cfg=2.5 denoise=true
    (latent flows decode with their autoencoder, or with ae=DIR)

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
    from genkit.flows.lm_train import sample_text, tarflowlm_folder

    if (lm := tarflowlm_folder(ckpt)) is not None:  # TarFlowLM: text samples (cfg/denoise do not apply)
        m = sample_text(lm, n, out, seed=cfg.seed, temperature=cfg.temperature, batch_size=cfg.batch_size)
        typer.echo(f"samples: {out / 'samples.txt'}  ({n} in {m['seconds']:.1f}s)")
        return
    import torch

    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.flows.io import load_flow
    from genkit.flows.train import default_attn_temp, latents_to_images, sample_flow
    from genkit.runtime import Progress, atomic_write_json, software_versions

    model_, info = load_flow(ckpt)
    nc = model_.config.num_classes
    text, codec = info.get("text"), _latent_codec(model_, info, cfg)
    if cfg.prompt and not text:
        what = "class-conditional (labels 0..K-1)" if nc else "not text-conditioned"
        raise ConfigError(f"prompt: this flow is {what}; prompts need a STARFlow trained with text.encoder")
    sigma = 0.0
    if cfg.denoise:
        sigma = flow_denoise_sigma(cfg, info)
    prompts, states, prompt_labels = list(cfg.prompt), None, None
    if text:
        from genkit.models.text import encode_states, template_prompts

        if not prompts and not text.get("templates"):
            raise ConfigError("prompt: this flow was trained on its images' captions; give prompt=[...]")
        if not prompts:  # the first training template with every class name: the samples have labels
            prompts, prompt_labels = template_prompts(text["class_names"], text["templates"][:1])
        states = encode_states(prompts + [""], text["max_length"], encoder=text["encoder"]).hidden  # "" last
    t0 = time.time()
    xs, ys = [], []
    stats: dict = {}
    with Progress(math.ceil(n / cfg.batch_size), description="sample", enabled=not quiet, unit="batch") as bar:
        for i in range(0, n, cfg.batch_size):
            m = min(cfg.batch_size, n - i)
            rows = torch.arange(i, i + m)
            labels = (rows % nc) if nc else None
            txt = txt_null = None
            if states is not None:
                txt, txt_null = states[rows % len(prompts)], states[-1:].expand(m, -1, -1)
                if prompt_labels is not None:
                    labels = torch.tensor(prompt_labels)[rows % len(prompts)]
            x = sample_flow(model_, m, seed=cfg.seed + i, guidance=cfg.cfg, labels=labels if nc else None,
                            temperature=cfg.temperature, attn_temp=cfg.attn_temp or None, guide_what=cfg.guide_what,
                            annealed=cfg.cfg_schedule == "annealed", denoise_sigma=0.0 if codec else sigma,
                            resample_nonfinite=cfg.resample_nonfinite, stats=stats, txt=txt, txt_null=txt_null,
                            guidance_kind=cfg.guidance_kind, clamp=codec is None)
            if codec is not None:  # latent flow: Tweedie on the latent (denoise=true), then decode
                x = latents_to_images(model_, x, codec, sigma=sigma, labels=labels if nc else None, txt=txt)
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
                                             "prompts": prompts,
                                             "attn_temp_used": cfg.attn_temp or default_attn_temp(model_),
                                             "denoise_sigma": sigma, "non_finite_samples": stats["non_finite"],
                                             "redrawn_samples": stats["redrawn"],
                                             "versions": software_versions()})
    typer.echo(f"samples: {out / 'samples.png'}  ({n} in {seconds:.1f}s)")


def _latent_codec(model, info: dict, cfg: FlowSampleConfig):
    """The autoencoder that decodes a latent STARFlow's samples (``ae=`` or the training one), else None."""
    latent = info.get("latent")
    if not latent:
        if cfg.ae:
            raise ConfigError("ae: this flow models pixels; ae= applies to latent STARFlows only")
        return None
    from genkit.models.autoencoder import load_codec

    folder = cfg.ae or latent["ae"]
    codec, _ = load_codec(folder, scaling_factor=latent["scaling_factor"])
    if codec.latent_channels != model.config.channels:
        raise ConfigError(f"ae: '{folder}' has {codec.latent_channels} latent channels, the flow models "
                          f"{model.config.channels}")
    return codec


def flow_denoise_sigma(cfg: FlowSampleConfig, info: dict) -> float:
    """sigma of the denoising step: ``sigma=`` if given, else the run's Gaussian training noise. Tweedie's
    x + sigma^2 grad log p(x) is exact only for Gaussian noise, so a uniformly dequantised run (whose noise is
    U(bin), std = bin width / sqrt(12)) is not denoised unless the user sets sigma."""
    if cfg.sigma > 0:
        return cfg.sigma
    if info.get("noise") == "uniform":
        hint = f" (bin width / sqrt(12) = {info['noise_sigma']:.4g})" if info.get("noise_sigma") else ""
        raise ConfigError("denoise=true: this flow was trained with uniform dequantization, where the Tweedie step "
                          f"is not exact; set sigma=...{hint} to apply it anyway, or train with data.noise=gaussian")
    if info.get("noise_sigma", 0.0) <= 0:
        raise ConfigError("denoise=true needs sigma=... (the run folder does not record its noise level)")
    return float(info["noise_sigma"])


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
