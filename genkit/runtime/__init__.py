"""genkit.runtime"""
