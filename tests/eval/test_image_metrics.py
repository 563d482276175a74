"""Offline image metrics: Frechet distance against its closed form, unbiased KID, k-NN precision/recall,
class statistics, the shipped classifiers, samples.npz loading and the eval commands' errors."""

import json
import math

import numpy as np
import pytest
import torch

from genkit.errors import ConfigError
from genkit.eval.image_metrics import (
    class_statistics,
    evaluate_images,
    feature_stats,
    frechet_distance,
    gaussian_frechet_distance,
    kernel_inception_distance,
    load_samples,
    mmd2_unbiased,
    polynomial_kernel,
    precision_recall,
)

torch.set_num_threads(1)


def gaussian(n, mu, cov, seed):
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64))
    return torch.as_tensor(mu, dtype=torch.float64) + torch.randn(n, len(mu), generator=g, dtype=torch.float64) @ chol.T


def random_spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64)


def test_fd_of_a_set_with_itself_is_zero():
    f = gaussian(500, torch.zeros(16), random_spd(16, 0), seed=1)
    assert frechet_distance(f, f) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(f, f + 1.0) == pytest.approx(16.0, rel=1e-8)  # a pure shift: |mu1 - mu2|^2


def test_fd_matches_closed_form():
    # commuting (diagonal) covariances: FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.0])
    a, b = torch.tensor([1.0, 4.0, 9.0]), torch.tensor([4.0, 1.0, 9.0])
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())  # 5 + 1 + 1 = 7
    assert gaussian_frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected, rel=1e-10)
    # general SPD covariances: tr(S1 + S2 - 2 sqrtm(S1 S2)) via scipy's sqrtm
    scipy_linalg = pytest.importorskip("scipy.linalg")
    s1, s2 = random_spd(8, 1), random_spd(8, 2)
    m1, m2 = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    covmean = scipy_linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    ref = float((m1 - m2).pow(2).sum() + s1.trace() + s2.trace()) - 2 * np.trace(covmean)
    assert gaussian_frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-8)
    # and the sample estimate converges to it
    f1, f2 = gaussian(40_000, m1, s1, seed=3), gaussian(40_000, m2, s2, seed=4)
    assert frechet_distance(f1, f2) == pytest.approx(ref, rel=0.05)
    _, cov = feature_stats(f1)
    assert torch.allclose(cov, torch.from_numpy(np.cov(f1.numpy(), rowvar=False)))


def test_kid_unbiased_estimator():
    x, y = torch.randn(7, 5, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64) + 0.3
    k = lambda a, b: (a @ b.T / 5 + 1) ** 3  # the Binkowski et al. kernel
    brute = (sum(k(x[i : i + 1], x[j : j + 1]).item() for i in range(7) for j in range(7) if i != j) / 42
             + sum(k(y[i : i + 1], y[j : j + 1]).item() for i in range(9) for j in range(9) if i != j) / 72
             - 2 * k(x, y).mean().item())
    assert mmd2_unbiased(x, y) == pytest.approx(brute, rel=1e-10)
    assert torch.allclose(polynomial_kernel(x, y), k(x, y))
    # unbiased: averaged over many draws from one distribution it is ~0 (the biased V-statistic is > 0)
    vals = [mmd2_unbiased(torch.randn(30, 8, generator=torch.Generator().manual_seed(2 * s), dtype=torch.float64),
                          torch.randn(30, 8, generator=torch.Generator().manual_seed(2 * s + 1), dtype=torch.float64))
            for s in range(300)]
    v = torch.tensor(vals)
    assert abs(v.mean()) < 3 * v.std() / math.sqrt(len(v))
    same = kernel_inception_distance(gaussian(2000, torch.zeros(8), torch.eye(8), 5),
                                     gaussian(2000, torch.zeros(8), torch.eye(8), 6), subsets=20, subset_size=500)
    other = kernel_inception_distance(gaussian(2000, torch.zeros(8), torch.eye(8), 5),
                                      gaussian(2000, torch.full((8,), 0.5), torch.eye(8), 6), subsets=20, subset_size=500)
    assert abs(same[0]) < 0.01 and other[0] > 20 * abs(same[0]) + 0.05


def test_precision_recall():
    f = gaussian(300, torch.zeros(4), torch.eye(4), seed=0)
    assert precision_recall(f, f, k=3) == (1.0, 1.0)
    assert precision_recall(f, f + 100.0, k=3) == (0.0, 0.0)
    # generated set covering only half of the real one: high precision, recall about one half
    p, r = precision_recall(f, f[f[:, 0] > 0], k=3)
    assert p == 1.0 and 0.45 < r < 0.85  # balls near the cut reach a little across it
    with pytest.raises(ConfigError):
        precision_recall(f[:3], f[:3], k=3)


def test_class_statistics():
    logits = torch.eye(4).repeat(5, 1) * 10  # 20 samples, 5 of each class
    st = class_statistics(logits, torch.arange(4).repeat(5))
    assert st["accuracy"] == 1.0 and st["label_entropy"] == pytest.approx(math.log(4))
    assert st["label_entropy_ratio"] == pytest.approx(1.0) and st["class_counts"] == [5, 5, 5, 5]
    collapsed = class_statistics(torch.eye(4)[[0] * 20] * 10, torch.arange(4).repeat(5))
    assert collapsed["label_entropy"] == 0.0 and collapsed["accuracy"] == 0.25


def test_shipped_digits_classifier_accuracy_and_real_data_scores():
    from genkit.data.images import load_images
    from genkit.eval.features import classifier_outputs, load_classifier

    test = load_images("digits", "test")
    clf = load_classifier("digits")
    _, logits = classifier_outputs(clf, test.to_unit())
    acc = float((logits.argmax(1) == test.labels).float().mean())
    assert acc > 0.9
    res = evaluate_images(test.to_unit(), "digits", labels=test.labels, metrics=("fd", "precision-recall", "classify"))
    noise = evaluate_images(torch.rand(297, 1, 8, 8) * 2 - 1, "digits", metrics=("fd",))
    assert res["acc-digits"] == pytest.approx(acc) and res["label_entropy_ratio-digits"] > 0.95
    assert res["fd-digits"] < noise["fd-digits"] / 10
    assert res["precision-digits"] > 0.8 and res["recall-digits"] > 0.8
    with pytest.raises(ConfigError, match="expects"):
        evaluate_images(torch.zeros(4, 1, 28, 28), "digits")


def test_load_samples(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_samples(tmp_path / "missing.npz")
    np.savez(tmp_path / "samples.npz", images=np.zeros((3, 8, 8, 1), dtype=np.uint8), labels=np.arange(3))
    x, y = load_samples(tmp_path)  # a folder holding samples.npz, channel-last uint8
    assert x.shape == (3, 1, 8, 8) and float(x.max()) == -1.0 and y.tolist() == [0, 1, 2]
    np.savez(tmp_path / "bad.npz", images=np.full((3, 1, 8, 8), 5.0))
    with pytest.raises(ConfigError, match=r"\[-1, 1\]"):
        load_samples(tmp_path / "bad.npz")
    np.savez(tmp_path / "nokey.npz", x=np.zeros(3))
    with pytest.raises(ConfigError, match="no 'images'"):
        load_samples(tmp_path / "nokey.npz")


def test_eval_commands(tmp_path, capsys):
    from genkit.cli import main  # in-process: a subprocess per call costs seconds of imports

    for metric in ("fd", "kid", "precision-recall", "classify"):
        assert main(["eval", metric, "--samples", str(tmp_path / "nope.npz"), "--ref", "digits"]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1
        assert "samples file" in err and "does not exist" in err
    from genkit.data.images import load_images

    d = load_images("digits", "test")
    np.savez(tmp_path / "samples.npz", images=d.to_unit()[:100].numpy(), labels=d.labels[:100].numpy())
    assert main(["eval", "fd", "--samples", str(tmp_path), "--ref", "digits", "--out", str(tmp_path / "res")]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["metric"] == "fd" and res["fd-digits"] >= 0 and "fid" not in res
    assert json.loads((tmp_path / "res" / "fd.json").read_text()) == res
    assert main(["eval", "classify", "--samples", str(tmp_path), "--ref", "digits"]) == 0
    assert json.loads(capsys.readouterr().out)["acc-digits"] > 0.9
    assert main(["eval", "fd", "--samples", str(tmp_path), "--ref", "digits", "--inception-weights",
                 str(tmp_path / "nope.pth")]) == 2
    assert "--inception-weights" in capsys.readouterr().err
    assert main(["eval", "kid", "--samples", str(tmp_path), "--ref", "cifar10"]) == 2
    assert "no shipped classifier" in capsys.readouterr().err


def test_inception_path_plumbing(tmp_path, monkeypatch):
    """--inception-weights: never downloads, a clear error without the package, and uint8 RGB inputs."""
    import sys
    import types

    from genkit.eval.features import inception_features, load_inception

    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"x")
    for name in ("torch_fidelity", "torch_fidelity.feature_extractor_inceptionv3", "torchmetrics",
                 "torchmetrics.image", "torchmetrics.image.fid"):
        monkeypatch.setitem(sys.modules, name, None)  # import -> ImportError
    with pytest.raises(ConfigError, match="needs torch-fidelity"):
        load_inception(weights)
    seen = {}

    class FakeInception:  # torch-fidelity's FeatureExtractorInceptionV3 interface
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            seen["args"] = (name, features_list, feature_extractor_weights_path)

        def __call__(self, x):
            seen["dtype"], seen["shape"] = x.dtype, tuple(x.shape)
            return (x.float().flatten(1)[:, :4],)

    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = FakeInception
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    model = load_inception(weights)
    assert seen["args"] == ("inception-v3-compat", ["2048"], str(weights))
    f = inception_features(model, torch.ones(5, 1, 8, 8))
    assert seen["dtype"] == torch.uint8 and seen["shape"] == (5, 3, 8, 8) and f.dtype == torch.float64
    assert float(f.max()) == 255.0
    with pytest.raises(ConfigError, match="does not exist"):
        load_inception(tmp_path / "missing.pth")


@pytest.mark.parametrize("source", ["digits", "mnist5k", "fashion-mnist"])
def test_shipped_classifiers_are_small_and_accurate(source):
    from genkit.eval.features import asset_path, classifier_info, load_classifier, metric_name

    path = asset_path(source)
    assert path.is_file() and path.stat().st_size < 400_000
    info = classifier_info(source)  # figures stored by benchmarks/train_classifiers.py
    assert info["source"] == source and info["test_accuracy"] > 0.88
    clf = load_classifier(source)
    assert clf.config.source == source and metric_name("fd", source) in ("fd-digits", "fd-mnist", "fd-fmnist")
    if source == "mnist5k":  # 500 real test images: recheck the stored accuracy
        from genkit.data.images import load_images

        test = load_images(source, "test")
        acc = float((clf(test.to_unit()).argmax(1) == test.labels).float().mean())
        assert acc == pytest.approx(info["test_accuracy"], abs=1e-3) and acc > 0.95
