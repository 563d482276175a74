"""Model-level tests of genkit.flows.starflow and the STARFlow switches on TarFlow's block: invertibility, exact
log-det, KV cache, equality with TarFlow when every switch is off, the guidance formula, RoPE positions."""

import math

import pytest
import torch

from genkit.errors import ConfigError
from genkit.flows.starflow import StarFlow, StarFlowConfig, uniform_config
from genkit.flows.switches import INV_SOFTPLUS_1, guide, rope_angles
from genkit.flows.tarflow import TarFlow, TarFlowConfig

torch.set_num_threads(1)


def tiny(**kw) -> StarFlowConfig:
    base = dict(img_size=4, channels=2, patch_size=1, layers_per_block=[1, 1, 2], channels_model=32, head_dim=16)
    return StarFlowConfig(**{**base, **kw})


def perturbed(cfg: StarFlowConfig, std: float = 0.05, seed: int = 0) -> StarFlow:
    """A non-identity flow: zero-initialised output projections and norm gains get small random values."""
    torch.manual_seed(seed)
    model = StarFlow(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.proj_out.weight.normal_(0, std)
            block.proj_out.bias.normal_(0, std)
            if block.final_norm is not None:
                block.final_norm.weight.normal_(0, 0.1)
    return model


def cond(cfg: StarFlowConfig, b: int = 3, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(b) % cfg.num_classes if cfg.num_classes else None
    txt = torch.randn(b, 5, cfg.txt_dim, generator=g) if cfg.txt_dim else None
    null = torch.zeros(b, 5, cfg.txt_dim) if cfg.txt_dim else None
    return y, txt, null


VARIANTS = {
    "class": dict(num_classes=3),
    "text": dict(txt_dim=12, head_dim=32, channels_model=64),
    "uncond-r2l": dict(seq_order="R2L", cond_top_only=False),
    "no-sos-exp": dict(num_classes=3, sos=False, softplus=False, rope=False),
}


def images(b=3, c=2, s=4, seed=1):
    return torch.randn(b, c, s, s, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_and_cache(variant):
    cfg = tiny(**VARIANTS[variant])
    model = perturbed(cfg)
    y, txt, null = cond(cfg)
    x = images()
    z, logdet = model(x, y, txt)
    assert (z - x).abs().max() > 1e-2 and logdet.abs().min() > 1e-3  # really not the identity
    assert (model.reverse(z, y, txt=txt) - x).abs().max() < 1e-4
    assert (model.reverse(z, y, txt=txt, use_cache=False) - x).abs().max() < 1e-4
    for kw in ({"guidance": 2.5}, {"guidance": 1.5, "guidance_kind": "tarflow", "attn_temp": 0.8},
               {"guidance": 2.0, "annealed_guidance": True}):
        a = model.reverse(z, y, txt=txt, txt_null=null, **kw)
        b = model.reverse(z, y, txt=txt, txt_null=null, use_cache=False, **kw)
        assert (a - b).abs().max() < 1e-5, kw


@pytest.mark.parametrize("variant", ["class", "text"])
def test_logdet_matches_autograd_jacobian(variant):
    cfg = tiny(**VARIANTS[variant])
    model = perturbed(cfg, std=0.1).double()
    y, txt, _ = cond(cfg, b=1)
    txt = None if txt is None else txt.double()
    x = images(b=1).double()
    jac = torch.autograd.functional.jacobian(lambda v: model(v.view(1, 2, 4, 4), y, txt)[0].flatten(), x.flatten())
    sign, logabsdet = torch.linalg.slogdet(jac)  # (32, 32)
    _, logdet = model(x, y, txt)
    assert sign.item() == 1.0 and abs(logdet.item()) > 0.1
    assert abs(logdet.item() - logabsdet.item()) < 1e-8


def test_identity_at_init_and_start_token():
    cfg = tiny(num_classes=3)
    model = StarFlow(cfg).eval()
    x, y = images(), torch.tensor([0, 1, 3])
    z, logdet = model(x, y)  # zero output projection: sigma = softplus(log(e - 1)) = 1, mu = 0
    assert torch.allclose(z, x, atol=1e-6) and logdet.abs().max() < 1e-5
    assert abs(torch.nn.functional.softplus(torch.tensor(INV_SOFTPLUS_1)).item() - 1.0) < 1e-7
    # the start token makes token 0 transformed too: a shift bias moves every token, the first one read included
    D = cfg.token_dim
    with torch.no_grad():
        model.blocks[0].proj_out.bias[D:].fill_(0.3)  # mu = 0.3, sigma = 1
    z, _ = model(x, y)
    shift = 4 * math.tanh(0.3 / 4)  # soft clip 4
    assert torch.allclose(z, x - shift, atol=1e-6)
    tar = StarFlow(tiny(num_classes=3, sos=False)).eval()
    with torch.no_grad():
        tar.blocks[0].proj_out.bias[D:].fill_(0.3)
    # without it the first token the block reads (the last one: block 0 is flipped under L2R) passes through
    tok = tar.patchify(tar(x, y)[0] - x)  # (B, T, D)
    assert torch.equal(tok[:, -1], torch.zeros_like(tok[:, -1])) and torch.allclose(tok[:, :-1], torch.tensor(-shift))


def test_soft_clip_bounds_the_scale():
    cfg = tiny(soft_clip=4.0)
    model = StarFlow(cfg).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.proj_out.bias.fill_(100.0)  # without the clip: sigma = softplus(100 + c) ~ 100
    _, logdet = model(images())
    per_dim = -logdet / 32 / len(model.blocks)
    assert abs(per_dim.mean().item() - math.log(torch.nn.functional.softplus(torch.tensor(4.0 + INV_SOFTPLUS_1)))) \
        < 1e-4


def test_every_switch_off_equals_tarflow():
    tcfg = TarFlowConfig(img_size=4, channels=2, patch_size=2, num_blocks=3, layers_per_block=2, channels_model=32,
                         head_dim=16, num_classes=3)
    torch.manual_seed(0)
    tar = TarFlow(tcfg).eval()
    with torch.no_grad():
        for name, p in sorted(tar.named_parameters()):
            p.normal_(0, 0.1)
            if name.endswith("norm.weight"):
                p.add_(1.0)
    star = StarFlow(uniform_config(img_size=4, channels=2, patch_size=2, layers_per_block=[2, 2, 2],
                                   channels_model=32, head_dim=16, num_classes=3)).eval()
    star.load_state_dict({k: v for k, v in tar.state_dict().items() if k != "var"})  # same names, strict
    x, y = images(), torch.tensor([0, 1, 3])
    for a, b in zip(tar(x, y), star(x, y)):
        assert torch.equal(a, b)
    assert torch.equal(tar.reverse(x, y), star.reverse(x, y))
    kw = dict(guidance=1.5, attn_temp=0.8, annealed_guidance=True)
    assert torch.equal(tar.reverse(x, y, **kw), star.reverse(x, y, guidance_kind="tarflow", **kw))


def test_guidance_formula():
    g = torch.Generator().manual_seed(0)
    mu, mu_u, ls = (torch.randn(5, 4, generator=g) for _ in range(3))
    for w in (0.0, 1.0, 2.5, 7.0):
        # equal scales: STARFlow guidance is ordinary CFG on mu and keeps the scale
        ls2, m2 = guide(ls, mu, ls, mu_u, w, "starflow")
        assert torch.allclose(ls2, ls, atol=1e-6) and torch.allclose(m2, (1 + w) * mu - w * mu_u, atol=1e-5)
    # by hand: sigma_c = 1, sigma_u = 2 -> s = 1/4; w = 2: 1 + w - w s = 2.5
    ls2, m2 = guide(torch.zeros(1), torch.ones(1), torch.full((1,), math.log(2.0)), torch.zeros(1), 2.0, "starflow")
    assert abs(ls2.item() - math.log(1 / math.sqrt(2.5))) < 1e-6 and abs(m2.item() - 3.0 / 2.5) < 1e-6
    # sigma_c > sigma_u: s is capped at 1, so it is CFG on mu with the conditional scale
    ls2, m2 = guide(torch.ones(1), torch.ones(1), torch.zeros(1), torch.zeros(1), 3.0, "starflow")
    assert abs(ls2.item() - 1.0) < 1e-6 and abs(m2.item() - 4.0) < 1e-6
    # tarflow kind: extrapolation of the log-scale and the shift
    ls2, m2 = guide(ls, mu, torch.zeros_like(ls), mu_u, 2.0, "tarflow")
    assert torch.allclose(ls2, 3 * ls) and torch.allclose(m2, 3 * mu - 2 * mu_u)


def test_starflow_guidance_equals_cfg_on_a_model_and_stays_finite():
    cfg = tiny(num_classes=3, softplus=False)  # exp parameterisation: force sigma_c = sigma_u below
    model = perturbed(cfg, std=0.2)
    deep = model.deep
    with torch.no_grad():  # alpha rows of the deep block's output projection: bias only, no dependence on labels
        D = cfg.token_dim
        deep.proj_out.weight[:D].zero_()
    z, y = images(), torch.tensor([0, 1, 2])
    a = model.reverse(z, y, guidance=2.0, guidance_kind="starflow")
    b = model.reverse(z, y, guidance=2.0, guidance_kind="tarflow", guide_what="b")  # CFG on mu only
    assert (a - b).abs().max() < 1e-4 and (a - model.reverse(z, y)).abs().max() > 1e-3
    model = perturbed(tiny(num_classes=3), std=0.5)
    for w in (8.0, 50.0):
        assert torch.isfinite(model.reverse(z, y, guidance=w)).all()


def test_rope_angles_follow_the_official_positions():
    side, hd = 4, 32
    a = rope_angles(hd, side, torch.arange(16))  # (16, 16): 8 pairs for rows, 8 for columns
    f = 10000.0 ** (-torch.arange(0, 16, 2).double() / 16)
    p = 6  # row 1, col 2
    assert torch.allclose(a[p].double(), torch.cat([1 * f, 2 * f]), atol=1e-6)
    # with text: 4 + 4 pairs for the image axes, 8 for the text axis; text token l at l / L * side
    at = rope_angles(hd, side, torch.arange(2), torch.arange(5), 5, with_text=True)  # (5 + 2, 16)
    f1 = 10000.0 ** (-torch.arange(0, 8, 2).double() / 8)
    f2 = 10000.0 ** (-torch.arange(8).double() / 8)
    assert torch.allclose(at[3].double(), torch.cat([torch.zeros(8), 3 / 5 * 4 * f2]), atol=1e-6)
    assert torch.allclose(at[5 + 1].double(), torch.cat([0 * f1, 1 * f1, torch.zeros(8)]), atol=1e-6)


def test_deep_shallow_layout_and_config_errors(tmp_path):
    cfg = tiny(layers_per_block=[1, 1, 1, 5], num_classes=10)
    model = StarFlow(cfg)
    assert [len(b.attn_blocks) for b in model.blocks] == [1, 1, 1, 5]
    assert [b.class_embed is not None for b in model.blocks] == [False, False, False, True]  # deep block only
    assert [b.flip for b in model.blocks] == [True, False, True, False]  # L2R: the deep block reads in order
    assert all(b.pos_embed is None and b.sos_embed is not None for b in model.blocks)
    model.save_pretrained(tmp_path / "m")
    loaded = StarFlow.from_pretrained(tmp_path / "m")
    assert loaded.config == cfg
    with pytest.raises(ConfigError) as err:
        StarFlowConfig(layers_per_block=[], num_classes=3, txt_dim=8, seq_order="up")
    assert len(err.value.problems) == 3
    with pytest.raises(ConfigError, match="rope needs head_dim"):
        StarFlowConfig(txt_dim=8, head_dim=8, channels_model=32)
