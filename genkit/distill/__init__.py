"""genkit.distill"""
