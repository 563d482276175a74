"""genkit.commands"""
