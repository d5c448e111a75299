import json

import torch

MODES = ["add", "norm_scaled", "ablate", "clamp"]


def rand(*shape, dtype=torch.float64, requires_grad=False):
    t = torch.randn(*shape, dtype=dtype)
    return t.requires_grad_(requires_grad)


def tol(dtype):
    """(rtol, atol) against a float64 reference."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5)}[dtype]


def assert_close(actual, expected, dtype, msg=""):
    rtol, atol = tol(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=atol, msg=msg)


def grads(out, inputs, g):
    """Gradients of <out, g> wrt the inputs that are tensors requiring grad."""
    live = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got = torch.autograd.grad(out, live, g, allow_unused=True)
    return list(got)


def leaf64(t):
    """float64 detached copy that requires grad iff t does."""
    return t.detach().double().requires_grad_(t.requires_grad)


def toy_steering_case(task_name="ioi", pairs=3, seed=0):
    """A shipped toy model, ``pairs`` of its task, one random vector per layer and an
    empty (layer, position) site mask to fill: the set-up of the steered-forward tests."""
    import numpy as np

    from steerops.bench import model_store
    from steerops.bench.tasks import TASKS

    model, _ = model_store.load_checkpoint(task_name)
    task = TASKS[task_name]
    sampled = task.sample(pairs, torch.Generator().manual_seed(seed))
    vectors = torch.randn(model.config.num_hidden_layers + 1, model.config.hidden_size)
    sites = np.zeros((len(vectors), task.seq_len), bool)
    return model, task, sampled, vectors, sites


def read_text(path):
    with open(path) as f:
        return f.read()


def read_json(path):
    return json.loads(read_text(path))


def read_jsonl(path):
    return [json.loads(line) for line in read_text(path).splitlines()]
