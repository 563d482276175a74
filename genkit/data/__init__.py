"""genkit.data"""
