"""Score identity Distillation losses: SiD, its adversarial extension SiDA and the long/short guidance of
SiD-LSG.  Every network here is a denoiser ``D(x, sigma, cond=None, return_logits=False) -> x0`` in the
EDM convention (``x = x0 + sigma * n``, sigma_data 0.5); see ``genkit.distill.nets``.

Papers and official code (mingyuanzhou/SiD ``training/sid_loss.py`` and ``sid_training_loop.py``, branch
``sida`` ``sida_training/sida_loss.py`` and ``sida_training_loop.py``; mingyuanzhou/SiD-LSG
``training/sid_training_loop.py`` and ``sid_sd_util.py``):

- SiD: Zhou, Zheng, Wang, Yin, Huang, "Score identity Distillation: Exponentially Fast Distillation of
  Pretrained Diffusion Models for One-Step Generation", ICML 2024, arXiv 2404.04057.
- SiDA: Zhou, Zheng, Gu, Wang, Huang, "Adversarial Score identity Distillation: Rapidly Surpassing the
  Teacher in One Step", ICLR 2025, arXiv 2410.14919.
- SiD-LSG: Zhou, Wang, Zheng, Huang, "Guided Score identity Distillation for Data-Free One-Step
  Text-to-Image Generation" (first titled "Long and Short Guidance in Score identity Distillation"),
  ICLR 2025, arXiv 2406.01561.

Notation: f_phi is the frozen teacher, f_psi the fake score network (both x0-predictors), x_g = G(z) a
generated sample.  The losses return *unreduced* tensors over the rows whose inputs and outputs are all
finite (the official code drops NaN rows the same way; we also drop +-inf rows); the training loop sums
them and divides by the local batch size (the official ``loss.sum().mul(scale / batch_gpu_total)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genkit.models.denoisers import SIGMA_DATA, broadcast_sigma

# ----------------------------------------------------------------------------------------- noise levels


def fake_score_sigmas(normal: torch.Tensor, p_mean: float = -1.2, p_std: float = 1.2) -> torch.Tensor:
    """sigma = exp(P_mean + P_std * n), n ~ N(0, 1): the EDM training distribution (Karras et al. 2022,
    arXiv 2206.00364, Table 1), used for the fake-score loss (SiD Sec. 4, official ``SID_EDMLoss.__call__``)."""
    return (normal.float() * p_std + p_mean).exp()


def generator_sigmas(uniform: torch.Tensor, tmax: int = 800, sigma_min: float = 0.002, sigma_max: float = 80.0,
                     rho: float = 7.0) -> torch.Tensor:
    """Noise levels of the generator loss (official ``SID_EDMLoss.generator_loss``): t = u * tmax / 1000 with
    u ~ U(0, 1), mapped through the Karras et al. (2022, Eq. 5) schedule read from sigma_min at t = 0 to
    sigma_max at t = 1:

        sigma(t) = (sigma_max^(1/rho) + (1 - t) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho

    so tmax = 800 keeps sigma in [0.002, 24.4] for the default schedule.  The SiD paper (experiments section) states
    t_max = 800 of 1000 steps; the mapping itself is only in the code."""
    t = uniform.float() * (tmax / 1000.0)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + (1 - t) * (lo - hi)) ** rho


def ddpm_timesteps(uniform: torch.Tensor, t_min: int = 20, t_max: int = 980) -> torch.Tensor:
    """Integer timesteps t ~ U{t_min, ..., t_max - 1} from u ~ U[0, 1): t = t_min + floor(u (t_max - t_min)).
    Official SiD-LSG (``sid_training_loop.py``: ``torch.randint(tmin, tmax)`` with tmin = 20, tmax = 980) draws
    them this way for both losses of a DDPM-schedule (Stable Diffusion) teacher."""
    t = t_min + (uniform.double() * (t_max - t_min)).floor().long()
    return t.clamp(t_min, t_max - 1)


def edm_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM Table 1)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """(B,) True where every listed tensor's row is finite (the official code checks ``isnan`` only)."""
    ok = None
    for t in tensors:
        row = torch.isfinite(t.detach()).reshape(t.shape[0], -1).all(1)
        ok = row if ok is None else ok & row
    return ok


# ----------------------------------------------------------------------------------------- guidance


def guided(net, x: torch.Tensor, sigma: torch.Tensor, cond=None, null=None, kappa: float = 1.0) -> torch.Tensor:
    """Classifier-free guidance with scale kappa in x0-space (SiD-LSG, arXiv 2406.01561, method section; official ``sid_sd_denoise``):

        D_kappa(x) = D(x | null) + kappa * (D(x | c) - D(x | null))

    kappa = 1 is the plain conditional denoiser.  The official code guides the epsilon prediction of Stable
    Diffusion; for a fixed (x, sigma) epsilon = (x - D) / sigma is affine in D, so guiding x0 is the same
    operation.  Both branches run as one batch (conditional rows then ``null`` rows)."""
    if cond is None or kappa == 1.0:
        return net(x, sigma, cond)
    b = x.shape[0]
    s = broadcast_sigma(sigma, x).flatten()
    both = net(torch.cat([x, x]), torch.cat([s, s]), torch.cat([cond, null]))
    d_c, d_u = both[:b], both[b:]
    return d_u + kappa * (d_c - d_u)


# ----------------------------------------------------------------------------------------- SiD maths


def sid_normaliser(x_g: torch.Tensor, d_real: torch.Tensor, reduce: str = "sample") -> torch.Tensor:
    """(B,) stop-gradient normaliser w of the generator loss, clipped below at 1e-5.

    ``"sample"`` (official ``SID_EDMLoss.generator_loss``, after DMD): w_i = mean over the elements of sample
    i of |x_g - f_phi(x_t)|.  ``"batch"`` (a genkit option, not in the paper or the code): the mean of that
    quantity over this process's batch, the same for every sample.  For images the per-sample mean runs over
    thousands of pixels and is a stable scale; for low-dimensional data (a 2-D mixture: a mean of two
    numbers) it is noisy and 1/w puts large weights on a few samples, which stalls SiD on the mixture
    benchmark (benchmarks/distill.py reports both)."""
    with torch.no_grad():
        w = (x_g.detach().float() - d_real.detach().float()).abs().flatten(1).mean(1)
        if reduce == "batch" and w.numel():
            w = w.mean().expand(w.shape[0])
        elif reduce != "sample":
            raise ValueError(f"normaliser reduce must be 'sample' or 'batch', got {reduce!r}")
        return w.clamp_min(1e-5)


def sid_generator_objective(x_g: torch.Tensor, d_real: torch.Tensor, d_fake: torch.Tensor,
                            alpha: float = 1.2, reduce: str = "sample") -> torch.Tensor:
    """The per-element SiD generator loss (SiD Sec. 4, the fused loss "L~2 - alpha L1" with the DMD-style
    weighting omega(t) for the normaliser, as implemented in ``SID_EDMLoss.generator_loss``):

        w = mean_pixels |x_g - f_phi(x_t)|          (per sample, stop-gradient, clipped below at 1e-5)
        L = (f_phi - f_psi) * ((f_phi - x_g) - alpha * (f_phi - f_psi)) / w

    with f_phi = ``d_real`` and f_psi = ``d_fake`` both evaluated at x_t = x_g + sigma n (``reduce``: see
    :func:`sid_normaliser`).  The paper writes the loss with omega(t) / sigma^4 factors; the official code
    drops the sigma factors (their product with the loss scale is absorbed into ``loss_scaling_G`` = 100).
    alpha = 1 gives (f_phi - f_psi) (f_psi - x_g) / w, the form SiD-LSG's code special-cases."""
    w = sid_normaliser(x_g, d_real, reduce).reshape(-1, *([1] * (x_g.ndim - 1)))
    d_real, d_fake, x_g = d_real.float(), d_fake.float(), x_g.float()
    return (d_real - d_fake) * ((d_real - x_g) - alpha * (d_real - d_fake)) / w


class SiDLoss:
    """The SiD losses as one callable object (hyper-parameters in, unreduced losses out).

    ``loss(fake, images, noise, sigma_normal, ...)`` is the fake-score loss; ``loss.generator_loss(...)``
    the generator's; ``discriminator_loss`` / ``generator_loss(adversarial=True)`` add SiDA's terms.  The
    random numbers (standard normals, uniforms) come from the caller so a step is a function of (seed, step).
    """

    def __init__(self, alpha: float = 1.2, tmax: int = 800, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = SIGMA_DATA,
                 normaliser: str = "sample", ddpm_sigmas: torch.Tensor | None = None, ddpm_tmin: int = 20,
                 ddpm_tmax: int = 980):
        self.alpha = alpha
        # DDPM-schedule teachers (official SiD-LSG): the teacher's discrete sigma_t = sqrt((1 - a_t) / a_t), t = 0..
        self.ddpm_sigmas = None if ddpm_sigmas is None else torch.as_tensor(ddpm_sigmas, dtype=torch.float64)
        self.ddpm_tmin, self.ddpm_tmax = ddpm_tmin, ddpm_tmax
        self.normaliser = normaliser
        self.tmax = tmax
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.rho = rho
        self.p_mean = p_mean
        self.p_std = p_std
        self.sigma_data = sigma_data

    # ---------------------------------------------------------------------------------- noise levels
    def fake_sigma_weight(self, sigma_normal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigma, weight), each (B,), of the fake-score (and SiDA discriminator) loss.

        EDM teachers (official SiD): ln sigma ~ N(P_mean, P_std^2) and the EDM weight lambda(sigma).
        DDPM-schedule teachers (official SiD-LSG): t ~ U{tmin..tmax-1}, sigma = sigma_t, weight 1 / sigma^2: then
        lambda (D - x_g)^2 is the official unweighted epsilon MSE (eps_hat - eps)^2, since eps_hat - eps =
        (x_g - D) / sigma; for a v-prediction teacher the official snr/(snr+1)-weighted v MSE is the same value.
        The standard normal ``sigma_normal`` becomes the uniform of t through its CDF."""
        if self.ddpm_sigmas is None:
            sigma = fake_score_sigmas(sigma_normal, self.p_mean, self.p_std)
            return sigma, edm_weight(sigma, self.sigma_data)
        u = 0.5 * (1 + torch.erf(sigma_normal.double() / 2 ** 0.5))
        sigma = self.ddpm_sigmas[ddpm_timesteps(u, self.ddpm_tmin, self.ddpm_tmax)]
        return sigma.float(), sigma.pow(-2).float()

    def generator_sigma(self, t_uniform: torch.Tensor) -> torch.Tensor:
        """(B,) sigma of the generator loss: :func:`generator_sigmas` (EDM teachers, official SiD), or the DDPM
        teacher's sigma_t at t ~ U{tmin..tmax-1} (official SiD-LSG), from u ~ U[0, 1)."""
        if self.ddpm_sigmas is None:
            return generator_sigmas(t_uniform, self.tmax, self.sigma_min, self.sigma_max, self.rho)
        return self.ddpm_sigmas[ddpm_timesteps(t_uniform, self.ddpm_tmin, self.ddpm_tmax)].float()

    # ---------------------------------------------------------------------------------- fake score f_psi
    def __call__(self, fake, images: torch.Tensor, noise: torch.Tensor, sigma_normal: torch.Tensor, cond=None,
                 null=None, kappa: float = 1.0) -> tuple[torch.Tensor, int]:
        """Fake-score loss on generated (detached) ``images`` (SiD Sec. 4: f_psi is trained with the
        denoising score matching loss of the diffusion model on x_g; official ``SID_EDMLoss.__call__``):

            L_psi = lambda(sigma) * || D_psi,kappa1(x_g + sigma n, sigma) - x_g ||^2,   ln sigma ~ N(P_mean, P_std^2)

        (sigma and lambda of DDPM-schedule teachers: :meth:`fake_sigma_weight`).  ``kappa`` is SiD-LSG's
        kappa_1 (guidance on f_psi while it trains; 1 = none).  Returns the unreduced loss over the finite rows
        and the number of dropped rows."""
        images = images.detach()
        sigma, lam = (v.to(images.device) for v in self.fake_sigma_weight(sigma_normal))  # (B,) each
        x_t = images + noise.to(images) * broadcast_sigma(sigma, images)
        d = guided(fake, x_t, sigma, cond, null, kappa)  # (B, ...)
        ok = finite_rows(images, d)
        weight = broadcast_sigma(lam, images)
        loss = weight[ok] * (d[ok].float() - images[ok].float()) ** 2
        return loss, int((~ok).sum())

    # ---------------------------------------------------------------------------------- generator G
    def generator_loss(self, teacher, fake, images: torch.Tensor, noise: torch.Tensor, t_uniform: torch.Tensor,
                       cond=None, null=None, kappa_fake: float = 1.0, kappa_real: float = 1.0,
                       adversarial: bool = False):
        """Generator loss on ``images`` = G(z) (with gradient), official ``SID_EDMLoss.generator_loss``:
        sigma from :meth:`generator_sigma`, x_t = x_g + sigma n, d_real = f_phi(x_t), d_fake = f_psi(x_t),
        loss :func:`sid_generator_objective`.  The networks' weights are frozen by the caller; the gradient
        reaches G through x_t in both.

        SiD-LSG: ``kappa_real`` is kappa_4 (guidance on the teacher), ``kappa_fake`` is kappa_2 = kappa_3
        (guidance on f_psi in both places it appears, as in the official code).

        SiDA (``adversarial=True``, official ``generator_share_encoder_loss``): f_psi also returns its encoder
        logits; the adversarial term per sample is

            L_adv = BCE(clamp(logits, -10, 10), 1) / w * numel(x_g[0])

        with the BCE mean-reduced over this process's batch and logit map (SiDA method section, "batch-normalized
        within each GPU") and ``w`` the SiD normaliser; the official loop multiplies by C*H*W after the
        per-sample mean, which gives the same value.

        Returns ``(loss (B', ...), n_dropped)`` or, adversarial, ``(loss, adv (B',), n_dropped)``."""
        sigma = self.generator_sigma(t_uniform).to(images.device)  # (B,)
        x_t = images + noise.to(images) * broadcast_sigma(sigma, images)
        d_real = guided(teacher, x_t, sigma, cond, null, kappa_real)
        if adversarial:
            if cond is not None and kappa_fake != 1.0:
                raise ValueError("SiDA's adversarial loss is not combined with guidance on f_psi")
            d_fake, logits = fake(x_t, sigma, cond, return_logits=True)
        else:
            d_fake, logits = guided(fake, x_t, sigma, cond, null, kappa_fake), None
        ok = finite_rows(images, d_real, d_fake, *([logits] if logits is not None else []))
        loss = sid_generator_objective(images[ok], d_real[ok], d_fake[ok], self.alpha, self.normaliser)
        if not adversarial:
            return loss, int((~ok).sum())
        w = sid_normaliser(images[ok], d_real[ok], self.normaliser)
        lg = logits[ok].float().clamp(-10, 10)
        bce = F.binary_cross_entropy_with_logits(lg, torch.ones_like(lg)) if lg.numel() else lg.sum()
        adv = bce / w * images[0].numel()  # (B',)
        return loss, adv, int((~ok).sum())

    # ---------------------------------------------------------------------------------- SiDA discriminator
    def discriminator_loss(self, fake, images: torch.Tensor, real: torch.Tensor, noise: torch.Tensor,
                           sigma_normal: torch.Tensor, cond=None):
        """SiDA's fake-score step (SiDA method section and its algorithm box, official
        ``fakescore_discriminator_share_encoder_loss``): the fake score network's encoder is the
        discriminator (channel mean of its lowest-resolution feature map as a logit map, no new
        parameters).  Generated and real images get the *same* sigma and noise:

            L_psi = lambda(sigma) ||D_psi(x_g + sigma n) - x_g||^2
            L_D   = lambda(sigma) * (BCE(logits(real + sigma n), 1) + BCE(logits(x_g + sigma n), 0)) / 2

        with both BCEs mean-reduced over this process's batch (one value times lambda(sigma) per sample, as
        the official code; DDPM-schedule teachers: the sigma and weight of :meth:`fake_sigma_weight`).  The official code runs the real images through the encoder in a second call;
        here both go through f_psi as one batch, which is the same for per-sample-normalised networks and
        keeps one forward per backward under DistributedDataParallel.

        Returns ``(loss_psi (B', ...), loss_D (B',), n_dropped)``."""
        images = images.detach()
        b = images.shape[0]
        sigma, weight = (v.to(images.device) for v in self.fake_sigma_weight(sigma_normal))  # (B,) each
        n = noise.to(images) * broadcast_sigma(sigma, images)
        cc = None if cond is None else torch.cat([cond, cond])
        d, logits = fake(torch.cat([images + n, real.to(images) + n]), torch.cat([sigma, sigma]), cc,
                         return_logits=True)
        d_fake, logit_fake, logit_real = d[:b], logits[:b].float(), logits[b:].float()
        ok = finite_rows(images, d_fake, logit_fake, logit_real)
        loss = broadcast_sigma(weight, images)[ok] * (d_fake[ok].float() - images[ok].float()) ** 2
        lr, lf = logit_real[ok], logit_fake[ok]
        if lr.numel():
            bce = F.binary_cross_entropy_with_logits(lr, torch.ones_like(lr)) + \
                F.binary_cross_entropy_with_logits(lf, torch.zeros_like(lf))
        else:
            bce = lr.sum()
        loss_d = weight[ok] * bce / 2  # (B',)
        return loss, loss_d, int((~ok).sum())
