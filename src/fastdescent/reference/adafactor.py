"""Reference Adafactor: NumPy, the operations of the kernels in src/kernels/adafactor.pxi
in the same order, so that both backends agree bit for bit.

``adafactor_statistics`` (the reductions, and the averaging of the second moments)
and ``adafactor_update`` (the fused update) have the kernels' signatures and
in-place contract. A factored tensor is ``batches`` matrices of ``rows x cols``; a
vector of n is one row of n columns. Every sum has the kernels' order, fixed by
the shape: tiles of ``ROW_BLOCK`` rows by whole rows, or strips of them
(``_strip_width``) when a row is over ``STRIP_BYTES``; along a row of a tile,
element j goes to lane j % ``LANES``, each lane adds in column order (in the dtype
over each ``CHUNK`` of columns, then in float64), the lanes combine by a pairwise
tree; a tile adds its rows in row order, its column sums add its rows in row order
in the dtype; then in float64, rows add their tiles in column order, columns
theirs in row order, a tensor its tiles in tile order.
"""

import math

import numpy as np

LANES = 32
STRIP_BYTES = 65536
ROW_BLOCK = 256
CHUNK = 512


def _lerp_(average, value, weight):
    """``average = torch.lerp(average, value, weight)`` in place, as the kernels'
    ``lerp``: a + w*(b - a) for w < 0.5, else b - (1 - w)*(b - a)."""
    dtype = average.dtype.type
    diff = value - average
    if weight < 0.5:
        average += dtype(weight) * diff
    else:
        average[...] = value - dtype(1.0 - weight) * diff


def _geometry(param, row_var, col_var):
    """(batches, rows, cols) of a tensor: its matrices, or one row for a vector."""
    if row_var is None:
        return 1, 1, param.size
    return math.prod(row_var.shape[:-2]), row_var.shape[-2], col_var.shape[-1]


def _in_order(x, axis):
    """The sum of ``x`` along ``axis`` in its dtype, added one after the other (as a
    loop that starts at 0 adds non-negative terms): ``np.add.accumulate`` is defined so."""
    return np.take(np.add.accumulate(x, axis=axis), -1, axis=axis)


def _strip_width(cols, itemsize):
    """Columns per strip: whole rows up to STRIP_BYTES, else the fewest strips of at
    most that, of equal widths rounded up to a multiple of CHUNK (the last may be
    narrower)."""
    strips = max(1, -(-cols // (STRIP_BYTES // itemsize)))
    return max(1, -(-(-(-cols // strips)) // CHUNK)) * CHUNK


def _lanes(squares):
    """Per row of ``squares`` (in the dtype, shape (..., cols)) and strip
    (``_strip_width``): each lane's sum in column order, in the dtype over each CHUNK
    of columns and then in float64, the lanes combined pairwise. Shape (..., strips)."""
    cols = squares.shape[-1]
    groups = -(-cols // LANES)
    x = np.zeros(squares.shape[:-1] + (groups * LANES,), squares.dtype)
    x[..., :cols] = squares
    x = x.reshape(squares.shape[:-1] + (groups, LANES))
    per_chunk = CHUNK // LANES
    full = groups // per_chunk
    chunks = []
    if full:
        blocks = x[..., :full * per_chunk, :].reshape(squares.shape[:-1] + (full, per_chunk, LANES))
        chunks.append(_in_order(blocks, -2))
    if groups % per_chunk:
        chunks.append(_in_order(x[..., full * per_chunk:, :], -2)[..., None, :])
    chunk_lanes = np.concatenate(chunks, axis=-2).astype(np.float64)  # (..., chunks, LANES)
    per_strip = _strip_width(cols, squares.itemsize) // CHUNK
    n_chunks = chunk_lanes.shape[-2]
    strips = -(-n_chunks // per_strip)
    padded = np.zeros(squares.shape[:-1] + (strips * per_strip, LANES))
    padded[..., :n_chunks, :] = chunk_lanes
    lanes = _in_order(padded.reshape(squares.shape[:-1] + (strips, per_strip, LANES)), -2)
    while lanes.shape[-1] > 1:
        lanes = lanes[..., 0::2] + lanes[..., 1::2]
    return lanes[..., 0]


def _by_row_block(x, reduce):
    """``reduce(block, axis)`` of each block of ROW_BLOCK rows of ``x`` (shape
    (batches, rows, ...)), stacked as (batches, row_blocks, ...)."""
    rows = x.shape[1]
    full = rows // ROW_BLOCK
    parts = []
    if full:
        blocks = x[:, :full * ROW_BLOCK].reshape((x.shape[0], full, ROW_BLOCK) + x.shape[2:])
        parts.append(reduce(blocks, 2))
    if rows % ROW_BLOCK:
        parts.append(reduce(x[:, full * ROW_BLOCK:], 1)[:, None])
    return np.concatenate(parts, axis=1)


def _tensor_sum(row_strip_sums):
    """A tensor's sum from its (batches, rows, strips) row sums: each tile adds its
    rows in order, then the tiles add in tile order."""
    tiles = _by_row_block(row_strip_sums, _in_order)
    return float(_in_order(tiles.reshape(-1), 0)) if tiles.size else 0.0


def _factors(row_var, col_var, eps1):
    """The update's row and column factors (broadcastable to the tensor's (batches,
    rows, cols)): 1/sqrt(row_var / max(mean(row_var), eps1)) and 1/sqrt(col_var), in
    float64, rounded to the dtype."""
    dtype = row_var.dtype.type
    batches, rows, cols = math.prod(row_var.shape[:-2]), row_var.shape[-2], col_var.shape[-1]
    rv = row_var.reshape(batches, rows, 1).astype(np.float64)
    mean = (_in_order(rv, 1) / rows).astype(dtype)[:, None, :]
    mean = np.where(dtype(eps1) > mean, dtype(eps1), mean)  # clamp_(min=eps1), NaN kept
    with _zero_is_infinite():
        row_factor = (1.0 / np.sqrt(rv / mean.astype(np.float64))).astype(dtype)
        col_factor = (1.0 / np.sqrt(col_var.reshape(batches, 1, cols).astype(np.float64))).astype(dtype)
    return row_factor, col_factor


def _zero_is_infinite():
    """No warning for 1/sqrt(0) = inf (a row, a column or an element whose gradients
    were all zero: ``_capped`` then takes 1/eps1), or for 0/0 with eps1 = 0: the
    kernels' C arithmetic gives the same values silently."""
    return np.errstate(divide="ignore", invalid="ignore")


def _inverse_root(variance):
    """1/sqrt(variance) in its dtype (an unfactored tensor's factor)."""
    with _zero_is_infinite():
        return variance.dtype.type(1) / np.sqrt(variance)


def _capped(f, inv_eps1):
    """min(f, 1/eps1), keeping a NaN f (the kernels' ``cap if cap < f else f``)."""
    cap = f.dtype.type(inv_eps1)
    return np.where(cap < f, cap, f)


def _inverse_eps(eps1):
    return 1.0 / eps1 if eps1 > 0.0 else math.inf


def adafactor_statistics(params, grads, row_var, col_var, variance, *, weight, eps1, grad_scale,
                         n_threads=None):
    sums = np.zeros((len(params), 2))
    inv_eps1 = _inverse_eps(eps1)
    for t, (p, g, rv, cv, v) in enumerate(zip(params, grads, row_var, col_var, variance)):
        if p.size == 0:
            continue
        batches, rows, cols = _geometry(p, rv, cv)
        p3 = p.reshape(batches, rows, cols)
        d = grad_scale * g.reshape(batches, rows, cols)
        if rv is None:
            flat = v.reshape(1, 1, -1)
            _lerp_(flat, d * d, weight)
            u = d * _capped(_inverse_root(flat), inv_eps1)
            sums[t] = _tensor_sum(_lanes(p3 * p3)), _tensor_sum(_lanes(u * u))
            continue
        squares = d * d
        row_means = (_in_order(_lanes(squares), 2) / cols).astype(p.dtype)
        col_sums = _by_row_block(squares, _in_order).astype(np.float64)  # each tile's, in the dtype
        col_means = (_in_order(col_sums, 1) / rows).astype(p.dtype)
        _lerp_(rv.reshape(batches, rows), row_means, weight)
        _lerp_(cv.reshape(batches, cols), col_means, weight)
        row_factor, col_factor = _factors(rv, cv, eps1)
        u = d * _capped(row_factor * col_factor, inv_eps1)
        sums[t] = _tensor_sum(_lanes(p3 * p3)), _tensor_sum(_lanes(u * u))
    return sums


def adafactor_update(params, grads, row_var, col_var, variance, *, step_sizes, param_decay, eps1,
                     grad_scale, n_threads=None):
    inv_eps1 = _inverse_eps(eps1)
    for t, (p, g, rv, cv, v) in enumerate(zip(params, grads, row_var, col_var, variance)):
        if p.size == 0:
            continue
        batches, rows, cols = _geometry(p, rv, cv)
        d = grad_scale * g.reshape(batches, rows, cols)
        if rv is None:
            f = _capped(_inverse_root(v.reshape(batches, rows, cols)), inv_eps1)
        else:
            row_factor, col_factor = _factors(rv, cv, eps1)
            f = _capped(row_factor * col_factor, inv_eps1)
        p3 = p.reshape(batches, rows, cols)
        p3[...] = p3 * param_decay + float(step_sizes[t]) * (d * f)
