"""genkit.models"""
