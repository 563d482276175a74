"""Shard specs, streaming tar reading, caption text and image checks: no model needed."""

from pathlib import Path

import numpy as np
import pytest
import torch

from genkit.errors import ConfigError
from genkit.recaption import testing as T
from genkit.recaption.data import ImageChecks, SampleError, collate, decode_image
from genkit.recaption.shards import expand_shards, iter_tar_samples, shard_name, split_key
from genkit.recaption.text import caption_from_fields, decode_caption, repair_mojibake
from recap_helpers import data_end, huge_png, member_offsets, png


def test_specs_expand_as_webdataset_does():
    from webdataset.shardlists import expand_urls

    spec = "http://127.0.0.1:9/d/p-{000008..000011}.tar::pipe:cat x/q-{a,b}-{0..1}.tar"
    got = expand_shards(spec)
    assert got == expand_urls(spec)  # webdataset's own expansion: '::' lists, zero padding, braces
    assert got[:4] == [f"http://127.0.0.1:9/d/p-{i:06d}.tar" for i in range(8, 12)]
    assert got[4:] == [f"pipe:cat x/q-{s}.tar" for s in ("a-0", "a-1", "b-0", "b-1")]
    assert [shard_name(u) for u in got] == [f"p-{i:06d}" for i in range(8, 12)] + ["q-a-0", "q-a-1", "q-b-0",
                                                                                       "q-b-1"]
    assert len(expand_shards("https://h/p-{000000..000127}.tar")) == 128
    assert shard_name("https://h/a/part-000001.tar?sig=1%2F2") == "part-000001"
    assert shard_name("pipe:curl -s -L 'https://h/part-000002.tar' | zcat") == "part-000002"
    assert shard_name("pipe:aws s3 cp s3://b/part-000003.tar -") == "part-000003"
    assert shard_name("file:///data/part-000004.tar.gz") == "part-000004"


def test_expand_shards_spec_folder_and_errors(tmp_path):
    for i in range(3):
        T.write_tar(tmp_path / "d" / f"p-{i:02d}.tar", [])
    (tmp_path / "d" / "notes.txt").write_text("x")
    assert [Path(p).name for p in expand_shards(str(tmp_path / "d"))] == ["p-00.tar", "p-01.tar", "p-02.tar"]
    assert len(expand_shards(str(tmp_path / "d" / "p-{00..02}.tar"))) == 3
    assert len(expand_shards(str(tmp_path / "d" / "p-*.tar"))) == 3
    with pytest.raises(ConfigError, match="do not exist"):
        expand_shards(str(tmp_path / "d" / "p-{00..04}.tar"))
    with pytest.raises(ConfigError, match="cannot name the output"):
        expand_shards("pipe:cat something")
    with pytest.raises(ConfigError, match="same name"):
        expand_shards("http://127.0.0.1:9/a/p.tar::http://127.0.0.1:9/b/p.tar")
    assert expand_shards(f"file://{tmp_path / 'd' / 'p-00.tar'}") == [str(tmp_path / "d" / "p-00.tar")]
    T.write_tar(tmp_path / "e" / "p-00.tar", [])
    with pytest.raises(ConfigError, match="same name"):
        expand_shards(f"{tmp_path / 'd'}::{tmp_path / 'e'}")
    assert shard_name("a/b/part-000001.tar") == "part-000001"
    assert split_key("a/b/0001.seg.PNG") == ("a/b/0001", "seg.png")
    assert split_key("a/noext") == (None, None)  # skipped, as webdataset does


def _shard(tmp_path, n=4):
    imgs = T.real_images(n)
    return T.write_tar(tmp_path / "s.tar", [T.make_sample(f"k{i}", a, f"cap {i}") for i, (_, a) in enumerate(imgs)])


def test_tar_samples_grouped_by_key(tmp_path):
    p = _shard(tmp_path)
    got = list(iter_tar_samples(p))
    assert [s.key for s in got] == ["k0", "k1", "k2", "k3"]
    assert all(set(s.fields) == {"jpg", "txt", "json"} and s.error is None for s in got)


def test_tar_truncated_inside_a_member_keeps_what_came_before(tmp_path):
    p = _shard(tmp_path)
    off, size = member_offsets(p)["k2.jpg"]
    p.write_bytes(p.read_bytes()[: off + size // 3])
    got = list(iter_tar_samples(p))
    assert [s.key for s in got] == ["k0", "k1", "k2"]
    assert got[0].error is None and got[1].error is None
    assert "truncated" in got[2].error and "k2.jpg" in got[2].error


def test_tar_truncated_between_members_or_in_a_header(tmp_path):
    p = _shard(tmp_path)
    raw = p.read_bytes()
    p.write_bytes(raw[: data_end(p)])  # every member whole, end-of-archive marker gone
    got = list(iter_tar_samples(p))
    assert [s.key for s in got] == ["k0", "k1", "k2", "k3", "__tar__"]
    assert all(s.error is None for s in got[:4]) and "end-of-archive" in got[4].error
    q = _shard(tmp_path)  # a fresh copy
    off, _ = member_offsets(q)["k3.jpg"]
    q.write_bytes(q.read_bytes()[: off - 512 + 100])  # cut inside k3.jpg's header
    got = list(iter_tar_samples(q))
    assert [s.key for s in got][:3] == ["k0", "k1", "k2"] and got[-1].error and "truncated" in got[-1].error


def test_tar_garbage_and_missing_file(tmp_path):
    g = tmp_path / "g.tar"
    g.write_bytes(b"not a tar at all" * 100)
    (s,) = list(iter_tar_samples(g))
    assert s.key == "__tar__" and s.error
    (s,) = list(iter_tar_samples(tmp_path / "missing.tar"))
    assert "cannot open" in s.error


def test_captions_nfc_mojibake_and_non_utf8():
    assert decode_caption("cafe\u0301 ".encode()) == ("caf\u00e9", None)
    once = "caf\u00e9 cr\u00e8me \u2019ok\u2019".encode("utf-8").decode("cp1252")
    assert repair_mojibake(once) == "caf\u00e9 cr\u00e8me \u2019ok\u2019"
    twice = once.encode("utf-8").decode("cp1252")
    assert repair_mojibake(twice) == "caf\u00e9 cr\u00e8me \u2019ok\u2019"
    for legit in ("caf\u00e9 na\u00efve", "\u00c2ge \u00e0 \u00ab Paris \u00bb", "\u65e5\u672c\u8a9e", "plain"):
        assert repair_mojibake(legit) == legit
    text, err = decode_caption("caf\u00e9".encode("latin-1"))
    assert text == "caf\ufffd" and "not valid UTF-8" in err and "0xe9" in err
    assert decode_caption(b"\xef\xbb\xbfbom") == ("bom", None)
    assert caption_from_fields({"json": b'{"caption": "from json"}'})[0] == "from json"
    assert caption_from_fields({"txt": b"t", "json": b'{"caption": "j"}'})[0] == "t"
    assert "not valid JSON" in caption_from_fields({"json": b"{oops"})[2]


def test_image_checks_before_decoding():
    checks = ImageChecks(min_side=8, max_pixels=64_000_000, max_aspect=40)
    im, w, h = decode_image(png(np.zeros((20, 30, 4), np.uint8)), checks)
    assert (w, h) == (30, 20) and im.mode == "RGB"
    with pytest.raises(SampleError, match="too small: 1x1"):
        decode_image(png(np.zeros((1, 1, 3), np.uint8)), checks)
    with pytest.raises(SampleError, match="too large: 10000x10000"):
        decode_image(huge_png(), checks)
    with pytest.raises(SampleError, match="aspect ratio"):
        decode_image(png(np.zeros((8, 400, 3), np.uint8)), checks)
    jpg = T.encode_image(T.real_images(1)[0][1])
    with pytest.raises(SampleError, match="corrupt image data"):
        decode_image(jpg[: len(jpg) // 2], checks)
    with pytest.raises(SampleError, match="not a decodable image"):
        decode_image(b"GIF89a-but-not-really", checks)


def test_collate_pads_on_the_left():
    a = {"input_ids": torch.tensor([[5, 6, 7]]), "attention_mask": torch.ones(1, 3, dtype=torch.long),
         "pixel_values": torch.ones(1, 3, 4, 4)}
    b = {"input_ids": torch.tensor([[8]]), "attention_mask": torch.ones(1, 1, dtype=torch.long),
         "pixel_values": torch.zeros(1, 3, 4, 4)}
    out = collate([a, b], pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert out["pixel_values"].shape == (2, 3, 4, 4)
