"""Sampling a trained flow (genkit.flows.train.sample_flow and `genkit sample --ckpt`): guidance knobs,
denoise-then-clip order, the official Gaussian-noise input mapping, non-finite samples; issue 15 items 1-4."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from genkit.data.batches import step_generator
from genkit.data.images import ImageData
from genkit.errors import RunError
from genkit.flows.tarflow import TarFlow, TarFlowConfig
from genkit.flows.train import FlowRecipe, UNCOND_ATTN_TEMP, default_attn_temp, make_inputs, sample_flow
from support import run_genkit

torch.set_num_threads(1)


def perturbed(num_classes=0, seed=0):
    torch.manual_seed(seed)
    model = TarFlow(TarFlowConfig(img_size=8, channels=1, patch_size=2, num_blocks=2, layers_per_block=1,
                                  channels_model=32, head_dim=16, num_classes=num_classes)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, 0.05)
            block.proj_out.bias.normal_(0, 0.05)
    return model


def first_noise(n, seed=0):
    return torch.randn((n, 1, 8, 8), generator=step_generator(seed, 0, stream=11))


def test_unconditional_guidance_uses_attention_temperature():
    model = perturbed()
    assert default_attn_temp(model) == UNCOND_ATTN_TEMP != 1.0 and default_attn_temp(perturbed(3)) == 1.0
    plain = sample_flow(model, 6)
    guided = sample_flow(model, 6, guidance=2.0)
    assert (guided - plain).abs().max() > 1e-3  # before issue 15: identical (attn_temp never passed)
    z = first_noise(6)
    expected = model.reverse(z, guidance=2.0, attn_temp=UNCOND_ATTN_TEMP).clamp(-1, 1)
    assert torch.equal(guided, expected)
    # every knob reaches TarFlow.reverse
    kw = {"guidance": 1.5, "attn_temp": 0.5, "guide_what": "b", "annealed": True}
    expected = model.reverse(z, guidance=1.5, attn_temp=0.5, guide_what="b", annealed_guidance=True).clamp(-1, 1)
    assert torch.equal(sample_flow(model, 6, **kw), expected)
    # attn_temp=1 makes the second pass equal to the first: no guidance, as the official default does
    assert torch.equal(sample_flow(model, 6, guidance=2.0, attn_temp=1.0), plain)


def test_denoise_runs_before_the_clip():
    # An identity flow (init) has p = N(0, I): denoise(x) = x - sigma^2 x. Samples are z itself, many |z| > 1,
    # so clipping first would give clamp(z) * (1 - sigma^2) instead of clamp(z * (1 - sigma^2)).
    model = TarFlow(TarFlowConfig(img_size=8, channels=1, patch_size=2, num_blocks=2, layers_per_block=1,
                                  channels_model=32, head_dim=16)).eval()
    z, sigma = first_noise(8), 0.5
    x = sample_flow(model, 8, denoise_sigma=sigma)
    assert torch.allclose(x, (z * (1 - sigma**2)).clamp(-1, 1), atol=1e-6)
    assert not torch.allclose(x, z.clamp(-1, 1) * (1 - sigma**2), atol=1e-3)


def test_gaussian_noise_training_uses_the_official_full_range_mapping():
    ints = torch.tensor([0, 8, 16], dtype=torch.uint8).view(3, 1, 1, 1)
    data = ImageData(ints, None, 17, 0, "toy")
    cfg = FlowRecipe()
    cfg.data.noise, cfg.data.noise_std = "gaussian", 0.0
    x, _ = make_inputs(data, torch.arange(3), cfg, 0, 0)
    assert x.flatten().tolist() == [-1.0, 0.0, 1.0]  # k/(L-1)*2-1; bin centres would give +-0.941
    cfg.data.noise_std = 0.1
    x2, _ = make_inputs(data, torch.arange(3), cfg, 0, 0)
    noise = torch.randn((3, 1, 1, 1), generator=step_generator(0, 0, stream=2))
    assert torch.allclose(x2, x + 0.1 * noise)
    cfg.data.noise = "uniform"  # uniform dequantization keeps (k + u) / L * 2 - 1
    x3, _ = make_inputs(data, torch.arange(3), cfg, 0, 0)
    u = torch.rand((3, 1, 1, 1), generator=step_generator(0, 0, stream=2))
    assert torch.allclose(x3, (ints.float() + u) / 17 * 2 - 1)


class NanWhereLarge:
    """A stand-in flow whose reverse pass is the identity except that a sample whose first pixel exceeds 1 comes
    out NaN (as exp(alpha) overflows under strong guidance in a rare sample)."""

    config = SimpleNamespace(channels=1, img_size=8, num_classes=0)

    def reverse(self, z, y=None, **kw):
        bad = z[:, 0, 0, 0] > 1.0
        return torch.where(bad.view(-1, 1, 1, 1), torch.full_like(z, float("nan")), z)


def test_non_finite_samples_are_counted_and_redrawn():
    n, model = 64, NanWhereLarge()
    z = first_noise(n)
    bad = z[:, 0, 0, 0] > 1.0
    assert 3 <= int(bad.sum()) < n // 2
    stats = {}
    x = sample_flow(model, n, stats=stats)
    assert stats == {"non_finite": int(bad.sum()), "redrawn": 0} and torch.isnan(x[bad]).all()
    stats = {}
    x = sample_flow(model, n, resample_nonfinite=True, stats=stats)
    assert torch.isfinite(x).all() and x.shape == (n, 1, 8, 8)
    assert torch.equal(x[~bad], z[~bad].clamp(-1, 1))  # finite samples are kept as drawn
    assert stats["non_finite"] == int(bad.sum()) and stats["redrawn"] >= int(bad.sum())
    # the first redraw gives row r the r-th row of a fresh seeded draw
    z1 = torch.randn((n, 1, 8, 8), generator=step_generator(0, 1, stream=11))
    ok1 = bad & (z1[:, 0, 0, 0] <= 1.0)
    assert torch.equal(x[ok1], z1[ok1].clamp(-1, 1))
    always_bad = SimpleNamespace(config=model.config, reverse=lambda z, y=None, **kw: z * float("nan"))
    with pytest.raises(RunError, match="stayed non-finite"):
        sample_flow(always_bad, 4, resample_nonfinite=True)


TINY = ["recipes/train-flow/tarflow-digits.yaml", "arch.width=32", "arch.num_blocks=2", "arch.dropout=0",
        "train.batch_size=32", "train.warmup_steps=2", "train.steps=8", "eval.samples=0", "eval.test_bpd=false"]


def test_sample_cli_guidance_denoise_and_errors(tmp_path, capsys):
    """One real subprocess (`python -m genkit sample ... cfg=2`); the other commands go through the same entry
    point in-process (genkit.cli.main), which saves the interpreter start-ups."""
    from genkit.cli import main

    def genkit(*args):
        code = main([*map(str, args)])
        return code, capsys.readouterr().err.strip()

    run = tmp_path / "uniform"
    assert genkit("train-flow", *TINY, "--out", run, "-q")[0] == 0
    images = lambda d: np.load(d / "samples.npz")["images"]
    assert genkit("sample", "--ckpt", run, "--n", "6", "--out", tmp_path / "w0", "-q")[0] == 0
    run_genkit("sample", "--ckpt", run, "--n", "6", "cfg=2", "--out", tmp_path / "w2", "-q")
    assert np.abs(images(tmp_path / "w2") - images(tmp_path / "w0")).max() > 1e-4  # unconditional cfg guides
    m = json.loads((tmp_path / "w2" / "metrics.json").read_text())
    assert m["attn_temp_used"] == UNCOND_ATTN_TEMP and m["non_finite_samples"] == 0 and m["cfg_schedule"] == "constant"
    assert genkit("sample", "--ckpt", run, "--n", "6", "cfg=2", "cfg_schedule=annealed", "guide_what=a",
                  "--out", tmp_path / "ann", "-q")[0] == 0
    assert not np.array_equal(images(tmp_path / "ann"), images(tmp_path / "w2"))

    code, err = genkit("sample", "--ckpt", run, "cfg=-1", "--out", tmp_path / "neg")
    assert code == 2 and "cfg: -1.0 is negative" in err and len(err.splitlines()) == 1
    assert genkit("sample", "--ckpt", run, "--n", "2", "cfg=-1", "negative_cfg=true", "--out", tmp_path / "neg",
                  "-q")[0] == 0
    # uniform dequantization: Tweedie's step is not exact, so denoise needs an explicit sigma
    code, err = genkit("sample", "--ckpt", run, "denoise=true", "--out", tmp_path / "dn")
    assert code == 2 and "uniform dequantization" in err and len(err.splitlines()) == 1
    assert genkit("sample", "--ckpt", run, "--n", "2", "denoise=true", "sigma=0.03", "--out", tmp_path / "dn",
                  "-q")[0] == 0
    assert json.loads((tmp_path / "dn" / "metrics.json").read_text())["denoise_sigma"] == 0.03

    gauss = tmp_path / "gauss"  # Gaussian noise augmentation: the recorded sigma is the training noise
    assert genkit("train-flow", *TINY, "data.noise=gaussian", "data.noise_std=0.07", "train.steps=2", "--out", gauss,
                  "-q")[0] == 0
    info = json.loads((gauss / "model" / "data.json").read_text())
    assert info["noise_sigma"] == 0.07 and info["pixels"] == "k/(L-1)*2-1"
    assert genkit("sample", "--ckpt", gauss, "--n", "2", "denoise=true", "resample_nonfinite=true", "--out",
                  tmp_path / "gd", "-q")[0] == 0
    m = json.loads((tmp_path / "gd" / "metrics.json").read_text())
    assert m["denoise_sigma"] == 0.07 and m["redrawn_samples"] == 0
