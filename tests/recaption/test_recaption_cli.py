"""``genkit recaption`` as users run it: one-line errors, SIGKILL + rerun, two processes."""

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from genkit import config as C
from genkit.recaption import RecaptionConfig, recaption
from genkit.recaption import testing as T
from recap_helpers import RUN, read_rows, sha

REPO = __import__("pathlib").Path(__file__).resolve().parents[2]


def genkit(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "GENKIT_DEBUG"}
    return subprocess.run([sys.executable, "-m", "genkit", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def expected_keys(shards) -> dict[str, dict[str, str]]:
    """shard name -> {key: sha256 of its image}, read straight from the tars."""
    out = {}
    for p in shards:
        with tarfile.open(p) as tf:
            out[p.name[:-4]] = {m.name.rsplit(".", 1)[0]: sha(tf.extractfile(m).read())
                                for m in tf.getmembers() if m.name.endswith((".jpg", ".png", ".webp"))}
    return out


def assert_exactly_once(out, want):
    rows = read_rows(out)
    assert set(rows) == set(want)
    for shard, keys in want.items():
        got = [(r["key"], r["sha256"], r["status"]) for r in rows[shard]]
        assert sorted(got) == sorted((k, s, "ok") for k, s in keys.items()), shard
    return rows


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory):
    return T.make_shards(tmp_path_factory.mktemp("clean"), 6, 6, prefix="clean")


def cli(capsys, *args):
    """``genkit ...`` in-process: (exit code, stdout, stderr)."""
    from genkit.cli import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_missing_or_non_vlm_model_is_one_clear_error_before_any_work(tmp_path, clean_shards, tiny_llava, capsys,
                                                                      monkeypatch):
    from transformers import LlamaConfig

    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    spec = clean_shards[0].parent
    out = tmp_path / "out"
    code, _, err = cli(capsys, "recaption", spec, "--model", tmp_path / "nope", "--out", out)
    assert code == 2 and err.startswith("genkit: error: --model: folder") and "does not exist" in err, err
    assert len(err.strip().splitlines()) == 1
    llama = tmp_path / "llama"
    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(llama)
    code, _, err = cli(capsys, "recaption", spec, "--model", llama, "--out", out)
    assert code == 2 and "not a vision-language" in err and len(err.strip().splitlines()) == 1, err
    code, _, err = cli(capsys, "recaption", tmp_path / "none-{0..3}.tar", "--model", tiny_llava, "--out", out)
    assert code == 2 and "4 shard(s) do not exist" in err
    code, _, err = cli(capsys, "recaption", spec, "--model", tiny_llava, "--out", out, "batch_size=0", "promt=x")
    assert code == 2 and "batch_size" in err and "did you mean 'prompt'" in err
    assert not out.exists(), "nothing may be written before the checks pass"
    code, text, _ = cli(capsys, "recaption", spec, "--model", tiny_llava, "--out", out, "max_new_tokens=64",
                        "--dry-run")
    assert code == 0 and "max_new_tokens: 64" in text and not out.exists()


def test_sigkill_then_rerun_gives_every_sample_exactly_once(tmp_path, clean_shards, tiny_llava, one_thread):
    spec = str(clean_shards[0].parent / "clean-{000000..000005}.tar")
    args = [*RUN, "max_new_tokens=24", "batch_size=2"]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "GENKIT_DEBUG"}
    proc = subprocess.Popen([sys.executable, "-m", "genkit", "recaption", spec, "--model", str(tiny_llava),
                             "--out", str(out), "-q", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not list(out.glob("*.done.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = list(out.glob("*.done.json"))
    assert 1 <= len(done) < 6, "the kill must land mid-run"
    import pyarrow.parquet as pq

    for p in out.glob("*.parquet"):  # whatever exists is whole: written to a temporary name, then renamed
        pq.read_table(p)
    (out / ".clean-000005.parquet.stale123.tmp").write_bytes(b"half a file")  # as a kill mid-write leaves
    p = genkit("recaption", spec, "--model", tiny_llava, "--out", out, "-q", *args)
    assert p.returncode == 0, p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["shards_skipped"] == len(done) and m["shards_complete"] == 6
    rows = assert_exactly_once(out, expected_keys(clean_shards))
    assert not list(out.glob(".*.tmp"))
    # the same captions as an uninterrupted run
    ref = tmp_path / "ref"
    recaption(C.load(RecaptionConfig, None, args), spec, tiny_llava, ref, quiet=True)
    assert read_rows(ref) == rows


def test_two_processes_write_the_single_process_outputs(tmp_path, clean_shards, shard_set, tiny_llava, one_thread):
    """Rank-strided shards: the union of both ranks' outputs is the 1-process output, no gaps, no duplicates."""
    folder, _ = shard_set
    spec = f"{clean_shards[0].parent / 'clean-{000000..000002}.tar'}::{folder}"
    one, two = tmp_path / "one", tmp_path / "two"
    recaption(C.load(RecaptionConfig, None, RUN), spec, tiny_llava, one, quiet=True)
    # accelerate 1.x: `launch --cpu --num_processes 2` starts one process; `--multi_gpu` on a GPU-less
    # machine goes through torchrun and genkit then runs on 2 CPU processes (gloo)
    cmd = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes",
           "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "genkit",
           "recaption", spec, "--model", str(tiny_llava), "--out", str(two), "-q", *RUN]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = {json.loads(d.read_text())["rank"] for d in two.glob("*.done.json")}
    assert ranks == {0, 1}
    m = json.loads((two / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["shards_complete"] == m["shards_total"] == 7
    m1 = json.loads((one / "metrics.json").read_text())
    assert (m["samples_ok"], m["samples_failed"]) == (m1["samples_ok"], m1["samples_failed"])
    assert read_rows(two) == read_rows(one)
