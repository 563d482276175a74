"""`genkit decode`: results written line by line, error records for bad lines, knobs, batching, bad models."""

import functools
import json

import pytest
import torch
from dllm_support import MASK, build_tiny

from genkit.cli import main
from genkit.dllm import decoding
from genkit.dllm.decode import DecodeConfig, decode_rows, parse_knob, resolve_knobs
from genkit.dllm.model import LLaDAConfig, LLaDAModel
from genkit.dllm.tokenizer import CharTokenizer


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


@pytest.fixture
def tiny_folder(tmp_path):
    """The conftest tiny model (64-token vocabulary, mask 63, context 128) saved without a tokenizer."""
    return build_tiny().save_pretrained(tmp_path / "tiny")


@pytest.fixture
def char_folder(tmp_path):
    """A random tiny model with a character tokenizer (text prompts)."""
    tok = CharTokenizer("0123456789+=")
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=64, vocab_size=tok.vocab_size,
                      mask_token_id=tok.mask_id, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                      max_sequence_length=64, init_std=0.5)
    model = LLaDAModel(cfg).init_weights(torch.Generator().manual_seed(0))
    folder = model.save_pretrained(tmp_path / "char")
    tok.save(folder)
    (folder / "genkit.json").write_text(json.dumps({"gen_length": 8}))
    return folder


def test_prompt_ids_results_and_error_records(tmp_path, tiny_folder, capsys):
    data = tmp_path / "in.jsonl"
    data.write_text("\n".join([
        json.dumps({"id": "a", "prompt_ids": [1, 5, 9], "answer": [7, 7]}),
        "",  # empty line
        "{not json",
        json.dumps({"id": "long", "prompt_ids": [3] * 120}),  # 120 + 16 > context 128
        json.dumps({"id": "b", "prompt_ids": [3, 4]}),
        json.dumps({"id": "nothing"}),
        json.dumps({"id": "mask", "prompt_ids": [MASK]}),
        json.dumps({"id": "c", "prompt_ids": [8, 8, 2, 40]}),
    ]) + "\n")
    out = tmp_path / "out"
    rc, stdout, _ = cli(capsys, "decode", "--model", tiny_folder, "--data", data, "algo=wino", "gen_length=16",
                        "block_length=8", "tau1=0.3", "batch_size=2", "--out", out, "-q")
    assert rc == 0 and "accuracy" in stdout
    recs = lines(out / "results.jsonl")
    assert [r.get("line") for r in recs] == list(range(1, 9))  # one record per input line, in order
    errors = {r["line"]: r["error"] for r in recs if "error" in r}
    assert set(errors) == {2, 3, 4, 6, 7}
    assert "empty line" in errors[2] and "malformed JSON" in errors[3] and "exceeds the model's context" in errors[4]
    assert "no prompt" in errors[6] and "mask id" in errors[7]
    ok = [r for r in recs if "error" not in r]
    assert [r["id"] for r in ok] == ["a", "b", "c"]
    for r in ok:
        assert len(r["output_ids"]) == 16 and r["nfe"] >= 2 and r["seconds"] >= 0 and "remasked" in r
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 8 and m["n_errors"] == 5 and m["n_graded"] == 1 and m["settings"]["tau1"] == 0.3
    assert m["mean_nfe"] == pytest.approx(sum(r["nfe"] for r in ok) / 3) and m["seed"] == 0
    assert m["tokens_per_second"] > 0 and m["wall_seconds"] > 0
    assert (out / "config.yaml").is_file()


@pytest.mark.parametrize("algo, knobs", [("llada", {"steps": 8}), ("fast-dllm", {"tau": 0.5}),
                                         ("wino", {"tau1": 0.3}), ("wino-plus", {"tau1": 0.3}),
                                         ("topk_margin", {"steps": 8})])
def test_greedy_batched_equals_batch_one(algo, knobs):
    model = build_tiny()
    rows = [{"id": i, "prompt_ids": p, "_line": i} for i, p in enumerate([[1, 5, 9, 12, 7], [3, 4], [8, 8, 2, 40]])]
    outs = []
    for bs in (1, 3):
        cfg = DecodeConfig(algo=algo, gen_length=16, block_length=8, batch_size=bs, **knobs)
        recs = decode_rows(model, None, rows, cfg, resolve_knobs(cfg, {}))
        outs.append([(r["output_ids"], r["nfe"]) for r in recs])
    assert outs[0] == outs[1]


def test_text_prompts_tokenizer_and_grading(tmp_path, char_folder, capsys):
    data = tmp_path / "in.jsonl"
    rows = [{"id": 0, "prompt": "12+3=", "answer": "15"}, {"id": 1, "prompt": "7+7=", "answer": "14"},
            {"id": 2, "prompt": "1 + x"}]  # space and x are not in the vocabulary
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    rc, _, _ = cli(capsys, "decode", "--model", char_folder, "--data", data, "algo=llada", "steps=4", "--trace",
                   "--out", out, "-q")
    assert rc == 0
    recs = lines(out / "results.jsonl")
    assert recs[0]["prompt"] == "12+3=" and isinstance(recs[0]["output"], str) and recs[0]["correct"] in (True, False)
    assert len(recs[0]["output_ids"]) == 8 and recs[0]["nfe"] == 4 and len(recs[0]["trace"]) == 4
    assert "not in this model's vocabulary" in recs[2]["error"]
    rc, stdout, _ = cli(capsys, "eval", "arness", "--results", out, "--k", "1", "--k", "2")
    res = json.loads(stdout)
    assert rc == 0 and res["samples"] == 2 and 0 <= res["local@1"] <= 1 and 0 <= res["global@2"] <= 1


def test_knob_parsing_and_unknown_knobs(tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    assert parse_knob("0.5") == 0.5 and parse_knob("8") == 8 and parse_knob("none") is None
    assert parse_knob("None") is None and parse_knob("prefix") == "prefix" and parse_knob("true") is True
    rc, out, _ = cli(capsys, "decode", "--model", tiny_folder, "--data", "x.jsonl", "algo=fast-dllm", "tau=none",
                     "steps=8", "--dry-run")
    assert rc == 0 and "tau: null" in out and "steps: 8" in out
    rc, _, err = cli(capsys, "decode", "--model", tiny_folder, "--data", "x.jsonl", "algo=llada", "tau1=0.5")
    assert rc == 2 and "tau1: not a knob of algo=llada" in err
    rc, _, err = cli(capsys, "decode", "--model", tiny_folder, "--data", "x.jsonl", "algo=beam")
    assert rc == 2 and "unknown decoder" in err
    rc, _, err = cli(capsys, "decode", "--model", tiny_folder, "--data", "x.jsonl", "tau1=high")
    assert rc == 2 and "tau1" in err


def test_bad_model_folders_are_one_line(tmp_path, tiny_folder, capsys, monkeypatch):
    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt_ids": [1, 2]}) + "\n")
    cfg = json.loads((tiny_folder / "config.json").read_text())
    not_mlm = tmp_path / "gpt"
    not_mlm.mkdir()
    (not_mlm / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    rc, _, err = cli(capsys, "decode", "--model", not_mlm, "--data", data, "--out", tmp_path / "o")
    assert rc == 2 and "not a LLaDA-style masked diffusion LM" in err and len(err.strip().splitlines()) == 1
    (tiny_folder / "config.json").write_text(json.dumps({**cfg, "mask_token_id": None}))
    rc, _, err = cli(capsys, "decode", "--model", tiny_folder, "--data", data, "--out", tmp_path / "o")
    assert rc == 2 and "mask_token_id" in err
    rc, _, err = cli(capsys, "decode", "--model", tmp_path / "nowhere", "--data", data, "--out", tmp_path / "o")
    assert rc == 2 and "does not exist" in err


def test_results_survive_a_failing_batch(tiny_folder, monkeypatch):
    """A batch that fails gets error records; the batches before and after keep their results."""
    model = build_tiny()
    real = decoding.DECODERS["llada"]
    calls = {"n": 0}

    @functools.wraps(real)  # same signature, so the same knobs are accepted
    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory")
        return real(*a, **k)

    monkeypatch.setitem(decoding.DECODERS, "llada", flaky)
    written = []
    rows = [{"id": i, "prompt_ids": [1 + i, 2], "_line": i + 1} for i in range(5)]
    cfg = DecodeConfig(algo="llada", gen_length=8, steps=4, batch_size=2)
    decode_rows(model, None, rows, cfg, resolve_knobs(cfg, {}), write=written.append)
    assert [("error" in r) for r in written] == [False, False, True, True, False]
    assert "out of memory" in written[2]["error"]


def test_wino_plus_is_a_separate_decoder():
    """wino-plus without a verifier (tau2 = 0) is exactly draft-only WINO; with one it spends check passes."""
    model, prompts = build_tiny(), [[1, 5, 9, 12, 7], [3, 4]]
    plain = decoding.decode_wino(model, prompts, gen_length=16, block_length=8, tau1=0.3, tau2=0.0)
    plus = decoding.decode_wino_plus(model, prompts, gen_length=16, block_length=8, tau1=0.3, tau2=0.0)
    assert torch.equal(plain.tokens, plus.tokens) and plain.nfe == plus.nfe
    res = decoding.decode_wino_plus(model, prompts, gen_length=16, block_length=8, tau1=0.3, tau2=0.9, trace=True)
    assert not (res.generated == MASK).any()
    assert any(len(p) == 0 for row in res.trace for p in row)  # a final check pass commits nothing
    assert decoding.DECODERS["wino-plus"] is decoding.decode_wino_plus
    assert decoding.DECODERS["wino"] is decoding.decode_wino  # the official one is untouched


def hf_tokenizer_folder(folder):
    """A word-level Hugging Face tokenizer with a chat template, saved like a real checkpoint's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "[MASK]", "<|user|>", "<|assistant|>", "how", "many", "apples", "answer",
             "is", "\\boxed", "{", "}", *"0123456789"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                  additional_special_tokens=["<|user|>", "<|assistant|>"])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|user|> {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok.save_pretrained(str(folder))
    return len(words)


def test_hf_tokenizer_chat_template_and_gsm8k_jsonl(tmp_path, capsys):
    pytest.importorskip("transformers")
    folder = tmp_path / "hf"
    cfg = LLaDAConfig(d_model=32, n_heads=4, n_layers=1, mlp_hidden_size=64, vocab_size=24, mask_token_id=3,
                      eos_token_id=2, pad_token_id=2, max_sequence_length=64, init_std=0.5)
    LLaDAModel(cfg).init_weights(torch.Generator().manual_seed(0)).save_pretrained(folder)
    assert hf_tokenizer_folder(folder) == 24
    data = tmp_path / "gsm8k.jsonl"  # the GSM8K format: question, answer with the reasoning and "#### N"
    data.write_text(json.dumps({"question": "how many apples", "answer": "2 and 1 make 3\n#### 3"}) + "\n")
    out = tmp_path / "out"
    rc, _, _ = cli(capsys, "decode", "--model", folder, "--data", data, "algo=llada", "gen_length=8", "steps=8",
                   "grader=gsm8k", "--out", out, "-q")
    assert rc == 0
    rec = lines(out / "results.jsonl")[0]
    # <s> <|user|> how many apples <|assistant|>
    assert rec["prompt"] == "how many apples" and rec["prompt_tokens"] == 6
    assert isinstance(rec["output"], str) and rec["correct"] in (True, False) and "extracted" in rec
    rc, _, _ = cli(capsys, "decode", "--model", folder, "--data", data, "algo=llada", "gen_length=8", "steps=8",
                   "chat=false", "--out", tmp_path / "plain", "-q")
    assert lines(tmp_path / "plain" / "results.jsonl")[0]["prompt_tokens"] == 3  # this tokenizer adds no BOS


def test_fast_dllm_steps_without_tau_is_the_fixed_quota():
    cfg = DecodeConfig(algo="fast-dllm", steps=8, gen_length=16)
    assert resolve_knobs(cfg, {})["tau"] is None
    assert "tau" not in resolve_knobs(DecodeConfig(algo="fast-dllm", gen_length=16), {})  # decoder default 0.9
    assert resolve_knobs(DecodeConfig(algo="llada"), {"gen_length": 24}) == {"gen_length": 24, "block_length": 24,
                                                                             "steps": 24}


def test_dtype_casts_the_weights(tmp_path, tiny_folder, capsys, monkeypatch):
    """dtype=bfloat16 loads the weights in bf16 (an 8B checkpoint on one GPU); a bad dtype is one line."""
    import genkit.dllm.io as dio

    seen = {}
    real = dio.load_dllm

    def spy(*a, **kw):
        model, tok, info = real(*a, **kw)
        seen["dtype"] = next(model.parameters()).dtype
        return model, tok, info

    monkeypatch.setattr(dio, "load_dllm", spy)
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"id": "a", "prompt_ids": [1, 5, 9]}) + "\n")
    rc, _, _ = cli(capsys, "decode", "--model", tiny_folder, "--data", data, "algo=wino", "gen_length=8",
                   "dtype=bfloat16", "--out", tmp_path / "o", "-q")
    assert rc == 0 and seen["dtype"] == torch.bfloat16
    rec = lines(tmp_path / "o" / "results.jsonl")[0]
    assert "error" not in rec and len(rec["output_ids"]) == 8
    rc, _, err = cli(capsys, "decode", "--model", tiny_folder, "--data", data, "dtype=fp8", "--out", tmp_path / "p")
    assert rc == 2 and "dtype" in err
