"""DiffuCoder's code rewards (Gong et al., arXiv 2506.20639, Sec. 5 / App.; official code apple/ml-diffucoder
``src/open_r1/rewards.py``: ``get_code_format_reward``, ``extract_code``, ``code_reward``), run through
genkit's sandbox instead of the official remote E2B sandbox.

Official rules, as the code has them (not all are in the paper):

* format (``get_code_format_reward(language="python")``): the completion must *fully* match
  ``^ (no ``` )*? ```python\\n (no ``` )*? ```\\n$``, i.e. prose without a fence, then exactly one
  ```` ```python ```` block, and the text ends with the closing fence *and a newline* (a completion that
  ends in ```` ``` ```` without the newline scores 0).  If it matches, the first block's code, stripped,
  is parsed: 1.0 if ``ast.parse`` accepts it, 0.5 on a syntax error (genkit also counts the other parse
  failures of hostile text, null bytes / too deep nesting, as syntax errors instead of crashing).
* code (``code_reward``): 0 unless format == 1; else the share of the problem's test cases that pass, each
  case run as ``python3 -c f"{code}\\n{case}"`` with ``code`` the unstripped first block
  (``extract_code``).  A test case that times out aborts the official evaluation script before it prints
  its pass rate, which the provider turns into 0.0: genkit scores a sandbox ``timeout`` (and an
  ``output-limit`` kill) as 0 too.  Unlike the official sandbox, a program that exits early
  (``os._exit(0)``) does not pass the tests it skipped.
* total (``recipes/config_coupled_code.yaml``: ``reward_funcs: [code, code_format]``,
  ``reward_weights: [2.0, 0.5]``, summed by TRL): ``2.0 * code + 0.5 * format``, in [0, 2.5].
"""

from __future__ import annotations

import ast
import re
from typing import Sequence

from genkit.eval.sandbox import SandboxResult, run_many, run_tests

CODE_WEIGHT = 2.0    # recipes/config_coupled_code.yaml reward_weights[0] (reward "code")
FORMAT_WEIGHT = 0.5  # reward_weights[1] (reward "code_format")

# prose without a fence, one ```python block without a fence inside, closing fence + "\n" at the very end
_FORMAT = re.compile(r"^(?:(?!```)[\s\S])*?```python\n(?:(?!```)[\s\S])*?```\n$", re.DOTALL)
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str | None:
    """The first ```` ```python ```` block's code, unstripped (official ``extract_code``), or None without one
    (the official function returns "")."""
    m = _BLOCK.search(completion)
    return m.group(1) if m else None


def format_reward(completion: str) -> float:
    """1.0 for prose + exactly one python block that ends the text (with its newline) and parses, 0.5 when
    that block has a syntax error, 0.0 otherwise (official ``get_code_format_reward``)."""
    if not _FORMAT.fullmatch(completion):
        return 0.0
    code = extract_code(completion)
    if code is None:
        return 0.0
    try:
        ast.parse(code.strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return 0.5
    return 1.0


def _score(result: SandboxResult) -> float:
    if result.status in ("timeout", "output-limit", "sandbox-error"):
        return 0.0
    return result.pass_rate


def code_reward(completion: str, tests: Sequence[str], **sandbox_kw) -> float:
    """Share of `tests` (assert snippets) the completion's code passes in the sandbox; 0 unless
    :func:`format_reward` is 1 (official ``code_reward``).  ``sandbox_kw``: ``timeout`` and limits of
    :func:`genkit.eval.sandbox.run_tests`."""
    if format_reward(completion) < 1.0 or not tests:
        return 0.0
    return _score(run_tests(extract_code(completion), list(tests), **sandbox_kw))


def code_format_reward(completion: str, tests: Sequence[str], **sandbox_kw) -> float:
    """DiffuCoder's coupled-GRPO reward: 2.0 * code + 0.5 * format."""
    return CODE_WEIGHT * code_reward(completion, tests, **sandbox_kw) + FORMAT_WEIGHT * format_reward(completion)


# ------------------------------------------------------------------------------------------------------
# Batched versions: one sandbox run per well-formatted completion, `workers` at a time
# ------------------------------------------------------------------------------------------------------
def format_rewards(completions: Sequence[str]) -> list[float]:
    return [format_reward(c) for c in completions]


def code_rewards(completions: Sequence[str], tests: Sequence[Sequence[str]], *, workers: int = 2,
                 **sandbox_kw) -> list[float]:
    """:func:`code_reward` of each (completion, its tests) pair; only format == 1 completions are run."""
    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions but {len(tests)} test lists")
    fmt = format_rewards(completions)
    idx = [i for i, f in enumerate(fmt) if f >= 1.0 and len(tests[i])]
    out = [0.0] * len(completions)
    results = run_many([(extract_code(completions[i]), list(tests[i])) for i in idx], workers=workers, **sandbox_kw)
    for i, r in zip(idx, results):
        out[i] = _score(r)
    return out


def code_format_rewards(completions: Sequence[str], tests: Sequence[Sequence[str]], *, workers: int = 2,
                        **sandbox_kw) -> list[float]:
    """2.0 * code + 0.5 * format for each completion (the official reward_weights)."""
    code = code_rewards(completions, tests, workers=workers, **sandbox_kw)
    return [CODE_WEIGHT * c + FORMAT_WEIGHT * f for c, f in zip(code, format_rewards(completions))]


# ------------------------------------------------------------------------------------------------------
# genkit's built-in graded tasks (genkit/dllm/tasks.py): the task's own grader
# ------------------------------------------------------------------------------------------------------
def task_reward(completion: str, row: dict, grader: str = "auto") -> float:
    """Reward of one output on a built-in task row: the grader's ``score`` when it gives one (reasoning-gym
    scorers), else 1.0 if correct, 0.0 otherwise (genkit.dllm.tasks.grade_row)."""
    from genkit.dllm.tasks import grade_row

    return grade_reward(grade_row(row, completion, grader))


def grade_reward(grade: dict) -> float:
    """A task grade as a reward: its ``score`` when it has one, else 1.0 if ``correct``, 0.0 otherwise."""
    if grade.get("score") is not None:
        return float(grade["score"])
    return 1.0 if grade.get("correct") else 0.0


def task_rewards(completions: Sequence[str], rows: Sequence[dict], grader: str = "auto") -> list[float]:
    return [task_reward(c, r, grader) for c, r in zip(completions, rows, strict=True)]
