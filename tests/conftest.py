"""Test-wide set-up.

Triton's interpreter must be chosen before any ``@triton.jit`` decorates a kernel, i.e. before the
first import of ``terrabyte.kernels``; on a machine without a GPU every kernel test runs under it.
"""
import os
import sys
from pathlib import Path

import pytest

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process or long tests (still run in CI)")


@pytest.fixture
def python_exe():
    return sys.executable
