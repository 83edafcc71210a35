"""Triton kernels of multi-scale deformable attention sampling (launchers in `triton_op`).

One program handles a block of BLOCK_Q queries of one (batch, head) and all D channels. Value rows
are gathered as (BLOCK_Q, BLOCK_D) tiles; everything accumulates in ACC_DTYPE (float32, or float64
for float64 inputs). Backward owns every (query, level, point) sample of its block, so location and
attention-weight gradients are plain stores; value gradients are scattered with atomic adds into a
buffer in ACC_DTYPE.
"""

import triton
import triton.language as tl


@triton.jit
def _sample_setup(loc_ptr, attn_ptr, sample, q_mask, wf, hf, ACC_DTYPE: tl.constexpr):
    """Pixel coordinates of one sample point per query: floor corner, fractions, attention weight, and
    ``poison``: NaN where the location is NaN or infinite, else 0."""
    x = tl.load(loc_ptr + 2 * sample, mask=q_mask, other=0.0).to(ACC_DTYPE)
    y = tl.load(loc_ptr + 2 * sample + 1, mask=q_mask, other=0.0).to(ACC_DTYPE)
    a = tl.load(attn_ptr + sample, mask=q_mask, other=0.0).to(ACC_DTYPE)
    # align_corners=False: pixel centres at integers.
    u = x * wf - 0.5
    v = y * hf - 0.5
    # grid_sample makes a sample at a non-finite location NaN. min/max would drop the NaN (and floor
    # of it is no index), so such a sample is read far outside (every corner masked) and the caller
    # adds the NaN back.
    poison = u * 0.0 + v * 0.0
    bad = poison != 0.0
    # The clamp keeps floor() finite far outside the map, where every corner is masked anyway.
    u = tl.where(bad, -2.0, tl.minimum(tl.maximum(u, -2.0), wf + 1.0))
    v = tl.where(bad, -2.0, tl.minimum(tl.maximum(v, -2.0), hf + 1.0))
    u0 = tl.floor(u)
    v0 = tl.floor(v)
    return u0.to(tl.int32), v0.to(tl.int32), u - u0, v - v0, a, poison


@triton.jit
def _corner_ptrs(base_ptr, level_start, cx, cy, w, h, q_mask, d, d_mask, row_stride):
    """Pointers to the value rows of one corner per query, and the mask of corners inside the map."""
    inside = q_mask & (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    row = level_start + cy * w + cx
    ptrs = base_ptr + row.to(tl.int64)[:, None] * row_stride + d[None, :]
    return ptrs, inside[:, None] & d_mask[None, :]


@triton.jit
def msda_forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, out_ptr,
    num_rows, num_queries, num_heads, head_dim,
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    num_blocks = tl.cdiv(num_queries, BLOCK_Q)
    b = pid // num_blocks
    q = (pid % num_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    base_ptr = value_ptr + b.to(tl.int64) * num_rows * row_stride + m * head_dim
    bag = (b.to(tl.int64) * num_queries + q) * num_heads + m
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=ACC_DTYPE)
    poisoned = tl.zeros((BLOCK_Q,), dtype=ACC_DTYPE)
    for lvl in range(NUM_LEVELS):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(ACC_DTYPE)
        wf = w.to(ACC_DTYPE)
        for pt in range(NUM_POINTS):
            sample = (bag * NUM_LEVELS + lvl) * NUM_POINTS + pt
            x0, y0, fu, fv, a, poison = _sample_setup(loc_ptr, attn_ptr, sample, q_mask, wf, hf, ACC_DTYPE)
            poisoned += poison
            ptrs, mask = _corner_ptrs(base_ptr, start, x0, y0, w, h, q_mask, d, d_mask, row_stride)
            acc += (a * (1 - fu) * (1 - fv))[:, None] * tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            ptrs, mask = _corner_ptrs(base_ptr, start, x0 + 1, y0, w, h, q_mask, d, d_mask, row_stride)
            acc += (a * fu * (1 - fv))[:, None] * tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            ptrs, mask = _corner_ptrs(base_ptr, start, x0, y0 + 1, w, h, q_mask, d, d_mask, row_stride)
            acc += (a * (1 - fu) * fv)[:, None] * tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
            ptrs, mask = _corner_ptrs(base_ptr, start, x0 + 1, y0 + 1, w, h, q_mask, d, d_mask, row_stride)
            acc += (a * fu * fv)[:, None] * tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    acc += poisoned[:, None]
    out_ptrs = out_ptr + bag[:, None] * head_dim + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask[:, None] & d_mask[None, :])


@triton.jit
def _corner_backward(base_ptr, grad_base_ptr, start, cx, cy, w, h, q_mask, d, d_mask, row_stride, g, weight,
                     ACC_DTYPE: tl.constexpr):
    """Scatter ``weight * g`` into one corner's value-gradient rows; return ``g · value`` per query."""
    ptrs, mask = _corner_ptrs(base_ptr, start, cx, cy, w, h, q_mask, d, d_mask, row_stride)
    val = tl.load(ptrs, mask=mask, other=0.0).to(ACC_DTYPE)
    grad_ptrs, _ = _corner_ptrs(grad_base_ptr, start, cx, cy, w, h, q_mask, d, d_mask, row_stride)
    tl.atomic_add(grad_ptrs, weight[:, None] * g, mask=mask)
    return tl.sum(val * g, axis=1)


@triton.jit
def msda_backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, loc_ptr, attn_ptr, grad_out_ptr,
    grad_value_ptr, grad_loc_ptr, grad_attn_ptr,
    num_rows, num_queries, num_heads, head_dim,
    NUM_LEVELS: tl.constexpr, NUM_POINTS: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid = tl.program_id(0)
    m = tl.program_id(1)
    num_blocks = tl.cdiv(num_queries, BLOCK_Q)
    b = pid // num_blocks
    q = (pid % num_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = q < num_queries
    d = tl.arange(0, BLOCK_D)
    d_mask = d < head_dim
    row_stride = num_heads * head_dim
    batch_offset = b.to(tl.int64) * num_rows * row_stride + m * head_dim
    base_ptr = value_ptr + batch_offset
    grad_base_ptr = grad_value_ptr + batch_offset
    bag = (b.to(tl.int64) * num_queries + q) * num_heads + m
    g_ptrs = grad_out_ptr + bag[:, None] * head_dim + d[None, :]
    g = tl.load(g_ptrs, mask=q_mask[:, None] & d_mask[None, :], other=0.0).to(ACC_DTYPE)
    for lvl in range(NUM_LEVELS):
        h = tl.load(shapes_ptr + 2 * lvl)
        w = tl.load(shapes_ptr + 2 * lvl + 1)
        start = tl.load(starts_ptr + lvl)
        hf = h.to(ACC_DTYPE)
        wf = w.to(ACC_DTYPE)
        for pt in range(NUM_POINTS):
            sample = (bag * NUM_LEVELS + lvl) * NUM_POINTS + pt
            x0, y0, fu, fv, a, poison = _sample_setup(loc_ptr, attn_ptr, sample, q_mask, wf, hf, ACC_DTYPE)
            # Corners outside the map load as 0, so their dot products below are 0 and the
            # unmasked bilinear weights give the same gradients as masked ones.
            g00 = _corner_backward(base_ptr, grad_base_ptr, start, x0, y0, w, h, q_mask, d, d_mask,
                                   row_stride, g, a * (1 - fu) * (1 - fv), ACC_DTYPE)
            g01 = _corner_backward(base_ptr, grad_base_ptr, start, x0 + 1, y0, w, h, q_mask, d, d_mask,
                                   row_stride, g, a * fu * (1 - fv), ACC_DTYPE)
            g10 = _corner_backward(base_ptr, grad_base_ptr, start, x0, y0 + 1, w, h, q_mask, d, d_mask,
                                   row_stride, g, a * (1 - fu) * fv, ACC_DTYPE)
            g11 = _corner_backward(base_ptr, grad_base_ptr, start, x0 + 1, y0 + 1, w, h, q_mask, d, d_mask,
                                   row_stride, g, a * fu * fv, ACC_DTYPE)
            # A sample at a non-finite location sends nothing to the value gradient (its corners are
            # masked) and NaN to its location and weight gradients, as grid_sample does.
            grad_a = g00 * (1 - fu) * (1 - fv) + g01 * fu * (1 - fv) + g10 * (1 - fu) * fv + g11 * fu * fv + poison
            grad_u = a * ((g01 - g00) * (1 - fv) + (g11 - g10) * fv)
            grad_v = a * ((g10 - g00) * (1 - fu) + (g11 - g01) * fu)
            loc_ty = grad_loc_ptr.dtype.element_ty
            tl.store(grad_loc_ptr + 2 * sample, (grad_u * wf + poison).to(loc_ty), mask=q_mask)
            tl.store(grad_loc_ptr + 2 * sample + 1, (grad_v * hf + poison).to(loc_ty), mask=q_mask)
            tl.store(grad_attn_ptr + sample, grad_a.to(grad_attn_ptr.dtype.element_ty), mask=q_mask)
