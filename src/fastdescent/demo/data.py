"""Mini-batches for NumPy training loops.

::

    from fastdescent.demo.data import MiniBatches

    batches = MiniBatches(X, y, batch_size=32, shuffle=True, seed=0)
    for epoch in range(10):
        for xb, yb in batches:          # a fresh permutation every epoch
            ...

Like ``torch.utils.data.DataLoader(TensorDataset(X, y), batch_size, shuffle,
drop_last)`` for in-memory arrays: each epoch visits every sample exactly once
(shuffling without replacement), in batches of ``batch_size``; the last batch
is shorter unless ``drop_last``.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt


class MiniBatches:
    """Iterate over aligned arrays in mini-batches, one epoch per ``iter()``.

    Parameters
    ----------
    *arrays : array_like
        One or more arrays with the same length along axis 0 (features, labels...).
    batch_size : int
        Samples per batch (> 0).
    shuffle : bool
        Draw a new permutation for every epoch; otherwise keep the order (and
        yield views, not copies).
    drop_last : bool
        Drop the final batch of an epoch if it is shorter than ``batch_size``.
    seed : int, numpy.random.Generator or None
        Seeds the permutations: the same seed gives the same sequence of epochs.

    Each batch is a tuple with one slice per array, or just the slice when
    there is a single array.
    """

    def __init__(self, *arrays: npt.ArrayLike, batch_size: int, shuffle: bool = True, drop_last: bool = False,
                 seed: int | np.random.Generator | None = None) -> None:
        if not arrays:
            raise TypeError("MiniBatches needs at least one array")
        as_arrays = tuple(np.asarray(a) for a in arrays)
        if any(a.ndim == 0 for a in as_arrays):
            raise ValueError("arrays must have at least one dimension")
        lengths = {len(a) for a in as_arrays}
        if len(lengths) != 1:
            raise ValueError(f"arrays must have the same length along axis 0, got {sorted(lengths)}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size must be an int, got {batch_size!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.arrays = as_arrays
        self.n_samples = lengths.pop()
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.drop_last:
            return self.n_samples // self.batch_size
        return -(-self.n_samples // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        order = self.rng.permutation(self.n_samples) if self.shuffle else None
        for b in range(len(self)):
            start = b * self.batch_size
            picked: slice | np.ndarray
            if order is None:
                picked = slice(start, start + self.batch_size)
            else:
                picked = order[start:start + self.batch_size]
            batch = tuple(a[picked] for a in self.arrays)
            yield batch if len(batch) > 1 else batch[0]


__all__ = ["MiniBatches"]
