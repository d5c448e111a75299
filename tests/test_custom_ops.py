"""torch.library registration: opcheck (schema, fake, autograd registration,
aot dispatch) and torch.compile(fullgraph=True) of code calling the ops."""
import pytest
import torch

import steerops
from steerops.ops import custom_ops as cops
from helpers import rand

N, D = 5, 24


def _intervene_args(requires_grad):
    return (rand(N, D, requires_grad=requires_grad), rand(N, D, requires_grad=requires_grad),
            rand(3, D, requires_grad=requires_grad), torch.tensor([-1, 0, 2, 2, -1]),
            torch.rand(N).double(), rand(2, D, requires_grad=requires_grad),
            rand(N, requires_grad=requires_grad), 1.0, torch.tensor([True, True, False, True,
                                                                    True]),
            torch.tensor([0, 1, 1, 0, 1]))


@pytest.mark.parametrize("mode", ["add", "norm_scaled", "ablate", "clamp"])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_intervene(backend, mode, requires_grad):
    torch.library.opcheck(cops.intervene_op, _intervene_args(requires_grad) + (mode,))


def test_opcheck_intervene_minimal(backend):
    x = rand(N, D, requires_grad=True)
    torch.library.opcheck(cops.intervene_op, (x, None, None, None, None, rand(D).view(1, D),
                                              None, 0.5, None, None, "add"))


def test_opcheck_intervene_inplace(backend):
    args = _intervene_args(False)
    torch.library.opcheck(cops.intervene_inplace_op, args + ("clamp",))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("directional", [False, True])
def test_opcheck_patch(backend, requires_grad, directional):
    x, s = rand(N, D, requires_grad=requires_grad), rand(4, D, requires_grad=requires_grad)
    args = (x, s, torch.tensor([4, 0]), torch.tensor([3, 3]), torch.rand(2).double(),
            rand(D) if directional else None, rand(N, D, requires_grad=requires_grad))
    torch.library.opcheck(cops.patch_op, args)
    if not requires_grad:
        torch.library.opcheck(cops.patch_inplace_op, args)


def test_opcheck_backward_ops(backend):
    args = _intervene_args(False)
    g = rand(N, D)
    torch.library.opcheck(cops.intervene_backward_op, (g,) + args + ("ablate", True, True, True))
    torch.library.opcheck(cops.patch_backward_op, (g, 4, torch.tensor([4, 0]),
                                                   torch.tensor([3, 3]), None, rand(D), True,
                                                   True))


def _model_step(hidden, residual, vector, alpha, source, dst, src):
    h = steerops.steer(hidden, vector, alpha, mode="norm_scaled", residual=residual)
    h = steerops.patch(h, source, dst, src)
    h = steerops.intervene(h, vector=vector, alpha=alpha, mode="ablate")
    return torch.tanh(h).sum()


def test_compile_fullgraph_forward_backward(backend):
    torch._dynamo.reset()
    args = [rand(2, 3, D, dtype=torch.float32, requires_grad=True),
            rand(2, 3, D, dtype=torch.float32),
            rand(D, dtype=torch.float32, requires_grad=True),
            torch.tensor(0.3, requires_grad=True),
            rand(6, D, dtype=torch.float32, requires_grad=True),
            torch.tensor([0, 4]), torch.tensor([5, 1])]
    compiled = torch.compile(_model_step, fullgraph=True, backend="aot_eager")
    with steerops.unchecked():  # value checks sync; a validated plan opts out
        loss = compiled(*args)
        grads = torch.autograd.grad(loss, [args[0], args[2], args[3], args[4]])
    eager_loss = _model_step(*args)
    eager_grads = torch.autograd.grad(eager_loss, [args[0], args[2], args[3], args[4]])
    torch.testing.assert_close(loss, eager_loss)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


def test_compile_inductor_inplace(backend):
    """In-place ops under inductor (functionalised), the hook-path shape."""
    torch._dynamo.reset()
    # built outside the compiled function: dynamo does not apply the default device
    # (CUDA on a GPU machine) to a torch.tensor it traces
    dst, src_rows = torch.tensor([1]), torch.tensor([0])

    def f(h, v, src):
        h = h * 2
        steerops.steer_(h, v, 0.5, mode="clamp")
        steerops.patch_(h, src, dst, src_rows)
        return h

    h, v, src = torch.randn(4, D), torch.randn(D), torch.randn(2, D)
    with steerops.unchecked():
        out = torch.compile(f, fullgraph=True)(h, v, src)
    torch.testing.assert_close(out, f(h, v, src))


def test_compile_with_value_checks_gives_clear_error(backend):
    torch._dynamo.reset()
    f = torch.compile(lambda h, v: steerops.steer(h, v, mode="ablate"), fullgraph=True,
                      backend="eager")
    with pytest.raises(Exception, match="steerops.unchecked"):
        f(torch.randn(3, D), torch.randn(D))
