"""genkit.diffusion"""
