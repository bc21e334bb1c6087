"""How a tensor lies in memory, as the kernels need to know it.

The kernels run over flat runs of memory. A *dense* tensor (one block without
gaps: contiguous, channels_last, any permutation of dimensions) is stepped in
place through a flat view of its block, in memory order, provided its gradient
and state buffers have the same layout. A *gapped* tensor (a slice such as
``w[:, ::2]`` or a column of a matrix) is gathered into a dense scratch block,
stepped there and scattered back (see ``_adapter``). Two parameters may share a
storage as long as they share no element; one that overlaps another, or itself,
is refused.
"""

import numpy as np
import torch

_REAL_OF = {np.dtype(np.complex64): np.float32, np.dtype(np.complex128): np.float64}


def is_dense(t):
    """True if ``t`` covers one block of memory without gaps or overlap, in any
    dimension order (contiguous, channels_last, a transposed contiguous tensor...)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def flat_view(t):
    """1-D NumPy view of the memory of dense tensor ``t``, in memory order; complex
    elements as (real, imaginary) pairs. Elementwise rules may run on this view as
    long as every buffer of the update has the same layout."""
    t = t.detach()
    if not t.is_contiguous():
        t = t.as_strided((t.numel(),), (1,))
    if t.dtype == torch.bfloat16:  # NumPy has no bfloat16: its bits, as the kernels take them
        return t.view(torch.int16).numpy().reshape(-1).view(np.uint16)
    a = t.numpy().reshape(-1)
    real = _REAL_OF.get(a.dtype)
    return a if real is None else a.view(real)


def real_dtype(dtype):
    """The NumPy dtype of the flat views of a tensor of torch ``dtype``."""
    return flat_view(torch.empty(0, dtype=dtype)).dtype


def same_layout(t, ref):
    """True if ``t`` is laid out in memory as ``ref`` (so one elementwise pass may
    run over both memory blocks side by side)."""
    return t.is_contiguous() if ref.is_contiguous() else t.stride() == ref.stride()


def in_layout_of(ref, t):
    """``t`` itself if it is laid out as ``ref``, else a copy in ``ref``'s layout."""
    if same_layout(t, ref):
        return t
    return torch.empty_strided(ref.shape, ref.stride(), dtype=ref.dtype).copy_(t)


def byte_span(t):
    """(first byte, one past the last byte) of the elements of ``t``; None if empty."""
    if t.numel() == 0:
        return None
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (reach + 1) * t.element_size()


def _byte_view(marks, t, start):
    """The bytes of ``t``'s elements as a view of ``marks`` (uint8 from address ``start``)."""
    size = t.element_size()
    return marks.as_strided(tuple(t.shape) + (size,), tuple(s * size for s in t.stride()) + (1,),
                            t.data_ptr() - start)


def overlaps_itself(t):
    """True if two elements of ``t`` share memory (an expanded or as_strided view)."""
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1)
    if t.numel() <= 1:
        return False
    reach = 0
    for stride, size in dims:
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False  # each stride passes every element before it: no two coincide
    reach = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    elements = torch.arange(reach + 1).as_strided(t.shape, t.stride(), 0).reshape(-1)
    return elements.unique().numel() != t.numel()


def share_elements(a, b):
    """True if tensors ``a`` and ``b`` (on the CPU, neither overlapping itself) have
    a byte of some element in common."""
    span_a, span_b = byte_span(a), byte_span(b)
    if span_a is None or span_b is None or span_a[1] <= span_b[0] or span_b[1] <= span_a[0]:
        return False
    if is_dense(a) and is_dense(b):
        return True  # a dense tensor covers every byte of its span
    start = min(span_a[0], span_b[0])
    marks = torch.zeros(max(span_a[1], span_b[1]) - start, dtype=torch.uint8)
    _byte_view(marks, a, start).fill_(1)
    return bool(_byte_view(marks, b, start).any())


def first_overlap(tensors):
    """``(i, j)`` for the first two of ``tensors`` that share an element, or None.

    Sorts the tensors by where they start, so that only neighbours whose spans
    intersect are compared element by element: O(n log n) for parameters that lie
    apart or side by side, as they usually do.
    """
    spans = sorted((span[0], span[1], i) for i, span in enumerate(map(byte_span, tensors)) if span is not None)
    open_spans = []  # (end, index) of the spans that may still reach the next start
    for start, end, i in spans:
        open_spans = [(e, j) for e, j in open_spans if e > start]
        for _, j in open_spans:
            if share_elements(tensors[j], tensors[i]):
                return (j, i) if j < i else (i, j)
        open_spans.append((end, i))
    return None
