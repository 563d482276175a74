"""genkit's LLaDA: a bidirectional LLaMA-style masked diffusion language model.

LLaDA (Nie et al., arXiv 2502.09992) is a LLaMA-shaped Transformer without the causal mask, trained to
predict masked tokens. This file re-implements the "llama" block of the official modelling code
(ML-GSAI/LLaDA, WINO-DLLM's patched copy) so that

* checkpoint folders (`config.json` + `*.safetensors`, sharded or not) load with their official parameter
  names (`model.transformer.blocks.{i}.q_proj.weight`, ...): our module names match them one for one;
* the forward pass accepts a 4-D boolean attention mask and 1-D or 2-D position ids (WINO's shadow block,
  left-padded batches), and an optional key/value cache (Fast-dLLM-style block caches);
* the numerics are the official ones (RMSNorm and RoPE in float32, same op order), so that logits are
  bit-identical with the official code on the same CPU (checked against `shared/fixtures/llada-tiny`).

Shape letters: B batch, L query length, S key length (cache + new), C d_model, H query heads,
K key/value heads, D head dim, F MLP hidden size, V vocabulary (embedding_size).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from genkit.errors import ConfigError

KVCache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys and values (B, K, S, D), keys rotated


@dataclass
class LLaDAConfig:
    """Hyper-parameters of a LLaDA model; the field names are those of LLaDA's `config.json`."""

    d_model: int = 4096  # width C of the residual stream
    n_heads: int = 32  # query heads H; head dim D = d_model // n_heads
    n_kv_heads: int | None = None  # key/value heads K (grouped-query attention); None = n_heads
    n_layers: int = 32  # number of Transformer blocks
    mlp_hidden_size: int | None = None  # SwiGLU hidden size F; None = mlp_ratio * d_model
    mlp_ratio: int = 4  # used only when mlp_hidden_size is None
    vocab_size: int = 126464  # tokenizer vocabulary
    embedding_size: int | None = None  # rows of the embedding / LM head (>= vocab_size); None = vocab_size
    rope_theta: float = 500000.0  # RoPE base
    rms_norm_eps: float = 1e-5  # RMSNorm epsilon
    mask_token_id: int | None = None  # the [MASK] id the model was trained to fill (required)
    eos_token_id: int | None = None  # end-of-sequence id (LLaDA: 126081)
    pad_token_id: int | None = None  # padding id used for left-padded batches (LLaDA: 126081)
    weight_tying: bool = False  # True: the LM head reuses the token embedding matrix
    include_bias: bool = False  # biases on every linear layer
    include_qkv_bias: bool = False  # biases on q/k/v only (Qwen-style)
    scale_logits: bool = False  # multiply logits by 1/sqrt(d_model)
    input_emb_norm: bool = False  # multiply token embeddings by sqrt(d_model)
    max_sequence_length: int = 4096  # RoPE table length (the official code precomputes this many positions)
    init_std: float = 0.02  # std of the normal init used by `init_weights` (tiny models trained by genkit)
    shifted_logits: bool = False  # genkit: Dream-style model whose logits at i predict token i+1

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.mlp_hidden_size is None:
            self.mlp_hidden_size = self.mlp_ratio * self.d_model
        if self.embedding_size is None:
            self.embedding_size = self.vocab_size
        problems = []
        if self.d_model % self.n_heads:
            problems.append(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            problems.append(f"head dim {self.d_model // self.n_heads} must be even for RoPE")
        if self.embedding_size < self.vocab_size:
            problems.append(f"embedding_size={self.embedding_size} is smaller than vocab_size={self.vocab_size}")
        if self.mask_token_id is None:
            problems.append("mask_token_id is not set: a masked diffusion LM needs the id of its [MASK] token")
        elif not 0 <= self.mask_token_id < self.embedding_size:
            problems.append(f"mask_token_id={self.mask_token_id} is outside the vocabulary "
                            f"(0..{self.embedding_size - 1})")
        if problems:
            raise ConfigError(problems)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "LLaDAConfig":
        """Read a LLaDA `config.json` dict; refuse architectures this implementation does not compute.

        MMaDA checkpoints (model_type 'mmada', `MMadaModelLM`) are read too: the official MMaDA class
        subclasses LLaDA's `LLaDAModelLM` without changing the network (same parameter names, same
        mask id 126336); its extra keys (llm_vocab_size, codebook_size, num_vq_tokens, ...) describe the
        image-token part of the enlarged vocabulary and do not change the forward pass.
        """
        model_type = str(raw.get("model_type", "")).lower()
        archs = raw.get("architectures") or []
        if model_type not in ("llada", "mmada") and not {"LLaDAModelLM", "MMadaModelLM"} & set(archs):
            kind = raw.get("model_type") or (archs[0] if archs else "unknown")
            raise ConfigError(
                f"{source} describes a '{kind}' model, not a LLaDA-style masked diffusion LM "
                "(model_type 'llada' or 'mmada'); pass a LLaDA/MMaDA checkpoint folder or one saved by genkit"
            )
        expected = {"block_type": "llama", "layer_norm_type": "rms", "activation_type": "silu", "rope": True,
                    "alibi": False, "attention_layer_norm": False, "block_group_size": 1}
        problems = [f"{source}: {k}={raw[k]!r} is not supported (genkit implements {k}={v!r}, as in LLaDA-8B)"
                    for k, v in expected.items() if k in raw and raw[k] != v]
        if raw.get("multi_query_attention") and raw.get("n_kv_heads") is None:
            raw = {**raw, "n_kv_heads": 1}
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if kwargs.get("mask_token_id") is None:
            problems.append(f"{source} has no mask_token_id: add the id of the model's [MASK] token "
                            "(LLaDA: 126336) to config.json")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """A `config.json` the official LLaDA code can also read (fixed architecture fields included)."""
        return {
            "architectures": ["LLaDAModelLM"], "model_type": "llada", "block_type": "llama",
            "layer_norm_type": "rms", "activation_type": "silu", "rope": True, "rope_full_precision": True,
            "alibi": False, "attention_layer_norm": False, "block_group_size": 1, "use_cache": False,
            **asdict(self),
        }


class LLaDAOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V) float
    past_key_values: KVCache | None  # per layer (keys, values) (B, K, S, D) when use_cache
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings, each block's output, ln_f output


class RMSNorm(nn.Module):
    """LLaDA's RMSNorm: normalise in float32 with rsqrt, cast back, then scale by the weight."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C) float32
        return self.weight * h.to(x.dtype)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    """Half-split (NeoX/LLaMA) rotation: [x1, x2] -> [-x2, x1] over the head dim."""
    x1, x2 = t.unflatten(-1, (2, -1)).unbind(-2)
    return torch.cat((-x2, x1), dim=-1)


class LLaDABlock(nn.Module):
    """Pre-norm block: x + attn(attn_norm(x)), then + ff_out(silu(ff_proj(h)) * up_proj(h)), h = ff_norm(x)."""

    def __init__(self, cfg: LLaDAConfig):
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        kv_dim = cfg.n_kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.include_bias)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=cfg.include_bias)  # gate
        self.up_proj = nn.Linear(cfg.d_model, cfg.mlp_hidden_size, bias=cfg.include_bias)  # up
        self.ff_out = nn.Linear(cfg.mlp_hidden_size, cfg.d_model, bias=cfg.include_bias)  # down

    def forward(self, x, sin, cos, mask, layer_past=None, cache_positions=None):
        B, L, C = x.shape
        H, K, D = self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim
        h = self.attn_norm(x)  # (B, L, C)
        q = self.q_proj(h).view(B, L, H, D).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(h).view(B, L, K, D).transpose(1, 2)  # (B, K, L, D)
        v = self.v_proj(h).view(B, L, K, D).transpose(1, 2)  # (B, K, L, D)
        # RoPE in float32 (rope_full_precision), on the new tokens only: cached keys are stored rotated.
        qf, kf = q.float(), k.float()
        q = (qf * cos + rotate_half(qf) * sin).to(q.dtype)  # (B, H, L, D)
        k = (kf * cos + rotate_half(kf) * sin).to(k.dtype)  # (B, K, L, D)
        if layer_past is not None:
            past_k, past_v = layer_past  # (B, K, S_past, D)
            if cache_positions is None:  # append: keys = [cache, new]
                k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
            else:  # overwrite: the new tokens replace the cache entries at these positions
                k = past_k.index_copy(2, cache_positions, k)
                v = past_v.index_copy(2, cache_positions, v)
        present = (k, v)
        if H != K:  # grouped-query attention, as the official code does it
            k = k.repeat_interleave(H // K, dim=1, output_size=H)  # (B, H, S, D)
            v = v.repeat_interleave(H // K, dim=1, output_size=H)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=False)  # (B, H, L, D)
        att = att.transpose(1, 2).contiguous().view(B, L, C)  # (B, L, C)
        x = x + self.attn_out(att)
        h = self.ff_norm(x)  # (B, L, C)
        x = x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))  # (B, L, C)
        return x, present


def attention_mask_4d(attention_mask, B: int, L: int, S: int):
    """A boolean (B or 1, 1, L, S) mask (True = may attend) from None, a (B, S) key-padding mask or a 4-D mask.

    Shared by genkit's LLaDA and Dream models: both take the same masks (WINO's shadow block, left padding).
    """
    if attention_mask is None:
        return None
    m = attention_mask
    if m.dtype != torch.bool:
        if not bool(((m == 0) | (m == 1)).all()):
            raise ConfigError("attention_mask must be boolean (True = may attend) or 0/1; "
                              "additive float biases are not supported")
        m = m.bool()
    if m.ndim == 2:  # (B, S) key padding: every query may attend to the non-padding keys
        if m.shape != (B, S):
            raise ConfigError(f"a 2-D attention_mask must be (batch, keys) = ({B}, {S}), got {tuple(m.shape)}")
        return m[:, None, None, :].expand(B, 1, L, S)  # (B, 1, L, S)
    if m.ndim != 4 or m.shape[1:] != (1, L, S) or m.shape[0] not in (1, B):
        raise ConfigError(f"a 4-D attention_mask must be ({B} or 1, 1, {L}, {S}), got {tuple(m.shape)}")
    return m


class LLaDAModel(nn.Module):
    """LLaDA masked diffusion LM. `model(input_ids, attention_mask, position_ids) -> logits (B, L, V)`.

    Parameter names equal the official checkpoint's (`model.transformer.wte.weight`, ...).
    """

    def __init__(self, config: LLaDAConfig):
        super().__init__()
        self.config = config
        transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_size, config.d_model),
            blocks=nn.ModuleList(LLaDABlock(config) for _ in range(config.n_layers)),
            ln_f=RMSNorm(config.d_model, config.rms_norm_eps),
        ))
        if not config.weight_tying:
            transformer["ff_out"] = nn.Linear(config.d_model, config.embedding_size, bias=config.include_bias)
        self.model = nn.ModuleDict(dict(transformer=transformer))
        self._rope_cache: dict = {}

    @property
    def mask_id(self) -> int:
        return self.config.mask_token_id

    @property
    def device(self) -> torch.device:
        return self.model.transformer.wte.weight.device

    def init_weights(self, generator: torch.Generator | None = None) -> "LLaDAModel":
        """Normal(0, init_std) linear/embedding weights, zero biases, unit norms (for models trained from scratch)."""
        for name, p in self.named_parameters():
            with torch.no_grad():
                if name.endswith("bias"):
                    p.zero_()
                elif p.ndim == 1:
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, self.config.init_std, generator=generator)
        return self

    def rope_tables(self, device: torch.device, needed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """sin/cos for positions 0..n-1, (n, D) float32, n = max(max_sequence_length, needed).

        Like the official code, the table covers max_sequence_length positions and is indexed by the position
        ids, so every entry is computed by the same (vectorised) kernel and positions may repeat (WINO).
        """
        key = str(device)
        if key not in self._rope_cache or self._rope_cache[key][0].shape[0] < needed:
            D, n = self.config.head_dim, max(self.config.max_sequence_length, needed)
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float) / D))
            seq = torch.arange(n, device=device, dtype=torch.float)
            freqs = torch.einsum("i , j -> i j", seq, inv_freq)  # (n, D/2)
            angles = torch.cat((freqs, freqs), dim=-1)  # (n, D): [f0..f_{D/2-1}, f0..f_{D/2-1}]
            self._rope_cache[key] = (angles.sin(), angles.cos())
        return self._rope_cache[key]

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
        """Logits (B, L, V) for `input_ids` (B, L).

        attention_mask: None (full bidirectional attention), bool (B or 1, 1, L, S) with True = may attend,
            or (B, S) key padding (1 = real token). S = L without a cache, else the cache length after update.
        position_ids: (L,) shared by the batch or (B, L); default: past length + arange(L) (or cache_positions).
        past_key_values: per-layer (keys, values) (B, K, S_past, D) from an earlier call with use_cache=True.
            The new tokens' keys/values are appended, or, when `cache_positions` (L,) is given, written over
            the cache entries at those positions (Fast-dLLM's dual cache, WINO's block cache).
        Returns the logits tensor, or an `LLaDAOutput` when use_cache or output_hidden_states is set.
        """
        B, L = input_ids.shape
        T = self.model.transformer
        past_len = 0 if past_key_values is None else past_key_values[0][0].shape[2]
        S = past_len + L if (past_key_values is None or cache_positions is None) else past_len
        if position_ids is None:
            position_ids = cache_positions if cache_positions is not None else torch.arange(
                past_len, past_len + L, device=input_ids.device)
        mask = attention_mask_4d(attention_mask, B, L, S)
        sin, cos = self.rope_tables(input_ids.device, needed=int(position_ids.max()) + 1)
        sin, cos = sin[position_ids], cos[position_ids]  # (L, D) or (B, L, D)
        sin, cos = (sin[None, None], cos[None, None]) if position_ids.ndim == 1 else (sin[:, None], cos[:, None])

        x = T.wte(input_ids)  # (B, L, C)
        if self.config.input_emb_norm:
            x = x * (self.config.d_model ** 0.5)
        hidden = [x] if output_hidden_states else None
        presents: KVCache | None = [] if use_cache else None
        for i, block in enumerate(T.blocks):
            layer_past = None if past_key_values is None else past_key_values[i]
            x, kv = block(x, sin, cos, mask, layer_past, cache_positions)  # (B, L, C)
            if use_cache:
                presents.append(kv)
            if output_hidden_states:
                hidden.append(x)
        x = T.ln_f(x)  # (B, L, C)
        if output_hidden_states:
            hidden.append(x)
        logits = F.linear(x, T.wte.weight) if self.config.weight_tying else T.ff_out(x)  # (B, L, V)
        if self.config.scale_logits:
            logits = logits * (1 / self.config.d_model ** 0.5)
        if use_cache or output_hidden_states:
            return LLaDAOutput(logits, presents, tuple(hidden) if hidden is not None else None)
        return logits

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu") -> "LLaDAModel":
        """Load `config.json` + `model.safetensors` (or shards listed in `model.safetensors.index.json`)."""
        folder = Path(folder)
        raw = read_config_json(folder, "a LLaDA checkpoint folder (config.json + *.safetensors)")
        config = LLaDAConfig.from_dict(raw, source=str(folder / "config.json"))
        state = read_safetensors_folder(folder, device)
        with torch.device("meta"):
            model = cls(config)
        return assign_state(model, state, folder, "a LLaDA model", dtype)

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        """Write config.json + model.safetensors into a temporary folder, then rename it into place."""
        return write_model_folder(folder, self.config.to_dict(), self.state_dict())


# ------------------------------------------------------------------------------------------- model folders
def read_config_json(folder: Path, what: str) -> dict:
    """The parsed `config.json` of a model folder; one-line ConfigError when absent or not JSON."""
    cfg_path = Path(folder) / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{folder} has no config.json: pass {what}")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{cfg_path} is not valid JSON ({e.msg} at line {e.lineno}); fix or replace it") from e


def read_safetensors_folder(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of `model.safetensors`, or of the shards named by `model.safetensors.index.json`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder} has no *.safetensors weights; genkit loads safetensors only "
                          "(convert .bin/.pt checkpoints with safetensors first)")
    state = {}
    for name in files:
        if not (folder / name).is_file():
            raise ConfigError(f"{folder / name} is listed in model.safetensors.index.json but missing; "
                              "re-download the checkpoint")
        state.update(load_file(str(folder / name), device=str(device)))
    return state


def assign_state(model: nn.Module, state: dict, folder: Path, what: str, dtype: torch.dtype | None = None):
    """Put `state` into a model built on the meta device (strict names), cast to `dtype`; returns it in eval mode."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ConfigError(
            f"{folder} weights do not match {what} with this config.json "
            f"(missing: {missing[:3]}{'...' if len(missing) > 3 else ''}; "
            f"unexpected: {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "check that config.json belongs to these weights")
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def write_model_folder(folder: str | os.PathLike, config: dict, state: dict) -> Path:
    """Write config.json + model.safetensors into a temporary folder, then rename it into place."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        old = None
        if folder.exists():
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            folder.rename(old)
        tmp.rename(folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
