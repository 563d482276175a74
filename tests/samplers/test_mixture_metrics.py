"""genkit.eval.mixture: exact metrics against an analytic Gaussian mixture."""

from pathlib import Path

import torch

from genkit.eval.mixture import (mean_log_density, mixture_metrics, mode_masses, mode_tv, projections,
                                 reference_mode_masses, sliced_w2)
from genkit.models.denoisers import load_denoiser

REPO = Path(__file__).resolve().parents[2]


def test_metrics_on_exact_and_broken_samples():
    gm = load_denoiser(REPO / "recipes" / "mixtures" / "ring2d.yaml")
    masses = reference_mode_masses(gm, 50_000)
    torch.testing.assert_close(masses, gm.weights, atol=1e-2, rtol=0)  # well-separated modes
    exact = gm.sample(4000, generator=torch.Generator().manual_seed(1))
    m = mixture_metrics(gm, exact, n_ref=4000, seed=2, reference_masses=masses)
    assert m["mode_tv"] < 0.04 and m["sliced_w2"] < 2 * m["sliced_w2_floor"] + 0.01
    assert abs(m["log_density"] - m["log_density_exact"]) < 0.1
    # everything on mode 0: TV = 1 - w_0 (up to the reference's sampling error)
    collapsed = gm.means[:1].expand(500, 2)
    assert abs(mode_tv(gm, collapsed, masses) - (1 - float(masses[0]))) < 1e-12
    assert mode_masses(gm, collapsed)[0] == 1
    # log-density is the mixture's exact log-density
    assert abs(mean_log_density(gm, exact[:10]) - float(gm.log_prob(exact[:10]).mean())) < 1e-12


def test_sliced_w2_of_a_shift_is_exact():
    a = torch.randn(1000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    theta = projections(3, 64, seed=7)
    want = float(((theta @ shift) ** 2).mean().sqrt())
    assert abs(sliced_w2(a, a + shift, n_proj=64, seed=7) - want) < 1e-12
    assert sliced_w2(a, a, n_proj=64, seed=7) == 0
    # unequal sizes go through matched quantiles
    assert abs(sliced_w2(a, (a + shift)[:500], n_proj=64, seed=7) - want) < 0.1
