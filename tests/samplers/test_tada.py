"""TADA (genkit reconstruction, genkit/samplers/tada.py (G1)-(G7)): exact checks of every ingredient."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from genkit.models.denoisers import GaussianMixtureDenoiser
from genkit.samplers import get_sigmas_karras, sample_tada
from genkit.samplers.tada import MomentumSystem

CASES = [(2, 0.0), (2, 1.5), (3, 0.0), (3, 2.0)]


@pytest.mark.parametrize("order, k", CASES)
def test_closed_form_covariance_solves_lyapunov_ode(order, k):
    """(G2) Sigma_t = e^{At} Sigma_0 e^{A^T t} + Q(t) solves dSigma/dt = A Sigma + Sigma A^T + g^2 e e^T."""
    s = MomentumSystem(order, k)
    n = s.n
    noise = np.zeros((n, n))
    noise[-1, -1] = s.g2

    def rhs(_, y):
        sig = y.reshape(n, n)
        return (s.A @ sig + sig @ s.A.T + noise).ravel()

    ts = np.array([0.05, 0.7, 3.0, 20.0])
    sol = solve_ivp(rhs, (0, 20.0), s.sigma0.ravel(), t_eval=ts, rtol=1e-12, atol=1e-14, method="DOP853")
    numeric = sol.y.T.reshape(-1, n, n)
    np.testing.assert_allclose(s.cov(ts), numeric, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("order, k", CASES)
def test_sigma_eff_projection_and_inverse(order, k):
    s = MomentumSystem(order, k)
    t = np.exp(np.linspace(-2.5, 3.5, 13))
    inv = np.linalg.inv(s.cov(t))  # plain inverse is accurate in this range
    np.testing.assert_allclose(s.precision(t), inv, rtol=1e-8)
    np.testing.assert_allclose(s.sigma_eff(t), 1 / np.sqrt(inv[:, 0, 0]), rtol=1e-10)
    p = s.projection(t)
    np.testing.assert_allclose(p[:, 0] * 0 + (p * np.eye(s.n)[0]).sum(1), 1.0)  # p . e_0 = 1
    sig = np.array([80.0, 3.0, 0.5, 0.01, 0.002])
    np.testing.assert_allclose(s.sigma_eff(s.t_of_sigma(sig)), sig, rtol=1e-11)
    if k == 0:  # scale-free system at k = 0: sigma_eff ~ t^(N - 1/2), sigma_eff(1) = sigma_data
        np.testing.assert_allclose(s.sigma_eff(np.array([1.0, 4.0])), [0.5, 0.5 * 4 ** (order - 0.5)], rtol=1e-12)


@pytest.mark.parametrize("order, k", [(2, 1.0), (3, 2.0)])
def test_prop31_posterior_mean_is_denoiser_at_projection(order, k):
    """(G3) E[x0 | m_t] computed directly in the augmented space equals D(r_t, sigma_eff(t))."""
    means, stds, weights = [-1.0, 0.4, 1.2], [0.1, 0.3, 0.2], [0.3, 0.5, 0.2]
    gm = GaussianMixtureDenoiser([[m] for m in means], stds=stds, weights=weights)
    s = MomentumSystem(order, k)
    rng = np.random.default_rng(0)
    e0 = np.eye(s.n)[0]
    for t in (0.3, 1.0, 4.0):
        cov = s.cov(np.array([t]))[0]
        for m in rng.normal(size=(4, s.n)) * np.sqrt(np.diag(cov)):
            # m | component j ~ N(e0 mu_j, Sigma + s_j^2 e0 e0^T); E[x0 | m, j] by Gaussian conditioning
            logits, x0 = [], []
            for mu, sd, w in zip(means, stds, weights):
                c = cov + sd ** 2 * np.outer(e0, e0)
                dev = m - e0 * mu
                sol = np.linalg.solve(c, dev)
                logits.append(math.log(w) - 0.5 * dev @ sol - 0.5 * np.linalg.slogdet(c)[1])
                x0.append(mu + sd ** 2 * sol[0])
            post = np.exp(np.array(logits) - max(logits))
            brute = float((post / post.sum()) @ np.array(x0))
            r = float(s.projection(np.array([t]))[0] @ m)
            sig = float(s.sigma_eff(np.array([t]))[0])
            got = float(gm(torch.tensor([[r]], dtype=torch.float64), sig))
            assert abs(got - brute) < 1e-10


@pytest.mark.parametrize("order, k", [(2, 1.0), (3, 0.5)])
def test_step_coefficients_match_ode_solver(order, k):
    """(G5) Psi(t_to, t_from) and the AB weights against an independent adaptive ODE solve."""
    s = MomentumSystem(order, k)
    n = s.n
    t_from, t_to = 2.0, 0.3
    nodes = np.array([t_from, 3.1, 4.5])

    def basis(u):
        return np.array([np.prod([(u - nodes[m]) / (nodes[j] - nodes[m]) for m in range(3) if m != j])
                         for j in range(3)])

    def rhs(u, y):  # Y(u) = Psi(t_to, u): dY/du = -Y B_u; dW_j/du = -Y b_u l_j(u) (integrated t_to -> t_from)
        ymat = y[: n * n].reshape(n, n)
        bmat, bvec, _ = s.drift(np.array([u]))
        dy = -ymat @ bmat[0]
        dw = -np.outer(ymat @ bvec[0], basis(u))  # (N, 3)
        return np.concatenate([dy.ravel(), dw.ravel()])

    y0 = np.concatenate([np.eye(n).ravel(), np.zeros(n * 3)])
    sol = solve_ivp(rhs, (t_to, t_from), y0, rtol=1e-12, atol=1e-14, method="DOP853")
    psi_ref = sol.y[: n * n, -1].reshape(n, n)
    w_ref = sol.y[n * n:, -1].reshape(n, 3).T
    psi, w = s.step_coefficients(t_from, t_to, nodes, variable="t")
    np.testing.assert_allclose(psi, psi_ref, rtol=2e-7, atol=1e-9)  # RK4, 64 substeps per unit of log t
    np.testing.assert_allclose(w, w_ref, rtol=2e-7, atol=1e-9)
    # the exact linear part carries the conditional covariance: Psi Sigma_from Psi^T = Sigma_to
    np.testing.assert_allclose(psi @ s.cov(np.array([t_from]))[0] @ psi.T, s.cov(np.array([t_to]))[0],
                               rtol=2e-7, atol=1e-12)


def tada_output_law(order, k, n_steps, m0=0.3, s0=0.4, sigma_max=20.0, solver_order=3):
    """For Gaussian data the sampler is affine in (x, xi): read the map off basis inputs and push the exact
    initial law (x ~ N(m0, s0^2 + sigma_max^2), xi ~ N(0, I)) through it. Returns (mean, std)."""
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    sig = get_sigmas_karras(n_steps, 0.002, sigma_max)
    basis = torch.cat([torch.zeros(1, order), torch.eye(order)], 0).double()  # row 0: all zero
    x, noise = basis[:, :1], basis[:, 1:].T.reshape(order - 1, order + 1, 1)
    out = sample_tada(gm, x, sig, order=order, k=k, noise=noise, solver_order=solver_order).reshape(-1)
    coef = out[1:] - out[0]
    var = coef[0] ** 2 * (s0 ** 2 + sigma_max ** 2) + (coef[1:] ** 2).sum()
    return float(out[0] + coef[0] * m0), math.sqrt(float(var))


@pytest.mark.parametrize("order, k", [(2, 0.5), (2, 2.0), (3, 1.0)])
def test_gaussian_data_output_law_is_exact_in_the_limit(order, k):
    m0, s0 = 0.3, 0.4
    errs = []
    for n in (40, 160):
        mean, std = tada_output_law(order, k, n, m0, s0)
        assert abs(mean - m0) < 1e-12  # the mean is exact at any step count
        errs.append(abs(std - s0))
    assert errs[1] < 2e-4 and errs[1] < errs[0] / 4


def test_order_one_is_ddim():
    """(G5) N = 1 (plain VE) with a first-order integrator is DDIM: x' = (s'/s) x + (1 - s'/s) D."""
    gm = GaussianMixtureDenoiser([[-1.0], [0.5]], stds=[0.2, 0.1])
    sig = get_sigmas_karras(8)
    x = torch.randn(16, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    got = sample_tada(gm, x, sig, order=1, solver_order=1)
    y = x.clone()
    for i in range(len(sig) - 1):
        ratio = float(sig[i + 1] / sig[i])
        y = ratio * y + (1 - ratio) * gm(y, float(sig[i]))
    torch.testing.assert_close(got, y, rtol=1e-8, atol=1e-8)


def test_initial_projection_is_x_and_extra_noise_matters():
    """(G6) r(m_init) = x exactly; with N >= 2 the extra noise channels change the sample (SDE-like)."""
    gm = GaussianMixtureDenoiser([[-1.0, 0.0], [1.0, 0.5]], stds=[0.2, 0.2])
    sig = get_sigmas_karras(6)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    seen = []
    a = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(1), callback=lambda d: seen.append(d))
    torch.testing.assert_close(seen[0]["x"], x, rtol=1e-12, atol=1e-9)
    b = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(1))
    c = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(ValueError, match="noise must have shape"):
        sample_tada(gm, x, sig, noise=torch.zeros(2, 8, 2, dtype=torch.float64))


def test_schedule_ending_above_zero_returns_projection_with_ve_marginal():
    """(G7) stopping at sigma_end > 0 returns r, distributed like x0 + sigma_end eps: check on Gaussian data
    through the affine map, as above."""
    m0, s0, smax, send = 0.3, 0.4, 20.0, 0.7
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    sig = torch.exp(torch.linspace(math.log(smax), math.log(send), 161, dtype=torch.float64))
    basis = torch.cat([torch.zeros(1, 2), torch.eye(2)], 0).double()
    out = sample_tada(gm, basis[:, :1], sig, noise=basis[:, 1:].T.reshape(1, 3, 1)).reshape(-1)
    coef = out[1:] - out[0]
    std = math.sqrt(float(coef[0] ** 2 * (s0 ** 2 + smax ** 2) + coef[1] ** 2))
    assert abs(std - math.sqrt(s0 ** 2 + send ** 2)) < 1e-4
