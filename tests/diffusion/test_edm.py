"""EDM teachers: loss weighting, the UNet and its conditioning, classifier-free guidance, the teacher folder,
training reduces the loss, and an interrupted run resumes to the same weights."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from genkit.diffusion.io import EDMTeacher, is_edm_teacher_folder, load_edm_teacher, teacher_config
from genkit.diffusion.loss import EDMLoss, edm_loss_weight
from genkit.diffusion.networks import UNet, UNetConfig
from genkit.diffusion.train import DiffusionRecipe, ema_decay_at, train_diffusion
from genkit.errors import ConfigError
from genkit.models.denoisers import EDMPrecond
from genkit.runtime.checkpoint import save_model_folder

torch.set_num_threads(1)


def tiny_net(num_classes=0, seed=0, perturb=True) -> UNet:
    torch.manual_seed(seed)
    net = UNet(UNetConfig(img_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,),
                          num_heads=2, num_classes=num_classes))
    if perturb:  # the zero-initialised output layers would make F == 0
        with torch.no_grad():
            for name, p in net.named_parameters():
                if "conv_out" in name or "conv1" in name or "proj" in name:
                    p.normal_(0, 0.05)
    return net.eval()


def test_edm_loss_weight_values():
    # lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2 with sd = 0.5 (EDM Table 1)
    assert float(edm_loss_weight(0.5)) == pytest.approx(8.0)
    assert float(edm_loss_weight(1.0)) == pytest.approx(5.0)
    assert float(edm_loss_weight(2.0)) == pytest.approx((4 + 0.25) / 1.0)
    assert float(edm_loss_weight(0.1, sigma_data=1.0)) == pytest.approx(1.01 / 0.01)
    # with EDM preconditioning lambda * c_out^2 = 1: the raw net's target has unit weight everywhere
    pre = EDMPrecond(torch.nn.Identity())
    sig = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    _, c_out, _, _ = pre.coefficients(sig)
    assert torch.allclose(edm_loss_weight(sig) * c_out ** 2, torch.ones_like(sig))


def test_edm_loss_matches_definition_and_sigma_distribution():
    net = tiny_net()
    d = EDMPrecond(net)
    loss_fn = EDMLoss()
    g = torch.Generator().manual_seed(0)
    y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    n, s = torch.randn(4, 1, 8, 8, generator=g), torch.randn(4, generator=g)
    with torch.no_grad():
        loss = loss_fn(d, y, n, s)
        sigma = (s * 1.2 - 1.2).exp()
        ref = edm_loss_weight(sigma).view(-1, 1, 1, 1) * (d(y + sigma.view(-1, 1, 1, 1) * n, sigma) - y) ** 2
    assert loss.shape == y.shape and torch.allclose(loss, ref, atol=1e-5)
    ln_sigma = loss_fn.sigmas(torch.randn(200_000, generator=g)).log()  # log-normal: P_mean -1.2, P_std 1.2
    assert ln_sigma.mean().item() == pytest.approx(-1.2, abs=0.01) and ln_sigma.std().item() == pytest.approx(1.2, abs=0.01)


def test_ema_rampup():
    from genkit.diffusion.train import DiffusionTrainConfig

    t = DiffusionTrainConfig(ema_halflife_steps=100, ema_rampup=0.05)
    assert ema_decay_at(0, t) == pytest.approx(0.5 ** (1 / 0.05))  # early: a short half-life
    assert ema_decay_at(9999, t) == pytest.approx(0.5 ** (1 / 100))


def test_unet_shapes_and_identity_at_init():
    net = tiny_net(perturb=False)
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(net(x, torch.zeros(3)), torch.zeros_like(x))  # zero-initialised output
    d = EDMPrecond(net)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    assert torch.allclose(d(x, sigma), 0.25 / (sigma ** 2 + 0.25).view(-1, 1, 1, 1) * x)  # D = c_skip x
    with pytest.raises(ConfigError):
        UNetConfig(img_size=6, channel_mult=(1, 2, 2))


def test_conditioning_null_label_and_cfg():
    net = tiny_net(num_classes=3)
    t = EDMTeacher(net)
    x, sigma = torch.randn(4, 1, 8, 8), torch.full((4,), 0.7)
    y = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        d_cond = t(x, sigma, class_labels=y)
        d_null = t(x, sigma, class_labels=torch.full((4,), 3))
        assert torch.allclose(t(x, sigma), d_null)  # no labels = the null class
        assert torch.allclose(t(x, sigma, class_labels=torch.zeros(4, 3)), d_null)  # EDM one-hot: zero row
        assert torch.allclose(t(x, sigma, class_labels=torch.nn.functional.one_hot(y, 3).float()), d_cond)
        assert not torch.allclose(d_cond, d_null)
        # D_w = (1 + w) D(y) - w D(null): w = 0 conditional, w = -1 unconditional
        assert torch.allclose(t(x, sigma, class_labels=y, cfg=0.0), d_cond)
        assert torch.allclose(t(x, sigma, class_labels=y, cfg=-1.0), d_null, atol=1e-6)
        assert torch.allclose(t(x, sigma, class_labels=y, cfg=2.0), 3 * d_cond - 2 * d_null, atol=1e-5)
        onehot = torch.nn.functional.one_hot(y, 3).float()
        assert torch.allclose(t(x, sigma, class_labels=onehot, cfg=2.0), 3 * d_cond - 2 * d_null, atol=1e-5)
        # an unconditional teacher ignores labels and guidance
        u = EDMTeacher(tiny_net())
        assert torch.equal(u(x, sigma, class_labels=y, cfg=3.0), u(x, sigma))


def test_teacher_folder_round_trip(tmp_path):
    net = tiny_net(num_classes=3)
    data = {"source": "digits", "shape": [1, 8, 8], "num_classes": 3}
    save_model_folder(tmp_path / "model", dict(net.state_dict()), teacher_config(net, 0.5, 0.002, 80.0, data))
    assert is_edm_teacher_folder(tmp_path) and is_edm_teacher_folder(tmp_path / "model")
    assert not is_edm_teacher_folder(tmp_path / "nothing")
    t = load_edm_teacher(tmp_path)
    assert t.num_classes == 3 and t.shape == (1, 8, 8) and t.sigma_max == 80.0 and t.data["source"] == "digits"
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(t(x, 0.5, class_labels=y, cfg=1.0), EDMTeacher(net)(x, 0.5, class_labels=y, cfg=1.0))
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "tarflow"}))
    with pytest.raises(ConfigError, match="not a genkit EDM teacher"):
        load_edm_teacher(tmp_path)


def test_training_steps_reduce_the_loss():
    from genkit.data.images import load_images

    torch.manual_seed(0)
    net = UNet(UNetConfig(img_size=8, model_channels=8, channel_mult=(1, 2), num_blocks=1, attn_resolutions=()))
    d = EDMPrecond(net)
    loss_fn = EDMLoss()
    data = load_images("digits", "train").to_unit()[:256]
    g = torch.Generator().manual_seed(1)
    ev = (torch.randn(data.shape, generator=g), torch.randn(256, generator=g))  # a fixed evaluation draw

    def eval_loss():
        with torch.no_grad():
            return float(loss_fn(d, data, *ev).mean())

    before = eval_loss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for step in range(30):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = loss_fn(d, data[idx], torch.randn(32, 1, 8, 8, generator=g), torch.randn(32, generator=g)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.8 * before, (before, after)


def _tiny_recipe(steps, conditional=False, **extra):
    from genkit import config as C

    over = [f"train.steps={steps}", "train.batch_size=16", "train.warmup_steps=2", "arch.model_channels=8",
            "arch.num_heads=2", "eval.samples=0", "eval.metric_samples=0", "runtime.checkpoint_every=3",
            "runtime.log_every=1", "runtime.keep_last=5", f"data.conditional={str(conditional).lower()}"]
    over += [f"{k}={v}" for k, v in extra.items()]
    return C.load(DiffusionRecipe, "recipes/train-diffusion/edm-digits.yaml", over)


def test_resume_matches_uninterrupted(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    full = train_diffusion(_tiny_recipe(6, conditional=True), tmp_path / "full", quiet=True)
    train_diffusion(_tiny_recipe(3, conditional=True), tmp_path / "part", quiet=True)  # "interrupted" at 3
    resumed = train_diffusion(_tiny_recipe(6, conditional=True), tmp_path / "part", quiet=True)
    a = load_file(str(tmp_path / "full" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "part" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, bit for bit
    ra = load_file(str(tmp_path / "full" / "checkpoints" / "step-00000006" / "model" / "model.safetensors"))
    rb = load_file(str(tmp_path / "part" / "checkpoints" / "step-00000006" / "model" / "model.safetensors"))
    assert all(torch.equal(ra[k], rb[k]) for k in ra)  # raw weights too
    assert full["final_loss"] == resumed["final_loss"]
    log = [json.loads(line) for line in (tmp_path / "part" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    t = load_edm_teacher(tmp_path / "part")
    assert t.num_classes == 10 and math.isclose(t.sigma_data, 0.5)
    assert (tmp_path / "part" / "config.yaml").is_file()


def test_two_processes_equal_one(tmp_path, monkeypatch):
    """torchrun with 2 gloo processes and the same global batch gives the weights of one process."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(repo)
    train_diffusion(_tiny_recipe(3, conditional=True, **{"runtime.checkpoint_every": 0}), tmp_path / "one",
                    quiet=True)
    over = ["train.steps=3", "train.batch_size=16", "train.warmup_steps=2", "arch.model_channels=8",
            "arch.num_heads=2", "eval.samples=0", "eval.metric_samples=0", "runtime.checkpoint_every=0",
            "runtime.log_every=1", "data.conditional=true"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "genkit", "train-diffusion",
           "recipes/train-diffusion/edm-digits.yaml", *over, "--out", str(tmp_path / "two"), "-q"]
    p = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
