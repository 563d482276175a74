"""Webdataset shards: spec expansion, streaming tar reading grouped by sample key, tar writing.

A webdataset shard is a plain tar whose members are grouped into samples by *key*: the member path up
to the first dot of its file name (``a/b/000123.jpg`` and ``a/b/000123.txt`` are sample ``a/b/000123``
with fields ``jpg`` and ``txt``), consecutive members with the same key forming one sample.  This
module reads shards with :mod:`tarfile` in streaming mode (``r|*``: one pass, no seeks, constant memory
per shard, gzip/bz2/xz transparently), the same grouping as webdataset's ``base_plus_ext``.

Damage is reported, never raised: a truncated tar (cut inside a header, inside a member's data, or
exactly between members so that the end-of-archive marker is missing) or an invalid header ends the
shard with an ``error`` on the last :class:`RawSample`, after every complete sample before it.
"""

from __future__ import annotations

import glob
import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from genkit.errors import ConfigError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_BRACE = re.compile(r"\{([^{}]*)\}")


# ------------------------------------------------------------------------------------------- specs
def braceexpand(pattern: str) -> list[str]:
    """Expand ``{000000..000127}`` (zero padding kept), ``{a,b}`` and several braces (cartesian product).

    >>> braceexpand("part-{08..10}-{a,b}.tar")[:3]
    ['part-08-a.tar', 'part-08-b.tar', 'part-09-a.tar']
    """
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?", body)
    if rng:
        lo, hi = int(rng.group(1)), int(rng.group(2))
        step = int(rng.group(3) or 1) or 1
        width = len(rng.group(1)) if rng.group(1).lstrip("-").startswith("0") else 0
        sign = 1 if hi >= lo else -1
        items = [str(i).zfill(width) for i in range(lo, hi + sign, sign * step)]
    else:
        items = body.split(",")
    return [head + item + rest for item in items for rest in braceexpand(tail)]


def expand_shards(spec: str) -> list[Path]:
    """The shard files of a spec: brace pattern(s) joined by ``::``, a glob, a folder of ``*.tar``, or a file.

    Raises :class:`ConfigError` (before any work) when nothing matches, a named shard is missing, or two
    shards share a file name (their outputs would collide in the output folder).
    """
    if "://" in spec or spec.startswith("pipe:"):
        raise ConfigError(f"SHARDS '{spec}': only local files are supported (copy or mount the shards first)")
    paths: list[Path] = []
    missing: list[str] = []
    for part in filter(None, spec.split("::")):
        for item in braceexpand(part):
            p = Path(item).expanduser()
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(SHARD_SUFFIXES))
                if not found:
                    raise ConfigError(f"SHARDS: folder '{p}' holds no {'/'.join(SHARD_SUFFIXES)} files")
                paths += found
            elif any(c in item for c in "*?["):
                paths += sorted(Path(q) for q in glob.glob(str(p)) if q.endswith(SHARD_SUFFIXES))
            elif p.is_file():
                paths.append(p)
            else:
                missing.append(item)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(f"SHARDS: {len(missing)} shard(s) do not exist: {shown}")
    if not paths:
        raise ConfigError(f"SHARDS '{spec}' matches no shard files")
    # one output per input name: refuse ambiguous specs instead of overwriting
    seen: dict[str, Path] = {}
    uniq: list[Path] = []
    for p in paths:
        name = shard_name(p)
        if name in seen:
            if seen[name].resolve() == p.resolve():
                continue
            raise ConfigError(f"SHARDS: '{seen[name]}' and '{p}' have the same name '{name}'; their outputs "
                              "would collide: recaption them into different --out folders")
        seen[name] = p
        uniq.append(p)
    return uniq


def shard_name(path: str | os.PathLike) -> str:
    """``data/part-000007.tar`` -> ``part-000007`` (the stem of every output of this shard)."""
    name = Path(path).name
    for suf in SHARD_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


# --------------------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    """One webdataset sample: its key, its fields (extension -> bytes) and a read error if any."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def split_key(name: str) -> tuple[str, str]:
    """Webdataset's ``base_plus_ext``: ``a/b/000123.seg.png`` -> (``a/b/000123``, ``seg.png``)."""
    d, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower() if dot else ""


class _TarInfo(tarfile.TarInfo):
    """Remembers why tarfile stopped: a zero block (a proper end) or a missing/short/invalid header."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.HeaderError as e:
            tf._genkit_stop = type(e).__name__  # EOFHeaderError = end-of-archive marker seen
            raise


_STOP_REASON = {
    "EmptyHeaderError": "truncated tar: the file ends without an end-of-archive marker",
    "TruncatedHeaderError": "truncated tar: the file ends inside a member header",
    "InvalidHeaderError": "corrupt tar: invalid member header",
}


def iter_tar_samples(path: str | os.PathLike, *, bufsize: int = 1 << 20) -> Iterator[RawSample]:
    """Stream the samples of one tar shard in order, in constant memory.

    A damaged tar yields every complete sample before the damage; the last sample yielded then carries
    ``error`` (the sample being read when the damage was found, or a sample keyed ``__tar__`` when the
    damage lies between samples).
    """
    cur: RawSample | None = None
    last_name = ""
    try:
        fobj = open(path, "rb", buffering=bufsize)
    except OSError as e:
        yield RawSample("__tar__", error=f"cannot open shard: {e.strerror or e}")
        return
    with fobj:
        try:
            tf = tarfile.open(fileobj=fobj, mode="r|*", tarinfo=_TarInfo)
        except (tarfile.TarError, OSError, EOFError) as e:
            yield RawSample("__tar__", error=f"not a readable tar: {e}")
            return
        tf._genkit_stop = None
        error, in_data = None, False
        try:
            while True:
                info = tf.next()
                tf.members.clear()  # tarfile keeps every TarInfo in stream mode: keep memory flat
                if info is None:
                    break
                last_name = info.name
                if not info.isfile():
                    continue
                key, ext = split_key(info.name)
                if cur is not None and key != cur.key:
                    yield cur
                    cur = None
                if cur is None:
                    cur = RawSample(key)
                in_data = True
                data = tf.extractfile(info).read()
                if len(data) != info.size:
                    raise tarfile.ReadError("unexpected end of data")
                in_data = False
                if ext in cur.fields:
                    cur.error = cur.error or f"duplicate field '{ext}' in sample"
                cur.fields[ext] = data
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            where = f" in member '{last_name}'" if last_name else ""
            error = f"truncated or corrupt tar{where}: {e}"
        finally:
            stop = tf._genkit_stop
            tf.close()
        if error is None and stop in _STOP_REASON:
            error = _STOP_REASON[stop] + (f" (after member '{last_name}')" if last_name else "")
        if cur is not None:
            if error is not None and in_data:
                cur.error = error  # the sample whose data was cut: it may be incomplete
                error = None
            yield cur
        if error is not None:
            yield RawSample("__tar__", error=error)


# --------------------------------------------------------------------------------------- writing
class TarWriter:
    """Write a webdataset tar member by member (used for the optional re-captioned copy of a shard)."""

    def __init__(self, fileobj):
        self._tf = tarfile.open(fileobj=fileobj, mode="w|")

    def add(self, name: str, data: bytes, mtime: float = 0.0) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = mtime
        info.mode = 0o644
        self._tf.addfile(info, io.BytesIO(data))

    def close(self) -> None:
        self._tf.close()
