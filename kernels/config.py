"""Launch heuristics shared by the kernel launchers.

Row kernels keep a whole row in registers while the padded row fits in
``MAX_SINGLE_PASS_BLOCK`` elements; wider rows take the looped variant that walks
the row in ``LOOP_BLOCK`` chunks (two passes: reductions, then the update).
Tests lower both limits to exercise the looped variant on small shapes.
"""
import torch
import triton
import triton.language as tl

MAX_SINGLE_PASS_BLOCK = 16384
LOOP_BLOCK = 4096

# Cap on the fp32 scratch used for per-program partial gradients of shared
# vectors (P x K x D), so that many vectors never blow up memory.
PARTIAL_BYTES_BUDGET = 256 * 1024 * 1024


def row_block(D):
    """(BLOCK_D, SINGLE_PASS) for a row of D elements."""
    block = triton.next_power_of_2(max(int(D), 1))
    if block <= MAX_SINGLE_PASS_BLOCK:
        return block, True
    return min(LOOP_BLOCK, block), False


def row_warps(block):
    if block <= 512:
        return 2
    if block <= 2048:
        return 4
    if block <= 8192:
        return 8
    return 16


def accumulator_dtype(dtype):
    """Triton dtype the kernels compute in: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def torch_accumulator_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reduction_programs(n_rows, device, bytes_per_program=0):
    """Number of programs for a two-stage row reduction (deterministic partials)."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one after another; few is enough
        target = 4
    if bytes_per_program > 0:
        target = min(target, max(1, PARTIAL_BYTES_BUDGET // bytes_per_program))
    return max(1, min(int(n_rows), target))
