"""Flash attention for the UNet's heads in F16 (F32 accumulation), as a Triton kernel.

Operands are laid out as the projections make them, `(B, S, H * D)`: head `h` of item `b` is
columns `h*D .. (h+1)*D`, so no head split or merge copy is needed. One program computes
`BLOCK_M` queries of one (item, head) against all keys, a key block at a time, with the running
maximum and sum of the online softmax in base 2 (the scale is folded into `scale_log2e`). `D` is
the head dim (40, 64, 80, 160); `BLOCK_D` is the next power of two, its extra columns masked.
"""

import triton
import triton.language as tl


@triton.jit
def attention_fwd(
    q_ptr, k_ptr, v_ptr, out_ptr,
    queries, keys,
    q_item, q_row, k_item, k_row, v_item, v_row, o_item, o_row,
    scale_log2e, heads,
    D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    block = tl.program_id(0)
    item_head = tl.program_id(1)
    item = item_head // heads
    head = item_head % heads

    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < queries
    col_ok = cols < D

    q_ptrs = q_ptr + item * q_item + rows[:, None] * q_row + head * D + cols[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)

    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, keys, BLOCK_N):
        key_rows = start + tl.arange(0, BLOCK_N)
        key_ok = key_rows < keys
        # K transposed: (BLOCK_D, BLOCK_N).
        k_ptrs = k_ptr + item * k_item + key_rows[None, :] * k_row + head * D + cols[:, None]
        k = tl.load(k_ptrs, mask=col_ok[:, None] & key_ok[None, :], other=0.0)
        scores = tl.dot(q, k) * scale_log2e
        scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        probs = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(running_max - new_max)
        running_sum = running_sum * rescale + tl.sum(probs, 1)
        v_ptrs = v_ptr + item * v_item + key_rows[:, None] * v_row + head * D + cols[None, :]
        v = tl.load(v_ptrs, mask=key_ok[:, None] & col_ok[None, :], other=0.0)
        acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v)
        running_max = new_max

    out = acc / running_sum[:, None]
    o_ptrs = out_ptr + item * o_item + rows[:, None] * o_row + head * D + cols[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
