"""Sample-quality metrics on feature vectors: Frechet distance, KID, precision/recall, class statistics.

All take (N, D) feature matrices (the shipped classifiers' penultimate features, see
``genkit.eval.features``, or Inception pool features) and compute in float64.

- Frechet distance (Heusel et al. 2017, "GANs trained by a two time-scale update rule", Eq. 6):
  ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)``.  The trace of the matrix square root is
  taken from the eigenvalues of the symmetric PSD matrix ``S1^1/2 S2 S1^1/2`` (equal to those of S1 S2),
  which avoids scipy.linalg.sqrtm's complex round-off.  Covariances use the 1/(N-1) normalisation.
- KID (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4): the unbiased MMD^2 estimator with the
  cubic polynomial kernel ``k(x, y) = (x.y / D + 1)^3``, averaged over ``subsets`` random subsets of
  ``subset_size`` rows from each set (the defaults 100 x 1000 of torch-fidelity/TF-GAN), with its std.
- Precision/recall (Kynkaanniemi et al. 2019, "Improved precision and recall metric", Sec. 3): each
  set's manifold is the union of balls centred on its points with radius the distance to the k-th nearest
  other point (k = 3); precision = share of generated points inside the real manifold, recall = share of
  real points inside the generated manifold.
- Class statistics of generated images under the classifier: accuracy against the requested labels
  (conditional samples) and the entropy of the predicted-label histogram (mode coverage; log K when every
  class is produced equally often).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from genkit.errors import ConfigError

METRICS = ("fd", "kid", "precision-recall", "classify")


# ------------------------------------------------------------------------------------------ statistics
def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (D,), covariance (D, D)) in float64 with the 1/(N-1) normalisation."""
    f = feats.double()
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / max(1, f.shape[0] - 1)


def _eigh(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric eigendecomposition; torch's CPU driver can fail (LAPACK error 126) on matrices with many
    repeated eigenvalues (e.g. dead ReLU features), so fall back to NumPy's driver, which does not."""
    s = 0.5 * (s + s.T)
    try:
        return torch.linalg.eigh(s)
    except torch.linalg.LinAlgError:
        import numpy as np

        w, v = np.linalg.eigh(s.cpu().numpy())
        return torch.from_numpy(w).to(s), torch.from_numpy(v).to(s)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    w, v = _eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein^2) distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    s1, s2 = torch.as_tensor(sigma1, dtype=torch.float64), torch.as_tensor(sigma2, dtype=torch.float64)
    r1 = _sqrt_psd(s1)
    m = r1 @ s2 @ r1  # S1^1/2 S2 S1^1/2, symmetric PSD with the eigenvalues of S1 S2
    tr_covmean = _eigh(m)[0].clamp_min(0).sqrt().sum()
    fd = (mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_covmean
    return float(fd.clamp_min(0))


def frechet_distance(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """FD between the Gaussians fitted to two feature sets."""
    return gaussian_frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> torch.Tensor:
    """``(gamma x.y + coef0)^degree`` with gamma = 1/D (Binkowski et al.)."""
    gamma = 1.0 / x.shape[1] if gamma is None else gamma
    return (gamma * x @ y.T + coef0) ** degree


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor, kernel=polynomial_kernel) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Eq. 3): the diagonal terms k(x_i, x_i) are left out."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    sxx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    syy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(sxx + syy - 2 * kxy.mean())


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased polynomial-kernel MMD^2 over random subsets (``subset_size`` is capped
    at the smaller set's size)."""
    real, fake = real.double(), fake.double()
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ConfigError("KID needs at least 2 samples in each set")
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        ir = torch.randperm(real.shape[0], generator=g)[:size]
        jf = torch.randperm(fake.shape[0], generator=g)[:size]
        vals.append(mmd2_unbiased(real[ir], fake[jf]))
    v = torch.tensor(vals, dtype=torch.float64)
    return float(v.mean()), float(v.std()) if len(vals) > 1 else 0.0


def _kth_radii(feats: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each point to its k-th nearest *other* point of the same set."""
    out = []
    for i in range(0, feats.shape[0], chunk):
        d = torch.cdist(feats[i : i + chunk], feats)  # (c, N)
        out.append(d.kthvalue(k + 1, dim=1).values)  # the 1st smallest is the point itself (distance 0)
    return torch.cat(out)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """(P,) bool: point lies in at least one ball (centre_j, radius_j)."""
    out = []
    for i in range(0, points.shape[0], chunk):
        d = torch.cdist(points[i : i + chunk], centres)  # (c, M)
        out.append((d <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds."""
    real, fake = real.double(), fake.double()
    if min(real.shape[0], fake.shape[0]) <= k:
        raise ConfigError(f"precision/recall with k={k} needs more than {k} samples in each set")
    precision = _inside(fake, real, _kth_radii(real, k)).double().mean()
    recall = _inside(real, fake, _kth_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def class_statistics(logits: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
    """Accuracy against ``labels`` (when given), predicted-label entropy (nats) and its ratio to log K,
    the per-class counts and the mean confidence."""
    k = logits.shape[1]
    pred = logits.argmax(1)
    counts = torch.bincount(pred, minlength=k).double()
    p = counts / counts.sum()
    ent = max(0.0, float(-(p[p > 0] * p[p > 0].log()).sum()))
    res = {"label_entropy": ent, "label_entropy_ratio": ent / math.log(k), "class_counts": counts.long().tolist(),
           "mean_confidence": float(logits.softmax(1).max(1).values.mean())}
    if labels is not None:
        res["accuracy"] = float((pred == labels.to(pred.device).long()).double().mean())
    return res


# ------------------------------------------------------------------------------------------ samples I/O
def load_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``samples.npz`` (or a folder holding one) -> (images (N, C, H, W) float32 in [-1, 1], labels or None).

    Key ``images`` in [-1, 1] (uint8 0..255 also accepted); channel-last arrays are transposed; optional
    ``labels`` (N,) integers."""
    p = Path(path)
    if p.is_dir():
        p = p / "samples.npz"
    if not p.is_file():
        raise ConfigError(f"samples file '{p}' does not exist: give a samples.npz (key 'images' in [-1, 1], "
                          "optional 'labels') or the folder holding it (e.g. the --out of genkit sample)")
    try:
        with np.load(p) as z:
            if "images" not in z:
                raise ConfigError(f"'{p}' has no 'images' array (keys: {', '.join(z.files) or 'none'})")
            images = z["images"]
            labels = z["labels"] if "labels" in z else None
    except (OSError, ValueError) as e:
        raise ConfigError(f"'{p}' is not a readable .npz file ({e})") from None
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4:
        raise ConfigError(f"'{p}': images must be (N, C, H, W), got shape {images.shape}")
    if images.shape[1] not in (1, 3) and images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.dtype == torch.uint8:
        x = x.float() / 127.5 - 1
    x = x.float()
    if not torch.isfinite(x).all():
        raise ConfigError(f"'{p}': images hold NaN or inf values")
    if x.min() < -1.01 or x.max() > 1.01:
        raise ConfigError(f"'{p}': images must lie in [-1, 1] (found [{float(x.min()):.3g}, {float(x.max()):.3g}])")
    y = None
    if labels is not None:
        y = torch.from_numpy(np.asarray(labels)).long().reshape(-1)
        if len(y) != len(x):
            raise ConfigError(f"'{p}': {len(y)} labels for {len(x)} images")
    return x.clamp(-1, 1), y


def reference_images(source: str, split: str = "train", split_seed: int = 0) -> torch.Tensor:
    """The real images of a built-in source as bin centres in [-1, 1]."""
    from genkit.data.images import load_images

    return load_images(source, split, seed=split_seed).to_unit()


# ------------------------------------------------------------------------------------------ one call
def evaluate_images(images: torch.Tensor, ref: str, *, labels: torch.Tensor | None = None,
                    metrics=("fd",), split: str = "train", split_seed: int = 0, k: int = 3,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, max_ref_pr: int | None = None,
                    seed: int = 0) -> dict:
    """Score generated ``images`` (N, C, H, W) in [-1, 1] against the real ``split`` of source ``ref``
    with the shipped classifier's features; flat keys named after the source (``fd-digits``, ...).

    Precision/recall subsample the reference to ``max_ref_pr`` rows (default: as many as the samples, as in
    Kynkaanniemi et al.) so both manifolds are built from equally many points."""
    from genkit.eval.features import classifier_outputs, load_classifier, metric_name

    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; valid: {', '.join(METRICS)}")
    clf = load_classifier(ref)
    feats, logits = classifier_outputs(clf, images)
    res: dict = {"n_samples": int(images.shape[0])}
    need_ref = [m for m in metrics if m != "classify"]
    if need_ref:
        real = reference_images(ref, split, split_seed)
        rfeats, _ = classifier_outputs(clf, real)
        res["n_ref"] = int(real.shape[0])
    if "fd" in metrics:
        res[metric_name("fd", ref)] = frechet_distance(rfeats, feats)
    if "kid" in metrics:
        mean, std = kernel_inception_distance(rfeats, feats, subsets=kid_subsets, subset_size=kid_subset_size,
                                              seed=seed)
        res[metric_name("kid", ref)] = mean
        res[metric_name("kid", ref) + "_std"] = std
    if "precision-recall" in metrics:
        n_pr = max_ref_pr or feats.shape[0]
        sub = rfeats
        if rfeats.shape[0] > n_pr:
            sub = rfeats[torch.randperm(rfeats.shape[0], generator=torch.Generator().manual_seed(seed))[:n_pr]]
        p, r = precision_recall(sub, feats, k=k)
        res[metric_name("precision", ref)] = p
        res[metric_name("recall", ref)] = r
        res["n_ref_pr"] = int(sub.shape[0])
    if "classify" in metrics:
        st = class_statistics(logits, labels)
        if "accuracy" in st:
            res[metric_name("acc", ref)] = st.pop("accuracy")
        res.update({metric_name(key, ref): v for key, v in st.items()})
    return res
