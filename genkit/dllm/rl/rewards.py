"""Rewards of `genkit rl`: a name -> function table; the rollout batch's reward is their weighted sum.

* `task`: genkit's built-in graded tasks (`genkit.dllm.tasks`), scored by `genkit.eval.rewards.grade_reward`
  (the grader's `score` when it gives one, pyfunc: the share of hidden asserts that pass, else 1.0 for a correct
  output). Tasks graded by running code (pyfunc) go through `genkit.eval.sandbox.run_many`, many programs at
  once, memoised (the only RL-specific part: `genkit.eval.rewards.task_rewards` grades one row at a time).
* `code`, `code_format`: DiffuCoder's rewards under their official names (apple/ml-diffucoder
  `src/open_r1/rewards.py`: `code` = `genkit.eval.rewards.code_rewards`, `code_format` = the format reward
  `genkit.eval.rewards.format_rewards`), for rows that carry their asserts in `tests` (or `meta.tests`); with
  `recipes/config_coupled_code.yaml`'s weights {code: 2.0, code_format: 0.5} the sum is
  `genkit.eval.rewards.code_format_reward`. No reward is implemented twice.

Nothing generated runs in the training process: programs run in the sandbox. Grades are memoised per
(program, tests), since rollouts of a small model repeat often.
"""

from __future__ import annotations

from genkit.errors import ConfigError

from ..tasks import get_task, grade_row


def row_tests(row: dict) -> list[str]:
    tests = row.get("tests", (row.get("meta") or {}).get("tests"))
    if not tests:
        raise ConfigError(f"row {row.get('id', '?')}: the code rewards need the problem's asserts in 'tests'")
    return list(tests)


class Grader:
    """Batched, memoised grading of outputs by their row's task (sandboxed tasks run in parallel)."""

    def __init__(self, workers: int = 2, timeout: float | None = None):
        self.workers, self.timeout = workers, timeout
        self.cache: dict = {}

    def sandbox_kw(self) -> dict:
        return {"timeout": self.timeout} if self.timeout else {}

    def grade(self, rows: list[dict], texts: list[str]) -> list[dict]:
        out: list[dict | None] = [None] * len(rows)
        jobs, where = [], {}
        for i, (row, text) in enumerate(zip(rows, texts)):
            task = get_task(str(row["task"])) if row.get("task") else None
            if task is None or task.sandbox_job is None:
                out[i] = grade_row(row, text)
                continue
            key = task.sandbox_job(row, text)
            key = (key[0], tuple(key[1]))
            if key in self.cache:
                out[i] = self.cache[key]
            else:
                where.setdefault(key, []).append(i)
                if len(where[key]) == 1:
                    jobs.append(key)
        if jobs:
            from genkit.eval.sandbox import run_many

            from ..tasks import PYFUNC_TIMEOUT, sandbox_grade

            results = run_many([(p, list(t)) for p, t in jobs], workers=self.workers,
                               timeout=self.timeout or PYFUNC_TIMEOUT)
            for key, res in zip(jobs, results):
                self.cache[key] = sandbox_grade(list(res.passed))
                for i in where[key]:
                    out[i] = self.cache[key]
        return out


def task_reward(rows, texts, grader: Grader) -> list[float]:
    from genkit.eval.rewards import grade_reward

    return [grade_reward(g) for g in grader.grade(rows, texts)]


def code_reward(rows, texts, grader: Grader) -> list[float]:
    from genkit.eval.rewards import code_rewards

    return code_rewards(texts, [row_tests(r) for r in rows], workers=grader.workers, **grader.sandbox_kw())


def code_format_reward(rows, texts, grader: Grader) -> list[float]:
    """The official reward *named* `code_format` (apple/ml-diffucoder `get_code_format_reward`) is the format
    reward alone (1 / 0.5 / 0); the recipe's weights make the total 2.0 x code + 0.5 x format, which is
    `genkit.eval.rewards.code_format_reward`."""
    from genkit.eval.rewards import format_rewards

    return format_rewards(texts)


REWARDS = {"task": task_reward, "code": code_reward, "code_format": code_format_reward}


def check_rewards(weights: dict) -> list[str]:
    bad = sorted(k for k in weights if k not in REWARDS)
    if bad:
        return [f"train.rewards: unknown reward {', '.join(bad)}; choose from {', '.join(REWARDS)}"]
    if not weights:
        return ["train.rewards: give at least one reward, e.g. train.rewards.task=1.0"]
    return []
