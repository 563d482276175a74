"""Original captions: strict UTF-8 decoding, mojibake repair, NFC normalisation.

Web captions arrive in every state.  The rules here, in order:

1. The bytes must be valid UTF-8; if not, the caption is kept lossily (U+FFFD for the bad bytes) for
   inspection and the sample is an ``error`` naming the first bad byte.  Guessing a legacy code page
   would silently produce wrong text at scale.
2. UTF-8 that was mis-decoded once (or twice) as Windows-1252/Latin-1 and re-encoded (``cafÃ©`` for
   ``café``, ``â€™`` for ``'``) is repaired when detectable: the text re-encodes to Windows-1252 (or
   Latin-1) bytes that are themselves valid UTF-8 and shorter.  Genuine Latin text never does, because a
   lone accented Latin-1 byte is not valid UTF-8 (the ftfy heuristic, reduced to its safe core).
3. Unicode NFC, so that equal captions compare equal; surrounding whitespace is stripped.
"""

from __future__ import annotations

import json
import re
import unicodedata

# lead bytes of 2-4 byte UTF-8 sequences rendered in cp1252/latin-1, followed by a continuation byte
_MOJIBAKE = re.compile("[\u00c2-\u00f4][\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6"
                       "\u02dc\u2013\u2014\u2018\u2019\u201a\u201c\u201d\u201e\u2020\u2021\u2022\u2026\u2030"
                       "\u2039\u203a\u20ac\u2122]")


def repair_mojibake(text: str, rounds: int = 2) -> str:
    """Undo UTF-8 mis-decoded as cp1252/latin-1 (up to ``rounds`` times); other text is returned as is."""
    for _ in range(rounds):
        if not _MOJIBAKE.search(text):
            break
        for codec in ("cp1252", "latin-1"):
            try:
                fixed = text.encode(codec).decode("utf-8")
            except UnicodeError:
                continue
            if len(fixed) < len(text):
                text = fixed
                break
        else:
            break
    return text


def normalize_text(text: str) -> str:
    """Mojibake repair, then NFC and stripped whitespace."""
    return unicodedata.normalize("NFC", repair_mojibake(text)).strip()


def decode_caption(raw: bytes) -> tuple[str, str | None]:
    """``(text, error)``: the normalised caption, and a reason when the bytes are not valid UTF-8."""
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
        raw = raw[3:]
    try:
        return normalize_text(raw.decode("utf-8")), None
    except UnicodeDecodeError as e:
        lossy = unicodedata.normalize("NFC", raw.decode("utf-8", errors="replace")).strip()
        return lossy, f"caption is not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})"


def caption_from_fields(fields: dict[str, bytes]) -> tuple[str | None, dict | None, str | None]:
    """``(caption, json_meta, error)`` from a sample's ``txt`` and/or ``json`` fields.

    The ``txt`` field wins; otherwise ``json["caption"]`` (img2dataset's layout).  A ``json`` field that
    is not valid UTF-8 JSON is an error.
    """
    meta, caption, error = None, None, None
    if "json" in fields:
        try:
            meta = json.loads(fields["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                meta, error = None, "json field is not an object"
        except UnicodeDecodeError as e:
            error = f"json field is not valid UTF-8 (offset {e.start})"
        except ValueError as e:
            error = f"json field is not valid JSON ({e})"
    if "txt" in fields:
        caption, err = decode_caption(fields["txt"])
        error = err or error
    elif meta is not None and isinstance(meta.get("caption"), str):
        caption = normalize_text(meta["caption"])
    return caption, meta, error
