"""Model-level tests of genkit.flows.tarflow: invertibility, exact log-det, identity at init, KV cache,
guidance, denoising on an analytic density, checkpoints, and parity with the official apple/ml-tarflow code."""

import json
import math

import pytest
import torch

from genkit.errors import ConfigError
from genkit.flows.tarflow import TarFlow, TarFlowConfig, denoise, drop_labels

torch.set_num_threads(1)


def tiny(**kw) -> TarFlowConfig:
    base = {"img_size": 8, "channels": 1, "patch_size": 2, "num_blocks": 3, "layers_per_block": 1, "channels_model": 32,
                "head_dim": 16, "num_classes": 0}
    return TarFlowConfig(**{**base, **kw})


def perturbed(cfg: TarFlowConfig, std: float = 0.05, seed: int = 0) -> TarFlow:
    """A non-identity flow: the zero-initialised output projections get small random weights."""
    torch.manual_seed(seed)
    model = TarFlow(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, std)
            block.proj_out.bias.normal_(0, std)
    return model


def images(b=4, c=1, s=8, seed=1):
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


def test_config_round_trip_and_validation():
    cfg = tiny(num_classes=10, dropout=0.1)
    d = cfg.to_dict()
    assert d["model_type"] == "tarflow" and TarFlowConfig.from_dict(d) == cfg
    assert (cfg.num_patches, cfg.token_dim) == (16, 4)
    with pytest.raises(ConfigError, match="unknown TarFlow config key 'width'"):
        TarFlowConfig.from_dict({**d, "width": 3})
    with pytest.raises(ConfigError) as err:  # all problems reported at once
        TarFlowConfig(img_size=9, patch_size=2, channels_model=30, head_dim=16)
    assert len(err.value.problems) == 2


def test_patchify_layout():
    model = TarFlow(tiny())
    x = torch.arange(64.0).view(1, 1, 8, 8)
    tokens = model.patchify(x)  # (1, 16, 4)
    assert tokens.shape == (1, 16, 4)
    assert tokens[0, 0].tolist() == [0, 1, 8, 9] and tokens[0, 1].tolist() == [2, 3, 10, 11]
    assert torch.equal(model.unpatchify(tokens), x)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_identity_at_init(num_classes):
    # Every block un-flips its output, so even with an odd number of flipped blocks z == x exactly.
    model = TarFlow(tiny(num_blocks=3, num_classes=num_classes)).eval()
    x = images()
    y = torch.tensor([0, 1, 2, 3]) if num_classes else None  # 3 = null label
    z, logdet = model(x, y)
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(4))
    assert torch.equal(model.reverse(x, y), x)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_invertibility(num_classes):
    model = perturbed(tiny(num_blocks=4, layers_per_block=2, num_classes=num_classes))
    x = images()
    y = torch.tensor([0, 1, 2, 1]) if num_classes else None
    z, logdet = model(x, y)
    assert logdet.shape == (4,) and z.shape == x.shape
    assert (z - x).abs().max() > 1e-2 and logdet.abs().min() > 1e-3  # really not the identity
    assert (model.reverse(z, y) - x).abs().max() < 1e-4
    assert (model.reverse(z, y, use_cache=False) - x).abs().max() < 1e-4


@pytest.mark.parametrize("num_classes", [0, 2])
def test_logdet_matches_autograd_jacobian(num_classes):
    model = perturbed(tiny(img_size=4, num_blocks=3, num_classes=num_classes), std=0.1).double()
    x = images(b=1, s=4).double()
    y = torch.tensor([1]) if num_classes else None
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 1, 4, 4), y)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)  # (16, 16)
    _, logdet = model(x, y)
    assert sign.item() == 1.0 and abs(logdet.item()) > 0.1
    assert abs(logdet.item() - logabsdet.item()) < 1e-8


def test_volume_preserving_variant():
    model = perturbed(tiny(nvp=False))
    x = images()
    z, logdet = model(x)
    assert torch.equal(logdet, torch.zeros(4)) and (model.reverse(z) - x).abs().max() < 1e-4
    model.update_prior(2 * z)  # var <- 0.9 * 1 + 0.1 * E[(2z)^2]; reverse then scales the noise by sqrt(var)
    assert torch.allclose(model.var, 0.9 + 0.4 * model.patchify(z).pow(2).mean(0))


def test_loss_and_log_prob_conventions():
    model = perturbed(tiny())
    x = images()
    z, logdet = model(x)
    n = 64
    assert torch.allclose(model.loss(x), 0.5 * z.pow(2).mean() - logdet.mean() / n)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).flatten(1).sum(1) + logdet
    assert torch.allclose(model.log_prob(x), expected, atol=1e-4)
    # loss = mean NLL per dim - 0.5 log(2 pi)
    assert torch.allclose(model.loss(x), -model.log_prob(x).mean() / n - 0.5 * math.log(2 * math.pi), atol=1e-6)


@pytest.mark.parametrize("num_classes", [0, 3])
def test_cached_reverse_equals_uncached(num_classes):
    model = perturbed(tiny(num_blocks=2, layers_per_block=2, num_classes=num_classes))
    z = images()
    y = torch.tensor([0, 1, 2, 0]) if num_classes else None
    for kw in ({}, {"guidance": 1.5, "attn_temp": 0.7, "annealed_guidance": True}, {"guidance": 2.0, "guide_what": "b"}):
        a, b = model.reverse(z, y, **kw), model.reverse(z, y, use_cache=False, **kw)
        assert (a - b).abs().max() < 1e-5, kw


def test_guidance():
    model = perturbed(tiny(num_blocks=2, num_classes=3))
    z, y = images(), torch.tensor([0, 1, 2, 0])
    plain = model.reverse(z, y)
    assert torch.equal(model.reverse(z, y, guidance=0.0, attn_temp=0.5, annealed_guidance=True), plain)
    assert torch.equal(model.reverse(z, y, guidance=2.0, guide_what=""), plain)
    for kw in ({"guidance": 1.0}, {"guidance": 1.0, "annealed_guidance": True}, {"guidance": 1.0, "guide_what": "a"}):
        assert (model.reverse(z, y, **kw) - plain).abs().max() > 1e-3, kw
    # Unconditional model: guidance acts only through the attention temperature of the second pass.
    uncond = perturbed(tiny(num_blocks=2))
    plain = uncond.reverse(z)
    assert torch.equal(uncond.reverse(z, guidance=1.0, attn_temp=1.0), plain)
    assert (uncond.reverse(z, guidance=1.0, attn_temp=0.5) - plain).abs().max() > 1e-3


def test_null_label_and_drop_labels():
    model = perturbed(tiny(num_blocks=2, num_classes=3))
    x = images(b=2)
    z_none, _ = model(x)
    for null in (torch.tensor([3, 3]), torch.tensor([-1, -1])):  # genkit's null label and the official -1
        assert torch.equal(model(x, null)[0], z_none)
    assert not torch.allclose(model(x, torch.tensor([0, 0]))[0], z_none)
    y = torch.arange(3).repeat(100)  # (300,)
    assert torch.equal(drop_labels(y, 0.0, 3), y)
    assert torch.equal(drop_labels(y, 1.0, 3), torch.full_like(y, 3))
    g = lambda: torch.Generator().manual_seed(0)
    dropped = drop_labels(y, 0.3, 3, generator=g())
    assert torch.equal(dropped, drop_labels(y, 0.3, 3, generator=g()))
    assert 0.15 < (dropped == 3).float().mean() < 0.45 and torch.equal(dropped[dropped != 3], y[dropped != 3])


def test_denoise_exact_on_identity_flow():
    # At init the flow is the identity, so p = N(0, I), grad log p(x) = -x and denoise(x) = x - sigma^2 x.
    model, x, sigma = TarFlow(tiny(num_classes=2)).eval(), images(), 0.3
    expected = x - sigma**2 * x
    assert torch.allclose(denoise(model, x, sigma=sigma), expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(denoise(model, x, torch.tensor([0, 1, 2, 1]), sigma), expected, atol=1e-6)
    with torch.inference_mode():
        assert torch.allclose(denoise(model, x, sigma=sigma, step_scale=0.5), x - 0.5 * sigma**2 * x, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())


def test_denoise_matches_official_step():
    # Official evaluate_fid.py: x - lr * grad_x(mean loss), lr = B * N * sigma^2.
    model, x, sigma = perturbed(tiny()), images(), 0.1
    xr = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model.loss(xr), xr)
    assert torch.allclose(denoise(model, x, sigma=sigma), x - 4 * 64 * sigma**2 * grad, atol=1e-6)


def test_save_load_round_trip(tmp_path):
    model = perturbed(tiny(num_classes=3, nvp=False))
    model.var.fill_(1.5)
    folder = tmp_path / "ckpt"
    model.save_pretrained(folder)
    model.save_pretrained(folder)  # overwriting an existing folder is atomic too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    assert json.loads((folder / "config.json").read_text())["model_type"] == "tarflow"
    loaded = TarFlow.from_pretrained(folder).eval()
    assert loaded.config == model.config
    x, y = images(), torch.tensor([0, 1, 2, 3])
    for a, b in zip(model(x, y), loaded(x, y)):
        assert torch.equal(a, b)
    assert torch.equal(model.reverse(x, y, guidance=1.0), loaded.reverse(x, y, guidance=1.0))
    with pytest.raises(ConfigError, match="missing config.json"):
        TarFlow.from_pretrained(tmp_path / "nowhere")


def test_parity_with_official_code():
    """Numbers from the official apple/ml-tarflow `transformer_flow.Model` (commit 313120e), in_channels=1,
    img_size=4, patch_size=2, channels=64, num_blocks=2, layers_per_block=1, num_classes=2, with every
    parameter (sorted by name) set to 0.1 * randn from Generator().manual_seed(0), plus 1 for LayerNorm
    weights. Same state-dict names here, so the same fill gives the same weights."""
    model = TarFlow(TarFlowConfig(img_size=4, channels=1, patch_size=2, num_blocks=2, layers_per_block=1,
                                  channels_model=64, head_dim=64, num_classes=2)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0))
    g = torch.Generator().manual_seed(1)
    x, noise = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 4, 4, generator=g)  # noise as tokens
    y = torch.tensor([0, 1])
    z, logdet = model(x, y)
    close = lambda a, b: torch.allclose(a.flatten()[:6], torch.tensor(b), atol=1e-4)
    assert close(z, [-0.036969, -0.658858, 2.96436, -2.09577, -0.508933, -0.101366])
    assert torch.allclose(logdet, torch.tensor([-3.343466, 2.43809]), atol=1e-4)
    noise = model.unpatchify(noise)
    assert close(model.reverse(noise, y), [1.380145, 1.39194, 0.096112, 0.528053, 1.457654, -0.707437])
    guided = model.reverse(noise, y, guidance=1.5, attn_temp=0.8, annealed_guidance=True)
    assert close(guided, [0.832201, 1.712238, -0.054477, 0.544673, 1.580022, -0.85293])
    # Non-annealed guidance and each letter of guide_what alone (official Model.reverse(noise, y, 1.5, ...)).
    assert close(model.reverse(noise, y, guidance=1.5, guide_what="a"),
                 [0.581818, 1.259315, 0.061763, 0.553455, 1.396696, -0.371771])
    assert close(model.reverse(noise, y, guidance=1.5, guide_what="b"),
                 [1.623739, 1.764235, -0.08804, 0.446615, 1.703029, -1.196188])
    assert close(model.reverse(noise, y, guidance=1.5, attn_temp=0.8),
                 [0.852673, 1.678145, -0.173631, 0.543273, 1.643315, -0.84323])


def test_parity_with_official_code_unconditional_attention_temperature_guidance():
    """As above with num_classes=0 (the same fill over the unconditional model's parameters): the paper's
    attention-temperature guidance, official Model.reverse(noise, None, w, attn_temp=tau[, annealed])."""
    model = TarFlow(TarFlowConfig(img_size=4, channels=1, patch_size=2, num_blocks=2, layers_per_block=1,
                                  channels_model=64, head_dim=64, num_classes=0)).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            p.copy_(0.1 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("norm.weight") else 0.0))
    g = torch.Generator().manual_seed(1)
    torch.randn(2, 1, 4, 4, generator=g)  # x of the conditional case, to draw the same noise
    noise = model.unpatchify(torch.randn(2, 4, 4, generator=g))
    close = lambda a, b: torch.allclose(a.flatten()[:6], torch.tensor(b), atol=1e-4)
    assert close(model.reverse(noise), [5.141449, 1.85967, -0.269107, 0.318293, 0.022734, -1.371957])
    assert close(model.reverse(noise, guidance=1.5, attn_temp=0.5),
                 [5.6004, 1.78761, -0.220884, 0.384364, -0.074434, -1.349669])
    assert close(model.reverse(noise, guidance=2.0, attn_temp=1.5, annealed_guidance=True),
                 [4.33608, 2.069773, -0.367735, 0.205107, 0.230192, -1.460342])
