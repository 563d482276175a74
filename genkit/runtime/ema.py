"""Exponential moving average of model weights (kept in float32 on the model's device)."""

from __future__ import annotations

import torch


class EMA:
    """``shadow = decay * shadow + (1 - decay) * param`` after each optimizer step.

    ``half_life_steps`` gives ``decay = 0.5 ** (1 / half_life_steps)`` (EDM / SiD specify EMA by half-life).
    """

    def __init__(self, model: torch.nn.Module, decay: float | None = None, *, half_life_steps: float | None = None):
        if (decay is None) == (half_life_steps is None):
            raise ValueError("give exactly one of decay or half_life_steps")
        self.decay = decay if decay is not None else 0.5 ** (1.0 / half_life_steps)
        self.shadow = {k: v.detach().float().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, v in model.state_dict().items():
            s = self.shadow[k]
            if v.dtype.is_floating_point:
                s.lerp_(v.detach().float(), 1.0 - self.decay)
            else:
                s.copy_(v)

    def state_dict(self) -> dict:
        return dict(self.shadow)

    def load_state_dict(self, sd: dict) -> None:
        for k, v in sd.items():
            self.shadow[k].copy_(v)

    def weights_for(self, model: torch.nn.Module) -> dict:
        """The EMA weights cast to the model's dtypes (for saving a final model folder)."""
        ref = model.state_dict()
        return {k: v.to(ref[k].dtype) for k, v in self.shadow.items()}
