"""DiffuCoder's code rewards (genkit/eval/rewards.py) against values the official apple/ml-diffucoder
``src/open_r1/rewards.py`` produced on the same strings (``get_code_format_reward``/``extract_code`` called
directly; ``code_reward``'s evaluation script run locally in place of the E2B sandbox)."""

import pytest

from genkit.eval import rewards as R

TXT = "Here is the code.\n```python\ndef f(x):\n    return x + 1\n```"
# (completion, official format reward, official extract_code ("" when none))
FORMAT_CASES = [
    (TXT + "\n", 1.0, "def f(x):\n    return x + 1\n"),
    ("```python\ndef f(x):\n    return x + 1\n```\n", 1.0, "def f(x):\n    return x + 1\n"),
    (TXT, 0.0, "def f(x):\n    return x + 1\n"),                       # no newline after the closing fence
    (TXT + "\n\n", 0.0, "def f(x):\n    return x + 1\n"),
    ("Here is the code.\n```python\ndef f(x)\n    return x + 1\n```\n", 0.5, "def f(x)\n    return x + 1\n"),
    (TXT + "\nDone.\n", 0.0, "def f(x):\n    return x + 1\n"),          # prose after the block
    ("```python\na = 1\n```\n```python\nb = 2\n```\n", 0.0, "a = 1\n"),  # two blocks
    ("Use ``` fences.\n```python\na = 1\n```\n", 0.0, "a = 1\n"),       # a fence in the prose
    ("```py\na = 1\n```\n", 0.0, ""),
    ("no code at all\n", 0.0, ""),
    ("```python\n```\n", 1.0, ""),                                       # an empty block parses
    ("Text\n```python\n   \n  x = 1\n```\n", 1.0, "   \n  x = 1\n"),      # parsed after strip()
    ("Text\n```python\nx = 1 ``` y\n```\n", 0.0, "x = 1 "),
    ("Text\n```python\nx = '\x00'\n```\n", 0.5, "x = '\x00'\n"),
    ("Text\r\n```python\r\nx = 1\r\n```\n", 0.0, ""),
]


@pytest.mark.parametrize("completion,fmt,code", FORMAT_CASES)
def test_format_and_extract_match_official(completion, fmt, code):
    assert R.format_reward(completion) == fmt
    assert (R.extract_code(completion) or "") == code
    assert R.format_rewards([completion]) == [fmt]


def test_hostile_text_does_not_crash_the_format_check():
    deep = "```python\nx = " + "(" * 200000 + "\n```\n"
    assert R.format_reward(deep) == 0.5


SUM = "Let me implement a function to calculate the sum of a list.\n```python\n{}\n```\n"
TESTS4 = ["assert sum_list([1, 2, 3]) == 6", "assert sum_list([]) == 0", "assert sum_list([-1, 1]) == 0",
          "assert sum_list([5]) == 5"]
# (completion, tests, official code reward); the four first are the official tests/test_code_reward.py cases
CODE_CASES = {
    "correct": (SUM.format("def sum_list(numbers):\n    return sum(numbers)"), TESTS4, 1.0),
    "invalid_syntax": (SUM.format("def sum_list(numbers)\n    return sum(numbers)  # Missing colon"), TESTS4[:2], 0.0),
    "incorrect_format": ("Let me implement a function to calculate the sum of a list.\n```python\n"
                         "def sum_list(numbers):\n    return sum(numbers)\n\n", TESTS4[:2], 0.0),
    "multiple_blocks": ("Let me.\n```python\n# First attempt\ndef sum_list(numbers):\n    return 0\n```\n```python\n"
                        "# Final solution\ndef sum_list(numbers):\n    return sum(numbers)\n```\n", TESTS4[:2], 0.0),
    "partial": (SUM.format("def sum_list(numbers):\n    return sum(numbers) if numbers else 1"), TESTS4, 0.75),
    "one_of_three": (SUM.format("def sum_list(numbers):\n    return 6"), TESTS4[:2] + TESTS4[3:], 1 / 3),
    "bad_test_syntax": (SUM.format("def sum_list(numbers):\n    return sum(numbers)"),
                        ["assert sum_list([1]) == 1", "assert sum_list([1] == 1"], 0.5),
    "indent_after_strip": ("Code:\n```python\n  x = 1\n```\n", ["assert x == 1"], 0.0),
    "main_block": (SUM.format("def sum_list(numbers):\n    return sum(numbers)\nif __name__ == '__main__':\n"
                              "    assert sum_list([2]) == 3"), ["assert sum_list([1]) == 1"], 0.0),
}


def test_code_rewards_match_official():
    names = list(CODE_CASES)
    comps = [CODE_CASES[n][0] for n in names]
    tests = [CODE_CASES[n][1] for n in names]
    got = R.code_rewards(comps, tests, workers=2)
    assert dict(zip(names, got)) == pytest.approx({n: CODE_CASES[n][2] for n in names})
    total = R.code_format_rewards(comps, tests, workers=2)
    want = [2.0 * CODE_CASES[n][2] + 0.5 * R.format_reward(CODE_CASES[n][0]) for n in names]
    assert total == pytest.approx(want)
    assert total[0] == 2.5 and total[1] == 0.25  # correct: 2.0 + 0.5; syntax error: 0.5 * 0.5
    c, t, want = CODE_CASES["partial"]
    assert R.code_reward(c, t) == 0.75 and R.code_format_reward(c, t) == pytest.approx(2.0 * 0.75 + 0.5)


def test_early_exit_exploit_scores_zero_unlike_the_official_sandbox():
    # official: 1.0 (each case runs `python3 -c code+case` and sys.exit(0) gives exit code 0)
    c = SUM.format("import sys\ndef sum_list(numbers):\n    return 0\nsys.exit(0)")
    assert R.code_reward(c, TESTS4[:2]) == 0.0
    c = SUM.format("import os\ndef sum_list(numbers):\n    return 0\nos._exit(0)")
    assert R.code_reward(c, TESTS4[:2]) == 0.0


def test_timeout_scores_zero_as_official():
    # a hanging case aborts the official evaluation script before it prints its pass rate -> 0.0
    c = SUM.format("def sum_list(numbers):\n    while not numbers:\n        pass\n    return sum(numbers)")
    assert R.code_reward(c, TESTS4, timeout=1.0) == 0.0
    assert R.code_format_reward(c, TESTS4, timeout=1.0) == 0.5


def test_task_reward_uses_the_task_grader():
    from genkit.dllm.tasks import make_task_data

    row = make_task_data("add", 1, 1, seed=0, min_digits=3, max_digits=3)[1][0]
    a, b = int(row["meta"]["a"]), int(row["meta"]["b"])
    assert R.task_rewards([f" {a + b}", str(a + b + 1), "garbage"], [row] * 3) == [1.0, 0.0, 0.0]
    assert R.task_reward(str(a + b), {"answer": str(a + b)}) == 1.0  # no task: exact match on `answer`
