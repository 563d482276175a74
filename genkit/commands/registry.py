"""Which config class validates the recipes of each ``recipes/<folder>/`` (used by tests and docs)."""

from __future__ import annotations

from genkit import config as C


def _flow(path):
    from genkit.flows.train import load_flow_recipe

    return load_flow_recipe(path)


def _diffusion(path):
    from genkit.diffusion.train import DiffusionRecipe

    return C.load(DiffusionRecipe, path)


def _mixture(path):
    from genkit.models.denoisers import load_denoiser

    return load_denoiser(path)


def _recaption(path):
    from genkit.recaption.pipeline import RecaptionConfig

    return C.load(RecaptionConfig, path)


def _train_dllm(path):
    from genkit.dllm.train import DLLMRecipe

    return C.load(DLLMRecipe, path)


def _decode(path):
    from genkit.dllm.decode import DecodeConfig

    cfg = C.load(DecodeConfig, path)
    cfg.knobs()  # knobs the decoder does not take are an error
    return cfg


def _distill(path):
    from genkit.distill.train import DistillRecipe

    return C.load(DistillRecipe, path)


def _train_ae(path):
    from genkit.ae.train import AERecipe

    return C.load(AERecipe, path)


def _rl(path):
    from genkit.dllm.rl.train import RLRecipe

    return C.load(RLRecipe, path, ["init=."])  # the run to start from is given on the command line


# recipes/<folder> -> loader(path) that raises ConfigError on a bad recipe
RECIPE_CONFIGS = {
    "train-dllm": _train_dllm,
    "decode": _decode,
    "train-flow": _flow,
    "train-ae": _train_ae,
    "mixtures": _mixture,
    "train-diffusion": _diffusion,
    "recaption": _recaption,
    "distill": _distill,
    "rl": _rl,
}
