"""Remote shards through webdataset's openers, against a real HTTP server on 127.0.0.1 started here.

Faults are real: the server drops the connection mid-body, answers 404, or stalls; ``pipe:cat FILE`` is the
pipe case and fsspec's in-memory filesystem the fsspec case.  Outputs must equal local reading row for row.
"""

import json
import sys

import pytest
import torch

from genkit import config as C
from genkit.errors import ConfigError
from genkit.recaption import RecaptionConfig, recaption
from genkit.recaption import testing as T
from genkit.recaption.data import ImageChecks, ShardStream, ShardTask, StreamPolicy
from genkit.recaption.shards import StreamError, expand_shards, iter_tar_samples
from recap_helpers import RUN, read_rows

FAST = ["retry_backoff=0.05", "stall_timeout=1"]


def samples(url, **kw):
    return [(s.key, s.fields, s.error) for s in iter_tar_samples(url, **kw)]


def test_http_and_pipe_read_like_local_and_faults_raise_stream_errors(shard_set):
    """Damaged data (cut shards) is recorded exactly as locally; transport faults raise StreamError instead."""
    folder, _ = shard_set
    names = [f"part-{i:06d}.tar" for i in range(4)]
    size = (folder / names[1]).stat().st_size
    with T.ShardServer(folder, drop_after={names[1]: size // 2}, missing={names[3]},
                       stall={names[0]: 1000}) as srv:
        with pytest.raises(StreamError, match="stalled"):
            samples(srv.url(names[0]), stall_timeout=0.5)
        with pytest.raises(StreamError, match=r"curl exit 18( after \d+ bytes)?: the connection closed"):
            samples(srv.url(names[1]))
        with pytest.raises(StreamError, match="404"):
            samples(srv.url(names[3]))
        for name in names[:3]:  # second requests: whole files, including the truncated part-000002
            assert samples(srv.url(name)) == samples(str(folder / name)), name
        assert srv.requests[names[1]] == 2 and srv.requests[names[3]] == 1
    for name in names:  # the pipe case, with part-000003 cut between members (no end-of-archive marker)
        assert samples(f"pipe:cat {folder / name}") == samples(str(folder / name)), name
    assert "end-of-archive" in samples(f"pipe:cat {folder / names[3]}")[-1][2]
    with pytest.raises(StreamError, match="command exited with status 1"):
        samples(f"pipe:cat {folder / 'nope.tar'} 2>/dev/null")


def _rows(chunks):
    by_shard: dict[int, list] = {}
    for c in chunks:
        for s, row in c.rows:
            by_shard.setdefault(s, []).append(row)
    return by_shard


def _stream(urls, **policy):
    encode = lambda image, caption: {"input_ids": torch.ones(1, 2, dtype=torch.long)}  # noqa: E731 - no model
    tasks = [ShardTask(i, u) for i, u in enumerate(urls)]
    return ShardStream(tasks, encode, ImageChecks(), batch_size=2, pad_id=0,
                       policy=StreamPolicy(backoff=0.01, **policy))


# Where to drop part-000000 (215 kB, 5 photos): curl cannot exit before genkit has read all but the last
# 64 kB pipe buffer of it, in 64 kB reads, so the samples of the first 128 kB are handed on before the drop
# is seen, and the re-read must skip them.
DROP = 180_000


def test_a_dropped_shard_is_reread_from_its_start_without_duplicates(shard_set):
    folder, _ = shard_set
    name = "part-000000.tar"
    assert (folder / name).stat().st_size > DROP + 20_000
    local = list(_stream([str(folder / name)]))
    with T.ShardServer(folder, drop_after={name: DROP}) as srv:
        chunks = list(_stream([srv.url(name)]))
    assert _rows(chunks) == _rows(local)  # every sample once, in order, with the same rows
    (last,) = [c for c in chunks if c.finished]
    info = last.streams[0]
    assert info["attempts"] == 2 and "closed before the end" in info["errors"][0]
    assert info["skipped"] >= 1, "samples handed on before the drop are skipped, not captioned again"
    assert not any(c.failed for c in chunks)


def test_a_shard_that_keeps_failing_or_changes_is_given_up(shard_set):
    folder, _ = shard_set
    with T.ShardServer(folder, missing={"part-000003.tar"}, drop_after={"part-000000.tar": DROP},
                       after_first={"part-000000.tar": "part-000001.tar"}) as srv:
        chunks = list(_stream([srv.url("part-000003.tar"), srv.url("part-000000.tar")], retries=2))
        assert srv.requests["part-000003.tar"] == 3  # 1 + retries
    failed = [s for c in chunks for s in c.failed]
    assert failed == [0, 1] and not any(c.finished for c in chunks)
    info = {s: i for c in chunks for s, i in c.streams.items()}
    assert info[0]["attempts"] == 3 and all("404" in e for e in info[0]["errors"])
    assert "changed between attempts" in info[1]["errors"][-1]


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory, shard_set, tiny_llava):
    folder, _ = shard_set
    out = tmp_path_factory.mktemp("local-ref")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    recaption(C.load(RecaptionConfig, None, [*RUN, "write_tar=true"]), str(folder), tiny_llava, out, quiet=True)
    torch.set_num_threads(n)
    return out


def cli(capsys, *args):
    from genkit.cli import main

    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_recaption_over_http_equals_local_survives_faults_and_reruns_idempotently(
        tmp_path, shard_set, tiny_llava, local_ref, capsys, one_thread):
    folder, _ = shard_set
    out = tmp_path / "out"
    with T.ShardServer(folder, drop_after={"part-000000.tar": DROP}, stall={"part-000001.tar": 1000},
                       missing={"part-000004.tar"}) as srv:
        spec = srv.url("part-{000000..000004}.tar")
        args = ["recaption", spec, "--model", tiny_llava, "--out", out, "-q", *RUN, *FAST, "retries=2",
                "write_tar=true"]
        code, text, err = cli(capsys, *args)
        assert code == 0, err
        assert "4/5 shards done, 1 failed after 2 retries" in text, text
        rows = read_rows(out)
        assert rows == read_rows(local_ref)  # byte for byte in the rows; only provenance (the URL) differs
        for name in rows:
            assert (out / f"{name}.tar").read_bytes() == (local_ref / f"{name}.tar").read_bytes()
        assert not list(out.glob(".*.tmp"))  # the spooled copies of the remote shards are gone
        done = {n: json.loads((out / f"{n}.done.json").read_text()) for n in rows}
        dropped, stalled = done["part-000000"]["stream"], done["part-000001"]["stream"]
        assert dropped["attempts"] == 2 and dropped["skipped"] >= 1 and "closed before" in dropped["errors"][0]
        assert stalled["attempts"] == 2 and "stalled" in stalled["errors"][0]
        assert done["part-000002"]["stream"] == {"attempts": 1, "errors": [], "skipped": 0}
        assert done["part-000001"]["shard"] == srv.url("part-000001.tar")
        assert not (out / "part-000004.done.json").exists() and not (out / "part-000004.parquet").exists()
        failed = json.loads((out / "part-000004.failed.json").read_text())
        assert failed["attempts"] == 3 and "404" in failed["errors"][-1]
        m = json.loads((out / "metrics.json").read_text())
        assert (m["shards_done"], m["shards_failed"], m["shards_failed_total"], m["shards_retried"],
                m["stream_retries"]) == (4, 1, 1, 2, 4)
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        assert [x["status"] for x in log].count("failed") == 1
        # the same command again: done shards are skipped, the 404 shard is tried (and recorded) again
        n_before = srv.requests["part-000000.tar"]
        code, text, err = cli(capsys, *args)
        assert code == 0 and "4/5 shards done, 1 failed" in text, err
        assert srv.requests["part-000000.tar"] == n_before and srv.requests["part-000004.tar"] == 6
        assert read_rows(out) == rows
        m = json.loads((out / "metrics.json").read_text())
        assert (m["shards_skipped"], m["shards_failed"], m["samples_ok"]) == (4, 1, 0)


def test_pipe_and_fsspec_shards_equal_local(tmp_path, shard_set, tiny_llava, local_ref, one_thread):
    fsspec = pytest.importorskip("fsspec")
    folder, _ = shard_set
    names = ["part-000001", "part-000002"]  # bad samples of every kind; a shard cut inside a member
    want = {n: r for n, r in read_rows(local_ref).items() if n in names}
    cfg = C.load(RecaptionConfig, None, RUN)
    recaption(cfg, f"pipe:cat {folder}/part-{{000001..000002}}.tar", tiny_llava, tmp_path / "pipe", quiet=True)
    assert read_rows(tmp_path / "pipe") == want
    mem = fsspec.filesystem("memory")
    for n in names:
        mem.pipe(f"/genkit-test/{n}.tar", (folder / f"{n}.tar").read_bytes())
    recaption(cfg, "memory://genkit-test/part-{000001..000002}.tar", tiny_llava, tmp_path / "mem", quiet=True)
    assert read_rows(tmp_path / "mem") == want


def test_remote_spec_errors_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("GENKIT_DEBUG", raising=False)
    model = tmp_path / "any"  # never loaded: the spec is checked first
    try:
        import s3fs  # noqa: F401
    except ImportError:
        code, _, err = cli(capsys, "recaption", "s3://bucket/part-{000000..000003}.tar", "--model", model,
                           "--out", tmp_path / "o")
        assert code == 2 and "genkit[remote]" in err and "s3fs" in err and len(err.strip().splitlines()) == 1, err
    monkeypatch.setitem(sys.modules, "fsspec", None)  # fsspec not installed
    with pytest.raises(ConfigError, match=r"fsspec, which is not installed: pip install 'genkit\[remote\]'"):
        expand_shards("gs://bucket/part-000000.tar")
    monkeypatch.undo()
    code, _, err = cli(capsys, "recaption", "http://127.0.0.1:9/p.tar", "--model", model, "--out",
                       "http://127.0.0.1:9/out")
    assert code == 2 and "local or mounted folder" in err, err
