"""Fixtures for the recaption tests: a tiny random LLaVA folder and shards of real images (some broken)."""


import numpy as np
import pytest
import torch

from genkit.recaption import testing as T
from recap_helpers import data_end, huge_png, member_offsets, png, sha


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    return T.build_tiny_llava(tmp_path_factory.mktemp("model") / "tiny-llava")


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def shard_set(tmp_path_factory):
    """Four shards: clean, bad samples of every kind, cut inside a member, cut between members.

    Returns (folder, expected) where expected[shard][key] = (status, sha256 or None, error substring).
    """
    folder = tmp_path_factory.mktemp("shards")
    imgs = T.real_images(24, seed=1)
    expected: dict[str, dict] = {}

    def good(key, i, fmt="jpg", caption=None):
        k, fields = T.make_sample(key, imgs[i][1], caption if caption is not None else f"photo {imgs[i][0]}", fmt)
        return (k, fields), (fields[fmt])

    # 0: clean
    samples, exp = [], {}
    for j in range(5):
        s, img = good(f"a{j:03d}", j, ("jpg", "png", "webp")[j % 3])
        samples.append(s)
        exp[s[0]] = ("ok", sha(img), None)
    T.write_tar(folder / "part-000000.tar", samples)
    expected["part-000000"] = exp

    # 1: bad samples of every kind between good ones
    rgb = imgs[5][1]
    jpg = T.encode_image(rgb, "jpg")
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 128, np.uint8)], axis=2)
    rows = [
        ("b000", {"jpg": jpg, "txt": b"a good photo"}, "ok", None),
        ("b001", {"jpg": np.random.default_rng(0).bytes(3000), "txt": b"noise"}, "error", "not a decodable image"),
        ("b002", {"jpg": jpg[: len(jpg) // 2], "txt": b"cut jpeg"}, "error", "corrupt image|decodable image"),
        ("b003", {"png": b"this is text, not a png", "txt": b"liar"}, "error", "not a decodable image"),
        ("b004", {"png": png(np.zeros((1, 1, 3), np.uint8)), "txt": b"one pixel"}, "error", "too small"),
        ("b005", {"png": huge_png(), "txt": b"huge"}, "error", "too large"),
        ("b006", {"txt": b"a caption without an image", "json": b"{}"}, "error", "no image"),
        ("b007", {"jpg": T.encode_image(imgs[6][1]), "txt": "caf\u00e9 au lait".encode("latin-1")}, "error",
         "not valid UTF-8"),
        ("b008", {"png": png(imgs[7][1]), "txt": "caf\u00e9 cr\u00e8me".encode("utf-8").decode("latin-1").encode()},
         "ok", None),
        ("b009", {"webp": T.encode_image(imgs[8][1], "webp"), "txt": "cafe\u0301".encode()}, "ok", None),
        ("b000", {"jpg": T.encode_image(imgs[9][1]), "txt": b"same key again"}, "error", "duplicate key"),
        ("b010", {"png": png(rgba), "txt": b"transparent"}, "ok", None),
        ("b011", {"jpg": T.encode_image(imgs[11][1]), "json": b'{"caption": "from json", "sha256": "00"}'},
         "error", "sha256"),
    ]
    exp = {}
    for key, fields, status, err in rows:
        img = next((fields[f] for f in ("jpg", "png", "webp") if f in fields), None)
        k = key if key not in exp else f"{key}#2"
        exp[k] = (status, sha(img) if img is not None else None, err)
    T.write_tar(folder / "part-000001.tar", [(k, f) for k, f, _, _ in rows])
    expected["part-000001"] = exp

    # 2: cut in the middle of the 4th sample's image
    samples, exp = [], {}
    for j in range(5):
        s, img = good(f"c{j:03d}", 12 + j)
        samples.append(s)
        exp[s[0]] = ("ok", sha(img), None)
    p = T.write_tar(folder / "part-000002.tar", samples)
    off, size = member_offsets(p)["c003.jpg"]
    p.write_bytes(p.read_bytes()[: off + size // 2])
    exp["c003"] = ("error", None, "truncated")  # its image bytes are incomplete: no sha256
    del exp["c004"]  # lost: nothing of it is left in the file
    expected["part-000002"] = exp

    # 3: cut exactly between members (the end-of-archive marker is missing)
    samples, exp = [], {}
    for j in range(3):
        s, img = good(f"d{j:03d}", 18 + j)
        samples.append(s)
        exp[s[0]] = ("ok", sha(img), None)
    p = T.write_tar(folder / "part-000003.tar", samples)
    p.write_bytes(p.read_bytes()[: data_end(p)])
    exp["__tar__"] = ("error", None, "end-of-archive")
    expected["part-000003"] = exp
    return folder, expected
