"""genkit.flows"""
