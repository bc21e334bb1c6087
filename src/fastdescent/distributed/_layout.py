"""How a group's flat arena is cut into one shard per rank (no MPI here).

A bucket is the parameters of one group with one dtype, in the group's order (the
unit one kernel call updates, as in :class:`fastdescent.optim.Optimizer`). Its
elements, concatenated, are cut into ``world_size`` chunks of equal length, each a
whole number of cache lines, so every rank's shard starts on a cache line of the
(cache-line aligned) arena and collectives can move fixed-size blocks. The arena is
padded to ``world_size * chunk`` elements; the padding is never stepped, never
saved and always zero in the gradients, so it changes no norm.
"""

import math

import numpy as np

CACHE_LINE = 64  # bytes


def shard_chunk(size, world_size, itemsize):
    """Elements per rank for a bucket of ``size`` elements: a multiple of the cache
    line (at least one line), as small as covers ``size``."""
    per_line = max(1, CACHE_LINE // itemsize)
    lines = -(-size // (per_line * world_size))
    return max(1, lines) * per_line


def aligned_empty(n, dtype):
    """An uninitialized 1-D array of ``n`` elements whose first byte is cache-line aligned."""
    dtype = np.dtype(dtype)
    raw = np.empty(n * dtype.itemsize + CACHE_LINE, dtype=np.uint8)
    skip = -raw.ctypes.data % CACHE_LINE
    return raw[skip:skip + n * dtype.itemsize].view(dtype)


class Bucket:
    """The parameters of one group with one dtype, flat, and how ranks share them.

    Attributes
    ----------
    group : int
        Index of the parameter group.
    dtype : numpy.dtype
    positions : list of int
        Indices of the bucket's parameters in the group's parameter list.
    shapes : list of tuple
    offsets : list of int
        Where each parameter starts in the flat bucket (one more entry: the size).
    size : int
        Elements of the bucket (no padding).
    chunk : int
        Elements per rank (padded arena length ``world_size * chunk``).
    """

    def __init__(self, group, dtype, positions, shapes, world_size):
        self.group = group
        self.dtype = np.dtype(dtype)
        self.positions = list(positions)
        self.shapes = [tuple(s) for s in shapes]
        self.offsets = [0]
        for shape in self.shapes:
            self.offsets.append(self.offsets[-1] + math.prod(shape))
        self.size = self.offsets[-1]
        self.world_size = world_size
        self.chunk = shard_chunk(self.size, world_size, self.dtype.itemsize)

    @property
    def padded_size(self):
        return self.world_size * self.chunk

    def shard_range(self, rank):
        """``(start, stop)``: the elements of the bucket that ``rank`` owns (may be empty)."""
        start = min(rank * self.chunk, self.size)
        return start, min(start + self.chunk, self.size)

    def ranges(self):
        return [self.shard_range(r) for r in range(self.world_size)]

    def views(self, flat):
        """The parameters' views (their shapes) into a flat array of this bucket."""
        return [flat[a:b].reshape(shape) for a, b, shape in zip(self.offsets, self.offsets[1:], self.shapes)]

    def pieces(self, start, stop):
        """``(k, a, b)`` for every parameter ``k`` (index into ``positions``) that
        overlaps ``[start, stop)``: its flat elements ``[a, b)`` lie in the range."""
        out = []
        for k, (first, end) in enumerate(zip(self.offsets, self.offsets[1:])):
            a, b = max(first, start), min(end, stop)
            if a < b:
                out.append((k, a - first, b - first))
        return out


def buckets_of(shapes_and_dtypes, world_size):
    """The buckets of every group: ``shapes_and_dtypes[g]`` lists ``(shape, dtype)`` of
    group ``g``'s parameters. Within a group, buckets follow each dtype's first
    appearance (as the optimizer's own buckets do)."""
    buckets = []
    for g, params in enumerate(shapes_and_dtypes):
        by_dtype = {}
        for k, (shape, dtype) in enumerate(params):
            by_dtype.setdefault(np.dtype(dtype), []).append(k)
        for dtype, positions in by_dtype.items():
            buckets.append(Bucket(g, dtype, positions, [params[k][0] for k in positions], world_size))
    return buckets
