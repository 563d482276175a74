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
