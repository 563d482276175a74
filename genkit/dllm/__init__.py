"""genkit.dllm: masked diffusion language models (genkit's LLaDA- and Dream-compatible models) and their decoders."""

from .dream_model import DreamConfig, DreamModel
from .model import LLaDAConfig, LLaDAModel, LLaDAOutput

__all__ = ["DreamConfig", "DreamModel", "LLaDAConfig", "LLaDAModel", "LLaDAOutput"]
