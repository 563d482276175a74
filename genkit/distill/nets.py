"""The three networks of score distillation, all with one signature.

Every network here is a denoiser ``net(x, sigma, cond=None, return_logits=False) -> x0`` (EDM convention,
sigma of shape (B,)); with ``return_logits=True`` it also returns SiDA's discriminator logits, the channel
mean of the encoder's lowest-resolution feature map (SiDA, arXiv 2410.14919, method section; official
``sida_networks.py``: ``x.mean(dim=1, keepdim=True)`` after the encoder), read with a forward hook, so the
discriminator adds no parameters.

- :class:`EDMNet`: EDM preconditioning around a raw network ``F(c_in x, c_noise, class_labels=...)``: the
  genkit UNet of ``genkit train-diffusion`` (encoder = ``conv_in`` + ``enc``; the official SongUNet's
  encoder likewise ends before the decoder's lowest-resolution blocks, which play the role of genkit's
  ``mid``) or :class:`MLPNet` for vector data (encoder = the first half of its blocks; the "feature map" is
  the hidden vector, so the logit map is one number per sample).
- :class:`DiffusersNet`: a diffusers UNet through ``genkit.models.diffusers_adapter`` (encoder = the down
  blocks; logits from the input of ``mid_block``).
- :class:`ExactNet`: an analytic Gaussian mixture (no parameters, no encoder).
- :class:`OneStepGenerator`: ``G(z) = D_theta(sigma_init z, sigma_init, cond)`` (SiD Sec. 4: the generator
  has the teacher's architecture and is evaluated once at the fixed sigma_init = 2.5).

:func:`fit_mlp` trains an :class:`MLPNet` denoiser for an analytic mixture teacher, which has no network to
copy: regression onto the exact denoiser (the initialisation of f_psi and G, so that "initialised from the
teacher" holds up to the fit error) or denoising score matching on a finite sample (a deliberately
imperfect teacher for SiDA).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from genkit.models.denoisers import SIGMA_DATA, broadcast_sigma

# ----------------------------------------------------------------------------------------- raw MLP


class MLPBlock(nn.Module):
    """Pre-norm residual MLP block with an adaptive scale/shift from the noise embedding."""

    def __init__(self, width: int, emb_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.affine = nn.Linear(emb_dim, 4 * width)
        self.fc2 = nn.Linear(2 * width, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.affine(emb).chunk(2, dim=1)  # (B, 2W) each
        return h + self.fc2(F.silu(torch.addcmul(shift, self.fc1(self.norm(h)), scale + 1)))


class MLPNet(nn.Module):
    """Raw network ``F(x_in (B, D), c_noise (B,)) -> (B, D)`` for vector data (mixture teachers).

    ``encoder_out`` (an identity module after the first ``depth // 2`` blocks) is where SiDA reads its
    discriminator features."""

    def __init__(self, dim: int, width: int = 256, depth: int = 4, emb_channels: int = 64):
        super().__init__()
        from genkit.diffusion.networks import NoiseEmbedding

        self.config = {"dim": dim, "width": width, "depth": depth, "emb_channels": emb_channels}
        self.map_noise = NoiseEmbedding(emb_channels, "positional")
        self.map = nn.Sequential(nn.Linear(emb_channels, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList([MLPBlock(width, width) for _ in range(depth)])
        self.encoder_out = nn.Identity()
        self.split = max(1, depth // 2)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels=None) -> torch.Tensor:
        emb = self.map(self.map_noise(c_noise.reshape(-1).expand(x.shape[0])))  # (B, W)
        h = self.inp(x.reshape(x.shape[0], -1))  # (B, W)
        for i, blk in enumerate(self.blocks):
            h = blk(h, emb)
            if i == self.split - 1:
                h = self.encoder_out(h)
        return self.out(F.silu(self.norm(h))).reshape(x.shape)


# ----------------------------------------------------------------------------------------- denoisers


def _encoder_tap(raw: nn.Module) -> nn.Module | None:
    """The module whose output is the encoder's lowest-resolution feature map."""
    from genkit.diffusion.networks import UNet

    if isinstance(raw, UNet):
        return raw.enc[-1][-1]  # last block of the last (lowest-resolution) encoder level, before `mid`
    if isinstance(raw, MLPNet):
        return raw.encoder_out
    return None


class EDMNet(nn.Module):
    """EDM preconditioning (Karras et al. 2022, Table 1) around ``raw``; see the module docstring."""

    def __init__(self, raw: nn.Module, sigma_data: float = SIGMA_DATA, num_classes: int = 0):
        super().__init__()
        self.raw = raw
        self.sigma_data = float(sigma_data)
        self.num_classes = int(num_classes)

    def forward(self, x: torch.Tensor, sigma, cond=None, return_logits: bool = False):
        xf = x.float()
        s = broadcast_sigma(sigma, xf)  # (B, 1, ...)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (s ** 2 + sd2)
        c_out = s * self.sigma_data / (s ** 2 + sd2).sqrt()
        c_in = 1 / (s ** 2 + sd2).sqrt()
        c_noise = s.flatten().log() / 4
        kw = {"class_labels": cond} if (cond is not None and self.num_classes) else {}
        if not return_logits:
            return c_skip * xf + c_out * self.raw(c_in * xf, c_noise, **kw).float()
        store = {}
        tap = _encoder_tap(self.raw)
        if tap is None:
            raise ValueError(f"{type(self.raw).__name__} has no encoder to serve as SiDA's discriminator")
        handle = tap.register_forward_hook(lambda m, i, o: store.__setitem__("h", o))
        try:
            f_x = self.raw(c_in * xf, c_noise, **kw).float()
        finally:
            handle.remove()
        logits = store["h"].float().mean(dim=1, keepdim=True)  # (B, 1, h, w) or (B, 1)
        return c_skip * xf + c_out * f_x, logits


class DiffusersNet(nn.Module):
    """A ``genkit.models.diffusers_adapter.DiffusersDenoiser`` with the common signature.  ``cond`` is
    ``encoder_hidden_states`` (float, (B, L, D)) for UNet2DConditionModel or class labels (ints)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.dd = denoiser

    @property
    def unet(self):
        return self.dd.unet

    def forward(self, x: torch.Tensor, sigma, cond=None, return_logits: bool = False):
        kw = {}
        if cond is not None:
            kw = {"encoder_hidden_states": cond} if cond.is_floating_point() else {"class_labels": cond}
        if not return_logits:
            return self.dd(x.float(), sigma, **kw).float()
        store = {}
        mid = getattr(self.unet, "mid_block", None)
        if mid is not None:  # the mid block's input is the encoder's lowest-resolution output
            handle = mid.register_forward_pre_hook(lambda m, args: store.__setitem__("h", args[0]))
        else:
            handle = self.unet.down_blocks[-1].register_forward_hook(
                lambda m, i, o: store.__setitem__("h", o[0] if isinstance(o, tuple) else o))
        try:
            d = self.dd(x.float(), sigma, **kw).float()
        finally:
            handle.remove()
        return d, store["h"].float().mean(dim=1, keepdim=True)


class ExactNet(nn.Module):
    """An analytic :class:`~genkit.models.denoisers.GaussianMixtureDenoiser` as a (frozen) teacher."""

    def __init__(self, mixture: nn.Module):
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor, sigma, cond=None, return_logits: bool = False):
        if return_logits:
            raise ValueError("the exact mixture denoiser has no encoder")
        return self.mixture(x.float(), broadcast_sigma(sigma, x.float()).flatten()).float()


class OneStepGenerator(nn.Module):
    """``x = G(z, cond) = D_theta(sigma_init z, sigma_init, cond)``, z ~ N(0, I) (SiD Sec. 4 and official
    ``sid_training_loop.py``: ``G(init_sigma * z, init_sigma * ones, labels)``, sigma_init = 2.5)."""

    def __init__(self, net: nn.Module, sigma_init: float = 2.5):
        super().__init__()
        self.net = net
        self.sigma_init = float(sigma_init)

    def forward(self, z: torch.Tensor, cond=None) -> torch.Tensor:
        s = torch.full((z.shape[0],), self.sigma_init, device=z.device, dtype=torch.float32)
        return self.net(self.sigma_init * z.float(), s, cond)


def trainable_copy(net: nn.Module) -> nn.Module:
    """A deep copy in train mode with gradients on (f_psi and G start as the teacher)."""
    c = copy.deepcopy(net)
    c.train().requires_grad_(True)
    return c


def freeze(net: nn.Module) -> nn.Module:
    net.eval().requires_grad_(False)
    return net


# ----------------------------------------------------------------------------------------- MLP fit


def fit_mlp(mixture, *, width: int = 256, depth: int = 4, steps: int = 3000, batch_size: int = 512,
            lr: float = 1e-3, target: str = "exact", samples: int = 0, p_mean: float = -1.2, p_std: float = 1.2,
            seed: int = 0, progress=None) -> EDMNet:
    """An :class:`MLPNet` denoiser (EDM-preconditioned) for a Gaussian-mixture teacher.

    ``target="exact"``: minimise lambda(sigma) ||D_theta(x, sigma) - D*(x, sigma)||^2 with D* the exact
    posterior mean (x = x0 + sigma n, x0 from the mixture, ln sigma ~ N(P_mean, P_std^2)): a regression
    with no target noise, so the fit is limited only by capacity and steps.
    ``target="dsm"``: the EDM denoising loss lambda(sigma) ||D_theta(x, sigma) - x0||^2 on ``samples``
    fixed draws (0 = fresh draws every step): an ordinary, imperfect, learned teacher.
    Adam with a cosine decay to lr/20; everything is seeded."""
    torch.manual_seed(seed)
    net = EDMNet(MLPNet(mixture.dim, width, depth))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed + 17)
    fixed = mixture.sample(samples, generator=g).float() if samples else None
    net.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / max(1, steps))))
        if fixed is None:
            x0 = mixture.sample(batch_size, generator=g).float()
        else:
            x0 = fixed[torch.randint(len(fixed), (batch_size,), generator=g)]
        sigma = (torch.randn(batch_size, generator=g) * p_std + p_mean).exp()
        x = x0 + torch.randn(x0.shape, generator=g) * sigma[:, None]
        with torch.no_grad():
            y = mixture(x.double(), sigma.double()).float() if target == "exact" else x0
        w = (sigma ** 2 + SIGMA_DATA ** 2) / (sigma * SIGMA_DATA) ** 2
        loss = (w[:, None] * (net(x, sigma) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress.update(1, fit_loss=loss.item())
    return net.eval()
