"""TarFlowLM: language modelling with Transformer autoregressive flows in a continuous latent space.

Zhang, Zhai, Gu, Zhang, Zheng, Chen, Bautista, Susskind, Jaitly, "Flexible Language Modeling in Continuous
Space with Transformer-based Autoregressive Flows", arXiv 2507.00425 (NeurIPS 2025). There is no public
code, and the paper body could not be read from this machine (only its abstract and third-party summaries of
Sec. 3): this module implements the model as genkit issue 19 specifies it; every choice neither source fixes
is marked "genkit choice" below.

The model (a VAE whose prior is a normalizing flow):

* encoder, per token, with a learned codebook {mu_k in R^d, sigma_k > 0}_{k<V}:
      q(z_t | x_t = k) = N(z_t; mu_k, sigma_k^2 I);
* tied decoder:  p(x_t = k | z_t) = N(z_t; mu_k, sigma_k^2 I) / sum_j N(z_t; mu_j, sigma_j^2 I)
  (a uniform prior over tokens inside the decoder; genkit choice where the summaries only say "tied");
* prior p(z_{1:T}): a stack of autoregressive flow layers over the token sequence, alternating direction
  (layer 0, on the data side, runs left to right; layer 1 right to left; ...), N(0, I) on top;
* training maximises the ELBO  E_q[ log p(x|z) + log p(z) - log q(z|x) ]  with one reparameterised sample
  z = mu_x + sigma_x * eps; bits per character = -ELBO / (T ln 2).

A flow layer reads the tokens before t (after its own direction permutation) with a causal Transformer made
of TarFlow's blocks (`genkit.flows.tarflow.AttentionBlock`) and transforms token t. Layer kinds
(`arch.layers`):

* ``affine`` -- TarFlow's: u_t = (z_t - m_t) * exp(-a_t), log-det = -sum a_t; the d dimensions of a token
  are transformed independently given the earlier tokens.
* ``mix1``  -- a K-component Gaussian mixture per scalar, autoregressive over the scalars of a token
  (a MADE-style masked head next to the Transformer context):
      F(y) = sum_k w_k Phi((y - m_k) / s_k),  u = Phi^-1(F(y)),  log-det = log p_mix(y) - log N(u; 0, 1);
  inverted by bisection (F is increasing).
* ``mixd``  -- only as layer 0 (the data side): the Transformer gives V mixture weights pi(z_<t) over the
  codebook Gaussians, p(z_t | z_<t) = sum_k pi_k N(z_t; mu_k, sigma_k^2 I), made invertible dimension by
  dimension: dimension j is Gaussianised with the 1-D mixture whose weights are updated by Bayes' rule,
      w_k^(j) proportional to pi_k prod_{i<j} N(z_{t,i}; mu_{k,i}, sigma_k^2),
  so log-det = log sum_k pi_k N(z_t; mu_k, sigma_k^2 I) - sum_j log N(u_j). With this layer alone and a
  small sigma the ELBO equals log pi_{x_t}(mu_{x_<t}): the cross-entropy of an autoregressive LM (the
  paper's reduction; `tests/flows/test_tarflowlm.py` checks it to 1e-3 bits).

Further structure (as the issue describes the paper):

* patches (`patch_size` P): P consecutive tokens form one flow token of P*d scalars; the Transformer
  conditions on earlier patches and the P tokens of a patch are generated jointly (block-wise generation).
  Inside a patch ``mix1`` is autoregressive over all P*d scalars and ``mixd`` over the P tokens (genkit
  choice: token p of a patch gets its weights pi from the earlier patches and tokens < p of its patch).
* even/odd channel mixing: every layer but the first reorders the d latent dimensions of each token to
  (0, 2, 4, ..., 1, 3, ...) on entry (genkit choice of where: the data-side layer keeps the codebook's
  order, which ``mixd`` needs).
* token 0: each layer reads a learned start vector before the first token, so token 0 is transformed
  with unconditional parameters (genkit choice; TarFlow passes its first patch through unchanged).
* numerics: the mixture maths runs in float32 or float64 (never bf16, even under autocast); CDFs are
  carried as log F and log(1 - F) from `log_ndtr`, Phi^-1 is taken on the smaller tail and polished by
  Newton steps on log_ndtr, and u is clamped to |u| <= U_CLAMP.

Generation (`sample`): u ~ N(0, T I) on top, each layer inverted patch by patch (one Transformer call per
patch with a KV cache; a patch's scalars by bisection inside it), z decoded with the tied decoder (argmax,
or a draw from p(x|z)). Multi-pass: `sample(..., passes=True)` also returns the state after each layer's
pass decoded with the tied decoder (the literal reading of the issue; see the README for what could not be
checked against the paper).

Shape letters: B batch, T tokens, S = T / P flow tokens (patches), P tokens per patch, d latent dims,
D = P * d scalars per patch, C Transformer width, V vocabulary, K mixture components.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from genkit.config import model_config_from_dict
from genkit.errors import ConfigError
from genkit.flows.mixture_cdf import (
    LOG_SQRT_2PI,
    U_CLAMP,
    _up,
    mixd_gaussianize,
    mixd_invert,
    mixture_gaussianize,
    mixture_invert,
    ndtri_lower,
    normal_logpdf,
    phi_inverse,
)
from genkit.flows.tarflow import AttentionBlock

__all__ = ["TarFlowLM", "TarFlowLMConfig", "LMFlowLayer", "MaskedHead", "LAYER_KINDS", "LOG_SQRT_2PI", "U_CLAMP",
           "mixd_gaussianize", "mixd_invert", "mixture_gaussianize", "mixture_invert", "ndtri_lower",
           "normal_logpdf", "phi_inverse"]

MODEL_TYPE = "tarflowlm"
LAYER_KINDS = ("affine", "mix1", "mixd")
LOG_S_MIN, LOG_S_MAX = -9.0, 5.0  # bounds of the mixture log-scales of mix1


@dataclass
class TarFlowLMConfig:
    """Hyper-parameters of a TarFlowLM (what `config.json` holds)."""

    vocab_size: int = 27  # V
    seq_len: int = 64  # T tokens per sequence
    latent_dim: int = 5  # d (paper: 5 on text8)
    patch_size: int = 1  # P tokens per flow token (block-wise generation)
    layers: list = field(default_factory=lambda: ["mixd", "mix1", "mix1"])  # flow layers, data side first
    layers_per_block: int = 2  # Transformer blocks per flow layer
    channels_model: int = 128  # Transformer width C
    head_dim: int = 32  # channels per attention head
    expansion: int = 4  # MLP width = expansion * C
    dropout: float = 0.0
    components: int = 16  # K of mix1
    head_hidden: int = 64  # hidden width of the within-patch masked head (0 = channels_model)
    channel_mix: bool = True  # even/odd reordering of the latent dims between layers
    sigma_init: float = 0.1  # initial encoder std of every token
    codebook_std: float = 1.0  # std of the initial codebook means

    def __post_init__(self):
        self.layers = [str(k) for k in self.layers]
        p = []
        if not self.layers:
            p.append("layers is empty: give at least one of " + ", ".join(LAYER_KINDS))
        bad = [k for k in self.layers if k not in LAYER_KINDS]
        if bad:
            p.append(f"layers: unknown kind(s) {bad}; use {', '.join(LAYER_KINDS)}")
        if "mixd" in self.layers[1:]:
            p.append("layers: mixd uses the codebook Gaussians, so it can only be the first (data-side) layer")
        if self.seq_len % self.patch_size:
            p.append(f"seq_len={self.seq_len} is not a multiple of patch_size={self.patch_size}")
        if self.channels_model % self.head_dim:
            p.append(f"channels_model={self.channels_model} is not a multiple of head_dim={self.head_dim}")
        for name in ("vocab_size", "seq_len", "latent_dim", "patch_size", "layers_per_block", "components"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sigma_init <= 0 or self.codebook_std <= 0:
            p.append("sigma_init and codebook_std must be > 0")
        if p:
            raise ConfigError(p)

    @property
    def num_patches(self) -> int:  # S
        return self.seq_len // self.patch_size

    @property
    def patch_dim(self) -> int:  # D
        return self.patch_size * self.latent_dim

    def to_dict(self) -> dict:
        return {"model_type": MODEL_TYPE, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TarFlowLMConfig:
        return model_config_from_dict(cls, d, MODEL_TYPE, "TarFlowLM")


# ---------------------------------------------------------------------------------------------- the layers
class MaskedHead(nn.Module):
    """Parameters of the scalars of a patch from the Transformer context h (..., C) and, autoregressively,
    from the patch's own earlier values x (..., D): a one-hidden-layer MADE (Germain et al. 2015) whose
    hidden units also read h. Input i has degree in_deg[i] >= 1, output group o has degree out_deg[o] >= 1,
    and output o sees input i iff in_deg[i] < out_deg[o]. Without such dependencies it is one linear map of
    h (TarFlow's `proj_out`). The last layer starts at zero (its bias sets the initial parameters)."""

    def __init__(self, C: int, in_deg: list[int], out_deg: list[int], n_params: int, hidden: int):
        super().__init__()
        self.groups, self.n = len(out_deg), n_params
        self.made = max(out_deg) > 1
        if self.made:
            h_deg = torch.arange(hidden) % max(out_deg)  # degrees 0 .. max(out_deg) - 1
            m_in = (torch.tensor(in_deg)[None, :] <= h_deg[:, None]).float()  # (H, D)
            m_out = (h_deg[None, :] < torch.tensor(out_deg)[:, None]).float()  # (O, H)
            self.register_buffer("mask_in", m_in, persistent=False)
            self.register_buffer("mask_out", m_out.repeat_interleave(n_params, 0), persistent=False)
            self.ctx = nn.Linear(C, hidden)
            self.inp = nn.Linear(len(in_deg), hidden, bias=False)
            self.out = nn.Linear(hidden, self.groups * n_params)
        else:
            self.out = nn.Linear(C, self.groups * n_params)  # (..., O * n)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, h, x=None):
        if self.made:
            a = self.ctx(h) + F.linear(x.to(h.dtype), self.inp.weight * self.mask_in)  # (..., H)
            out = F.linear(F.gelu(a), self.out.weight * self.mask_out, self.out.bias)  # (..., O * n)
        else:
            out = self.out(h)  # (..., O * n)
        return out.unflatten(-1, (self.groups, self.n))  # (..., O, n)


class LMFlowLayer(nn.Module):
    """One autoregressive flow layer over patches: TarFlow blocks for the context, a head for the kind."""

    def __init__(self, cfg: TarFlowLMConfig, kind: str, index: int):
        super().__init__()
        C, S, D, P, d = cfg.channels_model, cfg.num_patches, cfg.patch_dim, cfg.patch_size, cfg.latent_dim
        self.kind, self.flip, self.P, self.d, self.K = kind, index % 2 == 1, P, d, cfg.components
        self.mix_channels = cfg.channel_mix and index > 0 and d > 1
        perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv_perm", torch.argsort(perm), persistent=False)
        self.proj_in = nn.Linear(D, C)
        self.start = nn.Parameter(torch.randn(C) * 1e-2)  # read before the first patch
        self.pos_embed = nn.Parameter(torch.randn(S, C) * 1e-2)  # (S, C)
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(C, cfg.head_dim, cfg.expansion, cfg.dropout) for _ in range(cfg.layers_per_block))
        self.register_buffer("attn_mask", torch.ones(S, S, dtype=torch.bool).tril(), persistent=False)
        hidden = cfg.head_hidden or C
        if kind == "affine":  # (a, m) per scalar from the context only
            self.head = MaskedHead(C, [1] * D, [1] * D, 2, hidden)
        elif kind == "mix1":  # (logit, mean, log-scale) x K per scalar, autoregressive over the D scalars
            self.head = MaskedHead(C, list(range(1, D + 1)), list(range(1, D + 1)), 3 * self.K, hidden)
            # symmetry breaking that keeps the layer close to the identity: means spread over [-1/2, 1/2],
            # scales shrunk so that the mixture's variance is 1
            spread = torch.linspace(-0.5, 0.5, self.K) if self.K > 1 else torch.zeros(1)
            log_s = 0.5 * math.log(max(1e-3, 1.0 - float(spread.var(unbiased=False))))
            bias = torch.cat([torch.zeros(self.K), spread, torch.full((self.K,), log_s)])
            with torch.no_grad():
                self.head.out.bias.copy_(bias.repeat(D))
        else:  # mixd: V logits per token, autoregressive over the P tokens of a patch
            self.head = MaskedHead(C, [p + 1 for p in range(P) for _ in range(d)], list(range(1, P + 1)),
                                   cfg.vocab_size, hidden)

    # -- pieces -------------------------------------------------------------------------------------------
    def permute(self, x, dim: int = 1):
        return x.flip(dim) if self.flip else x

    def mix_in(self, x):  # (B, S, D) with the d dims of each token reordered even/odd
        return x.unflatten(-1, (self.P, self.d))[..., self.perm].flatten(-2) if self.mix_channels else x

    def mix_out(self, x):
        return x.unflatten(-1, (self.P, self.d))[..., self.inv_perm].flatten(-2) if self.mix_channels else x

    def context(self, x):
        """h (B, S, C): row s summarises patches < s (the start vector, then patches 0..S-2)."""
        B, S, _ = x.shape
        e = self.proj_in(x[:, :-1])  # (B, S-1, C)
        h = torch.cat([self.start.expand(B, 1, -1).to(e.dtype), e], 1) + self.permute(self.pos_embed, 0)[:S]
        for blk in self.attn_blocks:
            h = blk(h, self.attn_mask[:S, :S])  # (B, S, C)
        return h

    def transform(self, x, h, flow):
        """Forward transform of patches x (..., D) given their context h (..., C) -> u (..., D), logdet (...)."""
        params = self.head(h, x)
        if self.kind == "affine":
            a, m = _up(params[..., 0]), _up(params[..., 1])  # (..., D)
            return (_up(x) - m) * torch.exp(-a), -a.sum(-1)
        if self.kind == "mix1":
            p = _up(params)  # (..., D, 3K)
            logw, m, log_s = torch.log_softmax(p[..., :self.K], -1), p[..., self.K:2 * self.K], \
                p[..., 2 * self.K:].clamp(LOG_S_MIN, LOG_S_MAX)
            u, ld = mixture_gaussianize(_up(x), logw, m, log_s)  # (..., D)
            return u, ld.sum(-1)
        z = _up(x).unflatten(-1, (self.P, self.d))  # (..., P, d)
        u, ld = mixd_gaussianize(z, _up(params), _up(flow.mu), _up(flow.log_sigma))  # (..., P, d), (..., P)
        return u.flatten(-2), ld.sum(-1)

    def invert(self, u, h, flow):
        """Inverse of `transform` for one patch: u (B, D), h (B, C) -> x (B, D)."""
        if self.kind == "affine":
            params = self.head(h)
            return u * torch.exp(_up(params[..., 0])) + _up(params[..., 1])
        x = torch.zeros_like(u)
        if self.kind == "mix1":
            for q in range(u.shape[-1]):  # scalar q depends on scalars < q of the patch
                p = _up(self.head(h, x)[:, q])  # (B, 3K)
                logw = torch.log_softmax(p[:, :self.K], -1)
                log_s = p[:, 2 * self.K:].clamp(LOG_S_MIN, LOG_S_MAX)
                x[:, q] = mixture_invert(u[:, q], logw, p[:, self.K:2 * self.K], log_s)
            return x
        mu, log_sigma = _up(flow.mu), _up(flow.log_sigma)
        for p in range(self.P):  # token p of the patch depends on tokens < p
            sl = slice(p * self.d, (p + 1) * self.d)
            x[:, sl] = mixd_invert(u[:, sl], _up(self.head(h, x)[:, p]), mu, log_sigma)
        return x

    # -- the flow -----------------------------------------------------------------------------------------
    def forward(self, x, flow):
        """x (B, S, D) -> u (B, S, D), logdet (B,)."""
        x = self.permute(self.mix_in(x))
        u, ld = self.transform(x, self.context(x), flow)  # (B, S, D), (B, S)
        return self.permute(u), ld.sum(-1)

    @torch.no_grad()
    def reverse(self, u, flow):
        """u (B, S, D) -> x (B, S, D): patch by patch, one Transformer call each through a KV cache."""
        u = self.permute(_up(u))
        B, S, D = u.shape
        x = torch.zeros_like(u)
        pos = self.permute(self.pos_embed, 0)
        caches = [{} for _ in self.attn_blocks]
        for s in range(S):
            h = (self.start.expand(B, 1, -1) if s == 0 else self.proj_in(x[:, s - 1:s].to(self.start.dtype)))
            h = h + pos[s:s + 1]
            for blk, cache in zip(self.attn_blocks, caches):
                h = blk(h, None, 1.0, cache)  # (B, 1, C)
            x[:, s] = self.invert(u[:, s], h[:, 0], flow)
        return self.mix_out(self.permute(x))


class TarFlowLM(nn.Module):
    """Codebook (encoder + tied decoder) and the flow prior. See the module docstring."""

    def __init__(self, config: TarFlowLMConfig):
        super().__init__()
        self.config = c = config
        self.mu = nn.Parameter(torch.randn(c.vocab_size, c.latent_dim) * c.codebook_std)  # (V, d)
        self.log_sigma = nn.Parameter(torch.full((c.vocab_size,), math.log(c.sigma_init)))  # (V,)
        self.layers = nn.ModuleList(LMFlowLayer(c, kind, i) for i, kind in enumerate(c.layers))
        self.active_layers = len(self.layers)  # progressive training uses the first n only
        self.frozen_layers = 0  # ... and runs the first n of those (and the codebook if n > 0) without grad

    # -- shapes -------------------------------------------------------------------------------------------
    def patchify(self, z):  # (B, T, d) -> (B, S, D)
        return z.reshape(z.shape[0], -1, self.config.patch_dim)

    def unpatchify(self, x):  # (B, S, D) -> (B, T, d)
        return x.reshape(x.shape[0], -1, self.config.latent_dim)

    # -- encoder / decoder --------------------------------------------------------------------------------
    def encode(self, ids, eps):
        """z = mu_x + sigma_x eps (B, T, d) and log q(z | x) (B,)."""
        d = self.config.latent_dim
        mu, ls = _up(self.mu)[ids], _up(self.log_sigma)[ids]  # (B, T, d), (B, T)
        z = mu + torch.exp(ls).unsqueeze(-1) * _up(eps)
        log_q = (normal_logpdf(_up(eps)).sum(-1) - d * ls).sum(-1)
        return z, log_q

    def decoder_log_probs(self, z):
        """log p(x_t = k | z_t) (B, T, V) of the tied decoder."""
        mu, ls = _up(self.mu), _up(self.log_sigma)
        sq = (_up(z).pow(2).sum(-1, keepdim=True) - 2 * _up(z) @ mu.t() + mu.pow(2).sum(-1))  # (B, T, V)
        logits = -0.5 * sq.clamp_min(0) * torch.exp(-2 * ls) - self.config.latent_dim * ls
        return torch.log_softmax(logits, -1)

    # -- the flow prior -----------------------------------------------------------------------------------
    def forward(self, z, y=None, *, eps=None):
        """genkit's flow interface on latents: z (B, T, d) -> u (B, T, d), logdet (B,) through the active
        layers, data side first; `y` is unused (unconditional). `model(ids, eps=eps)` instead returns the
        ELBO terms of token ids (B, T) (see `elbo`): the training entry point, so that DDP sees a forward."""
        if eps is not None:
            return self.elbo(z, eps)
        x = self.patchify(_up(z))
        logdet = x.new_zeros(x.shape[0])
        for i, layer in enumerate(self.layers[:self.active_layers]):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i >= self.frozen_layers):
                x, ld = layer(x, self)
            logdet = logdet + ld
        return self.unpatchify(x), logdet

    def prior_log_prob(self, z):
        """log p(z) (B,) = log N(u; 0, I) + logdet."""
        u, logdet = self(z)
        return normal_logpdf(u).flatten(1).sum(1) + logdet

    def elbo(self, ids, eps):
        """Per-sequence ELBO terms in nats, each (B,): (elbo, reconstruction log p(x|z), log p(z), log q)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.frozen_layers == 0):
            z, log_q = self.encode(ids, eps)
            rec = self.decoder_log_probs(z).gather(-1, ids.unsqueeze(-1)).squeeze(-1).sum(-1)
        log_pz = self.prior_log_prob(z)
        return rec + log_pz - log_q, rec, log_pz, log_q

    # -- generation ---------------------------------------------------------------------------------------
    def decode(self, z, generator=None):
        """Token ids (B, T) from latents: argmax of the tied decoder, or a draw from it with a generator."""
        logp = self.decoder_log_probs(z)
        if generator is None:
            return logp.argmax(-1)
        B, T, V = logp.shape
        return torch.multinomial(logp.exp().view(-1, V).cpu(), 1, generator=generator).view(B, T).to(z.device)

    def data_layout(self, x, upto: int):
        """The state that enters layer `upto` (B, S, D) put back into the codebook's dimension order (the
        even/odd reorderings of layers 1..upto-1 undone), as (B, T, d)."""
        for layer in reversed(self.layers[:upto]):
            x = layer.mix_out(x)
        return self.unpatchify(x)

    @torch.no_grad()
    def reverse(self, u, y=None, *, passes: bool = False):
        """Invert the prior: u (B, T, d) -> z (B, T, d); with passes=True also the list of states after each
        layer's pass (top layer first), each in the codebook layout (B, T, d)."""
        x = self.patchify(_up(u))
        states = []
        for i in reversed(range(self.active_layers)):
            x = self.layers[i].reverse(x, self)
            if passes:
                states.append(self.data_layout(x, i))
        z = self.unpatchify(x)
        return (z, states) if passes else z

    @torch.no_grad()
    def sample(self, n: int, *, generator=None, temperature: float = 1.0, passes: bool = False,
               device="cpu"):
        """n token sequences (n, T); with passes=True also the decoded state after each pass (list of (n, T))."""
        c = self.config
        u = torch.randn((n, c.seq_len, c.latent_dim), generator=generator, dtype=torch.float64)
        u = (temperature * u).to(device=device, dtype=_up(self.mu).dtype)
        if not passes:
            return self.decode(self.reverse(u))
        z, states = self.reverse(u, passes=True)
        return self.decode(z), [self.decode(s) for s in states]

    # -- checkpoints --------------------------------------------------------------------------------------
    def save_pretrained(self, folder) -> Path:
        from genkit.runtime.checkpoint import save_model_folder

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return save_model_folder(folder, state, self.config.to_dict())

    @classmethod
    def from_pretrained(cls, folder, device="cpu") -> TarFlowLM:
        from safetensors.torch import load_file

        folder = Path(folder)
        missing = [f for f in ("config.json", "model.safetensors") if not (folder / f).is_file()]
        if missing:
            raise ConfigError(f"{folder} is not a TarFlowLM folder: missing {', '.join(missing)}")
        model = cls(TarFlowLMConfig.from_dict(json.loads((folder / "config.json").read_text())))
        model.load_state_dict(load_file(str(folder / "model.safetensors"), device=str(device)))
        return model.to(device)
