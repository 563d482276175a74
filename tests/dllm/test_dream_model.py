"""genkit's Dream model: official folders by path, logits equal to transformers' Qwen2 run without the causal mask."""

import json
import shutil

import pytest
import torch

from genkit.dllm.dream_model import DreamConfig, DreamModel
from genkit.dllm.model import LLaDAModel
from genkit.errors import ConfigError

transformers = pytest.importorskip("transformers")


def qwen2_folder(path, *, tie=False, seed=0, dtype=torch.float32):
    """A tiny random Qwen2ForCausalLM saved by transformers (safetensors), weights at a scale that gives peaked logits.

    96-token vocabulary, hidden 64, 4 query heads over 2 key/value heads (GQA), 2 layers, rope_theta 1e6 (Dream's).
    """
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g) if name.endswith("norm.weight")
                    else 0.3 * torch.randn(p.shape, generator=g))
    model.to(dtype).save_pretrained(str(path))
    return path


def as_dream(qwen, path, **extra):
    """The same weights with a Dream config.json, as the official Dream / DiffuCoder folders are laid out."""
    path.mkdir()
    for f in qwen.glob("*.safetensors"):
        shutil.copy(f, path / f.name)
    raw = json.loads((qwen / "config.json").read_text())
    raw.update({"model_type": "Dream", "architectures": ["DreamModel"], "mask_token_id": 95, "pad_token_id": 94,
                "auto_map": {"AutoConfig": "configuration_dream.DreamConfig",
                             "AutoModel": "modeling_dream.DreamModel"}, **extra})
    (path / "config.json").write_text(json.dumps(raw))
    (path / "modeling_dream.py").write_text("raise RuntimeError('genkit must not run remote code')\n")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dream")
    qwen = qwen2_folder(root / "qwen2")
    return qwen, as_dream(qwen, root / "dream")


def ids(seed=0, shape=(2, 11)):
    return torch.randint(0, 94, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_equal_qwen2_without_causal_mask(folders, dtype):
    qwen, dream = folders
    ref = transformers.Qwen2ForCausalLM.from_pretrained(str(qwen), dtype=dtype).eval()
    model = DreamModel.from_pretrained(dream, dtype=dtype)
    assert next(model.parameters()).dtype == dtype and model.config.shifted_logits
    x = ids()
    B, L = x.shape
    full = torch.ones(B, 1, L, L, dtype=torch.bool)
    out = model(x)
    assert torch.equal(out, ref(x, attention_mask=full).logits)  # bit for bit, fp32 and bf16
    assert (out.float() - ref(x).logits.float()).abs().max() > 0.1  # and not the causal (autoregressive) model
    # Dream's left-padded batch: padding keys hidden from every query, real tokens at positions 0, 1, ...
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[0, :3] = False
    pos = (torch.arange(L)[None] - (~keep).sum(1, keepdim=True)).clamp_min(0)
    mask4 = keep[:, None, None, :].expand(B, 1, L, L)
    assert torch.equal(model(x, attention_mask=keep, position_ids=pos),
                       ref(x, attention_mask=mask4, position_ids=pos).logits)


@torch.no_grad()
def test_official_parameter_names_and_tied_head(tmp_path, folders):
    from safetensors.torch import load_file

    _, dream = folders
    model = DreamModel.from_pretrained(dream)
    assert set(model.state_dict()) == set(load_file(str(dream / "model.safetensors")))
    assert "model.layers.1.self_attn.q_proj.bias" in model.state_dict()
    assert "model.layers.1.self_attn.o_proj.bias" not in model.state_dict()
    tied = as_dream(qwen2_folder(tmp_path / "q", tie=True), tmp_path / "d")
    ref = transformers.Qwen2ForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    m = DreamModel.from_pretrained(tied)
    assert m.config.tie_word_embeddings and not hasattr(m, "lm_head")
    x = ids()
    assert torch.equal(m(x), ref(x, attention_mask=torch.ones(2, 1, 11, 11, dtype=torch.bool)).logits)


@torch.no_grad()
def test_save_roundtrip_and_sharded_folder(tmp_path, folders):
    from safetensors.torch import load_file, save_file

    _, dream = folders
    model = DreamModel.from_pretrained(dream)
    x = ids()
    saved = model.save_pretrained(tmp_path / "m")
    raw = json.loads((saved / "config.json").read_text())
    assert raw["model_type"] == "Dream" and raw["architectures"] == ["DreamModel"] and raw["rope_theta"] == 1e6
    loaded = DreamModel.from_pretrained(saved)
    assert loaded.config == model.config and torch.equal(loaded(x), model(x))
    state = load_file(str(dream / "model.safetensors"))  # the 7B checkpoints come as 4 shards + an index
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[:9], "model-00002-of-00002.safetensors": names[9:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(sharded / fname), metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: f for f, keys in shards.items() for k in keys}}))
    shutil.copy(dream / "config.json", sharded / "config.json")
    assert torch.equal(DreamModel.from_pretrained(sharded)(x), model(x))


def test_official_config_fields():
    """The fields of Dream-v0-Instruct-7B's / DiffuCoder-7B-Instruct's config.json (Qwen2.5-7B shapes)."""
    raw = {"architectures": ["DreamModel"], "model_type": "Dream", "auto_map": {"AutoModel": "modeling_dream.DreamModel"},
           "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
           "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944, "mask_token_id": 151666,
           "max_position_embeddings": 131072, "max_window_layers": 28, "num_attention_heads": 28,
           "num_hidden_layers": 28, "num_key_value_heads": 4, "pad_token_id": 151643, "rms_norm_eps": 1e-06,
           "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", "transformers_version": "4.46.2", "use_cache": False,
           "use_sliding_window": False, "vocab_size": 152064}
    cfg = DreamConfig.from_dict(raw)
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.mask_token_id, cfg.embedding_size) == (128, 4, 151666, 152064)
    with torch.device("meta"):
        model = DreamModel(cfg)
        n = sum(p.numel() for p in model.parameters())
        logits = model(torch.zeros(2, 8, dtype=torch.long))  # shapes at full scale, no memory
    assert n == 7_615_616_512  # Qwen2.5-7B's parameter count
    assert logits.shape == (2, 8, 152064)
    # keys a config.json omits take the official DreamConfig defaults (mask 151666, pad 151643)
    assert DreamConfig.from_dict({"model_type": "Dream", "hidden_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "vocab_size": 152064}).mask_token_id == 151666


@pytest.mark.parametrize("change, words", [
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"architectures": ["DreamForCausalLM"]}, "DreamForCausalLM"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"mask_token_id": 500}, "mask_token_id"),
    ({"num_hidden_layers": 3}, "do not match"),
])
def test_bad_dream_folders_are_one_line(tmp_path, folders, change, words):
    qwen, _ = folders
    folder = as_dream(qwen, tmp_path / "bad", **change)
    with pytest.raises(ConfigError) as err:
        DreamModel.from_pretrained(folder)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_classes_refuse_each_others_folders(folders):
    qwen, dream = folders
    with pytest.raises(ConfigError, match="'Dream'.*not a LLaDA"):
        LLaDAModel.from_pretrained(dream)
    with pytest.raises(ConfigError, match="'qwen2'.*not a Dream"):
        DreamModel.from_pretrained(qwen)  # an autoregressive Qwen2 is not a masked diffusion LM


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_reproduces_full_pass(folders, padded):
    """The LLaDA cache interface on Dream (keys/values of a full pass reused), as Fast-dLLM's caches use it."""
    _, dream = folders
    model = DreamModel.from_pretrained(dream)
    x = ids(1, (2, 16))
    keep, pos = None, None
    if padded:
        keep = torch.arange(16)[None].expand(2, -1) >= torch.tensor([[0], [4]])
        pos = (torch.arange(16)[None] - torch.tensor([[0], [4]])).clamp_min(0)
    out = model(x, attention_mask=keep, position_ids=pos, use_cache=True)
    s, e = 9, 13
    prefix = [(k[:, :, :s], v[:, :, :s]) for k, v in out.past_key_values]  # prefix cache: queries appended
    tail = model(x[:, s:], attention_mask=keep, position_ids=None if pos is None else pos[:, s:],
                 past_key_values=prefix)
    assert torch.allclose(tail, out.logits[:, s:], atol=1e-5)
    mid = model(x[:, s:e], attention_mask=keep, position_ids=None if pos is None else pos[:, s:e],
                past_key_values=out.past_key_values, cache_positions=torch.arange(s, e), use_cache=True)
    assert torch.allclose(mid.logits, out.logits[:, s:e], atol=1e-5)  # dual cache: entries overwritten in place
    assert all(torch.allclose(a[0], b[0], atol=1e-6) for a, b in zip(mid.past_key_values, out.past_key_values))
