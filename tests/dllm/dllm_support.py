"""Tiny randomly initialised LLaDA models for the dLLM tests (imported by conftest and test files)."""

import torch

from genkit.dllm.model import LLaDAConfig, LLaDAModel

MASK, PAD = 63, 62


def build_tiny(n_layers=2, seed=0, head=4.0, shifted=False, **overrides) -> LLaDAModel:
    """64-token vocabulary (mask 63, pad/eos 62), d_model 32, 4 query heads over 2 key/value heads (GQA).

    Weights are drawn like the llada-tiny fixture's (norms near 1, unit-scale embeddings, a sharpened LM head)
    so that confidences spread over (0, 1) and WINO both accepts several tokens and re-masks.
    """
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=n_layers, mlp_hidden_size=64, vocab_size=64,
                      mask_token_id=MASK, pad_token_id=PAD, eos_token_id=PAD, max_sequence_length=128,
                      shifted_logits=shifted, **overrides)
    model = LLaDAModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "wte" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "model.transformer.ff_out.weight":
                p.copy_(head * torch.randn(p.shape, generator=g) / cfg.d_model ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.eval()
