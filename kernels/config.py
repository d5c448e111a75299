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
# The backward keeps g, h, v and the vector-gradient accumulator of a row live
# (4 x BLOCK_D fp32 per program): single pass up to 4096 columns fits 8 warps in
# <= 128 registers (2+ programs per SM on H100); above, a row of 8192 would need
# ~250 registers at 8 warps and spills at 16 (measured: `steerops bench
# compile`). Wider rows take the looped two-pass variant: the second read of a
# row follows the first at once (an L1/L2 hit, not DRAM), and the gradient
# partial row is read-modify-written in the program's own L2-resident slot.
MAX_SINGLE_PASS_BLOCK_BWD = 4096
LOOP_BLOCK = 4096
# The looped backward walks rows in 2048-column chunks (4096-column chunks took up
# to 161 registers: `steerops bench compile`).
LOOP_BLOCK_BWD = 2048
# 8 warps on both architectures: at 4, with every flag combination compiled, ptxas
# needed more than 128 registers for 16 of them (patch + residual + source and
# vector gradients in ablate / clamp) and spilled; at 8 the worst takes 96.
LOOP_WARPS_BWD = {90: 8, 80: 8}
# The backward is compiled with an explicit register cap (PTX .maxnreg): without one,
# ptxas parks a loop-invariant 64-bit address in local memory for some flag
# combinations at only 40-48 registers (at 4, 8 and 16 warps alike; `steerops bench
# compile` over every combination found 18 of 1300 at D = 2048 / 8192). With the cap
# it keeps everything in registers. 128 keeps 2+ programs per SM at 8 warps.
MAXNREG_BWD = 128
# Software pipelining of the backward's row loop (tl.range num_stages): 1 walks a
# program's rows one after another; 2 issues the next row's loads (cp.async into
# shared memory) while the current row reduces. Compiled for sm_90a, 2 takes the
# pipeliner (`steerops bench compile --bwd-row-stages 2`); not yet timed on a GPU, so
# 1 stays the default (`steerops bench kernels` times both: steerops_pipelined).
BWD_ROW_STAGES = 1
# The forward's 16-warp launch (rows of 8193..16384) gets the hardware's cap for a
# 512-thread program (128): uncapped, ptxas aimed at 64 registers and spilled one
# bf16 combination (weighted patch + residual, no steering).
MAXNREG_FWD_16_WARPS = 128
# compute capability (e.g. 90) the launchers choose for; None: the tensor's device
# (set by `steerops bench compile`, which launches nothing)
TARGET_ARCH = None

# Cap on the fp32 scratch used for per-program partial gradients of shared
# vectors (P x K x D), so that many vectors never blow up memory.
PARTIAL_BYTES_BUDGET = 256 * 1024 * 1024


def row_block(D):
    """(BLOCK_D, SINGLE_PASS) of the forward row kernels for a row of D elements."""
    block = triton.next_power_of_2(max(int(D), 1))
    if block <= MAX_SINGLE_PASS_BLOCK:
        return block, True
    return min(LOOP_BLOCK, block), False


def device_arch(device):
    """Compute capability as an int (90 for sm_90) of ``device``; Hopper's for
    non-CUDA devices (the interpreter), or ``TARGET_ARCH`` when set."""
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    if device is not None and torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def backward_row_launch(D, device=None):
    """(BLOCK_D, SINGLE_PASS, num_warps) of the steering backward for rows of D."""
    block = triton.next_power_of_2(max(int(D), 1))
    if block <= MAX_SINGLE_PASS_BLOCK_BWD:
        # 1024 and 2048 columns: 8 warps, not 4. At 4, ptxas parks a value in local
        # memory for some flag combinations although registers are plentiful (1024:
        # the fully featured fp32 one; 2048: K vectors + per-row alpha + mask with the
        # vector and alpha gradients, fp32, add/clamp: 8-byte stack at 40 registers)
        # 4096 columns: 16 warps (one 512-thread program per SM, 8 columns per thread);
        # at 8 warps 25 fp32 flag combinations needed more than 128 registers and spilled
        return block, True, {1024: 8, 2048: 8, 4096: 16}.get(block, row_warps(block))
    arch = device_arch(device)
    return min(LOOP_BLOCK_BWD, block), False, LOOP_WARPS_BWD[90 if arch >= 90 else 80]


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
