"""Test setup: the Triton interpreter runs the real kernels on CPU tensors.

TRITON_INTERPRET must be set before triton compiles anything, so it is set
here, before steerops is imported. Tests parametrised over ``backend`` run
each case through the Triton kernels (forced backend) and through the
plain-PyTorch CPU path.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import steerops  # noqa: E402
from steerops.kernels import config  # noqa: E402

BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with steerops.use_backend(request.param):
        yield request.param


@pytest.fixture
def looped(monkeypatch):
    """Force the looped (multi-chunk) row kernels on small D."""
    monkeypatch.setattr(config, "MAX_SINGLE_PASS_BLOCK", 32)
    monkeypatch.setattr(config, "LOOP_BLOCK", 32)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
