"""genkit.recaption"""
