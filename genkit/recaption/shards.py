"""Webdataset shards: specs, opening streams (local, ``pipe:``, ``http(s)://``, fsspec), reading samples, writing tars.

Specs follow webdataset's URL conventions and are expanded by webdataset itself
(:func:`webdataset.shardlists.expand_urls`: ``::``-separated lists, ``${VAR}`` from ``WDS_VAR``, brace
expansion by the ``braceexpand`` package, so ``part-{000000..000127}.tar`` keeps its zero padding).
Local entries may also be globs or folders of ``.tar`` files, checked before any work.  Every shard is
opened by webdataset's :func:`webdataset.gopen.gopen` (local files, ``pipe:COMMAND``, ``http(s)://`` through
``curl -f -s -L``), except URLs of other schemes (``s3://``, ``gs://``, ``hf://``, ``memory://``...), which
are opened with fsspec (the optional extra ``genkit[remote]`` plus the scheme's backend, e.g. ``s3fs``).
Samples are grouped as webdataset does: the key is the member path up to the first dot of its file name
(webdataset's ``base_plus_ext``; ``a/b/000123.seg.png`` is sample ``a/b/000123``, field ``seg.png``), field
names are lower-cased, consecutive members with one key form one sample, members without an extension and
``__meta__`` files are skipped.

What the library cannot express, and the own code kept for it:

- *Why a cut shard ended.*  webdataset's ``tar_file_iterator`` iterates ``tarfile`` in stream mode with the
  default ``TarInfo`` and no handle on the ``TarFile``.  In stream mode ``tarfile`` ends silently when the data
  stops exactly between two members or inside a header (``EmptyHeaderError`` / ``TruncatedHeaderError`` after
  offset 0 mean "end"), so a shard cut at a member boundary or inside a header passes for a complete one and
  its loss is never recorded (checked with webdataset 1.0.2's ``tarfile_samples``).  genkit therefore
  runs its own ~40-line loop over ``tarfile.open(fileobj=<webdataset stream>, mode="r|*", tarinfo=_TarInfo)``,
  whose ``TarInfo`` remembers why ``tarfile`` stopped, and records every cut (see :func:`iter_tar_samples`).
- *Transport failure vs damaged data.*  A failed ``curl`` or pipe command surfaces in webdataset's ``Pipe``
  only when the process is reaped, which may be after ``tarfile`` has already seen the early end of the data.
  Before blaming the data, genkit reads the stream to its end and closes it, so a dropped connection, an HTTP
  404 or a failed command raises :class:`StreamError` (the shard is retried from its start by
  :mod:`genkit.recaption.data`) instead of being recorded as a truncated shard.
- *A stalled server.*  ``gopen``'s curl has a connect timeout but no transfer timeout; a server that stops
  sending mid-body would block forever.  :class:`_Watchdog` kills the stream's process when one read of at
  most 64 KiB has waited ``stall_timeout`` seconds (http(s) and ``pipe:`` streams; fsspec backends use their
  own timeouts).
"""

from __future__ import annotations

import glob
import io
import os
import re
import shutil
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator
from urllib.parse import unquote, urlparse

from genkit.errors import ConfigError

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
REMOTE_EXTRA = "pip install 'genkit[remote]'"


class StreamError(Exception):
    """The shard's byte stream failed (connection dropped, HTTP error, stall, command failed): retry the shard."""


# ------------------------------------------------------------------------------------------- specs
def kind(url: str) -> str:
    """``local``, ``pipe``, ``http`` (http/https through curl) or ``fsspec`` (any other ``scheme://``)."""
    if url.startswith("pipe:"):
        return "pipe"
    m = _SCHEME.match(url)
    if m is None or len(m.group(1)) == 1:  # no scheme (or a Windows drive letter)
        return "local"
    scheme = m.group(1).lower()
    if scheme == "file":
        return "local"
    if scheme in ("http", "https"):
        return "http"
    return "fsspec"


def _local_path(url: str) -> Path:
    if url.lower().startswith("file:"):
        return Path(unquote(urlparse(url).path))
    return Path(url).expanduser()


def _check_fsspec(url: str) -> None:
    """A one-line :class:`ConfigError` (before any work) when fsspec or the URL's backend is missing."""
    scheme = _SCHEME.match(url).group(1)
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"SHARDS '{url}': {scheme}:// URLs are read through fsspec, which is not installed: "
                          f"{REMOTE_EXTRA} (plus the {scheme} backend)") from None
    try:
        fsspec.get_filesystem_class(scheme)
    except (ImportError, ValueError) as e:
        raise ConfigError(f"SHARDS '{url}': fsspec cannot open {scheme}:// URLs ({e}); {REMOTE_EXTRA} and "
                          f"install the backend for {scheme}://") from None


def expand_shards(spec: str) -> list[str]:
    """The shards of a spec, as webdataset URLs: local paths (brace patterns, globs, folders of ``*.tar``,
    files; ``::`` joins several), ``pipe:COMMAND``, ``http(s)://`` and fsspec URLs (``s3://``, ``gs://``...).

    Raises :class:`ConfigError` (before any work) when a local shard is missing, nothing matches, a scheme
    cannot be opened (curl or fsspec missing), or two shards share a name (their outputs would collide in
    the output folder).  Remote shards are not contacted here: one that cannot be read fails when read.
    """
    from webdataset.shardlists import expand_urls

    try:
        items = expand_urls(spec)
    except AssertionError as e:  # webdataset asserts on a ${VAR} without a WDS_VAR in the environment
        raise ConfigError(f"SHARDS '{spec}': {e}") from None
    urls: list[str] = []
    missing: list[str] = []
    checked: set[str] = set()
    for item in filter(None, items):
        k = kind(item)
        if k == "local":
            p = _local_path(item)
            if p.is_dir():
                found = sorted(q for q in p.iterdir() if q.is_file() and q.name.endswith(SHARD_SUFFIXES))
                if not found:
                    raise ConfigError(f"SHARDS: folder '{p}' holds no {'/'.join(SHARD_SUFFIXES)} files")
                urls += map(str, found)
            elif any(c in item for c in "*?["):
                urls += sorted(q for q in glob.glob(str(p)) if q.endswith(SHARD_SUFFIXES))
            elif p.is_file():
                urls.append(str(p))
            else:
                missing.append(item)
            continue
        if k not in checked:
            if k == "http" and shutil.which("curl") is None:
                raise ConfigError(f"SHARDS '{item}': http(s) shards are read with curl (webdataset's opener), "
                                  "which is not installed: install curl (e.g. apt-get install -y curl)")
            if k == "fsspec":
                _check_fsspec(item)
            checked.add(k)
        urls.append(item)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ConfigError(f"SHARDS: {len(missing)} shard(s) do not exist: {shown}")
    if not urls:
        raise ConfigError(f"SHARDS '{spec}' matches no shard files")
    # one output per input name: refuse ambiguous specs instead of overwriting
    seen: dict[str, str] = {}
    uniq: list[str] = []
    for u in urls:
        name = shard_name(u)
        if name in seen:
            if _same(seen[name], u):
                continue
            raise ConfigError(f"SHARDS: '{seen[name]}' and '{u}' have the same name '{name}'; their outputs "
                              "would collide: recaption them into different --out folders")
        seen[name] = u
        uniq.append(u)
    return uniq


def _same(a: str, b: str) -> bool:
    if kind(a) == kind(b) == "local":
        return Path(a).resolve() == Path(b).resolve()
    return a == b


def shard_name(url: str | os.PathLike) -> str:
    """The stem of every output of a shard, from the last path component of its URL.

    ``data/part-000007.tar`` and ``https://host/d/part-000007.tar?sig=x`` -> ``part-000007``; for
    ``pipe:COMMAND`` the last word of the command that names a ``.tar`` file
    (``pipe:curl -s -L https://host/part-000007.tar`` -> ``part-000007``).
    """
    url = os.fspath(url)
    k = kind(url)
    if k == "pipe":
        words = [w.strip("'\"") for w in url[5:].split()]
        named = [w for w in words if urlparse(w).path.endswith(SHARD_SUFFIXES)]
        if not named:
            raise ConfigError(f"SHARDS '{url}': cannot name the output of this pipe: command; put the shard's "
                              f"file name (NAME.tar) in the command, e.g. 'pipe:curl -s -L https://host/NAME.tar'")
        url = named[-1]
        k = kind(url)
    path = str(_local_path(url)) if k == "local" else unquote(urlparse(url).path)
    name = path.rstrip("/").rpartition("/")[2]
    for suf in SHARD_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


# ------------------------------------------------------------------------------------------ streams
class _Watchdog:
    """Kills a stream's process (curl or a pipe command) when one read of at most 64 KiB has waited
    ``timeout`` seconds.  Only time spent inside a read counts: a worker that waits for the model (its
    prefetch queue full) leaves the stream idle without being stalled."""

    def __init__(self, pipe, timeout: float):
        self.pipe, self.timeout = pipe, timeout
        self.reading_since: float | None = None
        self.stalled = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="genkit-stall-watchdog")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout / 4)):
            since = self.reading_since
            if since is not None and time.monotonic() - since > self.timeout:
                self.stalled = True
                try:
                    self.pipe.proc.kill()
                except OSError:  # already gone
                    pass
                return

    def stop(self) -> None:
        self._stop.set()


_CHUNK = 1 << 16  # bytes per read of the transport (the stall watchdog's unit)


class _Stream(io.RawIOBase):
    """A read-only view of a webdataset/fsspec stream: feeds the watchdog, copies bytes to ``tee``, and
    turns transport failures into :class:`StreamError` with a readable reason."""

    def __init__(self, url: str, *, stall_timeout: float = 0.0, tee=None):
        super().__init__()
        self.url, self.tee = url, tee
        self.kind = kind(url)
        self.nbytes = 0
        self.watchdog = None
        try:
            if self.kind == "fsspec":
                import fsspec

                self.f = fsspec.open(url, "rb").open()
            else:
                from webdataset.gopen import gopen

                self.f = gopen(url, "rb")
        except Exception as e:  # noqa: BLE001 - a shard that cannot be opened: retried, then recorded
            raise StreamError(f"cannot open: {_brief(e)}") from None
        if stall_timeout > 0 and hasattr(self.f, "proc"):
            self.watchdog = _Watchdog(self.f, stall_timeout)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else min(n, _CHUNK)
        if self.watchdog is not None:
            self.watchdog.reading_since = time.monotonic()
        try:
            data = self.f.read(n)
        except Exception as e:  # noqa: BLE001 - every failure of the transport, whatever the backend raises
            raise self._failure(e) from None
        finally:
            if self.watchdog is not None:
                self.watchdog.reading_since = None
        if data:
            self.nbytes += len(data)
            if self.tee is not None:
                self.tee.write(data)
        return data

    def finish(self) -> None:
        """Read to the end and close; raises :class:`StreamError` when the transport did not end cleanly."""
        try:
            while self.read(_CHUNK):
                pass
            self.f.close()
        except StreamError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failure(e) from None
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without judging the transport (after a failure); kills a stream process still running."""
        if self.watchdog is not None:
            self.watchdog.stop()
        proc = getattr(self.f, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
        try:
            self.f.close()
        except Exception:  # noqa: BLE001 - the failure was reported already
            pass
        super().close()

    def _failure(self, e: Exception) -> StreamError:
        where = f" after {self.nbytes} bytes" if self.nbytes else ""
        if self.watchdog is not None and self.watchdog.stalled:
            return StreamError(f"stalled: a read waited {self.watchdog.timeout:g} s for data{where}")
        status = getattr(self.f, "status", None)
        if status is None and getattr(self.f, "proc", None) is not None:
            status = self.f.proc.poll()
        if self.kind == "http" and isinstance(status, int):
            return StreamError(f"curl exit {status}{where}: {_CURL.get(status, 'transfer failed')}")
        if self.kind == "pipe" and isinstance(status, int):
            return StreamError(f"command exited with status {status}{where}")
        return StreamError(f"read failed{where}: {_brief(e)}")


_CURL = {
    6: "could not resolve the host", 7: "could not connect to the server",
    18: "the connection closed before the end of the file", 22: "HTTP error (status >= 400, e.g. 404 Not Found)",
    28: "timed out", 35: "TLS handshake failed", 52: "the server sent nothing", 56: "the connection was reset",
}


def _brief(e: Exception) -> str:
    msg = str(e.args[0]) if getattr(e, "args", None) else str(e)
    return f"{type(e).__name__}: {msg}"[:300]


# --------------------------------------------------------------------------------------- reading
@dataclass
class RawSample:
    """One webdataset sample: its key, its fields (extension -> bytes) and a read error if any."""

    key: str
    fields: dict[str, bytes] = field(default_factory=dict)
    error: str | None = None


def split_key(name: str) -> tuple[str | None, str | None]:
    """Webdataset's ``base_plus_ext`` with a lower-cased field: ``a/b/0001.seg.PNG`` -> (``a/b/0001``,
    ``seg.png``); ``(None, None)`` for a name without an extension (webdataset skips such members)."""
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return (key, ext.lower()) if key is not None else (None, None)


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


def iter_tar_samples(url: str | os.PathLike, *, stall_timeout: float = 0.0, tee=None) -> Iterator[RawSample]:
    """Stream the samples of one shard in order, in constant memory.

    Damaged data is reported, never raised: a truncated tar (cut inside a header, inside a member's data, or
    exactly between members so that the end-of-archive marker is missing) or an invalid header yields every
    complete sample before the damage; the last sample yielded then carries ``error`` (the sample being read
    when the damage was found, or a sample keyed ``__tar__`` when the damage lies between samples).  A failed
    transport raises :class:`StreamError` instead; every sample yielded before it was complete.  ``tee``
    (a binary file) receives a copy of every byte read.
    """
    url = os.fspath(url)
    if kind(url) == "local" and not _local_path(url).is_file():  # a shard deleted after planning
        yield RawSample("__tar__", error=f"cannot open shard: no such file '{url}'")
        return
    src = _Stream(url, stall_timeout=stall_timeout, tee=tee)
    try:
        yield from _samples(src)
    except BaseException:
        src.abort()
        raise


def _samples(src: _Stream) -> Iterator[RawSample]:
    cur: RawSample | None = None
    last_name = ""
    try:
        tf = tarfile.open(fileobj=io.BufferedReader(src, _CHUNK), mode="r|*", tarinfo=_TarInfo)
    except (tarfile.TarError, EOFError) as e:
        src.finish()  # a failed transport, not a bad file, when the stream did not end cleanly
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
            if not info.isfile() or _META.match(info.name):
                continue
            key, ext = split_key(info.name)
            if key is None:
                continue
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
    except (tarfile.TarError, EOFError, ValueError) as e:
        where = f" in member '{last_name}'" if last_name else ""
        error = f"truncated or corrupt tar{where}: {e}"
    stop = tf._genkit_stop
    src.finish()  # raises StreamError when the early end was the transport's, not the file's
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
