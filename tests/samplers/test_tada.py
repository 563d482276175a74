"""TADA (genkit/samplers/tada.py, (T1)-(T9)): closed forms against numerical integration, Prop. 3.1, the
solver's exactness, N = 1 = DDIM, convergence on Gaussian data, the knobs and the errors."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad, solve_ivp

from genkit.errors import ConfigError
from genkit.models.denoisers import GaussianMixtureDenoiser
from genkit.samplers import get_sigmas_karras, sample_tada, sample_unipc
from genkit.samplers.tada import AugmentedDynamics, sigmas_uniform_t

torch.set_num_threads(1)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("k", [1.0, 2.5])
def test_closed_forms_match_integrated_closed_loop(order, k):
    """(T4) mu_t x1 and Sigma_t against a DOP853 integration of the closed-loop ODE dx/dt = A x + e F(x, t)
    (T1)-(T2) from x_0 ~ N(0, Sigma_0): mean' = B mean + b x1, Sigma' = B Sigma + Sigma B^T."""
    dyn = AugmentedDynamics(order, k)
    n, x1 = order, 0.7
    c = np.array([math.factorial(n) / math.factorial(q) for q in range(n)])

    def rhs(t, y):
        mean, cov = y[:n], y[n:].reshape(n, n)
        b = np.diag(np.ones(n - 1), 1)
        b[-1] -= c * (1 - t) ** (np.arange(n) - n)  # F = N!/(1-t)^N (x1 - sum_q x^(q) (1-t)^q / q!)
        drive = np.zeros(n)
        drive[-1] = math.factorial(n) / (1 - t) ** n * x1
        return np.r_[b @ mean + drive, (b @ cov + cov @ b.T).ravel()]

    ts = np.array([0.05, 0.3, 0.7, 0.95, 0.99])
    sol = solve_ivp(rhs, (0, ts[-1]), np.r_[np.zeros(n), np.diag(dyn.sigma0).ravel()], t_eval=ts, rtol=1e-13,
                    atol=1e-15, method="DOP853")
    mean, cov = sol.y[:n].T, sol.y[n:].T.reshape(-1, n, n)
    np.testing.assert_allclose(dyn.mean(ts) * x1, mean, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(dyn.cov(ts), cov, rtol=1e-9, atol=1e-10 * np.abs(cov).max())
    # Phi is a transition matrix: Phi(t, s) Phi(s, u) = Phi(t, u), and x_t = Phi(t,s) x_s + m(t,s) x1
    np.testing.assert_allclose(dyn.phi(0.8, 0.3)[0] @ dyn.phi(0.3, 0.1)[0], dyn.phi(0.8, 0.1)[0], atol=1e-12)
    np.testing.assert_allclose(dyn.phi(0.8, 0.3)[0] @ dyn.mean(0.3)[0] + dyn.m(0.8, 0.3)[0], dyn.mean(0.8)[0],
                               atol=1e-12)
    if order == 1:  # flow matching: mu_t = t, Sigma_t = k (1-t)^2
        np.testing.assert_allclose(dyn.mean(ts)[:, 0], ts, rtol=1e-15)
        np.testing.assert_allclose(dyn.cov(ts)[:, 0, 0], k * (1 - ts) ** 2, rtol=1e-14)


@pytest.mark.parametrize("order, k", [(1, 1.0), (2, 1.0), (2, 0.3), (3, 1.0), (3, 4.0)])
def test_snr_increasing_and_prop31_identities(order, k):
    """(T5) gamma increases on (0, 1); r^T mu = 1 and gamma r^T Sigma r = 1; gamma equals mu^T Sigma^-1 mu where
    Sigma_t is well conditioned; t_of_sigma inverts sigma(t) = gamma^-1/2."""
    dyn = AugmentedDynamics(order, k)
    t = np.r_[np.linspace(1e-4, 0.999, 2000), 1 - np.logspace(-3.1, -6, 20)]
    gamma = dyn.snr(t)
    assert np.all(np.diff(gamma) > 0) and np.all(np.isfinite(gamma))
    mid = np.linspace(0.02, 0.9, 40)
    r, mu, cov, g = dyn.projection(mid), dyn.mean(mid), dyn.cov(mid), dyn.snr(mid)
    np.testing.assert_allclose((r * mu).sum(1), 1.0, atol=1e-12)
    np.testing.assert_allclose(g * np.einsum("mi,mij,mj->m", r, cov, r), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.einsum("mi,mij,mj->m", mu, np.linalg.inv(cov), mu), g, rtol=1e-8)
    sig = np.array([80.0, 3.0, 0.5, 0.01, 0.002, 1e-4])
    np.testing.assert_allclose(dyn.sigma(dyn.t_of_sigma(sig)), sig, rtol=1e-12)


@pytest.mark.parametrize("order, k", [(2, 1.0), (3, 2.0)])
def test_prop31_posterior_mean_is_denoiser_at_projection(order, k):
    """(T5) E[x1 | x_t], computed by Gaussian conditioning in the augmented space, equals D(r^T x_t, gamma^-1/2)."""
    means, stds, weights = [-1.0, 0.4, 1.2], [0.1, 0.3, 0.2], [0.3, 0.5, 0.2]
    gm = GaussianMixtureDenoiser([[m] for m in means], stds=stds, weights=weights)
    dyn = AugmentedDynamics(order, k)
    rng = np.random.default_rng(0)
    for t in (0.1, 0.5, 0.8):
        cov, mu = dyn.cov(t)[0], dyn.mean(t)[0]
        for x in rng.normal(size=(4, order)) * np.sqrt(np.diag(cov)) + mu * 0.3:
            logits, post_means = [], []
            for m, sd, w in zip(means, stds, weights):  # x | component ~ N(mu m, Sigma + sd^2 mu mu^T)
                c = cov + sd ** 2 * np.outer(mu, mu)
                dev = x - mu * m
                sol = np.linalg.solve(c, dev)
                logits.append(math.log(w) - 0.5 * dev @ sol - 0.5 * np.linalg.slogdet(c)[1])
                post_means.append(m + sd ** 2 * mu @ sol)
            post = np.exp(np.array(logits) - max(logits))
            brute = float((post / post.sum()) @ np.array(post_means))
            y = float(dyn.projection(t)[0] @ x)
            got = float(gm(torch.tensor([[y]], dtype=torch.float64), float(dyn.sigma(t)[0])))
            assert abs(got - brute) < 1e-10


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ab_weights_are_exact_integrals_and_step_is_exact_for_polynomial_force(order):
    """(T8) w_{l,j} against adaptive quadrature; with a force that is a polynomial in t of degree < p the step
    equals the open-loop ODE's exact solution."""
    dyn = AugmentedDynamics(order)
    t0, t1, nodes = 0.4, 0.55, [0.4, 0.3, 0.12]
    w = dyn.ab_weights(t0, t1, nodes)

    def ell(a, tau):
        return np.prod([(tau - nodes[b]) / (nodes[a] - nodes[b]) for b in range(3) if b != a])

    for a in range(3):
        for j in range(order):
            p = order - 1 - j
            ref = quad(lambda tau: (t1 - tau) ** p / math.factorial(p) * ell(a, tau), t0, t1, epsabs=1e-15)[0]
            assert abs(w[a, j] - ref) < 1e-14
    # F(tau) = 1 - 2 tau + 3 tau^2 through the three nodes: AB-3 integrates it exactly
    force = lambda tau: 1 - 2 * tau + 3 * tau ** 2  # noqa: E731
    x0 = np.arange(1.0, order + 1)
    step = dyn.open_loop(t1 - t0) @ x0 + sum(w[a] * force(nodes[a]) for a in range(3))
    sol = solve_ivp(lambda t, x: np.r_[x[1:], force(t)], (t0, t1), x0, rtol=1e-13, atol=1e-15, method="DOP853")
    np.testing.assert_allclose(step, sol.y[:, -1], rtol=1e-11, atol=1e-13)


def test_order_one_ab_one_is_ddim():
    """N = 1 (flow matching) with AB order 1 is DDIM = first-order DPM-Solver++ = UniP-1 on the same noise,
    float64, to 1e-10: x' = (s'/s) x + (1 - s'/s) D."""
    gm = GaussianMixtureDenoiser([[-1.0, 0.2], [0.5, 0.9], [0.1, -1.3]], stds=[0.2, 0.1, 0.3])
    for sig in (get_sigmas_karras(8), get_sigmas_karras(25, 0.01, 40.0)):
        x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig[0]
        y = x.clone()
        for i in range(len(sig) - 1):
            ratio = float(sig[i + 1] / sig[i])
            y = ratio * y + (1 - ratio) * gm(y, float(sig[i]))
        got = sample_tada(gm, x, sig, order=1, solver_order=1)
        torch.testing.assert_close(got, y, rtol=0, atol=1e-10)
        torch.testing.assert_close(sample_unipc(gm, x, sig, order=1, corrector=False), y, rtol=0, atol=1e-10)


def gaussian_output_law(order, k, n_steps, solver_order, grid="sigmas", m0=0.3, s0=0.4, sigma_max=20.0):
    """Gaussian data N(m0, s0^2) with its exact denoiser: the sampler is affine in (x, xi), so read the map off
    basis inputs and push the exact initial law (x ~ N(m0, s0^2 + sigma_max^2), xi ~ N(0, I)) through it."""
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    sig = get_sigmas_karras(n_steps, 0.002, sigma_max)
    basis = torch.cat([torch.zeros(1, order), torch.eye(order)], 0).double()  # row 0: all zero
    x, noise = basis[:, :1], basis[:, 1:].T.reshape(order - 1, order + 1, 1)
    out = sample_tada(gm, x, sig, order=order, k=k, noise=noise, solver_order=solver_order, grid=grid).reshape(-1)
    coef = out[1:] - out[0]
    var = coef[0] ** 2 * (s0 ** 2 + sigma_max ** 2) + (coef[1:] ** 2).sum()
    return float(out[0] + coef[0] * m0), math.sqrt(float(var))


@pytest.mark.parametrize("order, k, p, grid", [(2, 1.0, 3, "sigmas"), (2, 3.0, 2, "sigmas"), (3, 1.0, 3, "uniform"),
                                               (2, 0.5, 1, "sigmas")])
def test_gaussian_data_mean_and_std_converge(order, k, p, grid):
    m0, s0 = 0.3, 0.4
    errs = []
    for n in (10, 40, 160):
        mean, std = gaussian_output_law(order, k, n, p, grid, m0, s0)
        assert abs(mean - m0) < 1e-12  # the mean is exact at any step count
        errs.append(abs(std - s0))
    assert errs[2] < errs[1] / 3 < errs[0] / 3 and errs[2] < (1e-2 if p == 1 else 1e-4)


def test_k_changes_only_the_last_initial_variance():
    for order in (1, 2, 3):
        a, b = AugmentedDynamics(order, 1.0), AugmentedDynamics(order, 3.0)
        diff = np.nonzero(a.sigma0 != b.sigma0)[0]
        assert list(diff) == [order - 1] and b.sigma0[-1] == 3.0 and np.all(a.sigma0 == 1.0)
        np.testing.assert_array_equal(a.mean([0.2, 0.7]), b.mean([0.2, 0.7]))  # mu_t does not depend on k
    gm = GaussianMixtureDenoiser([[-1.0], [1.0]], stds=[0.2, 0.2])
    sig = get_sigmas_karras(6)
    x = torch.randn(8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sig[0]
    noise = torch.randn(1, 8, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k1, k3 = sample_tada(gm, x, sig, k=1.0, noise=noise), sample_tada(gm, x, sig, k=3.0, noise=noise)
    assert (k1 - k3).abs().max() > 1e-3


def test_initial_state_is_exact_and_extra_noise_matters():
    """(T7) r^T x_{t0} = x; L L^T + mu mu^T / gamma = Sigma_{t0}, r^T L = 0; the N-1 extra channels change the
    sample; the callback sees the schedule's sigmas (grid="sigmas") or a uniform t grid (grid="uniform")."""
    for order in (2, 3):
        dyn = AugmentedDynamics(order, 2.0)
        t0 = float(dyn.t_of_sigma([80.0])[0])
        lfac, mu, g = dyn.initial_factor(t0), dyn.mean(t0)[0], float(dyn.snr(t0)[0])
        assert lfac.shape == (order, order - 1)
        np.testing.assert_allclose(lfac @ lfac.T + np.outer(mu, mu) / g, dyn.cov(t0)[0], rtol=1e-9, atol=1e-14)
        np.testing.assert_allclose(dyn.projection(t0)[0] @ lfac, 0.0, atol=1e-12)
    gm = GaussianMixtureDenoiser([[-1.0, 0.0], [1.0, 0.5]], stds=[0.2, 0.2])
    sig = get_sigmas_karras(6)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 80
    seen = []
    a = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(1), callback=seen.append)
    torch.testing.assert_close(seen[0]["x"], x, rtol=1e-12, atol=1e-10)
    assert [d["sigma"] for d in seen] == sig[:-1].tolist()
    b = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(1))
    c = sample_tada(gm, x, sig, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)
    assert (a - c).abs().max() > 1e-3
    seen = []
    sample_tada(gm, x, sig, grid="uniform", generator=torch.Generator().manual_seed(1), callback=seen.append)
    got = np.array([d["sigma"] for d in seen])
    np.testing.assert_allclose(got, sigmas_uniform_t(sig)[:-1].numpy(), rtol=1e-14)
    assert got[0] == 80.0 and abs(got[-1] - 0.002) < 1e-15
    ts = AugmentedDynamics(2).t_of_sigma(got)
    np.testing.assert_allclose(np.diff(ts), np.diff(ts)[0], rtol=1e-9)


def test_schedule_ending_above_zero_returns_y_with_ve_marginal():
    """(T9) stopping at sigma_end > 0 returns y, distributed like x1 + sigma_end eps (Gaussian data)."""
    m0, s0, smax, send = 0.3, 0.4, 20.0, 0.7
    gm = GaussianMixtureDenoiser([[m0]], stds=[s0])
    sig = torch.exp(torch.linspace(math.log(smax), math.log(send), 161, dtype=torch.float64))
    basis = torch.cat([torch.zeros(1, 2), torch.eye(2)], 0).double()
    out = sample_tada(gm, basis[:, :1], sig, noise=basis[:, 1:].T.reshape(1, 3, 1)).reshape(-1)
    coef = out[1:] - out[0]
    std = math.sqrt(float(coef[0] ** 2 * (s0 ** 2 + smax ** 2) + coef[1] ** 2))
    assert abs(std - math.sqrt(s0 ** 2 + send ** 2)) < 1e-4


def test_bad_input_is_a_one_line_config_error():
    gm = GaussianMixtureDenoiser([[0.0]], stds=[1.0])
    x = torch.zeros(2, 1, dtype=torch.float64)
    bad = [(torch.tensor([1.0, 2.0, 0.0]), {}, "strictly decreasing"),
           (torch.tensor([5.0, 1.0, 1.0, 0.0]), {}, "strictly decreasing"),
           (torch.tensor([5.0, 0.0, 0.0]), {}, "strictly decreasing"),
           (torch.tensor([5.0]), {}, "at least 2 sigmas"),
           (get_sigmas_karras(4), {"k": 0.0}, "k must be > 0"),
           (get_sigmas_karras(4), {"k": -1.0}, "k must be > 0"),
           (get_sigmas_karras(4), {"order": 0}, "order N must be an integer >= 1"),
           (get_sigmas_karras(4), {"solver_order": 4}, "solver_order"),
           (get_sigmas_karras(4), {"grid": "cosine"}, "grid must be one of sigmas, uniform"),
           (get_sigmas_karras(4), {"noise": torch.zeros(2, 2, 1)}, "noise must have shape")]
    for sig, knobs, msg in bad:
        with pytest.raises(ConfigError, match=msg) as e:
            sample_tada(gm, x, sig, **knobs)
        assert "\n" not in str(e.value)
