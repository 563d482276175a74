"""From shard bytes to model-ready batches, inside DataLoader workers.

:class:`ShardStream` is an ``IterableDataset`` over this rank's shards; DataLoader worker ``w`` of ``W``
takes shards ``w, w + W, ...``.  A worker reads its shards one after another (streaming, see
:mod:`genkit.recaption.shards`), checks and decodes each image, runs the processor (resize, normalise,
prompt tokenisation with image-token expansion) and left-pads whole batches, so the main process only
moves tensors to the device and calls ``generate``: the model is never starved by decoding.

What a worker yields is a :class:`Chunk`: the output rows of up to ``batch_size`` samples (bad samples
carry ``status="error"`` and a reason; they need no model), the collated model inputs of the good ones,
and the shards whose last sample is in this chunk or an earlier one, so the main process can finalise
them once the chunk is captioned.  A shard whose stream fails (dropped connection, HTTP error, stall, failed
command) is re-read from its start, skipping the samples already handed on (``retries`` times, with a
doubling back-off); one that still fails is listed in ``Chunk.failed`` and the main process drops its rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from genkit.recaption.shards import RawSample
from genkit.recaption.text import caption_from_fields

IMAGE_FIELDS = ("jpg", "jpeg", "png", "webp")
COLUMNS = ("key", "re_caption", "org_caption", "sha256", "status", "error", "width", "height", "num_tokens")


class SampleError(Exception):
    """A sample that cannot be captioned; the message is the reason recorded in its row."""


# ------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class ImageChecks:
    """Limits checked on the image header, before any pixel is decoded."""

    min_side: int = 8
    max_pixels: int = 64_000_000
    max_aspect: float = 40.0


def decode_image(data: bytes, checks: ImageChecks):
    """``(RGB PIL image, width, height)``; raises :class:`SampleError` for corrupt, tiny or huge images."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: our own limits below decide
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise SampleError(f"image too large to open safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is a bad sample, never a crash
        raise SampleError(f"not a decodable image ({_reason(e)})") from None
    w, h = im.size
    if min(w, h) < checks.min_side:
        raise SampleError(f"image too small: {w}x{h} px (min side {checks.min_side})")
    if w * h > checks.max_pixels:
        raise SampleError(f"image too large: {w}x{h} px (max {checks.max_pixels} pixels)")
    if max(w, h) / min(w, h) > checks.max_aspect:
        raise SampleError(f"image aspect ratio {max(w, h) / min(w, h):.1f} above {checks.max_aspect:g}: {w}x{h} px")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGB", im.size, (255, 255, 255))  # transparent web images: on white
                bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
                im = bg
            else:
                im = im.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise SampleError(f"corrupt image data ({_reason(e)})") from None
    return im, w, h


def _reason(e: Exception) -> str:
    """``Type: message`` without object addresses, so reruns record identical reasons."""
    return f"{type(e).__name__}: " + re.sub(r" ?<[^<>]* at 0x[0-9a-fA-F]+>", "", str(e))


# ------------------------------------------------------------------------------------------ prompts
LLAVA_FORMAT = "USER: <image>\n{prompt} ASSISTANT:"


class PromptEncoder:
    """Prompt text + image -> the processor's model inputs for one sample (``input_ids`` (1, L), pixels...).

    ``prompt`` may contain ``{caption}``, replaced by the sample's original caption (at most
    ``caption_chars`` characters).  ``prompt_format``: ``auto`` = the processor's chat template when it has
    one, else LLaVA-1.5's ``USER: <image>\\n{prompt} ASSISTANT:``; ``chat`` = the chat template (required);
    or a format string with ``{prompt}`` and ``<image>`` (replaced by the processor's image token).
    """

    def __init__(self, processor, prompt: str, prompt_format: str = "auto", caption_chars: int = 1000):
        self.processor = processor
        self.prompt = prompt
        self.caption_chars = caption_chars
        has_chat = bool(getattr(processor, "chat_template", None))
        if prompt_format == "chat" and not has_chat:
            raise ValueError("prompt_format: 'chat' but the model's processor has no chat template")
        self.use_chat = prompt_format == "chat" or (prompt_format == "auto" and has_chat)
        fmt = LLAVA_FORMAT if prompt_format in ("auto", "chat") else prompt_format
        self.format = fmt.replace("<image>", getattr(processor, "image_token", None) or "<image>")
        self._cache: dict[str, str] = {}

    def text(self, caption: str | None) -> str:
        prompt = self.prompt
        if "{caption}" in prompt:
            prompt = prompt.replace("{caption}", (caption or "")[: self.caption_chars])
        cached = self._cache.get(prompt)
        if cached is not None:
            return cached
        if self.use_chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            text = self.format.replace("{prompt}", prompt)
        if len(self._cache) < 64:
            self._cache[prompt] = text
        return text

    def __call__(self, image, caption: str | None) -> dict[str, torch.Tensor]:
        out = self.processor(images=[image], text=[self.text(caption)], return_tensors="pt")
        return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def collate(items: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left-pad the token rows (``input_ids`` with ``pad_id``, masks with 0) and stack everything else.

    Left padding keeps every prompt's last token at the same position, so generated tokens start at one
    column for the whole batch.  Other tensors (pixels, image sizes) are zero-padded to a common shape
    (LLaVA-NeXT's variable patch counts) and concatenated along the batch dimension.
    """
    length = max(x["input_ids"].shape[1] for x in items)
    out = {}
    for k in items[0]:
        vals = [x[k] for x in items]
        seq = all(v.dim() >= 2 and v.shape[1] == x["input_ids"].shape[1] for v, x in zip(vals, items)) and (
            k.endswith("ids") or k.endswith("mask"))
        if seq:
            fill = pad_id if k == "input_ids" else 0
            rows = []
            for v in vals:
                pad = length - v.shape[1]
                if pad:
                    v = torch.cat([torch.full((v.shape[0], pad, *v.shape[2:]), fill, dtype=v.dtype), v], dim=1)
                rows.append(v)
            out[k] = torch.cat(rows)                              # (B, L)
        else:
            shape = [max(s) for s in zip(*(v.shape[1:] for v in vals))]
            padded = []
            for v in vals:
                if list(v.shape[1:]) != shape:
                    z = v.new_zeros((v.shape[0], *shape))
                    z[(slice(None), *(slice(0, n) for n in v.shape[1:]))] = v
                    v = z
                padded.append(v)
            out[k] = torch.cat(padded)                            # (B, ...)
    return out


# ------------------------------------------------------------------------------------------ samples
def empty_row(key: str) -> dict:
    return {c: None for c in COLUMNS} | {"key": key, "status": "ok"}


def prepare_sample(raw: RawSample, encoder: PromptEncoder, checks: ImageChecks):
    """``(row, model_inputs or None)`` for one raw sample; every problem becomes the row's ``error``."""
    row = empty_row(raw.key)
    try:
        if raw.error and not raw.fields:
            raise SampleError(raw.error)
        caption, meta, cap_err = caption_from_fields(raw.fields)
        row["org_caption"] = caption
        img_field = next((f for f in IMAGE_FIELDS if f in raw.fields), None)
        if img_field is not None:
            data = raw.fields[img_field]
            row["sha256"] = hashlib.sha256(data).hexdigest()
        if raw.error:
            raise SampleError(raw.error)
        if img_field is None:
            have = ", ".join(sorted(raw.fields)) or "nothing"
            raise SampleError(f"no image in sample (fields: {have}; expected one of {', '.join(IMAGE_FIELDS)})")
        if cap_err:
            raise SampleError(cap_err)
        want = (meta or {}).get("sha256")
        if isinstance(want, str) and want and want.lower() != row["sha256"]:
            raise SampleError("image bytes do not match the sha256 in the json field")
        image, row["width"], row["height"] = decode_image(data, checks)
        try:
            inputs = encoder(image, caption)
        except Exception as e:  # noqa: BLE001 - a processor failure concerns this sample only
            raise SampleError(f"processor failed ({_reason(e)})") from None
        return row, inputs
    except SampleError as e:
        row["status"], row["error"] = "error", str(e)
        return row, None


@dataclass
class ShardTask:
    """One shard for this rank: its position in the rank's list, its URL, and (retry) the keys to redo."""

    index: int
    url: str
    only_keys: frozenset[str] | None = None


@dataclass(frozen=True)
class StreamPolicy:
    """How a shard whose stream fails is retried (see :meth:`ShardStream._read_shard`)."""

    retries: int = 3            # re-reads from the start after the first failure
    backoff: float = 2.0        # seconds before the first retry, doubled each time
    max_backoff: float = 60.0
    stall_timeout: float = 120.0
    spool_dir: str | None = None  # write_tar with a non-local shard: keep a local copy of the bytes read here


def spool_path(folder, url: str) -> Path:
    """Where a worker copies a non-local shard's bytes for ``write_tar`` (a temporary name: see ``_clean_tmp``)."""
    from genkit.recaption.shards import shard_name

    return Path(folder) / f".{shard_name(url)}.source.tmp"


@dataclass
class Chunk:
    """Rows of up to ``batch_size`` model samples plus any bad ones, with the collated inputs of the former."""

    rows: list[tuple[int, dict]] = field(default_factory=list)   # (shard index, row)
    gen_rows: list[int] = field(default_factory=list)            # positions in rows that go to the model
    inputs: dict[str, torch.Tensor] | None = None
    finished: list[int] = field(default_factory=list)            # shard indices complete after this chunk
    failed: list[int] = field(default_factory=list)              # shard indices given up after the retries
    streams: dict[int, dict] = field(default_factory=dict)       # finished/failed shard -> attempts, errors
    seconds: float = 0.0                                         # worker time spent preparing this chunk

    def pin_memory(self):
        """Called by ``DataLoader(pin_memory=True)``: page-locked inputs for asynchronous copies to the GPU."""
        if self.inputs is not None:
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self


class ShardStream(IterableDataset):
    """The rank's shards as a stream of :class:`Chunk` (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, tasks: list[ShardTask], encoder: PromptEncoder, checks: ImageChecks, *,
                 batch_size: int, pad_id: int, policy: StreamPolicy = StreamPolicy()):
        self.tasks = tasks
        self.encoder = encoder
        self.checks = checks
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.policy = policy
        self.max_rows = max(4 * batch_size, 64)   # flush runs of bad samples too

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        state = {"chunk": Chunk(), "items": [], "t0": time.perf_counter()}

        def take():
            chunk, items = state["chunk"], state["items"]
            if items:
                chunk.inputs = collate(items, self.pad_id)
            chunk.seconds = time.perf_counter() - state["t0"]
            state.update(chunk=Chunk(), items=[], t0=time.perf_counter())
            return chunk

        for task in self.tasks[wid::nw]:
            yield from self._read_shard(task, state, take)
        if state["chunk"].rows or state["chunk"].finished or state["chunk"].failed:
            yield take()

    def _read_shard(self, task: ShardTask, state: dict, take):
        """Add one shard's rows to the chunks, re-reading its stream from the start when it fails.

        Exactly once across retries: the keys of the samples already handed on are remembered, and a
        re-read skips that many samples (checking their keys: a shard whose content changed between
        attempts is given up) before it hands on new ones.  Bytes are re-read, captions are not.
        """
        from genkit.recaption.shards import StreamError, iter_tar_samples, kind

        pol = self.policy
        done_keys: list[str] = []           # raw keys handed on (or filtered out), in shard order
        errors: list[str] = []
        spool = spool_path(pol.spool_dir, task.url) if pol.spool_dir and kind(task.url) != "local" else None
        for attempt in range(pol.retries + 1):
            if attempt:
                time.sleep(min(pol.backoff * 2 ** (attempt - 1), pol.max_backoff))
            seen: dict[str, int] = {}
            pos, skip = 0, len(done_keys)
            try:
                with (open(spool, "wb") if spool else contextlib.nullcontext()) as tee:
                    for raw in iter_tar_samples(task.url, stall_timeout=pol.stall_timeout, tee=tee):
                        pos += 1
                        if pos <= len(done_keys):
                            if raw.key != done_keys[pos - 1]:
                                errors.append(f"the shard changed between attempts (sample {pos} is "
                                              f"'{raw.key}', was '{done_keys[pos - 1]}')")
                                self._give_up(task, state, errors, attempt + 1, spool)
                                return
                            seen[raw.key] = seen.get(raw.key, 0) + 1
                            continue
                        done_keys.append(raw.key)
                        n = seen.get(raw.key, 0) + 1
                        seen[raw.key] = n
                        if n > 1:  # keys are unique in the output table: later duplicates are errors
                            raw = RawSample(f"{raw.key}#{n}", raw.fields, f"duplicate key '{raw.key}' in shard")
                        if task.only_keys is not None and raw.key not in task.only_keys:
                            continue
                        row, inputs = prepare_sample(raw, self.encoder, self.checks)
                        chunk = state["chunk"]
                        if inputs is not None:
                            chunk.gen_rows.append(len(chunk.rows))
                            state["items"].append(inputs)
                        chunk.rows.append((task.index, row))
                        if len(state["items"]) >= self.batch_size or len(chunk.rows) >= self.max_rows:
                            yield take()
            except StreamError as e:
                errors.append(str(e))
                continue
            state["chunk"].finished.append(task.index)
            state["chunk"].streams[task.index] = {"attempts": attempt + 1, "errors": errors, "skipped": skip}
            return
        self._give_up(task, state, errors, pol.retries + 1, spool)

    @staticmethod
    def _give_up(task: ShardTask, state: dict, errors: list[str], attempts: int, spool: Path | None) -> None:
        """The shard failed: the main process drops the rows it holds for it (no done marker is written)."""
        state["chunk"].failed.append(task.index)
        state["chunk"].streams[task.index] = {"attempts": attempts, "errors": errors}
        if spool is not None:
            spool.unlink(missing_ok=True)
