"""SiD / SiDA / SiD-LSG losses: zero loss and zero gradient at initialisation, parity with a direct float64
evaluation of the formulas, the parameter-free SiDA discriminator, guidance and non-finite rows."""

import copy
import math

import pytest
import torch

from genkit.diffusion.io import EDMTeacher
from genkit.diffusion.networks import UNet, UNetConfig
from genkit.distill.nets import EDMNet, MLPNet, OneStepGenerator, freeze, trainable_copy
from genkit.distill.sid import SiDLoss, fake_score_sigmas, generator_sigmas, guided, sid_generator_objective

torch.set_num_threads(1)


def tiny_unet(num_classes=0, seed=0) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(img_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                          num_heads=2, num_classes=num_classes))
    with torch.no_grad():  # the zero-initialised output layers would make F == 0
        for name, p in net.named_parameters():
            if "conv_out" in name or "conv1" in name or "proj" in name:
                p.normal_(0, 0.05)
    return net


def tiny_mlp(seed=0) -> EDMNet:
    torch.manual_seed(seed)
    net = EDMNet(MLPNet(2, width=32, depth=2, emb_channels=16))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def three_networks(net):
    """f_phi (frozen), f_psi and G copied from one network, as the official loop does."""
    return freeze(copy.deepcopy(net)), trainable_copy(net), OneStepGenerator(trainable_copy(net))


@pytest.mark.parametrize("family", ["unet", "unet-class", "mlp"])
def test_generator_loss_and_gradient_vanish_at_initialisation(family):
    if family == "mlp":
        net, shape, cond, null = tiny_mlp(), (2,), None, None
    else:
        k = 3 if family == "unet-class" else 0
        net, shape = EDMNet(tiny_unet(k), num_classes=k), (1, 8, 8)
        cond = torch.tensor([0, 1, 2, 1, 0, 2]) if k else None
        null = torch.full((6,), k) if k else None
    teacher, fake, gen = three_networks(net)
    fake.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    z, noise, t = torch.randn(6, *shape, generator=g), torch.randn(6, *shape, generator=g), torch.rand(6, generator=g)
    loss_fn = SiDLoss(alpha=1.2)
    kappas = [(1.0, 1.0)] + ([(2.0, 2.0)] if cond is not None else [])
    at_init = []
    for kf, kr in kappas:  # SiD-LSG: the same guidance on f_psi and f_phi keeps them equal
        gen.zero_grad(set_to_none=True)
        x_g = gen(z, cond)
        loss, dropped = loss_fn.generator_loss(teacher, fake, x_g, noise, t, cond, null, kappa_fake=kf, kappa_real=kr)
        assert dropped == 0
        assert float(loss.detach().abs().max()) == 0.0  # exactly: f_psi(x_t) and f_phi(x_t) are bitwise equal
        loss.sum().backward()
        at_init.append(max(float(p.grad.abs().max()) for p in gen.parameters() if p.grad is not None))
    if family == "mlp":  # SiDA: the adversarial term is not zero, but the SiD part still is
        loss, adv, _ = loss_fn.generator_loss(teacher, fake, gen(z), noise, t, adversarial=True)
        assert float(loss.detach().abs().max()) == 0.0 and adv.shape == (6,) and torch.isfinite(adv).all()
    # the same gradient once f_psi has moved a little away from f_phi
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    gen.zero_grad(set_to_none=True)
    loss, _ = loss_fn.generator_loss(teacher, fake, gen(z, cond), noise, t, cond, null)
    loss.sum().backward()
    moved = max(float(p.grad.abs().max()) for p in gen.parameters() if p.grad is not None)
    # at initialisation the two branches' backward passes cancel term by term: what is left is float32
    # round-off of the BLAS kernels (~1e-7), orders of magnitude below a real gradient
    assert max(at_init) < 1e-5 * moved, (at_init, moved)


def test_edmnet_equals_the_teacher_denoiser():
    unet = tiny_unet(num_classes=3)
    teacher = EDMTeacher(unet).eval()
    net = EDMNet(unet, num_classes=3)
    g = torch.Generator().manual_seed(1)
    x, s = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 3 + 0.01
    y = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        assert torch.allclose(net(x, s, y), teacher(x, s, class_labels=y), atol=1e-6)
        w = 1.5  # genkit's cfg weight w is kappa - 1
        ref = teacher(x, s, class_labels=y, cfg=w)
        assert torch.allclose(guided(net, x, s, y, torch.full((4,), 3), kappa=1 + w), ref, atol=1e-5)


def test_generator_sigmas_follow_the_official_karras_mapping():
    u = torch.tensor([0.0, 0.5, 1.0])
    sig = generator_sigmas(u, tmax=1000)
    assert sig[0].item() == pytest.approx(0.002, rel=1e-4) and sig[2].item() == pytest.approx(80.0, rel=1e-4)
    top = generator_sigmas(torch.tensor([1.0]), tmax=800).item()
    ref = (80 ** (1 / 7) + 0.2 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7  # t = 0.8
    assert top == pytest.approx(ref, rel=1e-5) and 24 < top < 25
    ln = fake_score_sigmas(torch.randn(100_000, generator=torch.Generator().manual_seed(0))).log()
    assert ln.mean().item() == pytest.approx(-1.2, abs=0.02) and ln.std().item() == pytest.approx(1.2, abs=0.02)


# ------------------------------------------------------------------------------ parity with float64 formulas


class Affine(torch.nn.Module):
    """A fixed denoiser D(x, sigma) = a(sigma) x + b with a known encoder map, for exact parity checks."""

    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x, sigma, cond=None, return_logits=False):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        d = self.scale * x / (1 + s) + self.shift
        if return_logits:
            return d, (x.sum(dim=tuple(range(1, x.ndim)), keepdim=False) * self.scale).reshape(-1, 1, 1, 1) - 0.3
        return d


def _data():
    g = torch.Generator().manual_seed(3)
    b = 5
    return (torch.randn(b, 1, 2, 2, generator=g), torch.randn(b, 1, 2, 2, generator=g),
            torch.randn(b, generator=g), torch.rand(b, generator=g), torch.randn(b, 1, 2, 2, generator=g))


def test_losses_equal_a_float64_evaluation_of_the_formulas():
    x_g, noise, sn, u, real = _data()
    phi, psi = Affine(0.9, 0.1), Affine(0.7, -0.05)
    alpha = 1.2
    loss_fn = SiDLoss(alpha=alpha)
    X, N, SN, U, R = (v.double() for v in (x_g, noise, sn, u, real))

    # fake-score loss: lambda(sigma) (D_psi(x + sigma n) - x)^2, ln sigma = -1.2 + 1.2 n
    sig = torch.exp(-1.2 + 1.2 * SN).view(-1, 1, 1, 1)
    lam = (sig ** 2 + 0.25) / (sig * 0.5) ** 2
    d = 0.7 * (X + sig * N) / (1 + sig) - 0.05
    ref = lam * (d - X) ** 2
    got, dropped = loss_fn(psi, x_g, noise, sn)
    assert dropped == 0 and torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)

    # generator loss: (a - b)((a - x) - alpha (a - b)) / mean|x - a|, sigma on the Karras ramp, t = u * 0.8
    t = U * 0.8
    sig = ((80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7).view(-1, 1, 1, 1)
    xt = X + sig * N
    a, b = 0.9 * xt / (1 + sig) + 0.1, 0.7 * xt / (1 + sig) - 0.05
    w = (X - a).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    ref_g = (a - b) * ((a - X) - alpha * (a - b)) / w
    got_g, _ = loss_fn.generator_loss(phi, psi, x_g, noise, u)
    assert torch.allclose(got_g.double(), ref_g, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sid_generator_objective(x_g, a.float(), b.float(), alpha).double(), ref_g, rtol=1e-5,
                          atol=1e-6)

    # the batch normaliser (genkit option for low-dimensional data): one w, the batch mean of the above
    wb = (X - a).abs().mean(dim=(1, 2, 3)).mean().clamp_min(1e-5)
    got_b, _ = SiDLoss(alpha=alpha, normaliser="batch").generator_loss(phi, psi, x_g, noise, u)
    assert torch.allclose(got_b.double(), (a - b) * ((a - X) - alpha * (a - b)) / wb, rtol=1e-5, atol=1e-6)

    # SiDA generator: BCE(clamp(logit, -10, 10), 1) mean over the process batch, / w, * numel per sample
    logit = (xt.sum(dim=(1, 2, 3)) * 0.7 - 0.3).clamp(-10, 10)
    bce = torch.nn.functional.softplus(-logit).mean()  # -log sigmoid(l)
    ref_adv = bce / w.flatten() * 4
    _, got_adv, _ = loss_fn.generator_loss(phi, psi, x_g, noise, u, adversarial=True)
    assert torch.allclose(got_adv.double(), ref_adv, rtol=1e-5)

    # SiDA fake step: same sigma and noise for real and fake; lambda (BCE(real, 1) + BCE(fake, 0)) / 2
    sig = torch.exp(-1.2 + 1.2 * SN).view(-1, 1, 1, 1)
    lam = ((sig ** 2 + 0.25) / (sig * 0.5) ** 2).flatten()
    lf = ((X + sig * N).sum(dim=(1, 2, 3)) * 0.7 - 0.3)
    lr = ((R + sig * N).sum(dim=(1, 2, 3)) * 0.7 - 0.3)
    bce = torch.nn.functional.softplus(-lr).mean() + torch.nn.functional.softplus(lf).mean()
    ref_d = lam * bce / 2
    got_f, got_d, _ = loss_fn.discriminator_loss(psi, x_g, real, noise, sn)
    assert torch.allclose(got_d.double(), ref_d, rtol=1e-5)
    assert torch.allclose(got_f.double(), ref, rtol=1e-5, atol=1e-6)


def test_guidance_is_the_cfg_combination():
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(3, 2, generator=g), torch.rand(3, generator=g) + 0.1
    c, null = torch.tensor([1.0, 2.0, 3.0]), torch.zeros(3)

    def net(x, sigma, cond=None):
        return x * 0.5 + cond[:, None] * sigma[:, None]

    for k in (1.0, 1.5, 3.0):
        ref = net(x, s, null) + k * (net(x, s, c) - net(x, s, null))
        assert torch.allclose(guided(net, x, s, c, null, k), ref, atol=1e-6)


def test_non_finite_rows_are_dropped_from_the_losses():
    x_g, noise, sn, u, real = _data()
    x_g = x_g.clone()
    x_g[2, 0, 0, 0] = float("nan")
    x_g[4, 0, 1, 1] = float("inf")
    phi, psi = Affine(0.9, 0.1), Affine(0.7, -0.05)
    loss_fn = SiDLoss()
    lf, dropped = loss_fn(psi, x_g, noise, sn)
    assert dropped == 2 and lf.shape[0] == 3 and torch.isfinite(lf).all()
    lg, dropped = loss_fn.generator_loss(phi, psi, x_g, noise, u)
    assert dropped == 2 and torch.isfinite(lg).all()
    _, ld, dropped = loss_fn.discriminator_loss(psi, x_g, real, noise, sn)
    assert dropped == 2 and ld.shape == (3,) and torch.isfinite(ld).all()


# ------------------------------------------------------------------------------ SiDA discriminator


def test_sida_discriminator_is_the_encoder_and_adds_no_parameters():
    unet = tiny_unet()
    net = EDMNet(unet)
    names_before = [n for n, _ in net.named_parameters()]
    g = torch.Generator().manual_seed(0)
    x, s = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, generator=g) + 0.1
    d, logits = net(x, s, return_logits=True)
    assert [n for n, _ in net.named_parameters()] == names_before  # no new parameters, no leftover hooks
    assert not any(m._forward_hooks for m in net.modules())
    assert torch.allclose(d, net(x, s), atol=1e-6)
    assert logits.shape == (3, 1, 4, 4)  # channel mean of the lowest-resolution (4x4) encoder map
    feats = {}
    h = unet.enc[-1][-1].register_forward_hook(lambda m, i, o: feats.__setitem__("h", o))
    net(x, s)
    h.remove()
    assert torch.allclose(logits, feats["h"].mean(1, keepdim=True), atol=1e-6)
    logits.sum().backward()  # only the encoder (and the embeddings it uses) gets a gradient from the logits
    assert all(p.grad is None or float(p.grad.abs().max()) == 0 for n, p in unet.named_parameters()
               if n.startswith(("mid.", "dec.", "up.", "norm_out", "conv_out")))
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for n, p in unet.named_parameters()
               if n.startswith("enc."))
    mlp = tiny_mlp()
    n_params = sum(p.numel() for p in mlp.parameters())
    _, lg = mlp(torch.randn(4, 2), torch.ones(4), return_logits=True)
    assert lg.shape == (4, 1) and sum(p.numel() for p in mlp.parameters()) == n_params


def test_one_step_generator_evaluates_the_network_at_sigma_init():
    net = tiny_mlp()
    gen = OneStepGenerator(net, sigma_init=2.5)
    z = torch.randn(5, 2)
    with torch.no_grad():
        assert torch.allclose(gen(z), net(2.5 * z, torch.full((5,), 2.5)), atol=1e-6)
    assert math.isclose(gen.sigma_init, 2.5)


# ------------------------------------------------------------------------------ SiD-LSG: each kappa where it enters


class CondAffine(torch.nn.Module):
    """D(x, sigma, c) = a x / (1 + sigma) + b + e_c: a class-conditional affine denoiser (class K = null)."""

    def __init__(self, scale, shift, class_shift):
        super().__init__()
        self.scale, self.shift = scale, shift
        self.class_shift = torch.tensor(class_shift)  # (K + 1,), the last entry is the null label's

    def forward(self, x, sigma, cond=None, return_logits=False):
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        e = 0.0 if cond is None else self.class_shift[cond].reshape(-1, *([1] * (x.ndim - 1))).to(x)
        return self.scale * x / (1 + s) + self.shift + e


def test_lsg_kappas_enter_where_the_official_code_puts_them():
    """kappa_1 guides f_psi in its own training loss, kappa_2 = kappa_3 guide f_psi inside the generator loss,
    kappa_4 guides the teacher there (official SiD-LSG sid_training_loop.py: cfg_train_fake, cfg_eval_fake,
    cfg_eval_real). Distinct values, float64 references, and the swapped routing must give other numbers."""
    x_g, noise, sn, u, _ = _data()
    y, null = torch.tensor([0, 1, 2, 1, 0]), torch.full((5,), 3)
    phi = CondAffine(0.9, 0.1, [0.3, -0.2, 0.5, 0.05])
    psi = CondAffine(0.7, -0.05, [-0.1, 0.4, 0.2, -0.3])
    k1, k2, k4, alpha = 1.5, 2.5, 4.0, 1.2
    loss_fn = SiDLoss(alpha=alpha)
    X, N, SN, U = (v.double() for v in (x_g, noise, sn, u))
    ey = lambda net: net.class_shift.double()[y].view(-1, 1, 1, 1)
    e0 = lambda net: net.class_shift.double()[3]

    def guided_ref(net, a, xt, sig, kappa):  # D(null) + kappa (D(c) - D(null)) in float64
        base = a * xt / (1 + sig) + net.shift
        return base + e0(net) + kappa * (ey(net) - e0(net))

    # kappa_1: the fake-score loss lambda(sigma) (D_psi,k1(x_g + sigma n) - x_g)^2
    sig = torch.exp(-1.2 + 1.2 * SN).view(-1, 1, 1, 1)
    lam = (sig ** 2 + 0.25) / (sig * 0.5) ** 2
    ref = lam * (guided_ref(psi, 0.7, X + sig * N, sig, k1) - X) ** 2
    got, _ = loss_fn(psi, x_g, noise, sn, y, null, kappa=k1)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert got.sum().item() == pytest.approx(ref.sum().item(), rel=1e-5) and ref.sum().item() == pytest.approx(
        765.7035, rel=1e-5)
    plain, _ = loss_fn(psi, x_g, noise, sn, y, null, kappa=1.0)
    assert abs(plain.sum().item() - got.sum().item()) > 0.1

    # kappa_2 on f_psi and kappa_4 on f_phi inside the generator loss
    t = U * 0.8
    sig = ((80 ** (1 / 7) + (1 - t) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7).view(-1, 1, 1, 1)
    xt = X + sig * N
    a, b = guided_ref(phi, 0.9, xt, sig, k4), guided_ref(psi, 0.7, xt, sig, k2)
    w = (X - a).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
    ref_g = (a - b) * ((a - X) - alpha * (a - b)) / w
    got_g, _ = loss_fn.generator_loss(phi, psi, x_g, noise, u, y, null, kappa_fake=k2, kappa_real=k4)
    assert torch.allclose(got_g.double(), ref_g, rtol=1e-5, atol=1e-6)
    assert ref_g.sum().item() == pytest.approx(-30.835803, rel=1e-5)
    swapped, _ = loss_fn.generator_loss(phi, psi, x_g, noise, u, y, null, kappa_fake=k4, kappa_real=k2)
    assert abs(swapped.sum().item() - got_g.sum().item()) > 0.1
