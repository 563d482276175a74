"""Small helpers shared by the training loops (learning-rate schedule, batch checks)."""

from __future__ import annotations

import math


def warmup_cosine_lr(step: int, *, lr: float, min_lr: float, warmup_steps: int, steps: int) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    frac = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, frac)))


def batch_problems(batch_size: int, grad_accum: int, key: str = "train.batch_size") -> list[str]:
    """The global batch must split evenly into the accumulation micro-batches."""
    if batch_size % grad_accum:
        return [f"{key}: {batch_size} is not divisible by runtime.grad_accum {grad_accum}"]
    return []
