"""genkit.samplers"""
