"""Test configuration. Without a GPU, Triton kernels run in the numpy interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported; the kernels then accept CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

