"""genkit.dllm: masked diffusion language models (genkit's LLaDA-compatible model) and their decoders."""

from .model import LLaDAConfig, LLaDAModel, LLaDAOutput

__all__ = ["LLaDAConfig", "LLaDAModel", "LLaDAOutput"]
