"""TADA: "Improved Diffusion Sampling with Training-free Augmented DynAmics", Chen, Zheng, Berthelot, Gu,
Susskind, Zhai 2025 (arXiv 2506.21757).

Provenance. The equations below are the paper's method as read from its v2 text (Sec. 2.2-3.3, Algorithm 1,
App. C, F.2, F.5, H; a text conversion whose display equations are lost) and written down in genkit issue 14;
the official code (apple/ml-tada) was not available to us. Every closed form here is checked in
``tests/samplers/test_tada.py`` against a numerical integration of the ODE it solves. Equation tags (T1)...
are ours. Time runs from the prior at t = 0 to the data at t = 1.

(T1) Augmented state (Sec. 3.1): per data dimension an N-th order chain of integrators
         x = (x^(0), ..., x^(N-1)),   d/dt x^(j) = x^(j+1) (j < N-1),   d/dt x^(N-1) = F,
     i.e. dx/dt = A x + e_{N-1} F with A the shift matrix. N = 2 is the paper's default; N = 1 is flow matching.
(T2) Force (App. F.2): the constant input that carries the position to the data point x1 at t = 1,
         F(x, t) = N! / (1-t)^N * (x1 - sum_{q<N} x^(q) (1-t)^q / q!),
     (N = 1: the flow-matching velocity (x1 - x)/(1-t)). Under this force F stays constant along the path.
(T3) Prior: x_0 ~ N(0, Sigma_0), Sigma_0 = diag(1, ..., 1, k), k > 0 (the detail knob of Fig. 3; it changes
     only the initial variance of the last variable).
(T4) Closed loop given x1 (App. H): x_t = Phi(t, s) x_s + m(t, s) x1 with
         Phi(t,s)_{jq} = [q >= j] (t-s)^(q-j)/(q-j)!  -  N! (t-s)^(N-j) (1-s)^(q-N) / ((N-j)! q!),
         m(t,s)_j      = N! (t-s)^(N-j) / ((N-j)! (1-s)^N),
     so x_t | x1 ~ N(mu_t x1, Sigma_t), mu_t = m(t, 0), Sigma_t = Phi(t,0) Sigma_0 Phi(t,0)^T (no diffusion
     term). N = 1: mu_t = t, Sigma_t = k (1-t)^2.
(T5) Prop. 3.1: gamma_t = mu_t^T Sigma_t^-1 mu_t is the effective SNR and y_t = r_t^T x_t with
     r_t = Sigma_t^-1 mu_t / gamma_t is distributed as x1 + gamma_t^(-1/2) eps, so E[x1 | x_t] = D(y_t,
     sigma = gamma_t^(-1/2)) with the pretrained EDM denoiser. Sigma_t is ill-conditioned near t = 1 (gamma
     grows like (1-t)^(-2N)), so both are computed through the initial variables, where the covariance is the
     diagonal Sigma_0: u = Phi(0,t) x_t = z x1 + x_0 with z = Phi(0,t) mu_t = -m(0,t), hence
         gamma_t = sum_j z_j^2 / Sigma_0,jj,    r_t = Phi(0,t)^T Sigma_0^-1 z / gamma_t.
     Sigma_t is never inverted.
(T6) Time grid: for the sigma schedule every other sampler gets, t_i solves gamma(t_i) = sigma_i^-2 (bisection
     on (0, 1); gamma is increasing), so all samplers query the denoiser at the same noise levels.
     ``grid="uniform"`` instead spaces t uniformly between the ends of the schedule (the denoiser is then
     queried at sigma = gamma(t_i)^(-1/2); :func:`sigmas_uniform_t` gives those sigmas to other samplers).
(T7) Initial state ("higher-dimensional initial noise"): every genkit sampler receives the VE noise x at
     sigma_0. TADA sets x_{t0} = mu_{t0} x + L xi, L L^T = Sigma_{t0} - mu mu^T / gamma (rank N-1),
     xi ~ N(0, I_{N-1}): an exact draw of x_{t0} whenever x is an exact draw at sigma_0, with r^T x_{t0} = x.
     Through the initial variables L = Phi(t0,0) Sigma_0^(1/2) Q with Q an orthonormal basis of the
     complement of Sigma_0^(-1/2) z.
(T8) Solver (Sec. 3.2, Algorithm 1; Table 2: expansion term F_theta, discretisation variable t): one denoiser
     call per step, h = t_{i+1} - t_i,
         y_i = r_{t_i}^T x_i,  D_i = D(y_i, sigma_i),  F_i = N!/(1-t_i)^N (D_i - sum_q x_i^(q) (1-t_i)^q/q!),
         x_{i+1} = e^{Ah} x_i + sum_l w_l F_{i-l},  (e^{Ah})_{jq} = h^(q-j)/(q-j)! (q >= j),
         w_{l,j} = int_{t_i}^{t_{i+1}} (t_{i+1}-tau)^(N-1-j)/(N-1-j)! ell_l(tau) dtau,
     the exact open-loop transition plus Adams-Bashforth of order p on F, ell_l the Lagrange basis in t
     through the last min(p, i+1) nodes; the weights are integrated exactly by Gauss-Legendre.
(T9) Output (Algorithm 1, line 10): D at the last positive sigma. NFE = number of positive sigmas. A schedule
     that ends above 0 returns y (distributed like x1 + sigma_last eps, as a VE sampler's x).

N = 1 with p = 1 is DDIM (= first-order DPM-Solver++) on the same noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from genkit.errors import ConfigError

GRIDS = ("sigmas", "uniform")


def _fact(n: int) -> float:
    return float(math.factorial(n))


class AugmentedDynamics:
    """The linear system (T1)-(T7) of order N with detail knob k: closed forms in float64 numpy, vectorised
    over arrays of times."""

    def __init__(self, order: int = 2, k: float = 1.0):
        if not isinstance(order, (int, np.integer)) or order < 1:
            raise ConfigError(f"TADA order N must be an integer >= 1 (got {order!r})")
        if not k > 0:
            raise ConfigError(f"TADA detail knob k must be > 0 (got {k!r}): it is the initial variance of the "
                              "last augmented variable")
        self.n, self.k = int(order), float(k)
        self.sigma0 = np.ones(self.n)  # (T3) diagonal of Sigma_0
        self.sigma0[-1] = self.k
        j = np.arange(self.n)
        self._j, self._q = j[:, None], j[None, :]  # row / column index grids (N, 1), (1, N)
        self._inv_fact_diff = np.array([[1 / _fact(q - i) if q >= i else 0.0 for q in j] for i in j])
        self._inv_fact_nj = np.array([1 / _fact(self.n - i) for i in j])  # 1/(N-j)!
        self._inv_fact_q = np.array([1 / _fact(q) for q in j])  # 1/q!
        self._nfact = _fact(self.n)

    # --- closed forms (T4) ---------------------------------------------------------------------------------

    def phi(self, t, s) -> np.ndarray:
        """(M, N, N) closed-loop transition Phi(t, s) (T4)."""
        t, s = np.broadcast_arrays(np.asarray(t, dtype=np.float64).reshape(-1),
                                   np.asarray(s, dtype=np.float64).reshape(-1))
        d = (t - s)[:, None, None]  # (M, 1, 1)
        pw = np.maximum(self._q - self._j, 0)  # (N, N)
        free = np.where(self._q >= self._j, d ** pw, 0.0) * self._inv_fact_diff  # e^{A (t-s)}
        loop = (self._nfact * d ** (self.n - self._j) * self._inv_fact_nj[:, None]  # (M, N, 1)
                * (1 - s)[:, None, None] ** (self._q - self.n) * self._inv_fact_q[None, :])  # (M, N, N)
        return free - loop

    def m(self, t, s) -> np.ndarray:
        """(M, N) data coefficient m(t, s) of the closed loop (T4)."""
        t, s = np.broadcast_arrays(np.asarray(t, dtype=np.float64).reshape(-1),
                                   np.asarray(s, dtype=np.float64).reshape(-1))
        d = (t - s)[:, None]
        return self._nfact * d ** (self.n - self._j[:, 0]) * self._inv_fact_nj / (1 - s)[:, None] ** self.n

    def mean(self, t) -> np.ndarray:
        """(M, N) mu_t = m(t, 0)."""
        return self.m(t, 0.0)

    def cov(self, t) -> np.ndarray:
        """(M, N, N) Sigma_t = Phi(t, 0) Sigma_0 Phi(t, 0)^T."""
        p = self.phi(t, 0.0)
        return (p * self.sigma0) @ p.transpose(0, 2, 1)

    # --- Prop. 3.1 through the initial variables (T5) ------------------------------------------------------

    def snr(self, t) -> np.ndarray:
        """(M,) gamma_t = sum_j z_j^2 / Sigma_0,jj with z = -m(0, t)."""
        z = -self.m(0.0, t)
        return (z ** 2 / self.sigma0).sum(-1)

    def sigma(self, t) -> np.ndarray:
        """(M,) the noise level the denoiser sees, gamma_t^(-1/2)."""
        return self.snr(t) ** -0.5

    def projection(self, t) -> np.ndarray:
        """(M, N) r_t = Phi(0, t)^T Sigma_0^-1 z / gamma_t, so that y_t = r_t . x_t."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        z = -self.m(0.0, t)  # (M, N)
        gamma = (z ** 2 / self.sigma0).sum(-1)
        back = self.phi(0.0, t)  # (M, N, N) Phi(0, t)
        return np.einsum("mjq,mj->mq", back, z / self.sigma0) / gamma[:, None]

    def t_of_sigma(self, sigma, iters: int = 200) -> np.ndarray:
        """(T6) t in (0, 1) with gamma(t) = sigma^-2, by bisection on log gamma (increasing in t)."""
        target = -2 * np.log(np.asarray(sigma, dtype=np.float64).reshape(-1))
        lo, hi = np.zeros_like(target), np.ones_like(target)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            with np.errstate(divide="ignore"):
                above = np.log(self.snr(mid)) > target
            hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
            if np.all((hi - lo) <= 4 * np.finfo(np.float64).eps * np.maximum(hi, 1e-300)):
                break
        return 0.5 * (lo + hi)

    # --- initial state (T7) --------------------------------------------------------------------------------

    def initial_factor(self, t0: float) -> np.ndarray:
        """(N, N-1) L with L L^T = Sigma_{t0} - mu mu^T / gamma and r^T L = 0, through the initial variables."""
        z = -self.m(0.0, t0)[0]
        w = z / np.sqrt(self.sigma0)
        w = w / np.linalg.norm(w)
        q = np.linalg.svd(w[None, :])[2][1:].T  # (N, N-1) orthonormal complement of w
        return self.phi(t0, 0.0)[0] @ (np.sqrt(self.sigma0)[:, None] * q)

    # --- solver pieces (T8) --------------------------------------------------------------------------------

    def open_loop(self, h: float) -> np.ndarray:
        """(N, N) e^{A h}: h^(q-j)/(q-j)! on and above the diagonal."""
        pw = np.maximum(self._q - self._j, 0)
        return np.where(self._q >= self._j, float(h) ** pw, 0.0) * self._inv_fact_diff

    def ab_weights(self, t_from: float, t_to: float, nodes) -> np.ndarray:
        """(L, N) w_{l,j} = int_{t_from}^{t_to} (t_to - tau)^(N-1-j)/(N-1-j)! ell_l(tau) dtau for the Lagrange
        basis ell_l through ``nodes``; the integrand is a polynomial of degree N-1 + L-1, integrated exactly by
        Gauss-Legendre."""
        nodes = np.asarray(nodes, dtype=np.float64)
        g, gw = np.polynomial.legendre.leggauss((self.n + len(nodes)) // 2 + 2)
        half = 0.5 * (t_to - t_from)
        tau = t_from + half * (g + 1)  # (G,)
        basis = np.ones((len(nodes), len(tau)))
        for a in range(len(nodes)):
            for b in range(len(nodes)):
                if a != b:
                    basis[a] *= (tau - nodes[b]) / (nodes[a] - nodes[b])
        p = self.n - 1 - np.arange(self.n)  # powers N-1-j
        kern = (t_to - tau)[None, :] ** p[:, None] / np.array([_fact(int(v)) for v in p])[:, None]  # (N, G)
        return half * np.einsum("lg,jg,g->lj", basis, kern, gw)

    def force(self, t: float, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        """(T2) F = N!/(1-t)^N (D - sum_q x^(q) (1-t)^q / q!) with x of shape (N, ...)."""
        c = [(1 - t) ** q / _fact(q) for q in range(self.n)]
        taylor = sum(c[q] * x[q] for q in range(self.n))
        return self._nfact / (1 - t) ** self.n * (denoised - taylor)


def _check_sigmas(sigmas) -> list[float]:
    sig = [float(s) for s in sigmas]
    if len(sig) < 2:
        raise ConfigError(f"TADA needs a schedule of at least 2 sigmas (got {len(sig)})")
    pos = sig[:-1] if sig[-1] == 0 else sig
    if any(not (s > 0 and math.isfinite(s)) for s in pos) or any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise ConfigError("TADA: sigmas must be strictly decreasing and positive except a final 0 "
                          f"(got {[round(s, 6) for s in sig]})")
    return sig


def sigmas_uniform_t(sigmas, order: int = 2, k: float = 1.0) -> torch.Tensor:
    """(T6) The schedule TADA's ``grid="uniform"`` queries: as many positive sigmas as ``sigmas`` has, at t
    uniform between t(sigmas[0]) and t(last positive sigma); a final 0 is kept. Float64."""
    sig = _check_sigmas(sigmas)
    pos = [s for s in sig if s > 0]
    dyn = AugmentedDynamics(order, k)
    t_end = dyn.t_of_sigma([pos[0], pos[-1]])
    ts = np.linspace(t_end[0], t_end[1], len(pos))
    out = dyn.sigma(ts)
    out[0], out[-1] = pos[0], pos[-1]  # exact ends (bisection round-off aside)
    if sig[-1] == 0:
        out = np.r_[out, 0.0]
    return torch.as_tensor(out, dtype=torch.float64)


@torch.no_grad()
def sample_tada(denoiser, x, sigmas, *, callback=None, order: int = 2, k: float = 1.0, solver_order: int = 3,
                grid: str = "sigmas", noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                cond: dict | None = None):
    """TADA sampler (arXiv 2506.21757, Algorithm 1; equations (T1)-(T9) in the module docstring).

    ``x``: VE initial noise at sigmas[0], as for every genkit sampler. ``order``: N, the order of the chain of
    integrators (2 in the paper; 1 is flow matching = DDIM at ``solver_order=1``). ``k``: detail knob, the
    initial variance of the last variable (T3). ``solver_order``: p, the Adams-Bashforth order on the force
    (3 in the paper's EDM experiments, 2 in its SD3 one). ``grid``: "sigmas" (t_i from the given schedule,
    the same noise levels as every sampler) or "uniform" (uniform in t between its ends). ``noise``: the N-1
    extra initial channels xi, shape (N-1, *x.shape), drawn from ``generator`` when not given. Returns D at
    the last positive sigma (T9).
    """
    cond = cond or {}
    if solver_order not in (1, 2, 3):
        raise ConfigError(f"TADA solver_order (Adams-Bashforth order p) must be 1, 2 or 3 (got {solver_order!r})")
    if grid not in GRIDS:
        raise ConfigError(f"TADA grid must be one of {', '.join(GRIDS)} (got {grid!r})")
    dyn = AugmentedDynamics(order, k)
    sig = _check_sigmas(sigmas)
    if grid == "uniform":
        sig = sigmas_uniform_t(sig, order, k).tolist()
    n = dyn.n
    pos = [s for s in sig if s > 0]
    ts = dyn.t_of_sigma(pos)  # (T6)
    proj = torch.as_tensor(dyn.projection(ts), dtype=x.dtype, device=x.device)  # (S, N)

    # (T7) augmented initial state (N, *x.shape) with r^T state = x
    if noise is None:
        noise = torch.randn((n - 1, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    elif tuple(noise.shape) != (n - 1, *x.shape):
        raise ConfigError(f"TADA noise must have shape {(n - 1, *x.shape)} (got {tuple(noise.shape)})")
    mu0 = torch.as_tensor(dyn.mean(ts[:1])[0], dtype=x.dtype, device=x.device)  # (N,)
    lfac = torch.as_tensor(dyn.initial_factor(float(ts[0])), dtype=x.dtype, device=x.device)  # (N, N-1)
    state = mu0.reshape(n, *([1] * x.ndim)) * x[None] + torch.einsum("nj,j...->n...", lfac, noise.to(x.dtype))

    s_in = x.new_ones(x.shape[0])
    history: list[tuple[float, torch.Tensor]] = []  # (t_l, F_l), newest first
    for i in range(len(sig) - 1):
        y = torch.einsum("n,n...->...", proj[i], state)  # (T5) y_i = r^T x_i
        denoised = denoiser(y, sig[i] * s_in, **cond)  # D(y_i, sigma_i), sigma_i = gamma(t_i)^-1/2
        if callback is not None:
            callback({"x": y, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": denoised})
        if sig[i + 1] == 0:  # (T9)
            return denoised
        t_i, t_next = float(ts[i]), float(ts[i + 1])
        history = [(t_i, dyn.force(t_i, state, denoised))] + history[: solver_order - 1]
        e = torch.as_tensor(dyn.open_loop(t_next - t_i), dtype=x.dtype, device=x.device)
        w = torch.as_tensor(dyn.ab_weights(t_i, t_next, [t for t, _ in history]), dtype=x.dtype,
                            device=x.device)  # (L, N)
        state = torch.einsum("nq,q...->n...", e, state)  # (T8) exact open-loop part
        for j, (_, f_j) in enumerate(history):  # (T8) Adams-Bashforth on F: F_i, F_{i-1}, ...
            state = state + w[j].reshape(n, *([1] * x.ndim)) * f_j[None]
    return torch.einsum("n,n...->...", proj[-1], state)  # schedule ended above 0 (T9)
