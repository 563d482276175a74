"""``genkit sample``: draw samples from a trained model and save a grid, the arrays and metrics."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

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
    from genkit.flows.lm_train import sample_text, tarflowlm_folder

    if (lm := tarflowlm_folder(ckpt)) is not None:  # TarFlowLM: text samples (cfg/denoise do not apply)
        m = sample_text(lm, n, out, seed=cfg.seed, temperature=cfg.temperature, batch_size=cfg.batch_size)
        typer.echo(f"samples: {out / 'samples.txt'}  ({n} in {m['seconds']:.1f}s)")
        return
    import torch

    from genkit.data.grid import save_grid, save_samples_npz
    from genkit.flows.io import load_flow
    from genkit.flows.tarflow import denoise
    from genkit.flows.train import sample_flow
    from genkit.runtime import Progress, atomic_write_json, software_versions

    model_, info = load_flow(ckpt)
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
