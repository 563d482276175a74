"""Autoencoders for latent flows: genkit train-ae (from scratch, or STARFlow decoder fine-tuning)."""
