"""Task generators and graders: held-out Sudoku grids, validity grading, addition layout, GSM8K extraction."""

import pytest

from genkit.dllm.tasks import (
    all_grids,
    count_solutions,
    extract_lmeval_flexible,
    extract_lmeval_strict,
    extract_wino_gsm8k,
    fill_valid,
    grade_row,
    grid_split,
    grid_valid,
    make_task_data,
)
from genkit.errors import ConfigError


def test_grids_and_holdout_split():
    grids = all_grids()
    assert len(grids) == 288 and all(grid_valid(g) for g in grids)
    train, test = grid_split()
    assert len(test) == 48 and not set(train) & set(test) and len(train) + len(test) == 288
    assert not grid_valid("1234214334124321")  # rows and columns fine, boxes not


@pytest.mark.parametrize("layout", ["blanks", "grid"])
def test_sudoku_pack_rows(layout):
    train, test = make_task_data("sudoku-pack", 300, 40, seed=3, layout=layout)
    _, held_out = grid_split()
    for r in train + test:
        puzzles = r["meta"]["puzzles"]
        assert r["prompt"] == "|".join(puzzles) and len(puzzles) == 7
        assert all(9 <= p.count(".") <= 12 for p in puzzles)
        assert 64 <= len(r["answer"]) <= 128
        assert set(r["answer"]) <= set("1234|_")
        assert grade_row(r, r["answer"]) == {"correct": True, "puzzles_valid": 1.0}
    if layout == "blanks":
        assert all(set(r["answer"]) <= set("1234|") for r in test)  # only the blanks' digits
    # test puzzles come from held-out grids only: their reference fill is a held-out grid
    for r in test:
        for p, part in zip(r["meta"]["puzzles"], r["answer"].split("|")):
            digits = iter(part if layout == "blanks" else [c for c, q in zip(part, p) if q == "."])
            assert "".join(next(digits) if c == "." else c for c in p) in held_out
    assert any(s > 1 for r in test for s in r["meta"]["solutions"])  # several solutions occur


def test_sudoku_grading_is_by_validity():
    grids = all_grids()
    puzzle = "1..." "...." "...." "...4"  # many solutions
    sols = [g for g in grids if g[0] == "1" and g[15] == "4"]
    assert count_solutions(puzzle, grids) == len(sols) > 2
    a, b = sols[0], sols[1]
    row = {"task": "sudoku-pack", "meta": {"puzzles": [puzzle], "layout": "blanks"}}
    for g in (a, b):  # any valid completion is correct, not only the reference
        digits = "".join(c for c, q in zip(g, puzzle) if q == ".")
        assert grade_row(row, digits)["correct"]
    bad = "".join(c for c, q in zip(a, puzzle) if q == ".")
    bad = ("2" if bad[0] != "2" else "3") + bad[1:]
    assert not grade_row(row, bad)["correct"]
    assert not grade_row(row, "")["correct"] and not grade_row(row, "12|34")["correct"]
    assert not fill_valid(puzzle, a[1:])  # a full grid where only blanks are expected
    single = {"task": "sudoku", "meta": {"puzzle": puzzle}}
    assert grade_row(single, a)["correct"] and grade_row(single, b)["correct"]
    assert not grade_row(single, "2" + a[1:])["correct"]  # a given changed


def test_addition_layout_and_grader():
    train, test = make_task_data("long-add", 200, 50, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for r in train + test:
        a, b = r["prompt"][:-1].split("+")
        assert len(a) == len(b) == 40 and 20 <= len(a.strip()) <= 40 and 20 <= len(b.strip()) <= 40
        assert len(r["answer"]) == 41 and int(r["answer"]) == int(a) + int(b)
        assert grade_row(r, r["answer"])["correct"] and grade_row(r, r["answer"].strip())["correct"]
        assert not grade_row(r, str(int(a) + int(b) + 1))["correct"]
    train, _ = make_task_data("add", 300, 0, seed=1)
    lengths = {len(r["meta"]["a"]) for r in train}
    assert min(lengths) == 3 and max(lengths) == 40
    with pytest.raises(ConfigError, match="min_digits"):
        make_task_data("add", 1, 1, min_digits=5, max_digits=2)


def test_reasoning_gym_task_uses_its_scorer():
    pytest.importorskip("reasoning_gym")
    train, test = make_task_data("basic_arithmetic", 50, 10, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    r = test[0]
    assert grade_row(r, r["answer"]) == {"correct": True, "score": 1.0}
    assert grade_row(r, "garbage")["correct"] is False
    assert grade_row(r, " " + r["answer"] + " ")["correct"]


def test_unknown_task():
    with pytest.raises(ConfigError, match="unknown task 'sudoku9'"):
        make_task_data("sudoku9", 1, 1)


def test_gsm8k_extraction():
    out = "We add 3 and 4 to get 7 apples.\nSo the answer is \\boxed{7}. Then 12 more."
    assert extract_wino_gsm8k(out) == "7"  # \boxed{} wins over the last number
    assert extract_wino_gsm8k("first 3, then 1,250 in total") == "1,250"
    assert extract_wino_gsm8k("no numbers here") is None
    assert extract_wino_gsm8k("\\boxed{\\frac{1}{2}}") == "2"
    assert extract_lmeval_strict("so #### 42\n#### 7") == "42"
    assert extract_lmeval_strict("The answer is 42") is None
    assert extract_lmeval_flexible("cost $1,200 and then 5 more") == "5"
    assert extract_lmeval_flexible("total: $1,200.") == "$1,200."
    row = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}
    assert grade_row(row, "... \\boxed{72}", "gsm8k")["correct"]
    assert grade_row(row, "#### 72", "gsm8k-strict")["correct"]
    assert grade_row(row, "so she sold $72.", "gsm8k-flexible")["correct"]
    assert not grade_row(row, "72 clips, 71 left", "gsm8k")["correct"]
    assert grade_row({"answer": "1,000"}, "\\boxed{1000}", "gsm8k")["correct"]
    with pytest.raises(ConfigError, match="unknown grader"):
        grade_row(row, "x", "bleu")


def test_pyfunc_rows_and_sandbox_grading():
    """pyfunc: 4 examples in the prompt, `return <expr>` answers that pass their own hidden asserts, a test split
    disjoint from training prompts; outputs are graded by running them in the sandbox."""
    from genkit.dllm.tasks import PYFUNC_FAMILIES, pyfunc_job

    train, test = make_task_data("pyfunc", 600, 40, seed=0)
    again, _ = make_task_data("pyfunc", 600, 40, seed=0)
    assert train == again and not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert {r["meta"]["family"] for r in train} == set(PYFUNC_FAMILIES)
    for r in train[:50]:
        assert r["prompt"].count("f(") == 4 and r["answer"].startswith("return ")
        assert len(r["meta"]["tests"]) == 8 and all(t.startswith("assert f(") for t in r["meta"]["tests"])
        shown = dict(p[2:].split(")=") for p in r["prompt"].split(";"))
        assert len(shown) == 4
        program, tests = pyfunc_job(r, r["answer"])
        assert program == f"def f(x):\n    {r['answer']}\n" and tests == r["meta"]["tests"]
    row = next(r for r in test if r["meta"]["family"] == "affine")
    assert grade_row(row, row["answer"]) == {"correct": True, "score": 1.0}
    assert grade_row(row, "return x*0+12345") == {"correct": False, "score": 0.0}
    assert not grade_row(row, "import os\nos._exit(0)")["correct"]  # does not even parse after `def f(x):`
    assert not grade_row(row, "return (__import__('os')._exit(0))")["correct"]  # exits before any marker
    with pytest.raises(ConfigError, match="families"):
        make_task_data("pyfunc", 5, 0, families=["cubic"])
