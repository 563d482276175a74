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


DREAM_MASK, DREAM_PAD = 127, 126


def build_tiny_dream(seed=0, n_layers=2, head=3.0):
    """A tiny random Dream-format model (genkit's DreamModel): 128-token vocabulary (mask 127, pad/eos 126),
    hidden 32, 4 query heads over 2 key/value heads, rope_theta 1e6 as Dream-7B.

    Weights come from one seeded generator in parameter order (no transformers init), so the official Dream code
    can load the same folder; the LM head is sharpened (`head`) so that top-k / top-p filters and the orders'
    scores matter, and its mask row is zero so the mask id is (almost) never proposed, as with a trained model.
    """
    from genkit.dllm.dream_model import DreamConfig, DreamModel

    cfg = DreamConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6,
                      mask_token_id=DREAM_MASK, pad_token_id=DREAM_PAD, eos_token_id=DREAM_PAD,
                      bos_token_id=DREAM_PAD)
    model = DreamModel(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # q/k/v biases
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name == "lm_head.weight":
                p.copy_(head * torch.randn(p.shape, generator=g) / cfg.hidden_size ** 0.5)
                p[DREAM_MASK] = 0
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
    return model.eval()
