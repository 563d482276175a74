"""From a teacher path to the three networks of score distillation, the conditioning, and generator folders.

A teacher is anything ``genkit.models.denoisers.load_denoiser`` takes:

- a genkit EDM teacher (``genkit train-diffusion --out RUN``): f_phi is its UNet (frozen), f_psi and G
  are copies of it (SiD Sec. 4; official ``sid_training_loop.py``: ``copy.deepcopy(true_score)`` twice);
- a diffusers UNet folder: the same, through the VP -> EDM adapter;
- an analytic Gaussian-mixture YAML: it has no network to copy, so an :class:`~genkit.distill.nets.MLPNet`
  denoiser is first fit to it (``genkit.distill.nets.fit_mlp``, saved in ``RUN/init/`` and reused on
  resume); f_psi and G start from that fit, and f_phi is the exact mixture (``mixture.teacher_net=exact``)
  or the fit itself (``mixture.teacher_net=mlp``: a learned, imperfect teacher, e.g. for SiDA).

A finished distillation writes a *generator folder* (``RUN/model/``: ``config.json`` with ``model_type``
``genkit-one-step-generator`` + ``model.safetensors``), loaded by :func:`load_generator`.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from genkit.distill.nets import DiffusersNet, EDMNet, ExactNet, MLPNet, OneStepGenerator, freeze
from genkit.errors import ConfigError

GENERATOR_TYPE = "genkit-one-step-generator"


@dataclass
class Setup:
    """Everything the loop needs to know about the teacher."""

    kind: str  # network family of f_psi and G: "edm-unet", "mlp" or "diffusers"
    teacher: nn.Module  # f_phi, frozen
    net: nn.Module  # the network f_psi and G are copied from
    shape: tuple  # sample shape without the batch dimension
    num_classes: int  # 0 = no class conditioning
    cross_attention_dim: int  # > 0 for text-conditioned diffusers UNets
    data: dict  # the teacher's data facts (source, split_seed, class_names)
    net_config: dict  # enough to rebuild the network from a generator folder
    mixture: object = None  # the exact GaussianMixtureDenoiser for mixture teachers
    ddpm_sigmas: torch.Tensor | None = None  # discrete-time (DDPM-schedule) teachers: sigma_t, t = 0..T-1


def _generator_folder(p: Path) -> Path | None:
    for cand in (p, p / "model"):
        cfg = cand / "config.json"
        if cfg.is_file():
            try:
                if json.loads(cfg.read_text()).get("model_type") == GENERATOR_TYPE:
                    return cand
            except (OSError, json.JSONDecodeError):
                return None
    return None


def load_setup(cfg) -> Setup:
    """Load and check the teacher of recipe ``cfg`` (one-line ConfigError for a wrong kind).  Mixture
    teachers still need :func:`fit_mixture_nets`."""
    from genkit.models.denoisers import GaussianMixtureDenoiser, load_denoiser

    path = Path(cfg.teacher)
    if _generator_folder(path) is not None:
        raise ConfigError(f"teacher '{path}' is a one-step generator from genkit distill, not a diffusion teacher "
                          "(give a genkit train-diffusion run, a mixture .yaml or a diffusers UNet folder)")
    den = load_denoiser(path)
    if isinstance(den, GaussianMixtureDenoiser):
        return _mixture_setup(den, cfg)
    from genkit.diffusion.io import EDMTeacher
    from genkit.models.diffusers_adapter import DiffusersDenoiser

    if isinstance(den, EDMTeacher):
        nc = den.num_classes
        net = EDMNet(den.net, den.sigma_data, nc)
        net_config = {"kind": "edm-unet", "unet": den.net.config.to_dict(), "sigma_data": den.sigma_data,
                      "num_classes": nc}
        return Setup("edm-unet", freeze(copy.deepcopy(net)), net, tuple(den.shape), nc, 0, dict(den.data or {}),
                     net_config)
    if isinstance(den, DiffusersDenoiser):
        from genkit.samplers.run import denoiser_shape

        unet = den.unet.float()
        net = DiffusersNet(den)
        xattn = int(getattr(unet.config, "cross_attention_dim", 0) or 0) \
            if type(unet).__name__ == "UNet2DConditionModel" else 0
        net_config = {"kind": "diffusers", "class_name": type(unet).__name__, "unet": dict(unet.config),
                      "prediction_type": den.prediction_type}
        return Setup("diffusers", freeze(copy.deepcopy(net)), net, denoiser_shape(den), 0, xattn,
                     {"source": "", "class_names": None}, net_config, ddpm_sigmas=den.sigmas.detach().cpu().clone())
    raise ConfigError(f"teacher '{path}' is a {type(den).__name__}; genkit distill takes a genkit EDM teacher, "
                      "a Gaussian-mixture .yaml or a diffusers UNet folder")


def _mixture_setup(mixture, cfg) -> Setup:
    """A mixture teacher: f_phi and the MLP are filled in by :func:`fit_mixture_nets` (after the run
    folder's config.yaml is written)."""
    mlp_cfg = {"dim": mixture.dim, "width": cfg.mixture.width, "depth": cfg.mixture.depth, "emb_channels": 64}
    return Setup("mlp", None, None, (mixture.dim,), 0, 0, {"source": "mixture", "name": mixture.name},
                 {"kind": "mlp", "mlp": mlp_cfg, "sigma_data": 0.5}, mixture=mixture)


def fit_mixture_nets(setup: Setup, cfg, out: Path, rt, *, quiet: bool = True) -> None:
    """Fit (main process, once) or reload ``RUN/init/mlp``: the MLP denoiser f_psi and G start from; f_phi
    is the exact mixture or that MLP (``mixture.teacher_net``)."""
    from genkit.distill.nets import fit_mlp
    from genkit.runtime.checkpoint import save_model_folder
    from genkit.runtime.files import load_safetensors
    from genkit.runtime.progress import Progress

    m, mixture = cfg.mixture, setup.mixture
    folder = out / "init" / "mlp"
    mlp_cfg = setup.net_config["mlp"]
    fit_cfg = {"target": m.fit_target, "steps": m.fit_steps, "batch_size": m.fit_batch, "lr": m.fit_lr,
               "samples": m.fit_samples, "seed": cfg.runtime.seed}
    if rt.is_main and not (folder / "model.safetensors").is_file():
        with Progress(m.fit_steps, description="fit MLP to the teacher", enabled=not quiet) as bar:
            net = fit_mlp(mixture, width=m.width, depth=m.depth, steps=m.fit_steps, batch_size=m.fit_batch,
                          lr=m.fit_lr, target=m.fit_target, samples=m.fit_samples, seed=cfg.runtime.seed,
                          progress=bar)
        save_model_folder(folder, net.state_dict(), {"model_type": "genkit-mlp-denoiser", "mlp": mlp_cfg,
                                                     "fit": fit_cfg, "mixture": mixture.name})
    rt.wait()
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("mlp") != mlp_cfg or saved.get("fit") != fit_cfg:
        raise ConfigError(f"mixture: '{folder}' holds an MLP fit with other settings ({saved.get('mlp')}, "
                          f"{saved.get('fit')}); use another --out or the same mixture.* keys")
    net = EDMNet(MLPNet(**mlp_cfg))
    net.load_state_dict(load_safetensors(folder / "model.safetensors"))
    setup.net = net.eval()
    setup.teacher = freeze(ExactNet(mixture) if m.teacher_net == "exact" else copy.deepcopy(net))


# ----------------------------------------------------------------------------------------- conditioning


class Conditioning:
    """Draws the conditioning of a batch and its unconditional ("null") counterpart.

    kinds: ``none``; ``class`` (labels 0..K-1, null = K); ``text-class`` (template prompts routed to the
    nearest class caption, see ``genkit.models.text``); ``text`` (MiniLM embeddings as a one-token
    ``encoder_hidden_states``, null = the embedding of "")."""

    def __init__(self, kind: str, num_classes: int = 0, prompts=None, prompt_labels=None, table=None,
                 null_embedding=None, routing_accuracy=None):
        self.kind = kind
        self.num_classes = num_classes
        self.prompts = prompts or []
        self.prompt_labels = None if prompt_labels is None else torch.as_tensor(prompt_labels)
        self.table = table  # text-class: (P,) routed labels; text: (P, D) embeddings
        self.null_embedding = null_embedding  # (D,)
        self.routing_accuracy = routing_accuracy

    @property
    def conditional(self) -> bool:
        return self.kind != "none"

    def sample(self, n: int, g: torch.Generator):
        """(cond for the networks, the class each row asks for (for metrics) or None)."""
        if self.kind == "none":
            return None, None
        if self.kind == "class":
            y = torch.randint(self.num_classes, (n,), generator=g)
            return y, y
        p = torch.randint(len(self.prompts), (n,), generator=g)
        return self._rows(p), self.prompt_labels[p]

    def _rows(self, p: torch.Tensor):
        if self.kind == "text-class":
            return self.table[p]
        return self.table[p][:, None, :]  # (n, 1, D)

    def null(self, n: int):
        if self.kind in ("class", "text-class"):
            return torch.full((n,), self.num_classes, dtype=torch.long)
        if self.kind == "text":
            return self.null_embedding[None, None, :].expand(n, 1, -1).clone()
        return None

    def drop(self, cond, mask: torch.Tensor):
        """Rows where ``mask`` is True become unconditional (SiD-LSG prompt dropout)."""
        if cond is None or not mask.any():
            return cond
        null = self.null(cond.shape[0])
        m = mask.reshape(-1, *([1] * (cond.ndim - 1)))
        return torch.where(m, null, cond)

    def for_labels(self, labels: torch.Tensor):
        """Conditioning that asks for class ``labels`` (evaluation): the first prompt written for each."""
        if self.kind == "class":
            return labels
        first = {}
        for i, lab in enumerate(self.prompt_labels.tolist()):
            first.setdefault(lab, i)
        return self._rows(torch.tensor([first[int(v)] for v in labels]))


def build_conditioning(setup: Setup, cfg) -> Conditioning:
    from genkit.models import text as T

    kind = cfg.cond.kind
    cond_ok = setup.num_classes > 0 or setup.cross_attention_dim > 0
    if kind == "auto":
        kind = "class" if setup.num_classes else ("text" if setup.cross_attention_dim else "none")
    if kind != "none" and not cond_ok:
        raise ConfigError(f"cond.kind={cfg.cond.kind}: teacher '{cfg.teacher}' is unconditional")
    if kind == "none" and cfg.method == "sid-lsg":
        raise ConfigError(f"method=sid-lsg needs a conditional teacher (class labels or text); teacher "
                          f"'{cfg.teacher}' is unconditional")
    if kind == "class" and not setup.num_classes:
        raise ConfigError("cond.kind=class: this teacher takes text (encoder_hidden_states), not class labels")
    if kind == "none":
        return Conditioning("none")
    if kind == "class":
        return Conditioning("class", setup.num_classes)
    if setup.cross_attention_dim and setup.cross_attention_dim != T.EMBED_DIM:
        raise ConfigError(f"cond.kind=text: the teacher's cross_attention_dim is {setup.cross_attention_dim}, "
                          f"the MiniLM text encoder gives {T.EMBED_DIM}")
    k = setup.num_classes or int(cfg.cond.num_classes)
    if not k:
        raise ConfigError("cond.num_classes: give the number of classes the text templates name")
    names = list(cfg.cond.class_names) or T.class_names_for(setup.data, k)
    if len(names) != k:
        raise ConfigError(f"cond.class_names: {len(names)} names for {k} classes")
    prompts, labels = T.template_prompts(names, list(cfg.cond.templates))
    emb = T.encode_prompts(prompts + [""])
    if setup.num_classes:  # route prompts to the class teacher's labels
        captions = [cfg.cond.templates[0].format(name=n, index=i) for i, n in enumerate(names)]
        routed = T.route_to_classes(emb[:-1], T.encode_prompts(captions))
        acc = float((routed == torch.tensor(labels)).double().mean())
        return Conditioning("text-class", k, prompts, labels, routed, routing_accuracy=acc)
    return Conditioning("text", k, prompts, labels, emb[:-1], emb[-1])


# ----------------------------------------------------------------------------------------- generator folders


def build_net(net_config: dict) -> nn.Module:
    """An untrained network of the family described by a generator folder's ``net`` entry."""
    kind = net_config["kind"]
    if kind == "edm-unet":
        from genkit.diffusion.networks import UNet, UNetConfig

        return EDMNet(UNet(UNetConfig.from_dict(net_config["unet"])), net_config["sigma_data"],
                      net_config.get("num_classes", 0))
    if kind == "mlp":
        return EDMNet(MLPNet(**net_config["mlp"]), net_config["sigma_data"])
    if kind == "diffusers":
        import diffusers

        from genkit.models.diffusers_adapter import DiffusersDenoiser

        ucfg = {k: v for k, v in net_config["unet"].items() if not k.startswith("_")}
        unet = getattr(diffusers, net_config["class_name"]).from_config(ucfg)
        return DiffusersNet(DiffusersDenoiser(unet, torch.full((1000,), 0.5), net_config["prediction_type"]))
    raise ConfigError(f"unknown generator network kind '{kind}'")


def generator_config(cfg, setup: Setup, cond: Conditioning) -> dict:
    return {"model_type": GENERATOR_TYPE, "method": cfg.method, "sigma_init": cfg.sid.sigma_init,
            "shape": list(setup.shape), "num_classes": cond.num_classes if cond.conditional else 0,
            "cond": {"kind": cond.kind, "templates": list(cfg.cond.templates)}, "teacher": str(cfg.teacher),
            "data": setup.data, "net": setup.net_config}


def load_generator(path: str | Path, device="cpu") -> tuple[OneStepGenerator, dict]:
    """A generator folder (``RUN``, ``RUN/model`` or a checkpoint's ``model/``) -> (G in eval mode, config)."""
    from genkit.runtime.checkpoint import find_latest_checkpoint
    from genkit.runtime.files import load_safetensors

    p = Path(path)
    folder = _generator_folder(p)
    if folder is None:
        ck = find_latest_checkpoint(p)
        folder = _generator_folder(ck / "model") if ck is not None else None
    if folder is None:
        raise ConfigError(f"'{p}' holds no one-step generator (expected config.json with model_type {GENERATOR_TYPE})")
    config = json.loads((folder / "config.json").read_text())
    gen = OneStepGenerator(build_net(config["net"]), config["sigma_init"])
    sd = load_safetensors(folder / "model.safetensors")
    missing, unexpected = gen.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ConfigError(f"'{folder}' does not match its config.json (missing {list(missing)[:3]}, "
                          f"unexpected {list(unexpected)[:3]})")
    return gen.to(device).eval(), config
