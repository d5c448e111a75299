"""Deterministic sum of rows grouped by key (no atomics).

Given contribution rows C (R, D) and a key per row (-1 = no key), writes
out[key] = sum of the rows with that key, in increasing row order. The host
sorts the keys once (stable); program i is a segment head when its sorted key
differs from the previous one, and walks its segment serially. The order of
additions is therefore fixed, so the result is bitwise reproducible, unlike
``index_add_`` with atomics. Rows of ``out`` whose key never occurs are left
as they are (the caller zero-fills).
"""
import torch
import triton
import triton.language as tl

from . import config


@triton.jit
def _segment_sum_rows_kernel(contrib_ptr, perm_ptr, keys_ptr, out_ptr, R, D,
                             stride_c, stride_o, BLOCK_D: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + i).to(tl.int64)
    prev = tl.load(keys_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    is_head = (key >= 0) & ((i == 0) | (key != prev))
    if is_head:
        cols = tl.arange(0, BLOCK_D)
        for start in range(0, D, BLOCK_D):
            c = start + cols
            cmask = c < D
            acc = tl.zeros([BLOCK_D], dtype=out_ptr.dtype.element_ty)
            j = i
            kj = key
            while kj == key:
                r = tl.load(perm_ptr + j).to(tl.int64)
                acc += tl.load(contrib_ptr + r * stride_c + c, mask=cmask, other=0.0).to(acc.dtype)
                j += 1
                kj = tl.load(keys_ptr + j, mask=j < R, other=-1).to(tl.int64)
            tl.store(out_ptr + key * stride_o + c, acc, mask=cmask)


def segment_sum_rows(contrib, keys, out):
    """out[keys[r]] += contrib[r] summed per key in row order; keys < 0 skipped.

    contrib (R, D), keys (R,) integer, out (M_out, D) zero-filled by the caller
    (its dtype is the accumulation dtype). Returns ``out``.
    """
    R, D = contrib.shape
    if R == 0 or D == 0:
        return out
    sorted_keys, perm = torch.sort(keys, stable=True)
    block = min(triton.next_power_of_2(D), config.LOOP_BLOCK)
    _segment_sum_rows_kernel[(R,)](
        contrib, perm, sorted_keys, out, R, D, contrib.stride(0), out.stride(0),
        BLOCK_D=block, num_warps=config.row_warps(block))
    return out
