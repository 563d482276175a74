"""Reinforcement learning for masked diffusion LMs: DiffuCoder's coupled-GRPO (`genkit rl`)."""

from .coupled_grpo import (METHODS, CoupledGRPOLoss, MaskDraw, completion_mask, draw_masks, group_advantages,
                           masked_inputs, per_token_logps)

__all__ = ["METHODS", "CoupledGRPOLoss", "MaskDraw", "completion_mask", "draw_masks", "group_advantages",
           "masked_inputs", "per_token_logps"]
