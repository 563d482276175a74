"""genkit.dllm"""
