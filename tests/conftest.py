"""Test configuration. Without a GPU, Triton kernels run in the numpy interpreter on CPU tensors.

tests/ is a package (tests/train/, tests/scale/ mirror train/ and train/scale/; their helpers are
imported as tests.train.support and tests.scale.support). The kernel tests of this folder still import
their helpers by bare name (`from support import ...`), so this folder goes at the END of sys.path: after
the repository root, so that `import train` is never tests/train.
"""

import os
import sys
from pathlib import Path

import torch

if str(Path(__file__).parent) not in sys.path:
    sys.path.append(str(Path(__file__).parent))

if not torch.cuda.is_available():
    # Must be set before triton is first imported; the kernels then accept CPU tensors.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
