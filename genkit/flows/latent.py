"""What a latent, text-conditioned flow needs around the model (STARFlow, arXiv 2506.06276; official
apple/ml-starflow ``train.py`` and ``utils/``): the autoencoder's latent space, caption tables, and sampling that
ends in pixels.

Training inputs (official ``train.py``): ``x = scale * sample(q(z|image)) + noise_std * eps`` with noise_std 0.3
(``add_noise``), and the captions' encoder states with 10 % of the captions replaced by the empty string
(``drop_label``). genkit draws the posterior sample, the noise and the dropped captions from (seed, step), and by
default caches the posterior means and stds of the training images once (``latent.cache``), which is the same
distribution as encoding every batch.

Captions (``text.source``): ``templates`` - the built-in sources have labels, not captions, so a caption is a
template ("a handwritten digit {name}") filled with the image's class name, the template drawn per image and step
(held-out templates are the test of text conditioning in ``benchmarks/starflow.py``); ``captions`` - a folder
source's own captions (``NAME.txt`` beside ``NAME.png``), encoded batch by batch as the official ``encode_text``
does (the text encoder stays in memory, e.g. a flan-T5 folder at full scale).

Sampling (official ``train.py`` / ``sample.py``): z ~ N(0, I) -> flow reverse (deep block first, guided) ->
optionally Tweedie denoising of the latent, x + sigma^2 grad log p(x) with the flow's exact density and sigma =
the training noise (official ``simple_denoising`` -> ``self_denoise``; skipped when a decoder fine-tuned on noisy
latents is used instead) -> autoencoder decode -> clamp to [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from genkit.config import field
from genkit.data.batches import step_generator
from genkit.errors import ConfigError


@dataclass
class LatentConfig:
    """The latent space of a diffusers AutoencoderKL (empty ``ae`` = model pixels)."""

    ae: str = field("", help="diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), "
                    "e.g. the ae/ of genkit train-ae or a local stabilityai/sd-vae-ft-ema; empty = pixel space", exists=True)
    scaling_factor: float = field(0.0, help="latent scale (0 = the folder's scaling_factor, or 1/std of the "
                                  "training latents when its config has none)", min=0.0)
    noise_std: float = field(0.3, help="std of the Gaussian noise added to the scaled latents (official 0.3)",
                             min=0.0)
    channels: int = field(0, help="expected latent channels (0 = whatever the autoencoder has; else a mismatch "
                          "is an error)", min=0)
    sample_posterior: bool = field(True, help="train on posterior samples (official) rather than the means")
    cache: bool = field(True, help="encode the training images once (posterior mean and std) instead of every "
                        "batch")


@dataclass
class TextConfig:
    """Text conditioning: encoder hidden states of captions, prepended to the deep block (STARFlow)."""

    encoder: str = field("", help="text encoder: minilm (packaged all-MiniLM-L6-v2, offline), a local folder "
                         "(flan-T5, BERT, CLIP text), or empty for no text conditioning")
    source: Literal["templates", "captions"] = field("templates", help="templates: class names filled into "
                                                     "text.templates; captions: the image folder's NAME.txt files")
    max_length: int = field(16, help="caption tokens (padded with zeroed states; official txt_size 128)", min=1)
    templates: list[str] = field(default_factory=lambda: ["a handwritten digit {name}",
                                                          "the number {name}, written by hand",
                                                          "a drawing of a {name}"],
                                 help="caption templates filled with each image's class name ({name}, {index})")
    class_names: list[str] = field(default_factory=list, help="class names for the templates (default: number "
                                   "words for digits/mnist5k, the dataset's names otherwise)")
    drop: float = field(0.1, help="probability of replacing a caption by the empty string (official "
                        "drop_label 0.1), the unconditional branch of guidance", min=0.0, max=1.0)


class CaptionTable:
    """Unique captions (templates x classes, plus "") and their encoder states, indexed per training row."""

    def __init__(self, cfg: TextConfig, class_names: list[str], states=None):
        from genkit.models.text import encode_states, template_prompts

        if not cfg.templates:
            raise ConfigError("text.templates: give at least one caption template")
        self.templates, self.class_names = list(cfg.templates), list(class_names)
        self.encoder_name = cfg.encoder
        prompts, _ = template_prompts(self.class_names, self.templates)
        self.prompts = prompts + [""]  # the empty caption last
        self.empty = len(self.prompts) - 1
        s = states if states is not None else encode_states(self.prompts, cfg.max_length, encoder=cfg.encoder)
        self.hidden = s.hidden  # (P + 1, L, E), padding zeroed
        self.drop = cfg.drop

    @property
    def dim(self) -> int:
        return int(self.hidden.shape[-1])

    def ids(self, labels: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        """Caption index per row: a random template for the row's class, or the empty caption (prob ``drop``)."""
        k = len(self.class_names)
        g = step_generator(seed, step, stream=31)
        tpl = torch.randint(len(self.templates), labels.shape, generator=g)
        ids = tpl * k + labels
        dropped = torch.rand(labels.shape, generator=step_generator(seed, step, stream=32)) < self.drop
        return torch.where(dropped, torch.full_like(ids, self.empty), ids)

    def states(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hidden[ids]  # (B, L, E)

    def for_labels(self, labels: torch.Tensor, template: int = 0) -> torch.Tensor:
        """Caption ids of ``labels`` with one template."""
        return template * len(self.class_names) + labels

    # the interface FlowSpace uses (shared with DataCaptions)
    def batch(self, data, idx: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        return self.states(self.ids(data.labels[idx], seed, step))

    def eval_states(self, data, rows: torch.Tensor) -> torch.Tensor:
        return self.states(self.for_labels(data.labels[rows]))

    def null(self, n: int) -> torch.Tensor:
        return self.states(torch.full((n,), self.empty))

    def prompt_states(self, labels=None, prompts=None) -> torch.Tensor:
        if prompts is not None:
            from genkit.models.text import encode_states

            return encode_states(list(prompts), self.hidden.shape[1], encoder=self.encoder_name).hidden
        return self.states(self.for_labels(torch.as_tensor(labels)))


class DataCaptions:
    """The images' own captions, encoded per batch by a text encoder kept in memory (official ``encode_text``:
    ``padding="max_length"``, states times the attention mask); ``drop`` of them replaced by ""."""

    def __init__(self, cfg: TextConfig, device="cpu"):
        from genkit.models.text import TextEncoder

        self.encoder = TextEncoder(cfg.encoder, device)
        self.max_length, self.drop = cfg.max_length, cfg.drop
        self.empty_states = self.encoder.encode([""], self.max_length).hidden  # (1, L, E)

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return self.encoder.encode(list(prompts), self.max_length).hidden

    def batch(self, data, idx: torch.Tensor, seed: int, step: int) -> torch.Tensor:
        dropped = torch.rand(idx.shape, generator=step_generator(seed, step, stream=32)) < self.drop
        caps = ["" if d else data.captions[i] for i, d in zip(idx.tolist(), dropped.tolist())]
        return self.encode(caps)

    def eval_states(self, data, rows: torch.Tensor) -> torch.Tensor:
        return self.encode([data.captions[i] for i in rows.tolist()])

    def null(self, n: int) -> torch.Tensor:
        return self.empty_states.expand(n, -1, -1)

    def prompt_states(self, labels=None, prompts=None) -> torch.Tensor:
        if prompts is None:
            raise ConfigError("this flow was trained on image captions: give prompts")
        return self.encode(prompts)


def posterior_stats(codec, images: torch.Tensor, batch_size: int = 256, device="cpu"):
    """(mean, std) of q(z|x) of all images, unscaled, each (N, c, h, w), on the CPU."""
    ms, ss = [], []
    for i in range(0, len(images), batch_size):
        m, s = codec.posterior(images[i : i + batch_size].to(device))
        ms.append(m.cpu())
        ss.append(s.cpu())
    return torch.cat(ms), torch.cat(ss)


def latent_inputs(codec, mean, std, noise_std: float, seed: int, step: int, *, sample: bool = True, stream: int = 41):
    """Scaled latents plus training noise for one batch, from cached posterior (mean, std): deterministic in
    (seed, step)."""
    z = mean
    if sample:
        z = mean + std * torch.randn(mean.shape, generator=step_generator(seed, step, stream=stream)).to(mean)
    x = codec.scaled(z)
    if noise_std > 0:
        x = x + noise_std * torch.randn(x.shape, generator=step_generator(seed, step, stream=stream + 1)).to(x)
    return x


@torch.no_grad()
def decode(codec, z, batch_size: int = 256) -> torch.Tensor:
    """Pixels in [-1, 1] from scaled latents (clamped after decoding)."""
    out = [codec.decode(z[i : i + batch_size]).clamp(-1, 1) for i in range(0, len(z), batch_size)]
    return torch.cat(out)
