"""Test setup.

CPU machine (CI): the Triton interpreter runs the real kernels on CPU tensors.
TRITON_INTERPRET must be set before triton compiles anything, so it is set
here, before steerops is imported. Tests parametrised over ``backend`` run each
case through the Triton kernels (forced backend) and the plain-PyTorch path.

GPU machine: the interpreter is left off; the ``triton`` parametrisation makes
CUDA the default device, so the same tests run the compiled kernels on the GPU
(``tests/test_cuda.py`` adds bf16/fp16 and large shapes).
"""
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

import steerops  # noqa: E402
from steerops.kernels import config  # noqa: E402

BACKENDS = ["triton", "torch"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton" and ON_GPU:
        torch.set_default_device("cuda")
    try:
        with steerops.use_backend(request.param if not ON_GPU else "auto"):
            yield request.param
    finally:
        torch.set_default_device(None)


@pytest.fixture
def looped(monkeypatch):
    """Force the looped (multi-chunk) row kernels on small D."""
    monkeypatch.setattr(config, "MAX_SINGLE_PASS_BLOCK", 32)
    monkeypatch.setattr(config, "MAX_SINGLE_PASS_BLOCK_BWD", 32)
    monkeypatch.setattr(config, "LOOP_BLOCK", 32)
    monkeypatch.setattr(config, "LOOP_BLOCK_BWD", 16)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny local model (steerops.app.tiny: word-level tokenizer, 4-block Llama trained
    on a toy IOI task) saved once per session, as `steerops tiny-model DIR` saves it."""
    from steerops.app.tiny import make_tiny_model
    folder = str(tmp_path_factory.mktemp("tiny-model"))
    accuracy = make_tiny_model(folder)
    assert accuracy > 0.9, f"the tiny model did not learn its task ({accuracy:.0%})"
    return folder


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    return model, AutoTokenizer.from_pretrained(tiny_folder)
