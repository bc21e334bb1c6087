"""How fastdescent.distributed cuts a bucket into shards (no MPI needed)."""

import numpy as np
import pytest

from fastdescent.distributed._layout import CACHE_LINE, aligned_empty, buckets_of


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 1000, 4097, 100_003])
def test_shards_cover_the_bucket_on_cache_lines(size, world_size, dtype):
    (bucket,) = buckets_of([[((size,), dtype)]], world_size)
    itemsize = np.dtype(dtype).itemsize
    assert bucket.chunk * itemsize % CACHE_LINE == 0 and bucket.chunk > 0
    assert bucket.padded_size == world_size * bucket.chunk >= size
    per_line = CACHE_LINE // itemsize  # the smallest such chunk: one line less would not cover the bucket
    assert bucket.chunk == per_line or (bucket.chunk - per_line) * world_size < size
    ranges = bucket.ranges()
    assert ranges[0][0] == 0 and ranges[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    for start, stop in ranges:
        assert stop - start <= bucket.chunk
        if start < stop:
            assert start * itemsize % CACHE_LINE == 0


def test_buckets_follow_groups_and_dtypes():
    f32, f64 = np.dtype(np.float32), np.dtype(np.float64)
    groups = [[((2, 3), f32), ((5,), f64), ((4,), f32)], [((7,), f64)]]
    buckets = buckets_of(groups, 2)
    assert [(b.group, b.dtype, b.positions, b.size) for b in buckets] == [
        (0, f32, [0, 2], 10), (0, f64, [1], 5), (1, f64, [0], 7)]
    flat = np.arange(10, dtype=np.float32)
    views = buckets[0].views(flat)
    assert [v.shape for v in views] == [(2, 3), (4,)] and views[1][0] == 6
    assert buckets[0].pieces(4, 8) == [(0, 4, 6), (1, 0, 2)]


@pytest.mark.parametrize("n", [1, 5, 1000])  # arenas are never empty
def test_aligned_empty(n):
    a = aligned_empty(n, np.float64)
    assert a.shape == (n,) and a.dtype == np.float64 and a.ctypes.data % CACHE_LINE == 0 and a.flags.writeable
