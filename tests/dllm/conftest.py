"""Shared fixtures for the dLLM tests: one CPU thread, and tiny randomly initialised LLaDA models."""

import pytest
import torch

from dllm_support import MASK, PAD, build_tiny  # noqa: F401


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls are much faster on one thread of a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny():
    return build_tiny


@pytest.fixture
def prompts():
    return [[1, 5, 9, 12, 7], [3, 4], [8, 8, 2, 40, 41, 42, 43]]  # ragged: left-padded into one batch
