"""genkit.samplers: ``sample_<name>(denoiser, x, sigmas, *, callback=None, **knobs) -> x``.

Every sampler sees only a denoiser ``D(x, sigma, **cond) -> x0`` (EDM convention), the initial VE noise
``x`` at ``sigmas[0]`` and a decreasing schedule ending (normally) at 0. NFE is what an
``genkit.models.denoisers.NFECounter`` sees; :func:`steps_for_nfe` picks the number of schedule intervals
that spends a requested NFE.
"""

from __future__ import annotations

from genkit.errors import ConfigError
from genkit.samplers.dpm_solver import sample_dpmpp_2m
from genkit.samplers.edm import sample_euler, sample_heun
from genkit.samplers.schedules import SCHEDULES, get_sigmas_exponential, get_sigmas_karras, get_sigmas_uniform_t
from genkit.samplers.tada import sample_tada
from genkit.samplers.unipc import sample_unipc

SAMPLERS = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dpmpp-2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "tada": sample_tada,
}

# Smallest NFE at which each sampler takes at least one update of its own higher order (the step to
# sigma = 0 is always first order): Heun one 2-evaluation step plus the final Euler step (2N - 1 >= 3),
# DPM-Solver++(2M) and UniPC one multistep update after their first-order start (3), TADA one
# Adams-Bashforth update with history (3; its 3rd-order update needs 4).
MIN_NFE = {"euler": 1, "heun": 3, "dpmpp-2m": 3, "unipc": 3, "tada": 3}


def get_sampler(name: str):
    """Sampler function by registry name; an unknown name is a ConfigError listing the valid ones."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(f"unknown sampler {name!r}; valid samplers: {', '.join(SAMPLERS)}") from None


def steps_for_nfe(name: str, nfe: int) -> int:
    """Number of schedule intervals N (sigmas has N + 1 values, the last 0) that spends at most ``nfe``
    denoiser calls: N = nfe for one-call-per-step samplers, N = (nfe + 1) // 2 for Heun (NFE = 2N - 1, the
    last step Euler; an even nfe therefore spends nfe - 1)."""
    get_sampler(name)
    if not isinstance(nfe, int) or nfe < MIN_NFE[name]:
        raise ConfigError(f"nfe={nfe} is too small for sampler {name!r}: it needs nfe >= {MIN_NFE[name]} "
                          f"to run at its order")
    return (nfe + 1) // 2 if name == "heun" else nfe


def expected_nfe(name: str, steps: int) -> int:
    """Denoiser calls a sampler makes on a schedule of ``steps`` intervals ending at 0."""
    get_sampler(name)
    return 2 * steps - 1 if name == "heun" else steps


def sigmas_for_nfe(name: str, nfe: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                   schedule: str = "karras"):
    """The schedule (with the final 0) that sampler ``name`` runs at ``nfe`` evaluations."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    n = steps_for_nfe(name, nfe)
    if schedule == "karras":
        return get_sigmas_karras(n, sigma_min, sigma_max, rho)
    if schedule == "uniform-t":
        return get_sigmas_uniform_t(n, sigma_min, sigma_max)
    return get_sigmas_exponential(n, sigma_min, sigma_max)


__all__ = ["SAMPLERS", "MIN_NFE", "get_sampler", "steps_for_nfe", "expected_nfe", "sigmas_for_nfe",
           "get_sigmas_karras", "get_sigmas_exponential", "get_sigmas_uniform_t", "sample_euler", "sample_heun",
           "sample_dpmpp_2m", "sample_unipc", "sample_tada"]
