"""Image sources: shapes, levels, deterministic disjoint splits, shuffled MNIST, clear errors."""

import numpy as np
import pytest
import torch

from genkit.data.batches import batch_indices
from genkit.data.images import FASHION_DIR, load_images
from genkit.errors import ConfigError


def test_digits_split():
    tr, te = load_images("digits", "train"), load_images("digits", "test")
    assert len(tr) == 1500 and len(te) == 297 and tr.shape == (1, 8, 8) and tr.levels == 17
    assert int(tr.ints.max()) == 16 and tr.num_classes == 10
    # deterministic and disjoint
    again = load_images("digits", "train")
    assert torch.equal(tr.ints, again.ints)
    rows_tr = {r.tobytes() + bytes([int(l)]) for r, l in zip(tr.ints.numpy(), tr.labels)}
    all_ = load_images("digits", "all")
    assert len(all_) == 1797
    assert not torch.equal(load_images("digits", "train", seed=1).ints, tr.ints)
    x = tr.to_unit()
    assert x.min() > -1 and x.max() < 1
    assert len(rows_tr) > 1400


def test_mnist5k_is_shuffled():
    tr = load_images("mnist5k", "train")
    assert len(tr) == 4500 and tr.shape == (1, 28, 28) and tr.levels == 256
    first = tr.labels[:100]
    assert len(set(first.tolist())) >= 8, "mnist_5k.csv is sorted by label: the loader must shuffle"
    te = load_images("mnist5k", "test")
    assert len(te) == 500 and len(set(te.labels.tolist())) == 10


@pytest.mark.skipif(not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Debian package dataset-fashion-mnist not installed ({FASHION_DIR})")
def test_fashion_mnist():
    te = load_images("fashion-mnist", "test")
    assert len(te) == 10000 and te.shape == (1, 28, 28)
    assert np.bincount(te.labels.numpy()).tolist() == [1000] * 10


def test_fashion_missing_names_install(monkeypatch, tmp_path):
    import genkit.data.images as im

    monkeypatch.setattr(im, "FASHION_DIR", tmp_path)
    with pytest.raises(ConfigError, match="apt-get install -y dataset-fashion-mnist"):
        load_images("fashion-mnist")


def test_folder_source(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(5):
            Image.fromarray(np.full((12, 12), 40 * i, dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_images(str(tmp_path), "all", image_size=8)
    assert len(d) == 10 and d.shape == (1, 8, 8) and d.num_classes == 2 and d.labels.tolist().count(1) == 5
    assert len(load_images(str(tmp_path), "train")) == 9
    (tmp_path / "cat" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="cannot be read"):
        load_images(str(tmp_path), "all")


def test_unknown_source():
    with pytest.raises(ConfigError, match="digits, mnist5k, fashion-mnist"):
        load_images("cifar")


def test_batch_indices_cover_epochs_deterministically():
    n, b = 10, 4
    seq = torch.cat([batch_indices(n, b, s, seed=3) for s in range(5)])  # 20 rows = 2 epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, b, 3, seed=3), batch_indices(n, b, 3, seed=3))


def test_pad_to_and_crop_to_round_trip():
    from genkit.data.images import crop_to

    d = load_images("digits", "train")
    p = d.padded(12)
    assert p.shape == (1, 12, 12) and p.ints[:, :, :2].sum() == 0 and p.ints[:, :, :, -2:].sum() == 0
    assert torch.equal(crop_to(p.ints, 8), d.ints) and torch.equal(p.labels, d.labels)
    with pytest.raises(ConfigError, match="pad_to"):
        d.padded(11)  # odd margin
