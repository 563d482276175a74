"""Offline fixtures for recaptioning: a tiny random LLaVA folder, real photos, webdataset shards.

No hub weights are reachable, so tests and benchmarks build a ``LlavaForConditionalGeneration`` from a
config (tiny CLIP vision tower + tiny Llama), a word-level tokenizer trained on a few sentences (with an
``<image>`` token) and a ``LlavaProcessor`` with a small ``CLIPImageProcessor``, save them with
``save_pretrained`` and load them back by path like any real checkpoint.  The init is seeded, so greedy
captions are deterministic, and a word-level vocabulary makes them varied, readable word salads that
depend on the image.

Images are real photos that ship with installed packages: crops of scikit-learn's two sample photos,
its 8x8 digits (upscaled), and scikit-image's astronaut and LFW face crops (when scikit-image is
installed).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np

WORDS = (
    "USER : ASSISTANT : a photo of a cat on a red sofa . the quick brown fox jumps over the lazy dog . "
    "an image of a flower with yellow petals and green leaves . please generate a detailed caption of "
    "this image . please be as descriptive as possible . a man in a white space suit holding a flag . "
    "a handwritten digit on a black background . a chinese temple , blue sky , green trees , stone roof . "
    "a close up face of a person with dark hair , smiling , looking at the camera ."
)

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER : {% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %} ASSISTANT :{% endif %}"
)


def build_tiny_llava(path: str | Path, *, seed: int = 0, image_size: int = 32, patch_size: int = 8,
                     hidden: int = 32, layers: int = 2, heads: int = 2, vision_hidden: int = 32,
                     vision_layers: int = 2, chat_template: bool = True) -> Path:
    """Save a randomly initialised LLaVA (model + processor) to ``path`` and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # before the imports: no torchvision-fallback advisory
    hf_logging.disable_progress_bar()
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    path = Path(path)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>",
                                                                               "<image>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>")
    image_proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                    crop_size={"height": image_size, "width": image_size})
    n_patches = (image_size // patch_size) ** 2
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=heads, image_size=image_size,
                              patch_size=patch_size, projection_dim=vision_hidden)
    text = LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=1024, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.token_to_id("<image>"),
                         image_seq_length=n_patches, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(image_processor=image_proc, tokenizer=fast, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE if chat_template else None)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------ images
def real_images(n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """``n`` (name, HxWx3 uint8) real images: photo crops, upscaled digits, astronaut and LFW face crops."""
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    photos = [("china", load_sample_images().images[0]), ("flower", load_sample_images().images[1])]
    faces = None
    try:
        import skimage.data as skd

        photos.append(("astronaut", skd.astronaut()))
        faces = (skd.lfw_subset() * 255).astype(np.uint8)  # (200, 25, 25)
    except ImportError:  # scikit-image is optional: photos and digits only
        pass
    digits = load_digits().images  # (1797, 8, 8) in 0..16
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 3 and faces is not None:
            f = faces[int(rng.integers(len(faces)))]
            out.append((f"lfw{i}", np.repeat(f[:, :, None], 3, axis=2)))
        elif kind == 2:
            d = (digits[int(rng.integers(len(digits)))] * 15.9).astype(np.uint8)
            d = np.kron(d, np.ones((6, 6), dtype=np.uint8))  # 48x48
            out.append((f"digit{i}", np.repeat(d[:, :, None], 3, axis=2)))
        else:
            name, im = photos[int(rng.integers(len(photos)))]
            h, w = im.shape[:2]
            ch, cw = int(rng.integers(48, min(h, 320))), int(rng.integers(48, min(w, 320)))
            y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
            out.append((f"{name}{i}", np.ascontiguousarray(im[y:y + ch, x:x + cw])))
    return out


def encode_image(arr: np.ndarray, fmt: str = "jpg", quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if fmt in ("jpg", "jpeg"):
        im.save(buf, format="JPEG", quality=quality)
    elif fmt == "png":
        im.save(buf, format="PNG")
    elif fmt == "webp":
        im.save(buf, format="WEBP", quality=quality)
    else:
        raise ValueError(fmt)
    return buf.getvalue()


def write_tar(path: str | Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """A webdataset shard: members ``KEY.EXT`` in sample order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for key, fields in samples:
            for ext, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def make_sample(key: str, arr: np.ndarray, caption: str | None, fmt: str = "jpg") -> tuple[str, dict[str, bytes]]:
    fields = {fmt: encode_image(arr, fmt)}
    if caption is not None:
        fields["txt"] = caption.encode("utf-8")
    fields["json"] = json.dumps({"key": key, "caption": caption}).encode()
    return key, fields


def make_shards(folder: str | Path, n_shards: int, per_shard: int, *, prefix: str = "part", seed: int = 0
                ) -> list[Path]:
    """``n_shards`` clean shards ``prefix-000000.tar ...`` of ``per_shard`` real images with captions."""
    imgs = real_images(n_shards * per_shard, seed=seed)
    paths = []
    for s in range(n_shards):
        samples = []
        for j in range(per_shard):
            name, arr = imgs[s * per_shard + j]
            fmt = ("jpg", "png", "webp")[j % 3]
            samples.append(make_sample(f"{s:06d}{j:04d}", arr, f"a picture ({name})", fmt))
        paths.append(write_tar(Path(folder) / f"{prefix}-{s:06d}.tar", samples))
    return paths


# ------------------------------------------------------------------------------------------ HTTP
class ShardServer:
    """A real threaded HTTP/1.1 server on 127.0.0.1 serving the files of ``folder`` with plain GET (no
    Range support), with per-file faults for tests and benchmarks::

        with ShardServer(folder, drop_after={"part-000001.tar": 5000}, missing={"part-000002.tar"}) as srv:
            srv.url("part-{000000..000002}.tar")   # 'http://127.0.0.1:PORT/part-{000000..000002}.tar'

    - ``drop_after[name] = N``: the first request for ``name`` sends the full ``Content-Length``, then only
      ``N`` bytes, then closes the connection; later requests get the whole file.
    - ``missing``: names answered with 404 Not Found (even if the file exists).
    - ``stall[name] = N``: the first request sends ``N`` bytes, then goes silent until the server stops
      (bounded: the handler waits on the server's stop event).
    - ``after_first[name] = other``: from the second request on, ``name`` serves the file ``other`` (a shard
      whose content changes between a failed read and its retry).
    ``requests[name]`` counts the GETs per file.  Only the loopback address is used.
    """

    def __init__(self, folder: str | Path, *, drop_after: dict[str, int] | None = None,
                 missing: set[str] | frozenset[str] = frozenset(), stall: dict[str, int] | None = None,
                 after_first: dict[str, str] | None = None):
        import threading
        from collections import Counter
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.folder = Path(folder)
        self.drop_after, self.missing, self.stall = dict(drop_after or {}), set(missing), dict(stall or {})
        self.after_first = dict(after_first or {})
        self.requests: Counter = Counter()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                name = self.path.lstrip("/").split("?")[0]
                server.requests[name] += 1
                first = server.requests[name] == 1
                path = server.folder / (name if first else server.after_first.get(name, name))
                if name in server.missing or not path.is_file() or "/" in name:
                    body = b"not found"
                    self.send_response(404)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-tar")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                cut = server.drop_after.get(name) if first else None
                hold = server.stall.get(name) if first else None
                limit = cut if cut is not None else hold if hold is not None else len(data)
                for i in range(0, limit, 1 << 16):
                    self.wfile.write(data[i: min(i + (1 << 16), limit)])
                self.wfile.flush()
                if hold is not None:
                    server._stop.wait(60)  # silent until the server stops (or a minute at most)
                if cut is not None or hold is not None:
                    self.close_connection = True
                    self.connection.shutdown(2)  # drop the connection mid-body

        class Server(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up (curl after a fault)
                import sys

                if not isinstance(sys.exc_info()[1], OSError):
                    super().handle_error(request, client_address)

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def __enter__(self) -> "ShardServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)
