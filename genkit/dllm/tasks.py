"""Built-in tasks for tiny masked diffusion LMs: generators of `{"prompt", "answer"}` JSONL with a grader.

A task row is `{"id", "task", "prompt", "answer", "meta"}`; `meta` holds what the grader needs (the puzzle,
the reasoning-gym entry), so a test file is self-contained: `genkit decode --data test.jsonl` grades it.

* `sudoku`: one 4x4 Sudoku; the prompt is the 16 cells row-major with `.` for blanks, the answer the full
  16-digit grid (the 16-token task of WINO's Sudoku setting, here with our own puzzles).
* `sudoku-pack`: `puzzles` 4x4 Sudokus with `min_blanks`..`max_blanks` blanks each (defaults 7 and 9-12),
  prompt = the puzzles joined by `|`; the answer holds only the blanks' digits, in one of two layouts:
  `blanks` (default): the blank digits of each puzzle, row-major, the puzzles joined by `|` (69-90
  tokens), so the model must count blanks to know which cell an answer token fills; `grid`: every puzzle as
  its 16 cells with `_` for a given (118 tokens), so each answer cell sits at a fixed offset from its
  prompt cell, which a tiny model learns in far fewer steps (the benchmark's choice; still no given digit
  in the answer). Few givens leave many puzzles with several
  solutions, so cells decoded in parallel can clash; grading is by validity (givens kept, every row, column
  and 2x2 box a permutation of 1-4), not by equality with the generating grid.
* Both Sudoku tasks hold out solution grids: the 288 valid 4x4 grids are split once (`holdout_seed`) and
  test puzzles come only from held-out grids, so a model cannot pass the test by memorising grids.
* `add` (3-40 digits) and `long-add` (20-40 digits): `a+b=` with both operands right-aligned in a field of
  `max_digits` characters (spaces on the left), digits most significant first; the answer is the sum
  right-aligned in `max_digits + 1` characters. The fixed layout puts digit i of a, b and the sum at fixed
  relative offsets, so what is left to learn is the carry, whose chains make parallel decoding hard.
* reasoning-gym tasks (`basic_arithmetic`, `countdown`, or `rg:<name>` for any of its generators), graded by
  the dataset's own `score_answer` (correct = score 1.0); needs `pip install reasoning-gym==0.1.25`.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass

from genkit.errors import ConfigError

# ------------------------------------------------------------------------------------------- sudoku
BOXES = [[(r, c) for r in range(br, br + 2) for c in range(bc, bc + 2)] for br in (0, 2) for bc in (0, 2)]


@functools.lru_cache(maxsize=1)
def _grids() -> tuple[str, ...]:
    rows = ["".join(p) for p in itertools.permutations("1234")]
    out = []

    def extend(g: str):
        if len(g) == 16:
            if grid_valid(g):
                out.append(g)
            return
        for r in rows:  # a row may not repeat a digit of the column above it
            if all(r[c] not in g[c::4] for c in range(4)):
                extend(g + r)

    extend("")
    return tuple(out)


def all_grids() -> list[str]:
    """The 288 valid 4x4 Sudoku grids as 16-character strings, in lexicographic order."""
    return list(_grids())


def grid_valid(g: str) -> bool:
    """Every row, column and 2x2 box holds 1, 2, 3, 4 once."""
    if len(g) != 16 or set(g) - set("1234"):
        return False
    full = set("1234")
    for i in range(4):
        if set(g[4 * i:4 * i + 4]) != full or set(g[i::4]) != full:
            return False
    return all({g[4 * r + c] for r, c in box} == full for box in BOXES)


def grid_split(holdout: int = 48, seed: int = 1234) -> tuple[list[str], list[str]]:
    """(train grids, held-out test grids): a fixed split of the 288 grids."""
    grids = all_grids()
    rng = random.Random(seed)
    rng.shuffle(grids)
    return sorted(grids[holdout:]), sorted(grids[:holdout])


def make_puzzle(grid: str, blanks: int, rng: random.Random) -> str:
    cells = rng.sample(range(16), blanks)
    return "".join("." if i in cells else ch for i, ch in enumerate(grid))


def count_solutions(puzzle: str, grids) -> int:
    """How many of `grids` (a list of strings or `grid_array(grids)`) agree with the puzzle's givens."""
    import numpy as np

    arr = grids if isinstance(grids, np.ndarray) else grid_array(grids)
    given = np.array([c != "." for c in puzzle])
    digits = np.array([int(c) if c != "." else 0 for c in puzzle])
    return int(((arr == digits) | ~given).all(axis=1).sum())


def grid_array(grids: list[str]):
    import numpy as np

    return np.array([[int(c) for c in g] for g in grids], dtype=np.int8)  # (n, 16)


def fill_valid(puzzle: str, digits: str) -> bool:
    """True when `digits` fill the blanks of `puzzle` (row-major) into a valid grid; givens are kept."""
    if len(digits) != puzzle.count("."):
        return False
    it = iter(digits)
    return grid_valid("".join(next(it) if p == "." else p for p in puzzle))


def _sudoku(n_train, n_test, seed, *, min_blanks=9, max_blanks=12, holdout=48, holdout_seed=1234):
    tr_grids, te_grids = grid_split(holdout, holdout_seed)
    everything = grid_array(tr_grids + te_grids)

    def rows(n, grids, rng, split):
        out = []
        for i in range(n):
            grid = rng.choice(grids)
            puzzle = make_puzzle(grid, rng.randint(min_blanks, max_blanks), rng)
            out.append({"id": f"{split}-{i}", "task": "sudoku", "prompt": puzzle, "answer": grid,
                        "meta": {"puzzle": puzzle}})
            if split == "test":  # how many valid grids fit the givens (analysis only)
                out[-1]["meta"]["solutions"] = count_solutions(puzzle, everything)
        return out

    return rows(n_train, tr_grids, random.Random(seed), "train"), rows(n_test, te_grids, random.Random(seed + 1),
                                                                        "test")


def _grade_sudoku(row: dict, output: str) -> dict:
    puzzle = row["meta"]["puzzle"]
    out = output.strip()
    ok = len(out) == 16 and all(p == "." or p == o for p, o in zip(puzzle, out)) and grid_valid(out)
    return {"correct": ok}


def pack_answer(puzzle: str, grid: str, layout: str) -> str:
    """One puzzle's part of a packed answer: its blank digits (`blanks`), or its 16 cells with `_` for the
    givens (`grid`: each answer cell at a fixed offset from its prompt cell)."""
    if layout == "grid":
        return "".join(g if c == "." else "_" for g, c in zip(grid, puzzle))
    return "".join(g for g, c in zip(grid, puzzle) if c == ".")


def unpack_digits(puzzle: str, part: str, layout: str) -> str | None:
    """The blank digits of one puzzle from its part of a packed answer (None when the part is malformed)."""
    if layout == "grid":
        if len(part) != 16 or any((c == ".") == (o == "_") for c, o in zip(puzzle, part)):
            return None
        return "".join(o for c, o in zip(puzzle, part) if c == ".")
    return part


def _sudoku_pack(n_train, n_test, seed, *, puzzles=7, min_blanks=9, max_blanks=12, layout="blanks", holdout=48,
                 holdout_seed=1234):
    if layout not in ("blanks", "grid"):
        raise ConfigError(f"sudoku-pack: layout={layout!r} is not blanks or grid")
    tr_grids, te_grids = grid_split(holdout, holdout_seed)
    everything = grid_array(tr_grids + te_grids)

    def rows(n, grids, rng, split):
        out = []
        for i in range(n):
            ps, ans, sols = [], [], []
            for _ in range(puzzles):
                grid = rng.choice(grids)
                p = make_puzzle(grid, rng.randint(min_blanks, max_blanks), rng)
                ps.append(p)
                ans.append(pack_answer(p, grid, layout))
                if split == "test":  # how many valid grids fit the givens (analysis only)
                    sols.append(count_solutions(p, everything))
            out.append({"id": f"{split}-{i}", "task": "sudoku-pack", "prompt": "|".join(ps), "answer": "|".join(ans),
                        "meta": {"puzzles": ps, "layout": layout, **({"solutions": sols} if sols else {})}})
        return out

    return rows(n_train, tr_grids, random.Random(seed), "train"), rows(n_test, te_grids, random.Random(seed + 1),
                                                                        "test")


def _grade_sudoku_pack(row: dict, output: str) -> dict:
    puzzles, layout = row["meta"]["puzzles"], row["meta"].get("layout", "blanks")
    parts = output.strip().split("|")
    valid = []
    for p, part in zip(puzzles, parts):
        digits = unpack_digits(p, part, layout)
        valid.append(digits is not None and fill_valid(p, digits))
    valid += [False] * (len(puzzles) - len(valid))
    ok = len(parts) == len(puzzles) and all(valid)
    return {"correct": ok, "puzzles_valid": sum(valid) / len(puzzles)}


# ------------------------------------------------------------------------------------------- addition
def _add(n_train, n_test, seed, *, min_digits=3, max_digits=40, task="add"):
    if not 1 <= min_digits <= max_digits:
        raise ConfigError(f"{task}: need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    W = max_digits

    def number(rng):
        d = rng.randint(min_digits, max_digits)
        return rng.randint(10 ** (d - 1) if d > 1 else 0, 10 ** d - 1)

    def rows(n, rng, split, avoid):
        out, seen = [], set()
        while len(out) < n:
            a, b = number(rng), number(rng)
            if (a, b) in avoid or (a, b) in seen:
                continue
            seen.add((a, b))
            out.append({"id": f"{split}-{len(out)}", "task": task, "prompt": f"{a:>{W}}+{b:>{W}}=",
                        "answer": f"{a + b:>{W + 1}}", "meta": {"a": str(a), "b": str(b)}})
        return out, seen

    train, seen = rows(n_train, random.Random(seed), "train", set())
    test, _ = rows(n_test, random.Random(seed + 1), "test", seen)
    return train, test


def _grade_add(row: dict, output: str) -> dict:
    """Exact sum; `digits_correct` = share of the sum's digits right (aligned on the right, for analysis)."""
    want = str(int(row["meta"]["a"]) + int(row["meta"]["b"]))
    got = output.strip()
    right = sum(a == b for a, b in zip(reversed(got), reversed(want)))
    return {"correct": got.isdigit() and int(got) == int(want), "digits_correct": right / len(want)}


# ------------------------------------------------------------------------------------------- reasoning-gym
RG_DEFAULTS = {
    # small enough for a sub-1M-parameter model trained for minutes on a CPU
    "basic_arithmetic": dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2, operators=["+", "-"],
                             allow_parentheses=False, allow_negation=False),
    "countdown": dict(min_numbers=3, max_numbers=3, min_value=1, max_value=20, min_target=10, max_target=100),
}


def _rg():
    try:
        import reasoning_gym
    except ImportError:
        raise ConfigError("reasoning-gym tasks need `pip install reasoning-gym==0.1.25`") from None
    return reasoning_gym


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _reasoning_gym(name):
    def gen(n_train, n_test, seed, **options):
        rg = _rg()
        cfg = {**RG_DEFAULTS.get(name, {}), **options}
        try:
            train_ds = rg.create_dataset(name, size=n_train, seed=seed, **cfg)
            # reasoning-gym draws item i from seed + i, so the test seeds start after the training seeds;
            # questions seen in training are dropped as well
            test_ds = rg.create_dataset(name, size=2 * n_test + 100, seed=seed + n_train + 1_000_003, **cfg)
        except (TypeError, ValueError, KeyError, AssertionError) as e:
            raise ConfigError(f"reasoning-gym {name}: {e}") from None
        train = [{"id": f"train-{i}", "task": f"rg:{name}", "prompt": e["question"], "answer": str(e["answer"]),
                  "meta": {"rg": name, "config": _jsonable(cfg), "entry": _jsonable(e)}}
                 for i, e in enumerate(train_ds)]
        seen = {r["prompt"] for r in train}
        test = []
        for e in test_ds:
            if e["question"] in seen or len(test) >= n_test:
                continue
            seen.add(e["question"])
            test.append({"id": f"test-{len(test)}", "task": f"rg:{name}", "prompt": e["question"],
                         "answer": str(e["answer"]), "meta": {"rg": name, "config": _jsonable(cfg),
                                                              "entry": _jsonable(e)}})
        return train, test
    return gen


_RG_CACHE: dict = {}


def _grade_rg(row: dict, output: str) -> dict:
    meta = row["meta"]
    name = meta["rg"]
    if name not in _RG_CACHE:
        _RG_CACHE[name] = _rg().create_dataset(name, size=1, seed=0, **meta.get("config", {}))
    try:
        score = float(_RG_CACHE[name].score_answer(output.strip(), meta["entry"]))
    except Exception:  # noqa: BLE001 - a scorer that chokes on a garbled output scores it 0
        score = 0.0
    return {"correct": score >= 1.0, "score": score}


# ------------------------------------------------------------------------------------------- pyfunc
PYFUNC_FAMILIES = ("affine", "square", "mod", "maxmin", "abs", "floordiv")


def _signed(c: int) -> str:
    return f"+{c}" if c > 0 else (f"-{-c}" if c < 0 else "")


def pyfunc_function(family: str, rng: random.Random) -> tuple[str, Callable[[int], int]]:
    """A random member of one family: (the expression in canonical form, the function it computes)."""
    if family == "affine":  # a*x+b, a in +-1..3, b in -5..5
        a, b = rng.choice([-3, -2, -1, 1, 2, 3]), rng.randint(-5, 5)
        return {1: "x", -1: "-x"}.get(a, f"{a}*x") + _signed(b), lambda x: a * x + b
    if family == "square":  # x*x+c
        c = rng.randint(-5, 5)
        return "x*x" + _signed(c), lambda x: x * x + c
    if family == "mod":  # Python's modulo: non-negative for a positive divisor
        m = rng.randint(2, 7)
        return f"x%{m}", lambda x: x % m
    if family == "maxmin":
        op, c = rng.choice(["max", "min"]), rng.randint(-5, 5)
        return f"{op}(x,{c})", (lambda x: max(x, c)) if op == "max" else (lambda x: min(x, c))
    if family == "abs":  # abs(x-c)
        c = rng.randint(-5, 5)
        return f"abs(x{_signed(-c)})", lambda x: abs(x - c)
    if family == "floordiv":  # Python's floor division (rounds towards minus infinity)
        d = rng.randint(2, 5)
        return f"x//{d}", lambda x: x // d
    raise ConfigError(f"pyfunc: unknown family {family!r}; choose from {', '.join(PYFUNC_FAMILIES)}")


def _pyfunc(n_train, n_test, seed, *, examples=4, tests=8, x_range=9, test_range=20, families=PYFUNC_FAMILIES):
    bad = [f for f in families if f not in PYFUNC_FAMILIES]
    if bad or not families:
        raise ConfigError(f"pyfunc: families {bad or '[]'} are not in {', '.join(PYFUNC_FAMILIES)}")
    if not 1 <= examples <= 2 * x_range + 1 or not 1 <= tests <= 2 * test_range + 1 - examples:
        raise ConfigError(f"pyfunc: examples={examples} / tests={tests} do not fit x_range={x_range} / "
                          f"test_range={test_range}")

    def rows(n, rng, split, avoid):
        out, seen = [], set()
        while len(out) < n:
            family = rng.choice(list(families))
            expr, fn = pyfunc_function(family, rng)
            xs = rng.sample(range(-x_range, x_range + 1), examples)
            prompt = ";".join(f"f({x})={fn(x)}" for x in xs)
            if prompt in avoid or prompt in seen:
                continue
            seen.add(prompt)
            hidden = rng.sample([x for x in range(-test_range, test_range + 1) if x not in xs], tests)
            out.append({"id": f"{split}-{len(out)}", "task": "pyfunc", "prompt": prompt, "answer": f"return {expr}",
                        "meta": {"family": family, "tests": [f"assert f({x}) == {fn(x)}" for x in hidden]}})
        return out, seen

    train, seen = rows(n_train, random.Random(seed), "train", set())
    test, _ = rows(n_test, random.Random(seed + 1), "test", seen)
    return train, test


PYFUNC_HEADER = "def f(x):\n    "


def pyfunc_job(row: dict, output: str) -> tuple[str, list[str]]:
    """The program and hidden asserts the sandbox runs for one pyfunc output: `def f(x):` + the output line."""
    return PYFUNC_HEADER + output.strip() + "\n", list(row["meta"]["tests"])


def sandbox_grade(passed: list[bool]) -> dict:
    """Grade of a sandboxed program: correct when every hidden assert passes; score = share that pass."""
    return {"correct": bool(passed) and all(passed), "score": sum(passed) / max(1, len(passed))}


def _grade_pyfunc(row: dict, output: str) -> dict:
    from genkit.eval.sandbox import run_tests

    program, tests = pyfunc_job(row, output)
    return sandbox_grade(run_tests(program, tests, timeout=PYFUNC_TIMEOUT).passed)


PYFUNC_TIMEOUT = 2.0  # seconds per program (each one evaluates a one-line expression 8 times)


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Task:
    name: str
    generate: Callable  # (n_train, n_test, seed, **options) -> (train rows, test rows)
    grade: Callable  # (row, output text) -> {"correct": bool, ...}
    doc: str
    # tasks graded by running code: (row, output text) -> (program, tests) for genkit.eval.sandbox, so that
    # many outputs can be run in parallel (`genkit rl`); `grade` runs one through the same sandbox
    sandbox_job: Callable | None = None


TASKS = {
    "sudoku": Task("sudoku", _sudoku, _grade_sudoku, "one 4x4 Sudoku, answer = the 16-cell grid"),
    "sudoku-pack": Task("sudoku-pack", _sudoku_pack, _grade_sudoku_pack,
                        "7 4x4 Sudokus with 9-12 blanks, answer = only the blanks (69-90 tokens)"),
    "add": Task("add", lambda *a, **k: _add(*a, **{"task": "add", **k}), _grade_add,
                "a+b with 3-40-digit operands, right-aligned"),
    "long-add": Task("long-add", lambda *a, **k: _add(*a, **{"min_digits": 20, "task": "long-add", **k}),
                     _grade_add, "a+b with 20-40-digit operands (long carry chains)"),
    "basic_arithmetic": Task("basic_arithmetic", _reasoning_gym("basic_arithmetic"), _grade_rg,
                             "reasoning-gym basic_arithmetic (two terms of 1-2 digits, + and -)"),
    "countdown": Task("countdown", _reasoning_gym("countdown"), _grade_rg, "reasoning-gym countdown (3 numbers)"),
    "pyfunc": Task("pyfunc", _pyfunc, _grade_pyfunc, "a one-line `return <expr>` from 4 input/output examples "
                   "(affine, square, mod, max/min, abs, floordiv), graded by 8 hidden asserts in the sandbox",
                   sandbox_job=pyfunc_job),
}


def get_task(name: str) -> Task:
    """A built-in task, or `rg:<name>` for any reasoning-gym generator."""
    if name in TASKS:
        return TASKS[name]
    if name.startswith("rg:") and len(name) > 3:
        rg_name = name[3:]
        return TASKS.get(rg_name) or Task(name, _reasoning_gym(rg_name), _grade_rg, f"reasoning-gym {rg_name}")
    raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)} or rg:<reasoning-gym name>")


def make_task_data(name: str, n_train: int, n_test: int, seed: int = 0, **options) -> tuple[list[dict], list[dict]]:
    task = get_task(name)
    try:
        return task.generate(n_train, n_test, seed, **options)
    except TypeError as e:
        raise ConfigError(f"task {name}: bad option ({e})") from None


# ------------------------------------------------------------------------------------------- grading
def grade_row(row: dict, output: str, grader: str = "auto") -> dict:
    """Grade one output: by the row's task when it names one, else against `answer` with `grader`.

    grader: auto (task grader, else exact match after stripping), exact, gsm8k (WINO's harness: the last
    \\boxed{} content, else the last number), gsm8k-strict / gsm8k-flexible (lm-eval's regexes).
    Returns {"correct": bool or None (no answer to grade against), "extracted": ..., ...}.
    """
    if grader == "auto" and row.get("task") and row.get("meta") is not None:
        try:
            task = get_task(str(row["task"]))
        except ConfigError:
            task = None
        if task is not None:
            return task.grade(row, output)
    gold = row.get("answer")
    if gold is None:
        return {"correct": None}
    gold = gsm8k_gold(str(gold))
    if grader in ("auto", "exact"):
        return {"correct": output.strip() == gold.strip()}
    if grader == "gsm8k":
        pred = extract_wino_gsm8k(output)
    elif grader == "gsm8k-strict":
        pred = extract_lmeval_strict(output)
    elif grader == "gsm8k-flexible":
        pred = extract_lmeval_flexible(output)
    else:
        raise ConfigError(f"unknown grader {grader!r}; choose auto, exact, gsm8k, gsm8k-strict or gsm8k-flexible")
    return {"correct": numbers_equal(pred, gold), "extracted": pred}


GRADERS = ("auto", "exact", "gsm8k", "gsm8k-strict", "gsm8k-flexible")
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def gsm8k_gold(answer: str) -> str:
    """GSM8K's reference answer is the text after `####`; other answers pass unchanged."""
    return answer.split("####")[-1].strip() if "####" in answer else answer


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}`, braces balanced."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def extract_wino_gsm8k(text: str) -> str | None:
    """WINO's GSM8K harness: the answer in the last \\boxed{}, else the last number in the output."""
    boxed = last_boxed(text)
    if boxed is not None:
        nums = _NUM.findall(boxed)
        return nums[-1] if nums else boxed.strip()
    nums = _NUM.findall(text)
    return nums[-1] if nums else None


# lm-eval-harness gsm8k filters: strict-match takes the first "#### <number>"; flexible-extract the last
# match of (-?[$0-9.,]{2,})|(-?[0-9]+) in the output
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEX = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def extract_lmeval_strict(text: str) -> str | None:
    m = _STRICT.search(text)
    return m.group(1) if m else None


def extract_lmeval_flexible(text: str) -> str | None:
    found = _FLEX.findall(text)
    if not found:
        return None
    a, b = found[-1]
    return a or b


def numbers_equal(pred: str | None, gold: str) -> bool:
    """Numeric comparison after removing `,`, `$` and a trailing `.` (lm-eval's regexes_to_ignore)."""
    if pred is None:
        return False

    def norm(s):
        return s.replace(",", "").replace("$", "").strip().rstrip(".")

    p, g = norm(pred), norm(gold)
    try:
        return abs(float(p) - float(g)) < 1e-6
    except ValueError:
        return p == g
