"""Decoders for masked diffusion LMs.

Every decoder is `decode_<name>(model, prompt_ids, *, gen_length, block_length, ...) -> DecodeResult` where
`model(input_ids, attention_mask=None, position_ids=None) -> logits (B, L, V)` has `config.mask_token_id`
(genkit's `LLaDAModel` or `DreamModel`; `config.shifted_logits` marks Dream-style logits), and `prompt_ids` is a (B, P) tensor or a list of token-id lists (left-padded here).
"""

from genkit.errors import ConfigError

from .common import DecodeResult, add_gumbel_noise, get_num_transfer_tokens
from .dream import decode_entropy, decode_maskgit_plus, decode_origin, decode_topk_margin, sample_tokens
from .fast_dllm import decode_fast_dllm
from .llada import decode_llada
from .wino import decode_wino, decode_wino_cache, wino_layout
from .wino_plus import decode_wino_plus

DECODERS = {
    "llada": decode_llada,
    "fast-dllm": decode_fast_dllm,
    "wino": decode_wino,
    "wino-cache": decode_wino_cache,
    "wino-plus": decode_wino_plus,  # genkit, not the official algorithm (see wino_plus.py)
    "origin": decode_origin,
    "maskgit_plus": decode_maskgit_plus,
    "topk_margin": decode_topk_margin,
    "entropy": decode_entropy,
}


def get_decoder(name: str):
    """The decoder registered under `name`; ConfigError listing the valid names otherwise."""
    try:
        return DECODERS[name]
    except KeyError:
        raise ConfigError(f"unknown decoder algo={name!r}; choose one of: {', '.join(DECODERS)}") from None


__all__ = [
    "DECODERS", "DecodeResult", "add_gumbel_noise", "get_decoder", "get_num_transfer_tokens", "sample_tokens",
    "wino_layout", "decode_llada", "decode_fast_dllm", "decode_wino", "decode_wino_cache", "decode_wino_plus",
    "decode_origin", "decode_maskgit_plus", "decode_topk_margin", "decode_entropy",
]
