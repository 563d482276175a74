"""Which config class validates the recipes of each ``recipes/<folder>/`` (used by tests and docs)."""

from __future__ import annotations

from genkit import config as C


def _flow(path):
    from genkit.flows.train import FlowRecipe

    return C.load(FlowRecipe, path)


def _mixture(path):
    from genkit.models.denoisers import load_denoiser

    return load_denoiser(path)


# recipes/<folder> -> loader(path) that raises ConfigError on a bad recipe
RECIPE_CONFIGS = {
    "train-flow": _flow,
    "mixtures": _mixture,
}
