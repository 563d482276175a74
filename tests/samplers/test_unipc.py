"""UniPC (genkit/samplers/unipc.py): parity with diffusers' UniPCMultistepScheduler, convergence order, errors."""

import math
from pathlib import Path

import pytest
import torch

from genkit.errors import ConfigError
from genkit.models.denoisers import GaussianMixtureDenoiser, load_denoiser
from genkit.samplers import get_sigmas_karras, sample_unipc

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def diffusers_unipc(denoiser, x, sigmas, order, variant):
    """diffusers' scheduler on the VP scale x_vp = x / sqrt(1 + sigma^2), its sigmas replaced by ours (float64),
    the model given as a data prediction ("sample") from our VE denoiser."""
    diffusers = pytest.importorskip("diffusers")
    n_steps = len(sigmas) - 1
    sched = diffusers.UniPCMultistepScheduler(solver_order=order, solver_type=variant, prediction_type="sample",
                                              lower_order_final=True)
    sched.set_timesteps(n_steps)
    assert len(sched.timesteps) == n_steps
    sched.sigmas = sigmas.clone()
    x_vp = x / math.sqrt(1 + float(sigmas[0]) ** 2)
    for j, t in enumerate(sched.timesteps):
        s = float(sigmas[j])
        x_vp = sched.step(denoiser(x_vp * math.sqrt(1 + s ** 2), s), t, x_vp).prev_sample
    return x_vp * math.sqrt(1 + float(sigmas[-1]) ** 2)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh2", "bh1"])
@pytest.mark.parametrize("steps", [3, 10])
def test_matches_diffusers_unipc(order, variant, steps):
    gm = load_denoiser(REPO / "recipes" / "mixtures" / "ring2d.yaml")
    sig = get_sigmas_karras(steps)
    if variant == "bh1":  # diffusers' bh1 computes -inf * 0 on the step to sigma = 0: compare a schedule ending above
        sig = get_sigmas_karras(steps + 1)[:-1]
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig[0]
    want = diffusers_unipc(gm, x, sig, order, variant)
    got = sample_unipc(gm, x, sig, order=order, variant=variant)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_convergence_order_on_exact_pf_ode():
    """Single Gaussian: the corrector raises the order by one (UniPC Sec. 3.2): UniP-1 (DDIM) is first order,
    UniPC-1 second, UniP-2 second, UniPC-2 above second."""
    m0, s0 = 0.3, 0.5
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    x = torch.tensor([[3.0], [-7.0]], dtype=torch.float64)
    big, small = 10.0, 0.05
    exact = m0 + (x - m0) * math.sqrt((s0 ** 2 + small ** 2) / (s0 ** 2 + big ** 2))
    for knobs, lo, hi in [({"order": 1, "corrector": False}, 0.8, 1.2), ({"order": 1}, 1.75, 2.25),
                          ({"order": 2, "corrector": False}, 1.6, 2.25), ({"order": 2}, 2.8, 5.0)]:
        errs = []
        for n in (16, 32, 64):
            sig = torch.exp(torch.linspace(math.log(big), math.log(small), n + 1, dtype=torch.float64))
            errs.append(float((sample_unipc(gm, x, sig, **knobs) - exact).abs().max()))
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(lo < r < hi for r in rates), (knobs, errs, rates)


def test_bad_knobs_are_config_errors():
    gm = GaussianMixtureDenoiser([[0.0]], stds=[1.0])
    x = torch.zeros(2, 1, dtype=torch.float64)
    with pytest.raises(ConfigError, match="order must be 1, 2 or 3"):
        sample_unipc(gm, x, get_sigmas_karras(4), order=4)
    with pytest.raises(ConfigError, match="variant"):
        sample_unipc(gm, x, get_sigmas_karras(4), variant="bh3")
    with pytest.raises(ConfigError, match="strictly decreasing"):
        sample_unipc(gm, x, torch.tensor([1.0, 2.0, 0.0]))
