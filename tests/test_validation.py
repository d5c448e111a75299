"""docs/ops.md section 4: bad input raises a clear error naming the argument,
before any kernel launch, and nothing is written."""
import pytest
import torch

import steerops

N, D = 6, 16


def _good():
    return torch.randn(N, D), torch.randn(D)


STEER_BAD = [
    # (kwargs overrides, exception, text that must appear in the message)
    (dict(vector=torch.randn(D + 1)), ValueError, "vector"),
    (dict(vector=torch.randn(2, 3, D)), ValueError, "vector"),
    (dict(vector=torch.randint(0, 3, (D,))), TypeError, "vector"),
    (dict(hidden=torch.randint(0, 3, (N, D))), TypeError, "hidden"),
    (dict(residual=torch.randn(N, D + 1)), ValueError, "residual"),
    (dict(residual=torch.randn(N, D, dtype=torch.float64)), TypeError, "residual"),
    (dict(mode="scale"), ValueError, "mode"),
    (dict(alpha="big"), TypeError, "alpha"),
    (dict(alpha=torch.randn(N + 1)), ValueError, "alpha"),
    (dict(alpha=torch.tensor([1, 2, 3, 4, 5, 6])), TypeError, "alpha"),
    (dict(mask=torch.ones(N)), TypeError, "mask"),
    (dict(mask=torch.ones(N + 2, dtype=torch.bool)), ValueError, "mask"),
    (dict(vector=torch.randn(3, D)), ValueError, "vector_index"),
    (dict(vector=torch.randn(3, D), vector_index=torch.tensor([0, 1, 2, 3, 0, 1])), ValueError,
     "vector_index"),
    (dict(vector=torch.randn(3, D), vector_index=torch.tensor([0, 1, 2, -1, 0, 1])), ValueError,
     "vector_index"),
    (dict(vector=torch.randn(3, D), vector_index=torch.zeros(N)), TypeError, "vector_index"),
    (dict(vector=torch.zeros(D), mode="norm_scaled"), ValueError, "zero-norm"),
    (dict(vector=torch.zeros(D), mode="ablate"), ValueError, "zero-norm"),
    (dict(vector=torch.zeros(D), mode="clamp"), ValueError, "zero-norm"),
    (dict(hidden=torch.randn(N, D, device="meta")), ValueError, "meta"),
]


def _on_default_device(over):
    """The bad inputs are built at import, on the CPU; on a GPU machine the `backend`
    fixture makes CUDA the default device, where each case must meet its own check, not
    the device-mismatch one. Meta tensors stay: they test the device check."""
    here = torch.empty(0).device
    return {k: v.to(here) if isinstance(v, torch.Tensor) and v.device.type == "cpu" else v
            for k, v in over.items()}


@pytest.mark.parametrize("over,exc,text", STEER_BAD)
@pytest.mark.parametrize("inplace", [False, True])
def test_steer_rejects(backend, over, exc, text, inplace):
    over = _on_default_device(over)
    hidden, vector = _good()
    kw = dict(hidden=hidden, vector=vector, alpha=1.0, mode="add")
    kw.update(over)
    if "meta" in text:  # device mismatch: hidden on meta, vector on cpu
        text = "vector"
    before = kw["hidden"].clone() if kw["hidden"].device.type != "meta" else None
    fn = steerops.steer_ if inplace else steerops.steer
    with pytest.raises(exc, match=text):
        fn(kw.pop("hidden"), kw.pop("vector"), kw.pop("alpha"), **kw)
    if before is not None:
        assert torch.equal(hidden if "hidden" not in over else over["hidden"], before)


def test_steer_zero_vector_is_fine_for_add(backend):
    h = torch.randn(N, D)
    assert torch.equal(steerops.steer(h, torch.zeros(D), 2.0), h)


def _patch_args():
    return dict(hidden=torch.randn(N, D), source=torch.randn(4, D),
                dst_index=torch.tensor([0, 3, 5]), src_index=torch.tensor([1, 1, 3]))


PATCH_BAD = [
    (dict(dst_index=torch.tensor([0, 3, 6])), ValueError, "dst_index out of range"),
    (dict(dst_index=torch.tensor([0, -1, 2])), ValueError, "dst_index out of range"),
    (dict(src_index=torch.tensor([0, 4, 2])), ValueError, "src_index out of range"),
    (dict(dst_index=torch.tensor([0, 3, 3])), ValueError, "duplicate"),
    (dict(dst_index=torch.tensor([0.0, 3.0, 5.0])), TypeError, "dst_index"),
    (dict(src_index=torch.tensor([0, 1])), ValueError, "src_index"),
    (dict(dst_index=torch.tensor([[0, 3, 5]])), ValueError, "dst_index"),
    (dict(source=torch.randn(4, D + 1)), ValueError, "source"),
    (dict(source=torch.randn(4, D, dtype=torch.float64)), TypeError, "source"),
    (dict(weight=torch.tensor([0.5, 1.5, 0.0])), ValueError, "weight"),
    (dict(weight=torch.tensor([0.5, float("nan"), 0.0])), ValueError, "weight"),
    (dict(weight=torch.tensor([0.5, 0.2])), ValueError, "weight"),
    (dict(direction=torch.zeros(D)), ValueError, "direction"),
    (dict(direction=torch.randn(D + 2)), ValueError, "direction"),
    (dict(residual=torch.randn(N + 1, D)), ValueError, "residual"),
    (dict(hidden=torch.randn(N, D).to(torch.int32)), TypeError, "hidden"),
    (dict(source=torch.randn(4, D, device="meta")), ValueError, "source is on meta"),
    (dict(dst_index=torch.tensor([0, 3, 5], device="meta")), ValueError, "dst_index is on meta"),
    (dict(weight=torch.rand(3, device="meta")), ValueError, "weight is on meta"),
]


@pytest.mark.parametrize("over,exc,text", PATCH_BAD)
@pytest.mark.parametrize("inplace", [False, True])
def test_patch_rejects(backend, over, exc, text, inplace):
    kw = _patch_args()
    kw.update(_on_default_device(over))
    hidden = kw.pop("hidden")
    before = hidden.clone()
    fn = steerops.patch_ if inplace else steerops.patch
    with pytest.raises(exc, match=text):
        fn(hidden, kw.pop("source"), kw.pop("dst_index"), kw.pop("src_index"), **kw)
    assert torch.equal(hidden, before)


INTERVENE_BAD = [
    (dict(patch_src=torch.tensor([0, -1, 4, -1, -1, 0])), ValueError, "patch_src out of range"),
    (dict(patch_src=torch.tensor([0, -2, 1, -1, -1, 0])), ValueError, "patch_src out of range"),
    (dict(patch_weight=torch.full((N,), 2.0)), ValueError, "patch_weight"),
    (dict(source=None), ValueError, "patch_src"),
    (dict(patch_src=torch.tensor([0, 1])), ValueError, "patch_src"),
    (dict(vector=None, mask=torch.ones(N, dtype=torch.bool)), ValueError, "need vector"),
    (dict(vector=torch.zeros(D), mode="clamp"), ValueError, "zero-norm"),
    (dict(mode="nope"), ValueError, "mode"),
    (dict(source=torch.randn(4, D, device="meta")), ValueError, "source is on meta"),
    (dict(vector=torch.randn(D, device="meta")), ValueError, "vector is on meta"),
]


@pytest.mark.parametrize("over,exc,text", INTERVENE_BAD)
def test_intervene_rejects(backend, over, exc, text):
    kw = dict(hidden=torch.randn(N, D), source=torch.randn(4, D),
              patch_src=torch.tensor([0, -1, 3, -1, -1, 0]), vector=torch.randn(D))
    kw.update(_on_default_device(over))
    with pytest.raises(exc, match=text):
        steerops.intervene(**kw)


def test_inplace_with_grad_is_rejected():
    h = torch.randn(N, D, requires_grad=True)
    with pytest.raises(RuntimeError, match="steerops.steer"):
        steerops.steer_(h, torch.randn(D))
    with pytest.raises(RuntimeError, match="steerops.steer"):
        steerops.steer_(torch.randn(N, D), torch.randn(D, requires_grad=True))
    with pytest.raises(RuntimeError, match="steerops.patch"):
        steerops.patch_(torch.randn(N, D), torch.randn(3, D, requires_grad=True),
                        torch.tensor([0]), torch.tensor([1]))


def test_unchecked_skips_value_checks_only():
    h = torch.randn(N, D)
    with steerops.unchecked():
        # a value check is skipped (the caller vouches for the plan) ...
        out = steerops.patch(h, torch.randn(4, D), torch.tensor([0, 1]), torch.tensor([2, 2]))
        assert out.shape == h.shape
        # ... but shape/dtype checks still run
        with pytest.raises(ValueError, match="vector"):
            steerops.steer(h, torch.randn(D + 1))
    with pytest.raises(ValueError, match="duplicate"):
        steerops.patch(h, torch.randn(4, D), torch.tensor([1, 1]), torch.tensor([2, 2]))


def test_backend_switch_errors():
    with pytest.raises(ValueError, match="backend"):
        steerops.set_backend("cuda")


def test_non_contiguous_inputs_are_read_correctly(backend):
    """Transposed / strided hidden and vector: made contiguous, never misread."""
    base = torch.randn(D, N)
    hidden = base.t()  # (N, D), last dim stride N
    vector = torch.randn(D, 2)[:, 0]  # stride 2
    out = steerops.steer(hidden, vector, 0.5, mode="ablate")
    ref = steerops.steer(hidden.contiguous(), vector.contiguous(), 0.5, mode="ablate")
    torch.testing.assert_close(out, ref)
