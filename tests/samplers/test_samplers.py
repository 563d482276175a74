"""Samplers: parity with float64 references and diffusers, convergence order, mixtures, NFE, errors."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from genkit.errors import ConfigError
from genkit.eval.mixture import mean_log_density, mode_tv, reference_mode_masses, sliced_w2
from genkit.models.denoisers import EDMPrecond, GaussianMixtureDenoiser, NFECounter, load_denoiser
from genkit.samplers import (SAMPLERS, expected_nfe, get_sampler, get_sigmas_exponential, get_sigmas_karras,
                             sample_euler, sigmas_for_nfe, steps_for_nfe)

REPO = Path(__file__).resolve().parents[2]


def ring():
    return load_denoiser(REPO / "recipes" / "mixtures" / "ring2d.yaml")


# --- references written from EDM Algorithm 1/2 (sigma(t) = t, s(t) = 1), float64 -----------------------


def reference_edm(denoiser, x, t_steps, second_order, churn=0.0, generator=None):
    """Karras et al. 2022 Algorithm 2 transcribed line by line (t_N = 0)."""
    n = len(t_steps) - 1
    x_i = x.to(torch.float64)
    for i in range(n):
        t_i, t_next = float(t_steps[i]), float(t_steps[i + 1])
        gamma = min(churn / n, math.sqrt(2) - 1)
        t_hat = t_i + gamma * t_i
        if gamma > 0:
            x_i = x_i + math.sqrt(t_hat ** 2 - t_i ** 2) * torch.randn(x.shape, generator=generator,
                                                                      dtype=torch.float64)
        d_i = (x_i - denoiser(x_i, torch.full((x.shape[0],), t_hat, dtype=torch.float64))) / t_hat
        x_next = x_i + (t_next - t_hat) * d_i
        if second_order and t_next != 0:
            d_prime = (x_next - denoiser(x_next, torch.full((x.shape[0],), t_next, dtype=torch.float64))) / t_next
            x_next = x_i + (t_next - t_hat) * (0.5 * d_i + 0.5 * d_prime)
        x_i = x_next
    return x_i


@pytest.mark.parametrize("name, second_order", [("euler", False), ("heun", True)])
def test_euler_heun_match_reference(name, second_order):
    gm = ring()
    sigmas = get_sigmas_karras(12)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    ref = reference_edm(gm, x, sigmas, second_order)
    torch.testing.assert_close(SAMPLERS[name](gm, x, sigmas), ref, rtol=1e-10, atol=1e-10)
    # float32 state: same answer to float32 accuracy
    torch.testing.assert_close(SAMPLERS[name](gm, x.float(), sigmas), ref.float(), rtol=1e-5, atol=1e-5)
    # stochastic churn (EDM Alg. 2 lines 4-6) with the same noise stream
    ref_c = reference_edm(gm, x, sigmas, second_order, churn=10.0, generator=torch.Generator().manual_seed(3))
    got_c = SAMPLERS[name](gm, x, sigmas, s_churn=10.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got_c, ref_c, rtol=1e-10, atol=1e-10)
    assert (got_c - ref).abs().max() > 1e-3  # churn did something


class TinyNet(nn.Module):
    """A fixed nonlinear 'raw network' F(x_in, c_noise) for the preconditioning path."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 4, generator=g) / 2)

    def forward(self, x, c_noise):
        return torch.tanh(x @ self.w + c_noise[:, None])


def test_euler_matches_diffusers_edm_euler_scheduler():
    diffusers = pytest.importorskip("diffusers")
    net = TinyNet()
    sched = diffusers.EDMEulerScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0,
                                        prediction_type="epsilon")
    sched.set_timesteps(18)
    sigmas = sched.sigmas.double()
    torch.testing.assert_close(sigmas, get_sigmas_karras(18), rtol=1e-6, atol=0)  # same Karras schedule
    x0 = torch.randn(32, 4, generator=torch.Generator().manual_seed(1)) * float(sigmas[0])
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            out = net(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]))
            x = sched.step(out, t, x).prev_sample
    ours = sample_euler(EDMPrecond(net), x0, sigmas)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_schedules():
    s = get_sigmas_karras(10, 0.002, 80.0, 7.0)
    assert len(s) == 11 and s[-1] == 0 and abs(s[0] - 80) < 1e-12 and abs(s[-2] - 0.002) < 1e-15
    assert (s[:-1].diff() < 0).all()
    e = get_sigmas_exponential(5, 0.01, 10.0)
    torch.testing.assert_close(e[:-1].log().diff(), torch.full((4,), math.log(1e-3) / 4, dtype=torch.float64))


def test_convergence_order_on_exact_pf_ode():
    """Single Gaussian N(m0, s0^2): the PF-ODE solution is x(s) = m0 + (x(S) - m0) sqrt((s0^2 + s^2) /
    (s0^2 + S^2)). Halving the step should cut the error ~2x (Euler) and ~4x (Heun, DPM-Solver++(2M))."""
    m0, s0 = 0.3, 0.5
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    x = torch.tensor([[3.0], [-7.0]], dtype=torch.float64)
    big, small = 10.0, 0.05
    exact = m0 + (x - m0) * math.sqrt((s0 ** 2 + small ** 2) / (s0 ** 2 + big ** 2))
    for name, order in [("euler", 1), ("heun", 2), ("dpmpp-2m", 2)]:
        errs = []
        for n in (16, 32, 64):
            sig = torch.exp(torch.linspace(math.log(big), math.log(small), n + 1, dtype=torch.float64))
            errs.append(float((SAMPLERS[name](gm, x, sig) - exact).abs().max()))
        rates = [math.log2(errs[i] / errs[i + 1]) for i in range(2)]
        assert all(abs(r - order) < 0.25 for r in rates), (name, errs, rates)


@pytest.fixture(scope="module")
def grid_setup():
    gm = load_denoiser(REPO / "recipes" / "mixtures" / "grid2d.yaml")
    ref = gm.sample(8000, generator=torch.Generator().manual_seed(5))
    return gm, ref, mean_log_density(gm, ref), reference_mode_masses(gm, 50_000)


@pytest.mark.parametrize("name, nfe", [("euler", 200), ("heun", 79), ("dpmpp-2m", 40), ("unipc", 40),
                                       ("tada", 40)])
def test_every_sampler_converges_to_mixture(name, nfe, grid_setup):
    """5x5 grid, 3000 samples, exact teacher. Thresholds sit between the converged values (sliced W2 ~0.04
    = the two-sample floor, mode TV ~0.045 vs a floor of ~0.035, log-density gap < 0.13) and what the same
    samplers give at a quarter of the NFE (sliced W2 > 0.08 or TV > 0.07 or log-density gap > 0.7)."""
    gm, ref, log_density_exact, masses = grid_setup
    sigmas = sigmas_for_nfe(name, nfe)
    x = torch.randn(3000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    knobs = {"generator": torch.Generator().manual_seed(1)} if name == "tada" else {}
    out = SAMPLERS[name](gm, x, sigmas, **knobs)
    assert sliced_w2(out, ref) < 0.05
    assert mode_tv(gm, out, masses) < 0.06
    assert abs(mean_log_density(gm, out) - log_density_exact) < 0.2


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("nfe", [3, 4, 7, 10])
def test_nfe_counts(name, nfe):
    gm = ring()
    sigmas = sigmas_for_nfe(name, nfe)
    counter = NFECounter(gm)
    SAMPLERS[name](counter, torch.randn(5, 2, dtype=torch.float64) * sigmas[0], sigmas)
    assert counter.calls == expected_nfe(name, len(sigmas) - 1)
    assert counter.rows == 5 * counter.calls
    want = nfe - 1 if (name == "heun" and nfe % 2 == 0) else nfe  # Heun spends 2N - 1
    assert counter.calls == want


def test_steps_for_nfe_values():
    assert [steps_for_nfe("heun", n) for n in (3, 4, 5, 35)] == [2, 2, 3, 18]
    assert [steps_for_nfe(s, 10) for s in ("euler", "dpmpp-2m", "unipc", "tada")] == [10, 10, 10, 10]
    exp = sigmas_for_nfe("dpmpp-2m", 4, schedule="exponential")
    torch.testing.assert_close(exp, get_sigmas_exponential(4))
    uni = sigmas_for_nfe("heun", 5, schedule="uniform-t")  # 3 steps, uniform in TADA's t
    assert len(uni) == 4 and uni[-1] == 0 and float(uni[0]) == 80.0 and abs(float(uni[2]) - 0.002) < 1e-15
    with pytest.raises(ConfigError, match="unknown schedule 'cosine'; valid schedules: karras, exponential, uniform-t"):
        sigmas_for_nfe("euler", 4, schedule="cosine")


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        get_sampler("ddim")
    for name in SAMPLERS:
        assert name in str(e.value)


@pytest.mark.parametrize("name, nfe", [("heun", 2), ("dpmpp-2m", 2), ("unipc", 2), ("tada", 2),
                                       ("euler", 0)])
def test_nfe_too_small_is_config_error(name, nfe):
    with pytest.raises(ConfigError, match=f"nfe={nfe} is too small for sampler '{name}'"):
        steps_for_nfe(name, nfe)
