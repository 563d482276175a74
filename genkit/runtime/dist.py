"""Process facts (rank, world size, device) without building an Accelerator.

Accelerate's ``PartialState`` reads the launcher's environment (``accelerate launch``, ``torchrun``) and
sets up the process group once; everything in genkit asks here instead of importing Accelerate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ProcessInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def process_info(cpu: bool = False) -> ProcessInfo:
    """Rank/world size/device of this process (initialises the process group when launched)."""
    from accelerate import PartialState

    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    return ProcessInfo(state.process_index, state.num_processes, state.local_process_index, state.device)


def barrier() -> None:
    from accelerate import PartialState

    PartialState().wait_for_everyone()
