"""Helpers shared by the recaption tests (imported by conftest.py and the test modules)."""

import hashlib
import io
import re
import tarfile
from pathlib import Path


from genkit.recaption import testing as T

# Runs on CPU with one thread: tiny matmuls are far faster single-threaded on a shared 2-core machine.
RUN = ["num_workers=0", "threads=1", "max_new_tokens=12", "batch_size=4"]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def png(arr) -> bytes:
    return T.encode_image(arr, "png")


def huge_png(side: int = 10_000) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # 12.5 MB of pixels, a few kB on disk
    return buf.getvalue()


def member_offsets(path: Path) -> dict[str, tuple[int, int]]:
    with tarfile.open(path) as tf:
        return {m.name: (m.offset_data, m.size) for m in tf.getmembers()}


def data_end(path: Path) -> int:
    """Byte offset right after the last member's (padded) data: cutting there drops the end marker."""
    raw = path.read_bytes()
    last = len(raw.rstrip(b"\0"))
    return (last + 511) // 512 * 512


def read_rows(out: Path) -> dict[str, list[dict]]:
    import pyarrow.parquet as pq

    return {p.name[: -len(".parquet")]: pq.read_table(p).to_pylist() for p in sorted(out.glob("*.parquet"))}


def check_against(rows: dict[str, list[dict]], expected: dict) -> None:
    """Every expected sample exactly once, with its key, sha256, status and reason (a regex); nothing else."""
    assert set(rows) == set(expected)
    for shard, exp in expected.items():
        keys = [r["key"] for r in rows[shard]]
        assert len(keys) == len(set(keys)), f"{shard}: duplicate keys {keys}"
        assert set(keys) == set(exp), f"{shard}: {sorted(keys)} != {sorted(exp)}"
        for r in rows[shard]:
            status, digest, err = exp[r["key"]]
            assert r["status"] == status, (shard, r)
            assert r["sha256"] == digest, (shard, r["key"])
            if status == "ok":
                assert r["error"] is None and r["re_caption"], (shard, r)
                assert r["num_tokens"] >= 1
            else:
                assert re.search(err, r["error"], re.I), (shard, r)
                assert r["re_caption"] is None
