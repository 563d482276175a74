"""TADA: "Improved Diffusion Sampling with Training-free Augmented DynAmics", Chen, Zheng, Berthelot, Gu,
Susskind, Zhai 2025 (arXiv 2506.21757) -- a genkit reconstruction.

Provenance. The official code (apple/ml-tada) was not available to us and the paper's body (Sec. 3, the
appendix dynamics, Algorithm 1) could not be retrieved; only the abstract, figure captions and third-party
descriptions could. From those we know: sampling runs in an augmented state of N variables per data
dimension (position + momenta, "higher-dimensional initial noise"); Prop. 3.1 states that for a Gaussian
augmented state ``m | x0 ~ N(mu_t x0, Sigma_t)`` the posterior mean is the pretrained denoiser evaluated at a
re-weighted projection ``r_t = mu^T Sigma^-1 m / (mu^T Sigma^-1 mu)`` and an effective noise level
``sigma_eff^2 = 1 / (mu^T Sigma^-1 mu)``; the solver is an exponential integrator with a 3rd-order
Adams-Bashforth treatment of the network term; a hyper-parameter on the initial covariance controls detail.
Everything below is derived from these facts, not transcribed; equation tags (G1)... are ours.

Model (per data dimension; all data dimensions are independent copies).

(G1) Forward "momentum diffusion": a chain of N integrators driven by white noise at the last variable,
         dm = A m dt + g e_{N-1} dW,   A_{i,i+1} = 1   (x' = v_1, v_1' = v_2, ..., v_{N-1}' = g xi)
     started at m_0 = (x0, v), v ~ N(0, k S0): the detail knob k scales the initial momentum covariance,
     S0 = diag(Q_11(1), ..., Q_{N-1,N-1}(1)) (the momentum variance the noise itself builds by t = 1).
(G2) Closed-form moments: since A e_0 = 0 the mean is mu_t = e_0 x0 for all t (VE: no drift on data), and
         Sigma_t = e^{At} Sigma_0 e^{A^T t} + Q(t),  (e^{At})_{ij} = t^(j-i)/(j-i)!,
         Q_ij(t) = g^2 t^(p_i+p_j+1) / (p_i! p_j! (p_i+p_j+1)),  p_i = N-1-i,
     the solution of dSigma/dt = A Sigma + Sigma A^T + g^2 e e^T (checked against an ODE solver in tests).
(G3) Prop. 3.1 (exact for any data distribution: r is a sufficient statistic of m for x0 and
     r | x0 ~ N(x0, sigma_eff^2)):   E[x0 | m_t] = D(r_t, sigma_eff(t)),
         sigma_eff(t)^2 = 1 / (e_0^T Sigma_t^-1 e_0),   r_t = sigma_eff^2 e_0^T Sigma_t^-1 m_t.
     g is set so that sigma_eff(1) = sigma_data at k = 0; the sampler's ``sigmas`` are values of sigma_eff
     (t(sigma) is found by bisection, sigma_eff being increasing in t), so TADA and the other samplers
     query the denoiser at the same noise levels.
(G4) Probability-flow ODE of (G1) with the score of the Gaussian-convolved law,
     grad log p_t(m) = -Sigma_t^-1 (m - e_0 D(r_t, sigma_eff)):
         dm/dt = B_t m + b_t D_t,   B_t = A + g^2/2 e e^T Sigma_t^-1,   b_t = -g^2/2 e e^T Sigma_t^-1 e_0.
     b_t D_t is the "force" on the last momentum variable.
(G5) Exponential integrator: with Psi(t, s) the transition matrix of B (computed per step to ~1e-7 by RK4
     on the N x N system in log t; no network calls),
         m_{i+1} = Psi(t_{i+1}, t_i) m_i + sum_j W_ij D_{i-j},
         W_ij    = int_{t_i}^{t_{i+1}} Psi(t_{i+1}, u) b_u l_j(u) du,
     where l_j are the Lagrange polynomials through the last 3 evaluations (Adams-Bashforth 3; orders 1, 2
     while the history fills up), in the system time t by default as in DEIS's tAB-DEIS (Zhang & Chen
     2022, arXiv 2204.13902) -- the paper's choice of variable is unknown to us. Measured on the genkit
     mixtures, extrapolating in lambda = -log sigma_eff over the large early steps of a 5-10 NFE schedule
     overshoots badly (``ab_variable="lambda"`` keeps that option). With N = 1 (plain VE) the scheme is DDIM
     at order 1 and a DEIS-style exponential multistep solver at orders 2-3.
(G6) Initial state: given the usual VE noise x at sigma_0 (x = x0 + sigma_0 eps), set
         m = e_0 x + L xi,  L L^T = Sigma_{t0} - sigma_0^2 e_0 e_0^T  (rank N-1),  xi ~ N(0, I),
     which is an exact sample of m_{t0} whenever x is an exact sample of x_{sigma_0}, and has r = x. The
     N-1 extra noise channels are the "higher-dimensional initial noise"; they are not determined by x, which
     gives the sampler its SDE-like character.
(G7) Output: at the step to sigma = 0 the first-order limit is returned, x0 = D(r, sigma_last) (as
     DPM-Solver++ does); a schedule ending above 0 returns r, which is distributed like x_sigma (VE).

NFE = number of positive sigmas (one denoiser call per step), as for Euler and DPM-Solver++(2M).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from genkit.models.denoisers import SIGMA_DATA


class MomentumSystem:
    """The linear system (G1)-(G3): closed-form Sigma_t, sigma_eff(t), t(sigma_eff), and the per-step
    exponential-integrator coefficients (G5). All float64 numpy; ``order`` = N (1 = plain VE diffusion)."""

    def __init__(self, order: int = 2, k: float = 1.0, sigma_data: float = SIGMA_DATA):
        if order < 1:
            raise ValueError("TADA order N must be >= 1")
        if k < 0:
            raise ValueError("TADA detail knob k must be >= 0")
        self.n, self.k = int(order), float(k)
        n = self.n
        self.p = np.arange(n - 1, -1, -1)  # p_i = N-1-i: power of t in e^{At} e_{N-1}
        self.fact = np.array([math.factorial(int(q)) for q in self.p], dtype=np.float64)
        self.A = np.diag(np.ones(n - 1), 1)
        q1 = self._q(np.array([1.0]), g2=1.0)[0]
        self.g2 = sigma_data ** 2 * np.linalg.inv(q1)[0, 0]  # sigma_eff(1) = sigma_data at k = 0 (G3)
        self.sigma0 = self.k * self.g2 * np.diag(np.r_[0.0, np.diag(q1)[1:]])  # (G1) initial covariance
        # pieces of the scaled square-root form used by `precision`
        self.sigma0_sqrt = np.sqrt(np.diag(self.sigma0))  # (N,)
        self.e_tilde = self.exp_at(np.array([1.0]))[0]  # (N, N) entries 1/(j-i)!
        self.q_tilde_chol = np.linalg.cholesky(self._q(np.array([1.0]))[0])  # chol(Q~), Q~ = Q(1)

    def _q(self, t, g2=None):
        g2 = self.g2 if g2 is None else g2
        pp = self.p[:, None] + self.p[None, :] + 1  # (N, N)
        return g2 * t[:, None, None] ** pp / (self.fact[:, None] * self.fact[None, :] * pp)  # (M, N, N)

    def exp_at(self, t):
        """(M, N, N) e^{A t}: (j-i)-th power of t over (j-i)! above the diagonal."""
        n = self.n
        d = np.arange(n)[None, :] - np.arange(n)[:, None]  # j - i
        fac = np.array([math.factorial(int(max(v, 0))) for v in d.ravel()]).reshape(n, n)
        return np.where(d >= 0, t[:, None, None] ** np.maximum(d, 0) / fac, 0.0)

    def cov(self, t):
        """(G2) (M, N, N) Sigma_t for an array of times."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        e = self.exp_at(t)
        return e @ self.sigma0 @ e.transpose(0, 2, 1) + self._q(t)

    def precision(self, t):
        """(M, N, N) Sigma_t^-1, computed stably: with T = diag(t^i), T e^{At} T^-1 = E~ (constant, entries
        1/(j-i)!) and T Q(t) T = t^(2N-1) Q~, so T Sigma T = F F^T with F = [E~ T Sigma_0^1/2, t^(N-1/2)
        chol(Q~)]; a QR of F^T gives the triangular factor without forming the ill-conditioned product."""
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        tp = t[:, None] ** np.arange(self.n)  # (M, N): diagonal of T
        left = self.e_tilde[None] * (tp * self.sigma0_sqrt)[:, None, :]  # (M, N, N)
        right = t[:, None, None] ** (self.n - 0.5) * self.q_tilde_chol[None]  # (M, N, N)
        f = np.concatenate([left, right], axis=2)  # (M, N, 2N)
        r = np.linalg.qr(f.transpose(0, 2, 1), mode="r")  # (M, N, N), R^T R = T Sigma T
        r_inv = np.linalg.inv(r)
        scaled_inv = r_inv @ r_inv.transpose(0, 2, 1)  # (T Sigma T)^-1
        return tp[:, :, None] * scaled_inv * tp[:, None, :]

    def sigma_eff(self, t):
        """(G3) sigma_eff(t) = (e_0^T Sigma_t^-1 e_0)^-1/2."""
        return 1.0 / np.sqrt(self.precision(t)[:, 0, 0])

    def projection(self, t):
        """(G3) (M, N) weights p with r = p . m:  p = sigma_eff^2 Sigma^-1 e_0 (so p . e_0 = 1)."""
        inv = self.precision(t)
        return inv[:, :, 0] / inv[:, 0, 0][:, None]

    def t_of_sigma(self, sigma, iters: int = 200):
        """Invert the increasing map t -> sigma_eff(t) by bisection in log t (to float64 precision)."""
        target = np.log(np.asarray(sigma, dtype=np.float64).reshape(-1))
        lo, hi = np.full_like(target, -40.0), np.full_like(target, 40.0)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = np.log(self.sigma_eff(np.exp(mid))) > target
            hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
            if np.all(hi - lo < 1e-13):
                break
        return np.exp(0.5 * (lo + hi))

    def drift(self, t):
        """(G4) B_t (M, N, N), b_t (M, N) and lambda_t = -log sigma_eff (M,) of the probability-flow ODE."""
        inv = self.precision(t)  # (M, N, N)
        bmat = np.broadcast_to(self.A, inv.shape).copy()
        bmat[:, -1, :] += 0.5 * self.g2 * inv[:, -1, :]
        bvec = np.zeros(inv.shape[:2])
        bvec[:, -1] = -0.5 * self.g2 * inv[:, -1, 0]
        lam = 0.5 * np.log(inv[:, 0, 0])
        return bmat, bvec, lam

    def step_coefficients(self, t_from: float, t_to: float, nodes, substeps_per_unit: int = 64,
                          variable: str = "t"):
        """(G5) Psi(t_to, t_from) (N, N) and W (J, N) for Lagrange nodes ``nodes`` (J values of ``variable``:
        "t" the system time, "lambda" = -log sigma_eff, or "sigma" = sigma_eff).

        Y(u) = Psi(t_to, u) solves dY/du = -Y B_u from Y(t_to) = I; W_j = -int_{t_to}^{t_from} Y b l_j du.
        Both are integrated together by classical RK4 in rho = log u (t_to < t_from)."""
        nodes = np.asarray(nodes, dtype=np.float64)
        rho0, rho1 = math.log(t_to), math.log(t_from)
        n_sub = max(8, math.ceil(abs(rho1 - rho0) * substeps_per_unit))
        h = (rho1 - rho0) / n_sub
        rho = rho0 + h * np.arange(2 * n_sub + 1) / 2  # grid and midpoints
        u = np.exp(rho)
        bmat, bvec, lam = self.drift(u)
        var = {"t": u, "lambda": lam, "sigma": np.exp(-lam)}[variable]
        # Lagrange basis l_j at every stage point: (S, J)
        diff = var[:, None] - nodes[None, :]  # (S, J)
        basis = np.ones((len(u), len(nodes)))
        for j in range(len(nodes)):
            for m in range(len(nodes)):
                if m != j:
                    basis[:, j] *= diff[:, m] / (nodes[j] - nodes[m])
        f_y = -u[:, None, None] * bmat  # dY/drho = Y @ f_y
        f_w = -u[:, None, None] * bvec[:, :, None] * basis[:, None, :]  # dW/drho = Y @ f_w: (S, N, J)

        y = np.eye(self.n)
        w = np.zeros((self.n, len(nodes)))
        for s in range(n_sub):
            a, m_, b = 2 * s, 2 * s + 1, 2 * s + 2
            k1y, k1w = y @ f_y[a], y @ f_w[a]
            y2 = y + 0.5 * h * k1y
            k2y, k2w = y2 @ f_y[m_], y2 @ f_w[m_]
            y3 = y + 0.5 * h * k2y
            k3y, k3w = y3 @ f_y[m_], y3 @ f_w[m_]
            y4 = y + h * k3y
            k4y, k4w = y4 @ f_y[b], y4 @ f_w[b]
            y = y + h / 6 * (k1y + 2 * k2y + 2 * k3y + k4y)
            w = w + h / 6 * (k1w + 2 * k2w + 2 * k3w + k4w)
        return y, w.T


@torch.no_grad()
def sample_tada(denoiser, x, sigmas, *, callback=None, order: int = 2, k: float = 1.0, solver_order: int = 3,
                noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
                cond: dict | None = None, ab_variable: str = "t", substeps_per_unit: int = 64):
    """TADA sampler (arXiv 2506.21757; genkit reconstruction, see the module docstring, (G1)-(G7)).

    ``x``: VE initial noise at sigmas[0] (as for every genkit sampler). ``order``: N, the number of
    augmented variables per dimension (N >= 2 for momentum; 1 is plain VE). ``k``: detail knob, the scale of
    the initial momentum covariance (G1). ``solver_order``: Adams-Bashforth order of the exponential
    integrator (G5), 3 in the paper. ``ab_variable``: the variable the AB polynomial is taken in, "t"
    (default), "lambda" or "sigma". ``noise``: the N-1 extra initial noise channels, shape
    (N-1, *x.shape) (drawn from ``generator`` when not given). Returns the sample (G7).
    """
    cond = cond or {}
    if solver_order not in (1, 2, 3):
        raise ValueError("solver_order must be 1, 2 or 3")
    if ab_variable not in ("t", "lambda", "sigma"):
        raise ValueError("ab_variable must be 't', 'lambda' or 'sigma'")
    sig = [float(s) for s in sigmas]
    n_steps = len(sig) - 1
    if any(s <= 0 for s in sig[:-1]) or any(a <= b for a, b in zip(sig[:-1], sig[1:])):
        raise ValueError("sigmas must be decreasing and positive (except a final 0)")
    system = MomentumSystem(order, k)
    pos = [s for s in sig if s > 0]
    ts = system.t_of_sigma(pos)  # (G3) times at which sigma_eff hits each sigma
    proj = torch.as_tensor(system.projection(ts), dtype=x.dtype, device=x.device)  # (S, N)

    # (G6) augmented initial state m: (N, *x.shape), with r(m) = x
    n = system.n
    resid = system.cov(ts[:1])[0] - sig[0] ** 2 * np.outer(np.eye(n)[0], np.eye(n)[0])
    evals, evecs = np.linalg.eigh(resid)
    top = np.argsort(evals)[::-1][: n - 1]
    chol = torch.as_tensor(evecs[:, top] * np.sqrt(np.clip(evals[top], 0, None)), dtype=x.dtype, device=x.device)
    if noise is None:
        noise = torch.randn((n - 1, *x.shape), generator=generator, dtype=x.dtype, device=x.device)
    elif noise.shape != (n - 1, *x.shape):
        raise ValueError(f"noise must have shape {(n - 1, *x.shape)}")
    m = torch.zeros((n, *x.shape), dtype=x.dtype, device=x.device)
    m[0] = x
    m = m + torch.einsum("nj,j...->n...", chol, noise)

    s_in = x.new_ones(x.shape[0])
    history: list[tuple[float, torch.Tensor]] = []  # (AB node value, D) of past evaluations, newest first
    for i in range(n_steps):
        r = torch.einsum("n,n...->...", proj[i], m)  # (G3) projection r_t
        denoised = denoiser(r, sig[i] * s_in, **cond)  # (G3) E[x0 | m_t] = D(r_t, sigma_eff)
        if callback is not None:
            callback({"x": r, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": denoised})
        if sig[i + 1] == 0:  # (G7)
            return denoised
        node = {"t": ts[i], "lambda": -math.log(sig[i]), "sigma": sig[i]}[ab_variable]
        history = [(node, denoised)] + history[: solver_order - 1]
        psi, w = system.step_coefficients(ts[i], ts[i + 1], [v for v, _ in history], substeps_per_unit,
                                          ab_variable)
        psi = torch.as_tensor(psi, dtype=x.dtype, device=x.device)
        w = torch.as_tensor(w, dtype=x.dtype, device=x.device)  # (J, N)
        m = torch.einsum("nk,k...->n...", psi, m)  # (G5) exact linear part
        for j, (_, d_j) in enumerate(history):  # (G5) Adams-Bashforth force term
            m = m + w[j].reshape(n, *([1] * x.ndim)) * d_j[None]
    return torch.einsum("n,n...->...", proj[n_steps], m)  # schedule ended above 0: r ~ x_sigma (G7)
