"""genkit.eval"""
