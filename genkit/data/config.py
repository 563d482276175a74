"""The `data:` section shared by the image recipes (train-flow, train-diffusion)."""

from __future__ import annotations

from dataclasses import dataclass

from genkit.config import field
from genkit.errors import ConfigError

from .images import ImageData, load_images


@dataclass
class ImageDataConfig:
    source: str = field("digits", help="image source: digits, mnist5k, fashion-mnist or a folder of images")
    split_seed: int = field(0, help="seed of the train/test split")
    image_size: int = field(0, help="resize folder images to this size (0 = keep)", min=0)
    channels: int = field(1, help="channels for folder images (1 = grey, 3 = RGB)", min=1, max=3)
    pad_to: int = field(0, help="centre the images on a square canvas of this size filled with level 0 "
                        "(e.g. 32 for MNIST-5k under an autoencoder; 0 = keep)", min=0)
    conditional: bool = field(False, help="condition on class labels (with label dropout: classifier-free guidance)")
    label_drop: float = field(0.1, help="probability of replacing a label by the null class during training",
                              min=0.0, max=1.0)

    def load(self, split: str) -> ImageData:
        """The `split` ('train' or 'test') of the source; ConfigError if conditional and it has no labels."""
        data = load_images(self.source, split, seed=self.split_seed, image_size=self.image_size or None,
                           channels=self.channels)
        if self.conditional and data.labels is None:
            raise ConfigError(f"data.conditional: source '{self.source}' has no labels")
        return data.padded(self.pad_to) if self.pad_to else data
