"""Spreading independent work over torch.distributed ranks (torchrun, SLURM, by hand).

Work is cut into *units* whose definition does not depend on the number of
ranks (a block of pairs x one layer for a patching sweep, a block of pairs for
attribution patching, one task model for the benchmark). Units are assigned to
ranks by estimated cost (longest first, to the least-loaded rank), each rank
runs its own, and the results travel back with ``all_gather_object`` so every
rank assembles the same object a single process would. With a shard folder,
each finished unit is written to disk first, so a rerun after a killed rank
redoes only the missing units (with any number of ranks).
"""
import hashlib
import json
import os
import sys

import torch


def active(distributed=None):
    """Whether to split work: ``distributed=None`` follows the process group (on when
    one is initialised with more than one rank), ``True`` requires a group (any size),
    ``False`` never splits."""
    if distributed is False:
        return False
    import torch.distributed as dist
    ready = dist.is_available() and dist.is_initialized()
    if distributed and not ready:
        raise RuntimeError("distributed=True needs an initialised process group: call "
                           "torch.distributed.init_process_group() (torchrun sets the "
                           "environment for it) or steerops.sweeps.distributed.init_from_env()")
    return ready and (bool(distributed) or dist.get_world_size() > 1)


def rank_world():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main():
    return rank_world()[0] == 0


def init_from_env():
    """Initialises the default process group from torchrun's environment (WORLD_SIZE,
    RANK, MASTER_ADDR, ...) when it names more than one process: NCCL with CUDA, gloo
    otherwise; returns whether a group is initialised."""
    import torch.distributed as dist
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    from datetime import timedelta
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device())
    # ranks wait for the slowest one at the gather: allow long shares of work
    dist.init_process_group(backend, timeout=timedelta(hours=12))
    return True


def local_device():
    """cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def assign(costs, world):
    """Unit indices per rank: longest unit first, each to the least-loaded rank (ties:
    lowest rank), so the split is deterministic and balanced by estimated cost."""
    loads = [0.0] * world
    mine = [[] for _ in range(world)]
    for unit in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda k: (loads[k], k))
        loads[r] += costs[unit]
        mine[r].append(unit)
    return [sorted(m) for m in mine]


def gather(obj):
    """Every rank's ``obj``, in rank order, on every rank (pickled; keep it on the CPU)."""
    import torch.distributed as dist
    _, world = rank_world()
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def fingerprint(*parts):
    """A short hash of tensors / JSON-able values: names a sweep's shards, so shards of
    another sweep (other inputs, sites or settings) are never mixed in."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def weights_sample(model, per_tensor=64):
    """A few values of every parameter (strided, so cheap for any model size): with the
    inputs, enough to tell two models (or two training seeds) apart in a shard name."""
    out = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // per_tensor)
        out.append(flat[::step][:per_tensor].float().cpu())
    return out


def save_shard(path, tensors, meta=None):
    """Tensors (+ JSON metadata) as safetensors, written atomically."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
              metadata={"steerops": json.dumps(meta or {})})
    os.replace(tmp, path)


def load_shard(path):
    """The shard's tensors, or None when the file cannot be read (cut short by a
    killed writer or a full disk): it is renamed ``NAME.unreadable``, with a line
    naming it, and the caller recomputes it."""
    from safetensors.torch import load_file
    try:
        return load_file(path)
    except Exception as e:  # safetensors' errors name no file
        os.replace(path, path + ".unreadable")
        print(f"set aside {path} (not a readable safetensors file: {e}); it will be "
              f"recomputed", file=sys.stderr)
        return None
