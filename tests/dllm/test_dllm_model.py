"""genkit's LLaDA model: config reading, saving/loading, masks, position ids and the key/value cache."""

import json

import pytest
import torch

from genkit.dllm.model import LLaDAConfig, LLaDAModel
from genkit.errors import ConfigError


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 62, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_state_dict_uses_official_names(tiny):
    keys = set(tiny(n_layers=1).state_dict())
    block = {f"model.transformer.blocks.0.{n}.weight" for n in
             ("attn_norm", "ff_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")}
    assert keys == block | {f"model.transformer.{n}.weight" for n in ("wte", "ln_f", "ff_out")}
    tied = tiny(n_layers=1, weight_tying=True)
    assert "model.transformer.ff_out.weight" not in tied.state_dict()
    x = ids()
    assert torch.allclose(tied(x), tied.model.transformer.ln_f(
        tied(x, output_hidden_states=True).hidden_states[-2]) @ tied.model.transformer.wte.weight.T, atol=1e-5)


@torch.no_grad()
def test_save_and_load_roundtrip(tmp_path, tiny):
    model = tiny()
    x = ids()
    folder = model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    loaded = LLaDAModel.from_pretrained(folder)
    assert loaded.config == model.config
    assert torch.equal(loaded(x), model(x))
    model.save_pretrained(folder)  # overwriting an existing folder works and leaves no temporaries behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@torch.no_grad()
def test_sharded_checkpoint_loads(tmp_path, tiny):
    from safetensors.torch import save_file

    model = tiny()
    state = model.state_dict()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:5], "model-00002-of-00002.safetensors": names[5:]}
    for fname, keys in shards.items():
        save_file({k: state[k].contiguous() for k in keys}, str(tmp_path / fname), metadata={"format": "pt"})
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_dict()))
    x = ids()
    assert torch.equal(LLaDAModel.from_pretrained(tmp_path)(x), model(x))


def _write(folder, model, config=None, weights=True):
    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights:
        model.save_pretrained(folder / "_w")
        (folder / "_w" / "model.safetensors").rename(folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("case, words", [
    ("missing", "no config.json"),
    ("bert", "'bert'"),
    ("no_mask", "mask_token_id"),
    ("sequential", "block_type"),
    ("bad_json", "not valid JSON"),
    ("no_weights", "safetensors"),
    ("wrong_shapes", "do not match"),
])
def test_bad_folders_raise_config_error(tmp_path, tiny, case, words):
    model = tiny(n_layers=1)
    good = model.config.to_dict()
    folder = tmp_path / case
    if case == "missing":
        folder.mkdir()
    elif case == "bert":
        _write(folder, model, {"model_type": "bert", "architectures": ["BertForMaskedLM"], "hidden_size": 32})
    elif case == "no_mask":
        _write(folder, model, {k: v for k, v in good.items() if k != "mask_token_id"})
    elif case == "sequential":
        _write(folder, model, {**good, "block_type": "sequential"})
    elif case == "bad_json":
        _write(folder, model, "{not json")
    elif case == "no_weights":
        _write(folder, model, good, weights=False)
    elif case == "wrong_shapes":
        _write(folder, model, {**good, "n_layers": 2})
    with pytest.raises(ConfigError) as err:
        LLaDAModel.from_pretrained(folder)
    msg = str(err.value)
    assert words in msg and "\n" not in msg


def test_config_validation():
    with pytest.raises(ConfigError, match="mask_token_id"):
        LLaDAConfig(d_model=32, n_heads=4, vocab_size=64)
    with pytest.raises(ConfigError, match="n_kv_heads"):
        LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=3, vocab_size=64, mask_token_id=63)
    cfg = LLaDAConfig.from_dict({"model_type": "llada", "d_model": 32, "n_heads": 4, "n_layers": 1,
                                 "vocab_size": 64, "mask_token_id": 63, "multi_query_attention": True,
                                 "some_unused_official_key": 1})
    assert cfg.n_kv_heads == 1 and cfg.mlp_hidden_size == 4 * 32 and cfg.embedding_size == 64


@torch.no_grad()
def test_masks_and_position_ids(tiny):
    model = tiny()
    x = ids()
    full = model(x)
    L = x.shape[1]
    ones = torch.ones(1, 1, L, L, dtype=torch.bool)
    assert torch.equal(model(x, attention_mask=ones, position_ids=torch.arange(L)), full)
    assert torch.equal(model(x, position_ids=torch.arange(L).expand(2, L)), full)
    # Left padding: a 2-D key-padding mask plus positions starting at 0 reproduces the unpadded row.
    padded = torch.cat([torch.full((2, 3), 62), x], dim=1)
    keep = torch.arange(L + 3)[None].expand(2, -1) >= 3
    pos = (torch.arange(L + 3) - 3).clamp_min(0).expand(2, -1)
    assert torch.allclose(model(padded, attention_mask=keep, position_ids=pos)[:, 3:], full, atol=1e-5)
    with pytest.raises(ConfigError, match="attention_mask"):
        model(x, attention_mask=torch.zeros(2, 1, L, L + 1, dtype=torch.bool))


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_reproduces_full_pass(tiny, padded):
    model = tiny()  # GQA: 4 query heads share 2 key/value heads
    x = ids(1, (2, 16))
    keep, pos = None, None
    if padded:
        keep = torch.arange(16)[None].expand(2, -1) >= torch.tensor([[0], [4]])
        pos = (torch.arange(16)[None] - torch.tensor([[0], [4]])).clamp_min(0)
    out = model(x, attention_mask=keep, position_ids=pos, use_cache=True)
    s, e = 9, 13
    # Prefix cache: keys/values of [0, s) reused, queries [s, 16) appended.
    prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in out.past_key_values]
    tail = model(x[:, s:], attention_mask=keep, position_ids=None if pos is None else pos[:, s:],
                 past_key_values=prefix)
    assert torch.allclose(tail, out.logits[:, s:], atol=1e-5)
    # Dual cache: queries [s, e) overwrite their own entries; keys are all 16 positions.
    mid = model(x[:, s:e], attention_mask=keep, position_ids=None if pos is None else pos[:, s:e],
                past_key_values=out.past_key_values, cache_positions=torch.arange(s, e), use_cache=True)
    assert torch.allclose(mid.logits, out.logits[:, s:e], atol=1e-5)
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(mid.past_key_values, out.past_key_values))


@torch.no_grad()
def test_mmada_folder_loads_as_llada(tmp_path, tiny):
    """MMaDA's MMadaModelLM subclasses LLaDAModelLM unchanged: its folder gives the same logits."""
    model = tiny(n_layers=1)
    cfg = {**model.config.to_dict(), "model_type": "mmada", "architectures": ["MMadaModelLM"],
           "llm_vocab_size": model.config.vocab_size, "codebook_size": 8, "num_vq_tokens": 4}
    folder = _write(tmp_path / "mmada", model, cfg)
    x = ids()
    assert torch.equal(LLaDAModel.from_pretrained(folder)(x), model(x))
