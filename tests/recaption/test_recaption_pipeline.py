"""The recaption pipeline in-process with a tiny random LLaVA on real images (CPU)."""

import json
import tarfile

import pytest

from genkit import config as C
from genkit.errors import ConfigError
from genkit.recaption import RecaptionConfig, recaption
from recap_helpers import RUN, check_against, read_rows


def run(shards, model, out, *overrides, **kw):
    cfg = C.load(RecaptionConfig, None, [*RUN, *overrides])
    return recaption(cfg, str(shards), model, out, quiet=True, **kw)


@pytest.fixture(scope="module")
def first_run(tiny_llava, shard_set, tmp_path_factory):
    import torch

    folder, expected = shard_set
    out = tmp_path_factory.mktemp("run") / "out"
    n = torch.get_num_threads()
    try:
        metrics = run(folder, tiny_llava, out)
    finally:
        torch.set_num_threads(n)
    return out, metrics, expected


def test_every_sample_once_with_key_sha256_and_reason(first_run):
    out, metrics, expected = first_run
    rows = read_rows(out)
    check_against(rows, expected)
    by_key = {r["key"]: r for r in rows["part-000001"]}
    assert by_key["b008"]["org_caption"] == "caf\u00e9 cr\u00e8me"          # mojibake repaired
    assert by_key["b009"]["org_caption"] == "caf\u00e9"                      # NFC
    assert by_key["b007"]["org_caption"] == "caf\ufffd au lait"              # kept lossily, with the error
    assert by_key["b000#2"]["sha256"] and "duplicate key 'b000'" in by_key["b000#2"]["error"]
    n_ok = sum(r["status"] == "ok" for rs in rows.values() for r in rs)
    n_err = sum(r["status"] == "error" for rs in rows.values() for r in rs)
    assert (metrics["samples_ok"], metrics["samples_failed"]) == (n_ok, n_err)
    assert metrics["shards_complete"] == metrics["shards_total"] == 4
    assert metrics["images_per_second"] > 0 and metrics["generated_tokens_per_second"] > 0
    assert {"seed", "versions", "wall_seconds"} <= set(metrics)
    assert json.loads((out / "metrics.json").read_text())["samples_ok"] == n_ok
    assert "prompt: Please generate a detailed caption" in (out / "config.yaml").read_text()
    assert len((out / "log.jsonl").read_text().splitlines()) == 4


def test_done_markers_carry_counts_and_provenance(first_run, tiny_llava):
    out, _, expected = first_run
    for shard, exp in expected.items():
        done = json.loads((out / f"{shard}.done.json").read_text())
        assert done["counts"]["samples"] == len(exp)
        assert done["counts"]["error"] == sum(s == "error" for s, _, _ in exp.values())
        prov = done["provenance"]
        assert prov["model"] == str(tiny_llava.resolve()) and len(prov["model_config_sha256"]) == 64
        assert prov["prompt"].startswith("Please generate a detailed caption")
        assert prov["generation"]["do_sample"] is False and prov["generation"]["max_new_tokens"] == 12
        assert "genkit" in prov["versions"] and "seed" in prov
        assert done["this_run"]["images_per_second"] >= 0
    assert not list(out.glob(".*.tmp"))


def test_captions_depend_on_the_image(first_run):
    rows = read_rows(first_run[0])
    caps = [r["re_caption"] for rs in rows.values() for r in rs if r["status"] == "ok"]
    assert len(set(caps)) >= len(caps) // 2, caps


def test_rerun_skips_done_shards(first_run, tiny_llava, shard_set, one_thread):
    out, _, _ = first_run
    before = {p.name: p.read_bytes() for p in out.glob("*.parquet")}
    m = run(shard_set[0], tiny_llava, out)
    assert m["shards_skipped"] == 4 and m["shards_done"] == 0 and m["samples_ok"] == 0
    assert {p.name: p.read_bytes() for p in out.glob("*.parquet")} == before


def test_other_settings_in_the_same_out_are_refused(first_run, tiny_llava, shard_set, one_thread):
    with pytest.raises(ConfigError, match="other settings.*prompt"):
        run(shard_set[0], tiny_llava, first_run[0], "prompt=Describe the image.")


def test_batched_generation_equals_batch_size_one(first_run, tiny_llava, shard_set, tmp_path, one_thread):
    """Greedy decoding with left padding: batching must not change a single caption."""
    folder, _ = shard_set
    run(folder / "part-00000{0,1}.tar", tiny_llava, tmp_path / "bs1", "batch_size=1")
    batched = read_rows(first_run[0])
    for shard, rows in read_rows(tmp_path / "bs1").items():
        want = {r["key"]: r["re_caption"] for r in batched[shard]}
        assert {r["key"]: r["re_caption"] for r in rows} == want


def test_retry_failed_recaptions_only_the_errors(tiny_llava, shard_set, tmp_path, one_thread):
    folder, expected = shard_set
    out = tmp_path / "out"
    spec = folder / "part-000001.tar"
    run(spec, tiny_llava, out, "min_image_side=30")  # a filter too strict for the 25x25 LFW face b008
    first = {r["key"]: r for r in read_rows(out)["part-000001"]}
    too_small = {k for k, r in first.items() if r["status"] == "error" and "too small" in r["error"]}
    assert too_small == {"b004", "b008"}
    m = run(spec, tiny_llava, out, retry_failed=True)  # default min_image_side=8
    assert m["shards_done"] == 1
    rows = read_rows(out)
    check_against(rows, {"part-000001": expected["part-000001"]})
    after = {r["key"]: r for r in rows["part-000001"]}
    for k, r in first.items():
        if r["status"] == "ok":
            assert after[k] == r, "rows that were ok are kept as they were"
    assert [r["key"] for r in rows["part-000001"]] == list(first), "order kept"
    done = json.loads((out / "part-000001.done.json").read_text())
    assert done["this_run"]["retry_failed"] and done["this_run"]["samples"] == sum(
        r["status"] == "error" for r in first.values())
    m = run(spec, tiny_llava, out, retry_failed=True)  # nothing new to fix: the same errors again
    assert read_rows(out)["part-000001"] == rows["part-000001"]


def test_workers_and_tar_output(tiny_llava, shard_set, first_run, tmp_path, one_thread):
    """DataLoader workers give the same table; write_tar adds the captions to a valid copy of the shard."""
    folder, _ = shard_set
    out = tmp_path / "out"
    run(folder / "part-00000{0,1,2}.tar", tiny_llava, out, "num_workers=2", "write_tar=true")
    ref = read_rows(first_run[0])
    for shard, rows in read_rows(out).items():
        assert sorted(rows, key=lambda r: r["key"]) == sorted(ref[shard], key=lambda r: r["key"])
        with tarfile.open(out / f"{shard}.tar") as tf:
            names = tf.getnames()
            caps = {n[: -len(".re_caption.txt")]: tf.extractfile(n).read().decode()
                    for n in names if n.endswith(".re_caption.txt")}
        assert caps == {r["key"]: r["re_caption"] for r in rows if r["status"] == "ok"}
        assert any(n.endswith((".jpg", ".png", ".webp")) for n in names)


def test_a_failing_batch_falls_back_to_single_samples(tiny_llava, shard_set, first_run, tmp_path, one_thread,
                                                      monkeypatch):
    """generate failing on a batch is retried per sample (padding removed): one bad sample fails alone."""
    from genkit.recaption import model as M

    real, calls = M.generate_captions, {"single": 0}

    def flaky(vlm, inputs, *a, **k):
        if inputs["input_ids"].shape[0] > 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        calls["single"] += 1
        if calls["single"] == 2:
            raise RuntimeError("boom")
        return real(vlm, inputs, *a, **k)

    monkeypatch.setattr(M, "generate_captions", flaky)
    folder, _ = shard_set
    run(folder / "part-000000.tar", tiny_llava, tmp_path / "out")
    rows = read_rows(tmp_path / "out")["part-000000"]
    ref = {r["key"]: r["re_caption"] for r in read_rows(first_run[0])["part-000000"]}
    failed = [r for r in rows if r["status"] == "error"]
    assert len(failed) == 1 and "generation failed (RuntimeError: boom)" in failed[0]["error"]
    assert all(r["re_caption"] == ref[r["key"]] for r in rows if r["status"] == "ok")


def test_prompt_formats_and_original_caption_placeholder(tiny_llava):
    from transformers import AutoProcessor

    from genkit.recaption.data import PromptEncoder

    proc = AutoProcessor.from_pretrained(tiny_llava, local_files_only=True)
    chat = PromptEncoder(proc, "Describe. Original: {caption}")
    assert chat.text("a red sofa") == "USER : <image> Describe. Original: a red sofa ASSISTANT :"
    assert chat.text(None) == "USER : <image> Describe. Original:  ASSISTANT :"
    plain = PromptEncoder(proc, "Describe {caption}", "Q: <image> {prompt} A:", caption_chars=3)
    assert plain.text("abcdef") == "Q: <image> Describe abc A:"
    inputs = chat(__import__("PIL.Image", fromlist=["Image"]).new("RGB", (40, 30)), "x")
    assert inputs["input_ids"].shape[0] == 1 and inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert int((inputs["input_ids"] == proc.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 16
