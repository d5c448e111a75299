"""The steering-mode registry (steerops/modes.py): a mode added by one ``register`` call
works through the ops (forward, explicit backward, both backends), validation,
``Steering`` and the CLI's choices, with no other file touched."""
import pytest
import torch

import steerops
from helpers import rand
from hf_models import causal_lm, prompts
from steerops.ops import modes


def _square_backward(g, h, u, a):
    s = (h * u).sum(-1, keepdim=True)
    gu = (g * u).sum(-1, keepdim=True)
    return 2 * a * s * gu * u, a * s * s * g + 2 * a * s * gu * h, (s * s * gu).squeeze(-1)


@pytest.fixture
def toy_mode():
    """h + a (h.u)^2 u: normalises (a zero row is refused) and has no kernel code, so
    the Triton backend hands it to the reference."""
    mode = modes.register(modes.SteeringMode(
        "square_along", "h + a (h.u)^2 u", True,
        lambda h, u, a: a * (h * u).sum(-1, keepdim=True) ** 2 * u, _square_backward))
    yield mode.name
    modes.unregister(mode.name)


def test_registry_lists_the_builtin_modes_with_their_kernel_codes():
    assert modes.names()[:4] == ("add", "norm_scaled", "ablate", "clamp")
    assert [modes.get(m).kernel_code for m in modes.names()[:4]] == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mode must be one of .* got 'nope'"):
        modes.get("nope")
    with pytest.raises(ValueError, match="already registered"):
        modes.register(modes.ADD)


@pytest.mark.parametrize("rows", [1, 7])
def test_a_registered_toy_mode_runs_through_the_ops(toy_mode, backend, rows):
    D = 123
    h, v = rand(rows, D), rand(2, D)
    idx = torch.arange(rows) % 2
    alpha = rand(rows)
    out = steerops.steer(h, v, alpha, mode=toy_mode, vector_index=idx)
    u = (v / v.norm(dim=-1, keepdim=True))[idx]
    s = (h * u).sum(-1, keepdim=True)
    torch.testing.assert_close(out, h + alpha[:, None] * s ** 2 * u)
    # the explicit backward (the registry's) against finite differences, float64
    hl, vl, al = (t.clone().requires_grad_() for t in (h, v, alpha))
    assert torch.autograd.gradcheck(
        lambda h_, v_, a_: steerops.steer(h_, v_, a_, mode=toy_mode, vector_index=idx),
        (hl, vl, al))
    with pytest.raises(ValueError, match="zero-norm row, which mode 'square_along'"):
        steerops.steer(h, torch.zeros(D, dtype=h.dtype), 1.0, mode=toy_mode)


def test_a_registered_toy_mode_steers_a_model_and_is_a_cli_choice(toy_mode, capsys):
    model = causal_lm("llama")
    ids = prompts(batch=2)
    v = torch.randn(32)
    with torch.no_grad():
        base = model(ids).logits
        with steerops.Steering(model, 1, v, 0.5, mode=toy_mode):
            steered = model(ids).logits
    assert not torch.allclose(base, steered)
    with pytest.raises(ValueError, match="zero-norm"):
        steerops.Steering(model, 1, torch.zeros(32), mode=toy_mode)
    from steerops.app import commands
    with pytest.raises(SystemExit) as stop:
        commands.steer_main(["--help"])
    assert stop.value.code == 0 and toy_mode in capsys.readouterr().out
