"""Denoisers: everything a sampler sees is ``D(x, sigma, **cond) -> x0``.

Convention (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
arXiv 2206.00364, the "EDM" paper): ``x = x0 + sigma * eps`` (variance exploding), ``D`` returns the
estimate of ``E[x0 | x]``, ``sigma`` is a scalar or one value per sample, ``sigma_data = 0.5``.

This module holds
- :class:`EDMPrecond`, the EDM preconditioning wrapper around a raw network ``F`` (EDM Table 1);
- :class:`GaussianMixtureDenoiser`, an analytic denoiser with exact x0-prediction, score and log-density
  of the sigma-smoothed mixture, used as an exact teacher in tests and benchmarks;
- :class:`NFECounter`, which counts denoiser calls (samplers never count by arithmetic);
- :func:`load_denoiser`, path -> denoiser (mixture YAML, diffusers UNet folder).

Adapters for foreign checkpoints (diffusers UNets) live in ``genkit.models.diffusers_adapter``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genkit.errors import ConfigError

SIGMA_DATA = 0.5


def broadcast_sigma(sigma, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (python float, 0-d or (B,) tensor) -> shape (B, 1, ..., 1) matching ``x`` for broadcasting."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must be a scalar or have shape ({x.shape[0]},), got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


# ---------------------------------------------------------------------------------------------------------
# EDM preconditioning
# ---------------------------------------------------------------------------------------------------------


class EDMPrecond(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1 "Ours" column, Eq. 7):

        D(x, sigma) = c_skip(sigma) * x + c_out(sigma) * F(c_in(sigma) * x, c_noise(sigma))
        c_skip  = sigma_data^2 / (sigma^2 + sigma_data^2)
        c_out   = sigma * sigma_data / sqrt(sigma^2 + sigma_data^2)
        c_in    = 1 / sqrt(sigma^2 + sigma_data^2)
        c_noise = ln(sigma) / 4

    ``model`` is the raw network ``F(x_in, c_noise, **cond)`` with ``c_noise`` of shape (B,). Class labels are
    passed as ``class_labels=`` (only when given, so unconditional nets need not accept the keyword).
    The official code (NVlabs/edm ``training/networks.py::EDMPrecond``) runs F in float32 (or fp16) and
    returns float32; we return ``x``'s dtype.
    """

    def __init__(self, model: nn.Module, sigma_data: float = SIGMA_DATA,
                 sigma_min: float = 0.0, sigma_max: float = float("inf")):
        super().__init__()
        self.model = model
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)  # the range the net was trained on (informative only)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in, c_noise) for a tensor of sigmas (EDM Table 1)."""
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: torch.Tensor, sigma, class_labels: torch.Tensor | None = None, **cond) -> torch.Tensor:
        sigma_b = broadcast_sigma(sigma, x.float())  # (B, 1, ..., 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma_b)
        if class_labels is not None:
            cond["class_labels"] = class_labels
        f_x = self.model(c_in * x.float(), c_noise.flatten(), **cond)  # (B, ...)
        return (c_skip * x.float() + c_out * f_x.float()).to(x.dtype)


# ---------------------------------------------------------------------------------------------------------
# Analytic Gaussian mixture
# ---------------------------------------------------------------------------------------------------------


class GaussianMixtureDenoiser(nn.Module):
    """Exact denoiser for data ``x0 ~ sum_k w_k N(mu_k, C_k)`` (flattened to ``dim`` features).

    The sigma-smoothed density is ``p_sigma(x) = sum_k w_k N(x; mu_k, C_k + sigma^2 I)``. With posterior
    responsibilities ``g_k(x) ∝ w_k N(x; mu_k, C_k + sigma^2 I)``:

        E[x0 | x]        = sum_k g_k (mu_k + C_k (C_k + sigma^2 I)^-1 (x - mu_k))
        grad log p_sigma = sum_k g_k (C_k + sigma^2 I)^-1 (mu_k - x)   (= (E[x0|x] - x) / sigma^2, Tweedie)

    Each C_k is stored by its eigendecomposition ``U_k diag(l_k) U_k^T`` so every sigma (one per sample) costs
    only a change of basis (isotropic mixtures skip even that). All maths runs in float64; outputs come back
    in the input's dtype.
    """

    def __init__(self, means, covs=None, stds=None, weights=None, name: str | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("means must have shape (K, dim)")
        k, d = means.shape
        if (covs is None) == (stds is None):
            raise ValueError("give exactly one of covs (K, dim, dim) or stds (K,) / scalar")
        if covs is not None:
            covs = torch.as_tensor(covs, dtype=torch.float64)
            covs = 0.5 * (covs + covs.transpose(-1, -2))
            evals, evecs = torch.linalg.eigh(covs)  # (K, d), (K, d, d)
            if evals.min() <= 0:
                raise ValueError("every covariance must be positive definite")
        else:
            stds = torch.as_tensor(stds, dtype=torch.float64).expand(k)
            if stds.min() <= 0:
                raise ValueError("every std must be positive")
            evals = (stds ** 2)[:, None].expand(k, d).clone()
            evecs = torch.eye(d, dtype=torch.float64).expand(k, d, d).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or weights.min() <= 0:
            raise ValueError("weights must be K positive numbers")
        self.register_buffer("means", means)
        self.register_buffer("evals", evals)
        self.register_buffer("evecs", evecs)
        self.register_buffer("weights", weights / weights.sum())
        self.name = name
        # isotropic components (C_k = v_k I) take a fast path on (B, K) tensors
        self.isotropic = bool(torch.allclose(evecs, torch.eye(d, dtype=torch.float64).expand(k, d, d))
                              and (evals == evals[:, :1]).all())

    # --- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: dict, source: str = "mixture config") -> "GaussianMixtureDenoiser":
        """Build from a dict (see ``recipes/mixtures/*.yaml``); all problems are reported at once."""
        return cls(**_parse_mixture_config(cfg, source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "GaussianMixtureDenoiser":
        return cls.from_config(_read_yaml(path), source=str(path))

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    @property
    def covs(self) -> torch.Tensor:
        """(K, dim, dim) component covariances."""
        return self.evecs @ torch.diag_embed(self.evals) @ self.evecs.transpose(-1, -2)

    # --- exact quantities ----------------------------------------------------------------------------------
    def _flat(self, x: torch.Tensor, sigma):
        xf = x.reshape(x.shape[0], -1).to(torch.float64)  # (B, d)
        if xf.shape[1] != self.dim:
            raise ValueError(f"mixture has dim {self.dim}, got inputs with {xf.shape[1]} features")
        return xf, broadcast_sigma(sigma, xf).reshape(-1)  # (B, d), (B,)

    def _iso_terms(self, x: torch.Tensor, sigma):
        """Isotropic fast path: shrink factors a_k = v_k / (v_k + sigma^2) and component logits, (B, K)."""
        xf, s = self._flat(x, sigma)
        var = self.evals[:, 0][None] + (s ** 2)[:, None]  # (B, K)
        sq = (xf ** 2).sum(1, keepdim=True) - 2 * xf @ self.means.T + (self.means ** 2).sum(1)[None]  # |x-mu|^2
        log_norm = -0.5 * (sq.clamp_min(0) / var + self.dim * (var.log() + math.log(2 * math.pi)))
        return xf, self.evals[:, 0][None] / var, var, self.weights.log()[None] + log_norm

    def _terms(self, x: torch.Tensor, sigma):
        """Shared pieces: flattened float64 x, eigen-coordinates y, smoothed eigenvalues, component logits."""
        xf, s = self._flat(x, sigma)
        y = torch.einsum("kji,bkj->bki", self.evecs, xf[:, None, :] - self.means[None])  # U_k^T (x - mu_k): (B, K, d)
        lam = self.evals[None] + (s ** 2)[:, None, None]  # eigenvalues of C_k + sigma^2 I: (B, K, d)
        log_norm = -0.5 * ((y ** 2 / lam).sum(-1) + lam.log().sum(-1) + self.dim * math.log(2 * math.pi))  # (B, K)
        logits = self.weights.log()[None] + log_norm  # (B, K)
        return xf, y, lam, logits

    def posterior(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """(B, K) component responsibilities p(k | x_sigma)."""
        terms = self._iso_terms(x, sigma) if self.isotropic else self._terms(x, sigma)
        return terms[3].softmax(-1)

    def forward(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        """E[x0 | x_sigma = x] (conditioning keywords are accepted and ignored)."""
        if self.isotropic:  # sum_k g_k (a_k x + (1 - a_k) mu_k)
            xf, a, _, logits = self._iso_terms(x, sigma)
            post = logits.softmax(-1)  # (B, K)
            x0 = (post * a).sum(1, keepdim=True) * xf + (post * (1 - a)) @ self.means
            return x0.reshape(x.shape).to(x.dtype)
        _, y, lam, logits = self._terms(x, sigma)
        post = logits.softmax(-1)  # (B, K)
        shrunk = torch.einsum("kij,bkj->bki", self.evecs, self.evals[None] / lam * y)  # C_k (C_k+s^2)^-1 (x-mu_k)
        x0 = (post[..., None] * (self.means[None] + shrunk)).sum(1)  # (B, d)
        return x0.reshape(x.shape).to(x.dtype)

    def score(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """grad_x log p_sigma(x), exact."""
        if self.isotropic:  # sum_k g_k (mu_k - x) / (v_k + sigma^2)
            xf, _, var, logits = self._iso_terms(x, sigma)
            pv = logits.softmax(-1) / var  # (B, K)
            return (pv @ self.means - pv.sum(1, keepdim=True) * xf).reshape(x.shape).to(x.dtype)
        _, y, lam, logits = self._terms(x, sigma)
        post = logits.softmax(-1)
        grads = torch.einsum("kij,bkj->bki", self.evecs, -y / lam)  # (C_k + s^2)^-1 (mu_k - x): (B, K, d)
        return (post[..., None] * grads).sum(1).reshape(x.shape).to(x.dtype)

    def log_prob(self, x: torch.Tensor, sigma=0.0) -> torch.Tensor:
        """(B,) log p_sigma(x) in float64 (sigma = 0 gives the data density)."""
        terms = self._iso_terms(x, sigma) if self.isotropic else self._terms(x, sigma)
        return terms[3].logsumexp(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n, dim) exact float64 samples of the data distribution (sigma = 0)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (n,)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        noise = torch.einsum("nij,nj->ni", self.evecs[comp], self.evals[comp].sqrt() * z)
        return self.means[comp] + noise


MIXTURE_KEYS = {"kind", "name", "means", "std", "covs", "weights"}


def _read_yaml(path) -> Any:
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _mixture_means(spec, problems: list[str]) -> torch.Tensor | None:
    """``means:`` is an explicit (K, dim) list, or a layout: ring / grid / random (seeded)."""
    if isinstance(spec, list):
        try:
            means = torch.tensor(spec, dtype=torch.float64)
        except (TypeError, ValueError):
            problems.append("means: must be a list of equal-length lists of numbers")
            return None
        if means.ndim != 2 or means.shape[0] < 1:
            problems.append("means: must be a non-empty list of equal-length lists of numbers")
            return None
        return means
    if not isinstance(spec, dict):
        problems.append("means: must be a list of points or a layout {layout: ring|grid|random, ...}")
        return None
    layout = spec.get("layout")
    allowed = {"ring": {"modes", "radius"}, "grid": {"side", "spacing"}, "random": {"modes", "dim", "scale", "seed"}}
    if layout not in allowed:
        problems.append(f"means.layout: must be one of {sorted(allowed)}, got {layout!r}")
        return None
    extra = set(spec) - allowed[layout] - {"layout"}
    if extra:
        problems.append(f"means: unknown key(s) {sorted(extra)} for layout {layout} (valid: {sorted(allowed[layout])})")
        return None
    if layout == "ring":  # `modes` points evenly spaced on a circle of radius `radius`
        n, radius = int(spec.get("modes", 8)), float(spec.get("radius", 1.0))
        angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
        return radius * torch.stack([angle.cos(), angle.sin()], 1)
    if layout == "grid":  # side x side points, `spacing` apart, centred on 0
        side, spacing = int(spec.get("side", 5)), float(spec.get("spacing", 0.5))
        axis = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
        return torch.cartesian_prod(axis, axis)
    g = torch.Generator().manual_seed(int(spec.get("seed", 0)))  # random: N(0, scale^2 I) means, seeded
    n, dim, scale = int(spec.get("modes", 10)), int(spec.get("dim", 16)), float(spec.get("scale", 1.0))
    return scale * torch.randn(n, dim, generator=g, dtype=torch.float64)


def _parse_mixture_config(cfg, source: str) -> dict:
    if not isinstance(cfg, dict):
        raise ConfigError(f"{source}: a Gaussian mixture must be a mapping with kind: gaussian_mixture")
    problems = []
    if cfg.get("kind") != "gaussian_mixture":
        problems.append(f"kind: must be gaussian_mixture, got {cfg.get('kind')!r}")
    unknown = set(cfg) - MIXTURE_KEYS
    if unknown:
        problems.append(f"unknown key(s) {sorted(unknown)} (valid: {sorted(MIXTURE_KEYS)})")
    means = None
    if "means" in cfg:
        means = _mixture_means(cfg["means"], problems)
    else:
        problems.append("means: missing (a list of points or {layout: ring|grid|random, ...})")
    out: dict = {"means": means, "name": cfg.get("name")}
    k = None if means is None else means.shape[0]
    d = None if means is None else means.shape[1]
    if ("std" in cfg) == ("covs" in cfg):
        problems.append("give exactly one of std: (isotropic, number or one per mode) or covs:")
    elif "std" in cfg:
        std = cfg["std"]
        try:
            std_t = torch.as_tensor(std, dtype=torch.float64)
        except (TypeError, ValueError):
            std_t = None
        if std_t is None or std_t.ndim > 1 or (std_t.ndim == 1 and k is not None and len(std_t) != k) \
                or (std_t <= 0).any():
            problems.append(f"std: must be a positive number or {k} positive numbers")
        else:
            out["stds"] = std_t
    else:
        covs = cfg["covs"]
        if isinstance(covs, dict):  # random SPD covariances: scale^2 * (A A^T / dim + 0.1 I), seeded
            extra = set(covs) - {"layout", "scale", "seed"}
            if covs.get("layout") != "random" or extra:
                problems.append("covs: a mapping must be {layout: random, scale: s, seed: n}")
            elif k is not None:
                g = torch.Generator().manual_seed(int(covs.get("seed", 0)))
                a = torch.randn(k, d, d, generator=g, dtype=torch.float64)
                out["covs"] = float(covs.get("scale", 0.1)) ** 2 * (a @ a.transpose(1, 2) / d + 0.1 * torch.eye(d))
        else:
            try:
                covs_t = torch.as_tensor(covs, dtype=torch.float64)
            except (TypeError, ValueError):
                covs_t = None
            if covs_t is None or (k is not None and covs_t.shape != (k, d, d)):
                problems.append(f"covs: must be {k} matrices of shape {d}x{d}")
            elif torch.linalg.eigvalsh(0.5 * (covs_t + covs_t.transpose(1, 2))).min() <= 0:
                problems.append("covs: every covariance must be positive definite")
            else:
                out["covs"] = covs_t
    if "weights" in cfg:
        try:
            w = torch.as_tensor(cfg["weights"], dtype=torch.float64)
        except (TypeError, ValueError):
            w = None
        if w is None or w.ndim != 1 or (k is not None and len(w) != k) or (w <= 0).any():
            problems.append(f"weights: must be {k} positive numbers (they are normalised to sum to 1)")
        else:
            out["weights"] = w
    if problems:
        raise ConfigError([f"{source}: {p}" for p in problems])
    return out


# ---------------------------------------------------------------------------------------------------------
# NFE counting and loading
# ---------------------------------------------------------------------------------------------------------


class NFECounter:
    """Wraps a denoiser and counts its calls (``calls``) and the rows it was called on (``rows``).

    NFE in genkit is always what this counter saw, never arithmetic on step counts. Other attributes are
    forwarded to the wrapped denoiser.
    """

    def __init__(self, denoiser):
        self.denoiser = denoiser
        self.calls = 0
        self.rows = 0

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        self.calls += 1
        self.rows += x.shape[0]
        return self.denoiser(x, sigma, **cond)

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0

    def __getattr__(self, name):
        if name == "denoiser":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.denoiser, name)


def load_denoiser(path: str | Path, **kwargs):
    """Path -> denoiser ``D(x, sigma, **cond)``.

    - a ``.yaml``/``.yml`` file with ``kind: gaussian_mixture`` -> :class:`GaussianMixtureDenoiser`;
    - a genkit EDM teacher (run folder, checkpoint or model folder of ``genkit train-diffusion``)
      -> ``genkit.diffusion.io.EDMTeacher``;
    - a diffusers ``UNet2DModel``/``UNet2DConditionModel`` folder (or a pipeline folder with ``unet/``)
      -> ``genkit.models.diffusers_adapter.DiffusersDenoiser`` (``kwargs`` go to its loader).
    Anything else is a :class:`ConfigError` saying what was expected.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"model path {p} does not exist")
    if p.is_file() and p.suffix in {".yaml", ".yml"}:
        cfg = _read_yaml(p)
        if not isinstance(cfg, dict) or cfg.get("kind") != "gaussian_mixture":
            raise ConfigError(f"{p} is not a Gaussian-mixture model file (expected 'kind: gaussian_mixture')")
        return GaussianMixtureDenoiser.from_config(cfg, source=str(p))
    if p.is_dir():
        from genkit.diffusion.io import is_edm_teacher_folder, load_edm_teacher
        from genkit.models.diffusers_adapter import is_diffusers_unet_folder, load_diffusers_denoiser

        if is_edm_teacher_folder(p):
            return load_edm_teacher(p)
        if is_diffusers_unet_folder(p):
            return load_diffusers_denoiser(p, **kwargs)
        raise ConfigError(f"{p} is a folder but neither a genkit diffusion teacher (genkit train-diffusion --out) "
                          "nor a diffusers UNet2DModel/UNet2DConditionModel folder")
    raise ConfigError(f"{p} is not a model: expected a mixture .yaml file or a diffusers UNet folder")
