"""genkit's Dream: the Qwen2-architecture masked diffusion LM of Dream and DiffuCoder, loaded without remote code.

Dream (Ye et al., arXiv 2508.15487) and DiffuCoder (Gong et al., arXiv 2506.20639) start from Qwen2.5 weights
and keep their architecture: a pre-norm decoder with q/k/v biases, grouped-query attention, SwiGLU MLPs,
RMSNorm and RoPE, run *without* the causal mask. Their checkpoints (`config.json` with `model_type: Dream`,
`architectures: [DreamModel]`, safetensors shards) are read by the official `modeling_dream.py`, which the Hub
folders ship for `trust_remote_code=True`; genkit re-implements it here instead, so

* the parameter names are the official ones (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.
  weight`, ..., `model.norm.weight`, `lm_head.weight`), which are Qwen2's: a Dream folder is a Qwen2 folder
  with a different config.json;
* the numerics follow the official code (Dream's `DreamSdpaAttention`, transformers' Qwen2): RMSNorm in float32
  and cast back, cos/sin computed in float32 then cast to the activations' dtype, RoPE applied in that dtype,
  scaled-dot-product attention with no causal mask (`is_causal=False`, no mask when nothing is padded);
* the logits are *shifted*, as Dream's training made them: the output at position i predicts token i + 1
  (`config.shifted_logits` is True; genkit's decoders shift them right by one, see decoding/common.py).

Checked against transformers' `Qwen2ForCausalLM` run with a full (non-causal) attention mask on the same folder
(tests/dllm/test_dream_model.py). The forward takes genkit's masked-diffusion interface:
`model(input_ids, attention_mask=None, position_ids=None) -> logits (B, L, V)`, plus the same optional key/value
cache as genkit's LLaDA (Fast-dLLM's prefix and dual caches).

Shape letters: B batch, L query length, S key length (cache + new), C hidden size, H query heads,
K key/value heads, D head dim, F MLP hidden size, V vocabulary.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from genkit.errors import ConfigError

from .model import (KVCache, LLaDAOutput, RMSNorm, assign_state, attention_mask_4d, read_config_json,
                    read_safetensors_folder, rotate_half, write_model_folder)  # RMSNorm: Qwen2's equals LLaDA's

DREAM_ARCHITECTURES = ("DreamModel",)


def is_dream_config(raw: dict) -> bool:
    """True for a Dream / DiffuCoder `config.json` (model_type 'Dream' or architectures ['DreamModel'])."""
    return str(raw.get("model_type", "")).lower() == "dream" or bool(
        set(raw.get("architectures") or []) & set(DREAM_ARCHITECTURES))


@dataclass
class DreamConfig:
    """Hyper-parameters of a Dream model: the field names and defaults of the official `DreamConfig`.

    The defaults are those of Dream's `configuration_dream.py` (they apply to keys a config.json omits, as the
    official class applies them); Dream-v0-7B and DiffuCoder-7B set hidden_size 3584, 28 layers, 28 query and
    4 key/value heads, intermediate_size 18944, vocab_size 152064, rope_theta 1e6, mask_token_id 151666.
    """

    vocab_size: int = 151936  # rows of the embedding and of the LM head
    hidden_size: int = 4096  # width C of the residual stream
    intermediate_size: int = 22016  # SwiGLU hidden size F
    num_hidden_layers: int = 32  # decoder layers
    num_attention_heads: int = 32  # query heads H; head dim D = hidden_size // H
    num_key_value_heads: int | None = 32  # key/value heads K (grouped-query attention); None = H
    hidden_act: str = "silu"  # MLP activation (only silu, as every Dream checkpoint)
    max_position_embeddings: int = 32768  # context length genkit allows (RoPE itself has no table limit)
    rms_norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base
    rope_scaling: dict | None = None  # only None (plain RoPE, as Dream and DiffuCoder) is implemented
    tie_word_embeddings: bool = False  # True: the LM head reuses the embedding matrix
    use_sliding_window: bool = False  # only False is implemented (Dream attends over the whole sequence)
    attention_dropout: float = 0.0  # dropout on attention weights while training
    initializer_range: float = 0.02  # std of `init_weights` (models built from scratch)
    mask_token_id: int | None = 151666  # the [MASK] id (`<|mask|>` in Dream's and DiffuCoder's tokenizers)
    pad_token_id: int | None = 151643  # padding id (`<|endoftext|>`)
    bos_token_id: int | None = None  # beginning-of-sequence id
    eos_token_id: int | None = None  # end-of-sequence id (`<|endoftext|>` = 151643 in Dream)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(f"hidden_size={self.hidden_size} is not divisible by "
                            f"num_attention_heads={self.num_attention_heads}")
        elif (self.hidden_size // self.num_attention_heads) % 2:
            problems.append(f"head dim {self.hidden_size // self.num_attention_heads} must be even for RoPE")
        if self.num_attention_heads % self.num_key_value_heads:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by "
                            f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act={self.hidden_act!r} is not supported (Dream uses 'silu')")
        if self.rope_scaling is not None:
            problems.append(f"rope_scaling={self.rope_scaling!r} is not supported (Dream and DiffuCoder use null)")
        if self.use_sliding_window:
            problems.append("use_sliding_window=true is not supported (Dream attends over the whole sequence)")
        if self.mask_token_id is None:
            problems.append("mask_token_id is not set: a masked diffusion LM needs the id of its [MASK] token")
        elif not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id={self.mask_token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        if problems:
            raise ConfigError(problems)

    # the names genkit's decoders and `genkit decode` read (LLaDAConfig's)
    shifted_logits = property(lambda self: True, doc="Dream's logit at i predicts token i + 1")
    embedding_size = property(lambda self: self.vocab_size)
    max_sequence_length = property(lambda self: self.max_position_embeddings)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "DreamConfig":
        """Read a Dream / DiffuCoder `config.json`; refuse other models and features genkit does not compute."""
        archs = raw.get("architectures") or []
        if not is_dream_config(raw):
            kind = raw.get("model_type") or (archs[0] if archs else "unknown")
            raise ConfigError(f"{source} describes a '{kind}' model, not a Dream-style masked diffusion LM "
                              "(model_type 'Dream', architectures ['DreamModel'])")
        if archs and not set(archs) & set(DREAM_ARCHITECTURES):
            raise ConfigError(f"{source}: architectures {archs} is not Dream's 'DreamModel' (a variant with other "
                              "semantics, e.g. block diffusion or unshifted logits, needs its own class)")
        eos = raw.get("eos_token_id")
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        rope = raw.get("rope_parameters")  # transformers >= 5 writes RoPE settings here instead of rope_theta
        if isinstance(rope, dict):
            if rope.get("rope_type", "default") != "default":
                kwargs["rope_scaling"] = rope
            if "rope_theta" in rope:
                kwargs["rope_theta"] = rope["rope_theta"]
        layer_types = set(raw.get("layer_types") or [])
        if layer_types - {"full_attention"}:
            raise ConfigError(f"{source}: layer_types {sorted(layer_types)} is not supported (Dream attends over "
                              "the whole sequence in every layer)")
        if isinstance(eos, list):  # some configs list several end ids; the first is the tokenizer's EOS
            kwargs["eos_token_id"] = eos[0] if eos else None
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A `config.json` the official Dream code can also read."""
        return {"architectures": list(DREAM_ARCHITECTURES), "model_type": "Dream", "use_cache": False,
                **asdict(self)}


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention with q/k/v biases (Qwen2's projections, Dream's `is_causal=False`)."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.cfg = cfg
        H, K, D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, H * D, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, K * D, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, K * D, bias=True)
        self.o_proj = nn.Linear(H * D, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, layer_past=None, cache_positions=None):
        B, L, _ = x.shape
        H, K, D = self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim
        q = self.q_proj(x).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, K, D).transpose(1, 2)  # (B, K, L, D)
        v = self.v_proj(x).view(B, L, K, D).transpose(1, 2)  # (B, K, L, D)
        q = q * cos + rotate_half(q) * sin  # RoPE in the activations' dtype, as Qwen2 / Dream
        k = k * cos + rotate_half(k) * sin
        if layer_past is not None:  # cached keys are stored rotated (genkit's LLaDA cache convention)
            past_k, past_v = layer_past  # (B, K, S_past, D)
            if cache_positions is None:
                k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
            else:
                k, v = past_k.index_copy(2, cache_positions, k), past_v.index_copy(2, cache_positions, v)
        present = (k, v)
        if H != K:  # Dream's repeat_kv: each key/value head serves H/K consecutive query heads
            S = k.shape[2]
            k = k[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)  # (B, H, S, D)
            v = v[:, :, None].expand(B, K, H // K, S, D).reshape(B, H, S, D)
        p = self.cfg.attention_dropout if self.training else 0.0
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, is_causal=False)  # (B, H, L, D)
        att = att.transpose(1, 2).contiguous().view(B, L, H * D)  # (B, L, C)
        return self.o_proj(att), present


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, L, C)


class DreamLayer(nn.Module):
    """Pre-norm block: x + attn(input_layernorm(x)), then + mlp(post_attention_layernorm(x))."""

    def __init__(self, cfg: DreamConfig):
        super().__init__()
        self.self_attn = DreamAttention(cfg)
        self.mlp = DreamMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, layer_past=None, cache_positions=None):
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, layer_past, cache_positions)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))  # (B, L, C)
        return x, present


class DreamModel(nn.Module):
    """Dream / DiffuCoder masked diffusion LM. `model(input_ids, attention_mask, position_ids) -> logits (B, L, V)`.

    The logits are the official (shifted) ones: row i predicts token i + 1; `config.shifted_logits` says so.
    """

    def __init__(self, config: DreamConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DreamLayer(config) for _ in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def init_weights(self, generator: torch.Generator | None = None) -> "DreamModel":
        """Normal(0, initializer_range) weights, zero biases, unit norms (the official `_init_weights`)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, self.config.initializer_range, generator=generator)
        return self

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for `position_ids` (L,) or (B, L), broadcastable to (B, H, L, D), in `dtype`.

        Computed in float32 as transformers' Qwen2 / Dream rotary embedding: inv_freq = theta^(-2i/D), angles =
        position * inv_freq (an outer product: exact), [angles, angles], then cos/sin cast to the activations'
        dtype (bfloat16 for the released checkpoints).
        """
        D = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float,
                                                                    device=position_ids.device) / D))
        freqs = position_ids[..., None].float() * inv_freq  # (..., L, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., L, D)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        if position_ids.ndim == 1:
            return cos[None, None], sin[None, None]  # (1, 1, L, D)
        return cos[:, None], sin[:, None]  # (B, 1, L, D)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        *,
        past_key_values: KVCache | None = None,
        cache_positions: torch.Tensor | None = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ):
        """Shifted logits (B, L, V) for `input_ids` (B, L); the arguments are those of `LLaDAModel.forward`.

        attention_mask: None (full bidirectional attention, as Dream's `attention_mask="full"`), bool
            (B or 1, 1, L, S) with True = may attend, or (B, S) key padding (1 = real token).
        position_ids: (L,) or (B, L); default past length + arange(L) (or cache_positions). Dream's left-padded
            batches give real tokens positions 0, 1, ... after the padding (`tok_idx` in its sampler).
        past_key_values / cache_positions / use_cache: the key/value cache of genkit's LLaDA (Fast-dLLM caches).
        Returns the logits, or an `LLaDAOutput` (logits, past_key_values, hidden_states) when use_cache or
        output_hidden_states is set.
        """
        B, L = input_ids.shape
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        S = past_len + L if (past_key_values is None or cache_positions is None) else past_len
        if position_ids is None:
            position_ids = cache_positions if cache_positions is not None else torch.arange(
                past_len, past_len + L, device=input_ids.device)
        mask = attention_mask_4d(attention_mask, B, L, S)
        x = self.model.embed_tokens(input_ids)  # (B, L, C)
        cos, sin = self.rope(position_ids, x.dtype)
        hidden = [x] if output_hidden_states else None
        presents: KVCache | None = [] if use_cache else None
        for i, layer in enumerate(self.model.layers):
            layer_past = None if past_key_values is None else past_key_values[i]
            x, kv = layer(x, cos, sin, mask, layer_past, cache_positions)  # (B, L, C)
            if use_cache:
                presents.append(kv)
            if output_hidden_states:
                hidden.append(x)
        x = self.model.norm(x)  # (B, L, C)
        if output_hidden_states:
            hidden.append(x)
        head = self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight
        logits = F.linear(x, head)  # (B, L, V)
        if use_cache or output_hidden_states:
            return LLaDAOutput(logits, presents, tuple(hidden) if hidden is not None else None)
        return logits

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "DreamModel":
        """Load an official Dream / DiffuCoder folder (config.json + safetensors shards) by local path.

        No code from the folder is run (its modeling_dream.py is ignored). `dtype` casts the weights
        (bfloat16 halves the float32 memory; the released 7B shards are stored in bfloat16 already).
        """
        folder = Path(folder)
        raw = read_config_json(folder, "a Dream / DiffuCoder folder (config.json + *.safetensors)")
        config = DreamConfig.from_dict(raw, source=str(folder / "config.json"))
        state = read_safetensors_folder(folder, device)
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # a tied head is the embedding matrix
        with torch.device("meta"):
            model = cls(config)
        return assign_state(model, state, folder, "a Dream model", dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json (official field names) + model.safetensors, atomically."""
        return write_model_folder(folder, self.config.to_dict(), self.state_dict())
