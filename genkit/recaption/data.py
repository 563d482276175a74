"""From shard bytes to model-ready batches, inside DataLoader workers.

:class:`ShardStream` is an ``IterableDataset`` over this rank's shards; DataLoader worker ``w`` of ``W``
takes shards ``w, w + W, ...``.  A worker reads its shards one after another (streaming, see
:mod:`genkit.recaption.shards`), checks and decodes each image, runs the processor (resize, normalise,
prompt tokenisation with image-token expansion) and left-pads whole batches, so the main process only
moves tensors to the device and calls ``generate``: the model is never starved by decoding.

What a worker yields is a :class:`Chunk`: the output rows of up to ``batch_size`` samples (bad samples
carry ``status="error"`` and a reason; they need no model), the collated model inputs of the good ones,
and the shards whose last sample is in this chunk or an earlier one, so the main process can finalise
them once the chunk is captioned.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import IterableDataset, get_worker_info

from genkit.recaption.shards import RawSample, iter_tar_samples
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
    """One shard for this rank: its position in the rank's list, its path, and (retry) the keys to redo."""

    index: int
    path: Path
    only_keys: frozenset[str] | None = None


@dataclass
class Chunk:
    """Rows of up to ``batch_size`` model samples plus any bad ones, with the collated inputs of the former."""

    rows: list[tuple[int, dict]] = field(default_factory=list)   # (shard index, row)
    gen_rows: list[int] = field(default_factory=list)            # positions in rows that go to the model
    inputs: dict[str, torch.Tensor] | None = None
    finished: list[int] = field(default_factory=list)            # shard indices complete after this chunk
    seconds: float = 0.0                                         # worker time spent preparing this chunk

    def pin_memory(self):
        """Called by ``DataLoader(pin_memory=True)``: page-locked inputs for asynchronous copies to the GPU."""
        if self.inputs is not None:
            self.inputs = {k: v.pin_memory() for k, v in self.inputs.items()}
        return self


class ShardStream(IterableDataset):
    """The rank's shards as a stream of :class:`Chunk` (use with ``DataLoader(batch_size=None)``)."""

    def __init__(self, tasks: list[ShardTask], encoder: PromptEncoder, checks: ImageChecks, *,
                 batch_size: int, pad_id: int):
        self.tasks = tasks
        self.encoder = encoder
        self.checks = checks
        self.batch_size = batch_size
        self.pad_id = pad_id
        self.max_rows = max(4 * batch_size, 64)   # flush runs of bad samples too

    def __iter__(self):
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        chunk, items, t0 = Chunk(), [], time.perf_counter()

        def take():
            nonlocal chunk, items, t0
            if items:
                chunk.inputs = collate(items, self.pad_id)
            chunk.seconds = time.perf_counter() - t0
            out, chunk, items, t0 = chunk, Chunk(), [], time.perf_counter()
            return out

        for task in self.tasks[wid::nw]:
            seen: dict[str, int] = {}
            for raw in iter_tar_samples(task.path):
                n = seen.get(raw.key, 0) + 1
                seen[raw.key] = n
                if n > 1:  # keys are unique in the output table: later duplicates are errors
                    raw = RawSample(f"{raw.key}#{n}", raw.fields, f"duplicate key '{raw.key}' in shard")
                if task.only_keys is not None and raw.key not in task.only_keys:
                    continue
                row, inputs = prepare_sample(raw, self.encoder, self.checks)
                if inputs is not None:
                    chunk.gen_rows.append(len(chunk.rows))
                    items.append(inputs)
                chunk.rows.append((task.index, row))
                if len(items) >= self.batch_size or len(chunk.rows) >= self.max_rows:
                    yield take()
            chunk.finished.append(task.index)
        if chunk.rows or chunk.finished:
            yield take()
