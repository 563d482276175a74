import pytest
import torch

from support import run_genkit

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def genkit_cli():
    return run_genkit
