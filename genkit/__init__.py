"""genkit: one CLI and one runtime for generative-modelling research."""

__version__ = "0.1.0"
