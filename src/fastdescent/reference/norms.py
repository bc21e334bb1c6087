"""Reference reductions for the global gradient norm: NumPy, same order as the kernel.

Same signatures and in-place contract as ``sum_squares`` and ``max_abs`` in
src/kernels/norms.pxi. The concatenated elements of all arrays are cut into blocks
of ``BLOCK`` elements; inside a block element k is added to lane k % ``LANES`` in
index order, the lanes are combined by a pairwise tree, and the block sums are
added in block order. Zero padding at the end adds +0.0 to non-negative sums,
which changes nothing, so it stands in for the kernel's short last block.
"""

import numpy as np

LANES = 16
BLOCK = 4096


def _concatenated(arrays):
    return np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)


def _rows_of_lanes(values):
    """float64 ``values`` zero-padded to whole blocks, shaped (blocks, rows, lanes)."""
    n_blocks = -(-values.size // BLOCK)
    padded = np.zeros(n_blocks * BLOCK)
    padded[: values.size] = values
    return padded.reshape(n_blocks, BLOCK // LANES, LANES)


def sum_squares(arrays, *, clip_value, scale, n_threads=None):
    if clip_value < np.inf:
        for a in arrays:
            limit = a.dtype.type(clip_value)
            # In place, NaN kept: v > limit -> limit, then v < -limit -> -limit.
            np.copyto(a, limit, where=a > limit)
            np.copyto(a, -limit, where=a < -limit)
    with np.errstate(over="ignore", under="ignore"):  # float64 overflow: the face rescales
        squares = (_concatenated(arrays).astype(np.float64) * scale) ** 2
    rows = _rows_of_lanes(squares)
    lanes = np.zeros((rows.shape[0], LANES))
    for r in range(rows.shape[1]):
        lanes += rows[:, r, :]
    while lanes.shape[1] > 1:
        lanes = lanes[:, 0::2] + lanes[:, 1::2]
    total = 0.0
    for block_sum in lanes[:, 0].tolist():
        total += block_sum
    return total


def max_abs(arrays, *, n_threads=None):
    magnitudes = np.abs(_concatenated(arrays).astype(np.float64))
    return float(np.max(magnitudes[~np.isnan(magnitudes)], initial=0.0))
