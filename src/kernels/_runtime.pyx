"""Run-time support shared by every kernel variant and by the reference backend.

Built once, for the baseline instruction set, so that it can always be imported to
find out which kernel variant this CPU can run.

* OpenMP queries (a build without OpenMP answers as a single thread).
* CPU feature detection for the instruction-set dispatch.
* ``check_buffers``, ``checked_lists``: the validation every functional face runs
  before any array is written, whichever backend then does the update; and
  ``WrittenBuffers``, its per-step counterpart for the optimizers. It is in Cython
  because a Python version (``np.shares_memory`` per pair) costs more than a whole
  update of a thousand elements.
* ``cached``, ``remember``, ``same_values``, ``update_each``: what lets an optimizer
  and a face validate hyperparameters once per change rather than once per step.
"""

cimport cython
cimport numpy as cnp

cnp.import_array()

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FD_OPENMP 1
    #else
    #define FD_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_num_procs(void) { return 1; }
    #endif

    /* 1 if this CPU (and the OS, which must save the wide registers) can run
       code compiled for the named x86-64 micro-architecture level. */
    static int fd_cpu_level(int level) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
        __builtin_cpu_init();
        switch (level) {
            case 1: return 1;
            case 3: return __builtin_cpu_supports("x86-64-v3") != 0;
            case 4: return __builtin_cpu_supports("x86-64-v4") != 0;
            default: return 0;
        }
    #else
        return level == 1;
    #endif
    }
    """
    int FD_OPENMP
    int omp_get_max_threads() noexcept nogil
    int omp_get_num_procs() noexcept nogil
    int fd_cpu_level(int level) noexcept nogil


def openmp_enabled():
    """True if the extension modules were built with OpenMP."""
    return bool(FD_OPENMP)


def omp_max_threads():
    """``omp_get_max_threads()``: OMP_NUM_THREADS or the processor count (1 if serial)."""
    return omp_get_max_threads()


def omp_num_procs():
    """``omp_get_num_procs()``: the processors this process may use, as OpenMP saw
    them at start-up (it honours ``taskset``; 1 if serial)."""
    return omp_get_num_procs()


# Read once: libgomp asks the kernel for the thread's affinity on every call (a
# system call), and the processors a process may use do not change in practice.
cdef int NUM_PROCS = max(1, omp_get_num_procs())


def thread_limit():
    """Threads a kernel may use now: ``omp_get_max_threads()`` for the calling
    thread (``OMP_NUM_THREADS``, or what threadpoolctl or ``omp_set_num_threads``
    set in this thread) capped at the usable processors; 1 in a serial build.

    Read on every call, as scikit-learn does, so that threadpoolctl's limits apply;
    it costs a thread-local read in libgomp.
    """
    return _thread_limit()


cdef inline int _thread_limit() noexcept:
    return max(1, min(omp_get_max_threads(), NUM_PROCS))


_LEVELS = {"baseline": 1, "avx2": 3, "avx512": 4}


def cpu_supports(variant):
    """True if this CPU and OS can run the kernel variant named ``variant``."""
    try:
        level = _LEVELS[variant]
    except KeyError:
        raise ValueError(f"unknown kernel variant {variant!r}; known: {sorted(_LEVELS)}") from None
    return bool(fd_cpu_level(level))


#: Step counts stay below this (an int64, and a float that bias corrections can raise a
#: coefficient to).
MAX_STEP = 2**63


# ------------------------------------------------------------------ buffer checks
from cpython.object cimport PyObject
from cpython.dict cimport PyDict_GetItemWithError, PyDict_Next, PyDict_SetItem, PyDict_Size, PyDict_Update
from cpython.float cimport PyFloat_AS_DOUBLE
from cpython.list cimport PyList_GET_ITEM, PyList_New, PyList_SET_ITEM
from cpython.ref cimport Py_INCREF, Py_XDECREF, Py_XINCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdlib cimport malloc, free
from libc.math cimport INFINITY, pow, sqrt
from libc.string cimport memcmp


cdef str _label(str name, Py_ssize_t index, bint indexed):
    return f"{name}[{index}]" if indexed else name


cdef bint _same_shape(cnp.ndarray a, cnp.ndarray b):
    cdef int d
    if cnp.PyArray_NDIM(a) != cnp.PyArray_NDIM(b):
        return False
    for d in range(cnp.PyArray_NDIM(a)):
        if cnp.PyArray_DIM(a, d) != cnp.PyArray_DIM(b, d):
            return False
    return True


cdef int _check_array(object obj, str name, Py_ssize_t index, bint indexed, bint writable,
                      cnp.ndarray ref, str ref_name) except -1:
    """Type, dtype, shape, contiguity and writability of one array against ``ref``."""
    cdef cnp.ndarray arr
    cdef int typenum
    if not cnp.PyArray_Check(obj):
        raise TypeError(f"{_label(name, index, indexed)} must be a numpy.ndarray, got {type(obj).__name__}")
    arr = <cnp.ndarray>obj
    typenum = cnp.PyArray_TYPE(arr)
    if ref is None:
        if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
            raise TypeError(
                f"{_label(name, index, indexed)} has dtype {arr.dtype}; "
                "fastdescent kernels take float32 or float64"
            )
    else:
        if typenum != cnp.PyArray_TYPE(ref):
            raise TypeError(
                f"{_label(name, index, indexed)} has dtype {arr.dtype}, but "
                f"{_label(ref_name, index, indexed)} has dtype {ref.dtype}: dtypes must match"
            )
        if not _same_shape(arr, ref):
            raise ValueError(
                f"{_label(name, index, indexed)} has shape {(<object>arr).shape}, but "
                f"{_label(ref_name, index, indexed)} has shape {(<object>ref).shape}"
            )
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr):
        raise ValueError(f"{_label(name, index, indexed)} must be C-contiguous")
    if not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{_label(name, index, indexed)} is not aligned to its dtype")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{_label(name, index, indexed)} is read-only; it is updated in place")
    return 0


# The bytes [lo, hi) of one buffer: ``role`` and ``index`` say which (check_buffers)
# or ``index`` is the position in a WrittenBuffers table.
cdef struct Span:
    size_t lo
    size_t hi
    Py_ssize_t role
    Py_ssize_t index
    bint writable


cdef void _sort_spans(Span* spans, Py_ssize_t n) noexcept nogil:
    """By start. Insertion sort for the few buffers of a typical call; else a
    natural merge sort: the arrays of one role usually lie in address order (they
    were allocated one after another), so the runs are long and few merges do
    (O(n log runs), at worst O(n log n)). Falls back to insertion sort if the
    scratch space cannot be allocated."""
    cdef Py_ssize_t i, j, width, lo, mid, hi, a, b, k
    cdef Span item
    cdef Span* scratch
    cdef Span* source
    cdef Span* target
    cdef Py_ssize_t* starts
    cdef Py_ssize_t n_runs = 0
    if n > 16:
        scratch = <Span*>malloc(n * sizeof(Span))
        starts = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
        if scratch != NULL and starts != NULL:
            for i in range(n):  # the ascending runs
                if i == 0 or spans[i].lo < spans[i - 1].lo:
                    starts[n_runs] = i
                    n_runs += 1
            starts[n_runs] = n
            source, target = spans, scratch
            while n_runs > 1:  # merge runs pairwise until one is left
                k = 0
                for i in range(0, n_runs, 2):
                    lo, mid = starts[i], starts[i + 1]
                    hi = starts[i + 2] if i + 2 <= n_runs else mid
                    a, b, j = lo, mid, lo
                    while a < mid and b < hi:
                        if source[b].lo < source[a].lo:
                            target[j] = source[b]
                            b += 1
                        else:
                            target[j] = source[a]
                            a += 1
                        j += 1
                    while a < mid:
                        target[j] = source[a]
                        a += 1
                        j += 1
                    while b < hi:
                        target[j] = source[b]
                        b += 1
                        j += 1
                    starts[k] = lo
                    k += 1
                starts[k] = n
                n_runs = k
                source, target = target, source
            if source != spans:
                for i in range(n):
                    spans[i] = source[i]
            free(scratch)
            free(starts)
            return
        free(scratch)
        free(starts)
    for i in range(1, n):
        item = spans[i]
        j = i - 1
        while j >= 0 and spans[j].lo > item.lo:
            spans[j + 1] = spans[j]
            j -= 1
        spans[j + 1] = item


cdef Py_ssize_t _first_conflict(Span* spans, Py_ssize_t n, Py_ssize_t* other) noexcept nogil:
    """Sort ``spans`` by start, then sweep them once: return the position of a span
    that shares bytes with an earlier one, at least one of the two written (the
    earlier one's position goes to ``other``), or -1. Read-only spans may overlap.

    An overlap of a and b (a starting first) is seen at b: the largest end so far
    (of any span, or of the written ones if b is read-only) lies beyond b's start.
    O(n log n)."""
    cdef size_t end_any = 0, end_written = 0
    cdef Py_ssize_t i, last_any = -1, last_written = -1
    _sort_spans(spans, n)
    for i in range(n):
        if spans[i].writable and last_any >= 0 and spans[i].lo < end_any:
            other[0] = last_any
            return i
        if last_written >= 0 and spans[i].lo < end_written:
            other[0] = last_written
            return i
        if spans[i].hi > end_any:
            end_any, last_any = spans[i].hi, i
        if spans[i].writable and spans[i].hi > end_written:
            end_written, last_written = spans[i].hi, i
    return -1


cdef enum:
    # Spans sorted on the stack; larger calls allocate.
    LOCAL_SPANS = 32


cdef inline bint _fits(object obj, int typenum, cnp.ndarray ref, bint writable):
    """The common case, tested at once: an aligned, C-contiguous ndarray of dtype
    ``typenum``, shaped like ``ref`` (unless None), writeable if ``writable``.
    Anything else goes to :func:`_check_array` for its error."""
    cdef int need = cnp.NPY_ARRAY_C_CONTIGUOUS | cnp.NPY_ARRAY_ALIGNED
    if writable:
        need |= cnp.NPY_ARRAY_WRITEABLE
    return (cnp.PyArray_Check(obj) and cnp.PyArray_TYPE(<cnp.ndarray>obj) == typenum
            and (cnp.PyArray_FLAGS(<cnp.ndarray>obj) & need) == need
            and (ref is None or _same_shape(<cnp.ndarray>obj, ref)))


def check_buffers(tuple names, tuple arrays, tuple writable, bint indexed=True):
    """Validate the buffers of one update before anything is written.

    ``names[r]`` is the role of ``arrays[r]``, a list with one array per tensor
    (``None`` for a role the update does not use); role 0 is the parameters.
    Every array must be a C-contiguous, aligned float32/float64 ``ndarray`` with the
    dtype and shape of its parameter, all parameters of one dtype; ``writable[r]``
    roles must be writeable; and no written buffer may share a byte with any other
    buffer of the call, of any tensor and any role (read-only buffers, the
    gradients, may overlap each other). The overlap check sorts the byte ranges
    once: O(k log k) for k buffers.

    Raises TypeError (not an ndarray, wrong or mixed dtype) or ValueError (shape,
    layout, read-only, aliasing, list lengths). Returns the total element count.
    """
    if len(arrays) != len(names) or len(writable) != len(names):
        raise ValueError("names, arrays and writable must have the same length")
    return _check_update(names, arrays, writable, indexed)


cdef enum:
    # Arrays of one call held on the stack; larger calls allocate.
    LOCAL_ITEMS = 32


# The arrays of one update, gathered from the caller's arguments without building
# lists: items[r * n_tensors + i] is array i of role r (a reference each), NULL for
# a role the update does not use. Filled by _gather or _gather_lists, checked by
# _check_items, emptied by _release (always: it may hold references on error).
cdef struct Gathered:
    PyObject** items
    Py_ssize_t n_tensors
    Py_ssize_t n_roles
    Py_ssize_t total          # elements of the parameters (after _check_items)
    int typenum               # their dtype (after _check_items)
    bint indexed              # the caller gave lists (errors name params[i])
    unsigned long long given  # bit r: role r is given (even with no tensors)
    PyObject* local[LOCAL_ITEMS]


cdef inline void _gathered_init(Gathered* g) noexcept:
    g.items, g.n_tensors, g.n_roles, g.total = NULL, 0, 0, 0


cdef int _gathered_alloc(Gathered* g, Py_ssize_t n_roles, Py_ssize_t n_tensors) except -1:
    cdef Py_ssize_t k, n = n_roles * n_tensors
    if n_roles > 64:
        raise ValueError("at most 64 roles")
    g.given = 0
    if n <= LOCAL_ITEMS:
        g.items = &g.local[0]
    else:
        g.items = <PyObject**>malloc(n * sizeof(PyObject*))
    if g.items == NULL:
        raise MemoryError()
    for k in range(n):
        g.items[k] = NULL
    g.n_roles, g.n_tensors = n_roles, n_tensors
    return 0


cdef void _release(Gathered* g) noexcept:
    cdef Py_ssize_t k
    if g.items == NULL:
        return
    for k in range(g.n_roles * g.n_tensors):
        Py_XDECREF(g.items[k])
    if g.items != &g.local[0]:
        free(g.items)
    g.items = NULL


cdef int _take_list(Gathered* g, Py_ssize_t r, object given) except -1:
    """Role ``r``'s arrays from ``given``, an exact list or tuple of n_tensors items."""
    cdef Py_ssize_t i, n = g.n_tensors
    cdef PyObject* item
    cdef bint is_list = type(given) is list
    if not is_list and type(given) is not tuple:
        raise TypeError(f"expected a list of arrays, got {type(given).__name__}")
    g.given |= 1ULL << r
    for i in range(n):
        item = PyList_GET_ITEM(given, i) if is_list else PyTuple_GET_ITEM(given, i)
        Py_XINCREF(item)
        g.items[r * n + i] = item
    return 0


cdef int _gather(Gathered* g, tuple names, tuple arrays, tuple writable) except -1:
    """Gather and check (:func:`_check_items`) the arguments of a functional face:
    ``arrays[r]`` one array (every role then one array: a single-tensor call), a
    list or tuple of arrays, or None for a role the update does not use."""
    cdef Py_ssize_t r, n_roles = len(arrays)
    cdef object first = arrays[0], given
    cdef bint indexed = not cnp.PyArray_Check(first)
    cdef list converted = None
    if indexed and not isinstance(first, (list, tuple)):
        raise TypeError(f"params must be a numpy.ndarray or a list of them, got {type(first).__name__}")
    if len(names) != n_roles or len(writable) != n_roles:
        raise ValueError("names, arrays and writable must have the same length")
    if indexed:
        for r in range(n_roles):
            given = arrays[r]
            if given is None or type(given) is list or type(given) is tuple:
                continue
            if not isinstance(given, (list, tuple)):
                raise TypeError(f"expected a list of arrays to match the list of params, got {type(given).__name__}")
            if converted is None:  # a subclass: what it holds now, once
                converted = list(arrays)
            converted[r] = list(given)
        if converted is not None:
            arrays = tuple(converted)
        first = arrays[0]
        for r in range(1, n_roles):
            if arrays[r] is not None and len(arrays[r]) != len(first):
                raise ValueError(f"{len(arrays[r])} {names[r]} arrays for {len(first)} parameters")
        _gathered_alloc(g, n_roles, len(first))
        for r in range(n_roles):
            if arrays[r] is not None:
                _take_list(g, r, arrays[r])
    else:
        _gathered_alloc(g, n_roles, 1)
        for r in range(n_roles):
            given = arrays[r]
            if given is not None:
                Py_INCREF(given)
                g.items[r] = <PyObject*>given
                g.given |= 1ULL << r
    g.indexed = indexed
    return _check_items(g, names, writable)


cdef int _check_items(Gathered* g, tuple names, tuple writable) except -1:
    """Check every gathered array (see :func:`check_buffers`); sets ``total`` and ``typenum``."""
    cdef Py_ssize_t n_roles = g.n_roles, n = g.n_tensors, r, i, n_spans = 0, capacity = 0, hit, other
    cdef Py_ssize_t nbytes, total = 0
    cdef PyObject** items = g.items
    cdef cnp.ndarray param, a
    cdef object item
    cdef int typenum
    cdef bint write, indexed = g.indexed
    cdef Span local[LOCAL_SPANS]
    cdef Span* spans = local
    g.total, g.typenum = 0, cnp.NPY_FLOAT32
    if n == 0:
        return 0
    item = <object>items[0]
    if not cnp.PyArray_Check(item):
        _check_array(item, names[0], 0, indexed, writable[0], None, None)
    typenum = cnp.PyArray_TYPE(<cnp.ndarray>item)
    if typenum != cnp.NPY_FLOAT32 and typenum != cnp.NPY_FLOAT64:
        _check_array(item, names[0], 0, indexed, writable[0], None, None)
    for r in range(n_roles):
        capacity += n if items[r * n] != NULL else 0
    if capacity > LOCAL_SPANS:
        spans = <Span*>malloc(capacity * sizeof(Span))
        if spans == NULL:
            raise MemoryError()
    try:
        # Every array against its parameter, and the byte range of each non-empty one.
        for r in range(n_roles):
            if items[r * n] == NULL:
                continue
            write = writable[r]
            for i in range(n):
                item = <object>items[r * n + i]
                param = <cnp.ndarray>items[i] if r else None
                if not _fits(item, typenum, param, write):
                    _check_array(item, names[r], i, indexed, write, param, names[0])
                    # Only a parameter passes that: one that differs from the first in dtype.
                    raise TypeError(f"{_label(names[0], i, indexed)} has dtype {(<cnp.ndarray>item).dtype} but "
                                    f"{_label(names[0], 0, indexed)} has {(<cnp.ndarray>items[0]).dtype}: "
                                    "one call takes one dtype")
                a = <cnp.ndarray>item
                nbytes = cnp.PyArray_NBYTES(a)
                if r == 0:
                    total += nbytes // cnp.PyArray_ITEMSIZE(a)
                if nbytes:
                    spans[n_spans].lo = <size_t>cnp.PyArray_BYTES(a)
                    spans[n_spans].hi = spans[n_spans].lo + <size_t>nbytes
                    spans[n_spans].role, spans[n_spans].index = r, i
                    spans[n_spans].writable = write
                    n_spans += 1
        hit = _first_conflict(spans, n_spans, &other)
        if hit >= 0:
            raise ValueError(_sharing(names, indexed, spans[hit], spans[other]))
    finally:
        if spans != local:
            free(spans)
    g.total, g.typenum = total, typenum
    return 0


cdef Py_ssize_t _check_update(tuple names, tuple arrays, tuple writable, bint indexed) except -1:
    """:func:`check_buffers` of ``arrays``: a list (or None) per role."""
    cdef Py_ssize_t r, n_tensors = len(<list>arrays[0])
    cdef Gathered g
    _gathered_init(&g)
    for r in range(1, len(names)):
        if arrays[r] is not None and len(<list>arrays[r]) != n_tensors:
            raise ValueError(f"{len(<list>arrays[r])} {names[r]} arrays for {n_tensors} parameters")
    try:
        _gathered_alloc(&g, len(names), n_tensors)
        for r in range(len(names)):
            if arrays[r] is not None:
                _take_list(&g, r, <list>arrays[r])
        g.indexed = indexed
        _check_items(&g, names, writable)
        return g.total
    finally:
        _release(&g)


cdef str _sharing(tuple names, bint indexed, Span a, Span b):
    """The error for two buffers that share memory, the later argument named first."""
    cdef str first = _label(names[a.role], a.index, indexed), second = _label(names[b.role], b.index, indexed)
    if (a.role, a.index) < (b.role, b.index):
        first, second = second, first
    return (f"{first} shares memory with {second}; a buffer that is written may share "
            "no byte with any other buffer of the update")


def checked_lists(tuple names, tuple arrays, tuple writable):
    """The buffers of one update as lists, one entry per tensor, after
    :func:`check_buffers`: what every functional face hands its kernel.

    ``arrays[r]`` is one array (then every role must be one array: a
    single-tensor call) or a list or tuple of arrays (a multi-tensor call), or
    None for a role the update does not use. Returns a tuple of new lists (None
    for an unused role), so that a list the caller changes later cannot differ
    from what was checked.
    """
    return _checked_lists(names, arrays, writable)


cdef tuple _checked_lists(tuple names, tuple arrays, tuple writable):
    cdef Gathered g
    _gathered_init(&g)
    try:
        _gather(&g, names, arrays, writable)
        return _lists(&g)
    finally:
        _release(&g)


cdef tuple _lists(const Gathered* g):
    """The gathered arrays as a tuple of new lists, one per role (None for a role not given)."""
    cdef Py_ssize_t r, i, n = g.n_tensors
    cdef tuple lists = PyTuple_New(g.n_roles)
    cdef object role
    for r in range(g.n_roles):
        role = None
        if g.given >> r & 1:
            role = PyList_New(n)
            for i in range(n):
                Py_XINCREF(g.items[r * n + i])
                PyList_SET_ITEM(role, i, <object>g.items[r * n + i])
        Py_INCREF(role)
        PyTuple_SET_ITEM(lists, r, role)
    return lists


def check_distinct(str name, list arrays):
    """Raise ValueError if any two of ``arrays`` (C-contiguous ndarrays) overlap.

    Used when an optimizer gets parameters. O(n log n) in the number of arrays.
    """
    cdef list spans = []
    cdef cnp.ndarray a
    cdef Py_ssize_t i
    for i in range(len(arrays)):
        a = <cnp.ndarray?>arrays[i]
        if cnp.PyArray_NBYTES(a):
            start = <Py_ssize_t>cnp.PyArray_BYTES(a)
            spans.append((start, start + cnp.PyArray_NBYTES(a), i))
    spans.sort()
    for i in range(1, len(spans)):
        if spans[i][0] < spans[i - 1][1]:
            raise ValueError(
                f"{name}[{spans[i - 1][2]}] and {name}[{spans[i][2]}] share memory; "
                "each must be a distinct array"
            )


# ------------------------------------------------ what an optimizer's step writes
cdef extern from *:
    """
    /* A view of ``a`` as ``descr`` (of the same item size), as ``a.view(descr)``. */
    static PyObject *fd_view_as(PyArrayObject *a, PyArray_Descr *descr) {
        Py_INCREF(descr);  /* PyArray_View steals it */
        return PyArray_View(a, descr, NULL);
    }
    """
    object fd_view_as(cnp.ndarray a, cnp.dtype descr)

cdef cnp.dtype _UINT16 = cnp.PyArray_DescrFromType(cnp.NPY_UINT16)
cdef int _bfloat16_typenum = -1


cdef int _bfloat16_type() except -2:
    """The type number of ``ml_dtypes.bfloat16`` (imported when first needed: only
    low-precision optimizers meet it), whose arrays the kernels take as uint16 bits."""
    global _bfloat16_typenum
    if _bfloat16_typenum < 0:
        import ml_dtypes
        import numpy
        _bfloat16_typenum = numpy.dtype(ml_dtypes.bfloat16).num
    return _bfloat16_typenum


cdef struct Recorded:
    char* data
    Py_ssize_t nbytes
    int typenum


@cython.auto_pickle(False)
cdef class WrittenBuffers:
    """The arrays an optimizer's step writes: its parameters and state buffers.

    They cannot change between steps (a group's parameter list refuses changes;
    the state buffers are the optimizer's own, replaced only by
    ``load_state_dict``, which builds a new table), so their byte ranges are
    recorded, sorted and checked for overlap once, when the table is built. A
    step then costs, in C and without Python work per array:

    * :meth:`verify`: every recorded array still has its data pointer, size and
      dtype and is C-contiguous, aligned and writeable (a ``dtype``, ``shape``,
      ``strides`` or ``flags`` assignment in place would be caught here);
    * :meth:`check_grads`: each gradient has its parameter's dtype and shape, is
      C-contiguous and aligned, and shares no byte with any recorded array
      (binary search in the sorted ranges: O(k log n)).

    ``labels[i]`` names ``arrays[i]`` in errors; ``groups[i]`` is its parameter
    group (a step of one group only refuses overlaps with that group's arrays).
    """

    cdef list arrays, labels
    cdef Py_ssize_t n, n_spans
    cdef Recorded* recorded
    cdef Span* spans       # sorted by start, disjoint; Span.index = position in arrays, Span.role = group

    def __init__(self, list arrays, list labels, list groups):
        cdef Py_ssize_t i
        cdef cnp.ndarray a
        if len(labels) != len(arrays) or len(groups) != len(arrays):
            raise ValueError("arrays, labels and groups must have the same length")
        if self.recorded != NULL:
            raise RuntimeError("a WrittenBuffers table is built once")
        self.arrays, self.labels, self.n = list(arrays), list(labels), len(arrays)
        self.recorded = <Recorded*>malloc((self.n + 1) * sizeof(Recorded))
        self.spans = <Span*>malloc((self.n + 1) * sizeof(Span))
        if self.recorded == NULL or self.spans == NULL:
            raise MemoryError()
        self.n_spans = 0
        for i in range(self.n):
            a = <cnp.ndarray?>self.arrays[i]
            self.recorded[i].data = cnp.PyArray_BYTES(a)
            self.recorded[i].nbytes = cnp.PyArray_NBYTES(a)
            self.recorded[i].typenum = cnp.PyArray_TYPE(a)
            if self.recorded[i].nbytes:
                self.spans[self.n_spans].lo = <size_t>self.recorded[i].data
                self.spans[self.n_spans].hi = self.spans[self.n_spans].lo + <size_t>self.recorded[i].nbytes
                self.spans[self.n_spans].index = i
                self.spans[self.n_spans].role = groups[i]
                self.spans[self.n_spans].writable = True
                self.n_spans += 1
        cdef Py_ssize_t other, hit = _first_conflict(self.spans, self.n_spans, &other)
        if hit >= 0:
            raise ValueError(f"{self.labels[self.spans[other].index]} and {self.labels[self.spans[hit].index]} "
                             "share memory; each must be a distinct array")
        self.verify()

    def __dealloc__(self):
        free(self.recorded)
        free(self.spans)

    cpdef verify(self):
        """ValueError if a recorded array was changed in place since the table was built."""
        cdef Py_ssize_t i
        cdef cnp.ndarray a
        for i in range(self.n):
            a = <cnp.ndarray>self.arrays[i]
            if (cnp.PyArray_BYTES(a) != self.recorded[i].data or cnp.PyArray_NBYTES(a) != self.recorded[i].nbytes
                    or cnp.PyArray_TYPE(a) != self.recorded[i].typenum or not cnp.PyArray_IS_C_CONTIGUOUS(a)
                    or not cnp.PyArray_ISALIGNED(a) or not cnp.PyArray_ISWRITEABLE(a)):
                raise ValueError(f"{self.labels[i]} was changed in place (its dtype, size, layout or writeable "
                                 "flag): an optimizer's arrays must stay as they were given")

    cpdef check_grads(self, list params, list grads, list positions, Py_ssize_t grad_offset,
                      Py_ssize_t param_offset, Py_ssize_t group=-1):
        """Check ``grads[i]`` against ``params[i]`` and against every recorded array of
        group ``group`` (-1: of every group).

        Errors name the gradient ``grads[grad_offset + positions[i]]`` (its place in the
        list given to ``step``) and the parameter ``params[param_offset + positions[i]]``.
        """
        cdef Py_ssize_t i, n = len(params)
        if len(grads) != n:
            raise ValueError(f"{len(grads)} gradients for {n} parameters")
        for i in range(n):
            self.check_grad(grads[i], <cnp.ndarray>params[i], grad_offset + positions[i],
                            param_offset + positions[i], group)

    cdef int check_grad(self, object obj, cnp.ndarray p, Py_ssize_t grad_index, Py_ssize_t param_index,
                        Py_ssize_t group) except -1:
        """:meth:`check_grads` of one gradient, ``grads[grad_index]`` of ``params[param_index]``."""
        if (not cnp.PyArray_Check(obj) or cnp.PyArray_TYPE(<cnp.ndarray>obj) != cnp.PyArray_TYPE(p)
                or not _same_shape(<cnp.ndarray>obj, p) or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>obj)
                or not cnp.PyArray_ISALIGNED(<cnp.ndarray>obj)):
            _check_array(obj, f"grads[{grad_index}]", -1, False, False, p, f"its parameter params[{param_index}]")
        return self.check_overlap(<cnp.ndarray>obj, grad_index, group)

    cdef int check_overlap(self, cnp.ndarray g, Py_ssize_t grad_index, Py_ssize_t group) except -1:
        """ValueError if gradient ``g`` (``grads[grad_index]``) shares a byte with a
        recorded array of group ``group`` (-1: of any group)."""
        cdef Py_ssize_t lo, hi, mid
        cdef size_t start, end
        if not cnp.PyArray_NBYTES(g):
            return 0
        start = <size_t>cnp.PyArray_BYTES(g)
        end = start + <size_t>cnp.PyArray_NBYTES(g)
        # The spans are disjoint and sorted, so their ends are sorted too: find
        # the first that ends after the gradient starts.
        lo, hi = 0, self.n_spans
        while lo < hi:
            mid = (lo + hi) // 2
            if self.spans[mid].hi <= start:
                lo = mid + 1
            else:
                hi = mid
        while lo < self.n_spans and self.spans[lo].lo < end:
            if group < 0 or self.spans[lo].role == group:
                raise ValueError(f"grads[{grad_index}] shares memory with "
                                 f"{self.labels[self.spans[lo].index]}, which the step writes")
            lo += 1
        return 0

    cpdef list check_stored_grads(self, list params, object grads, list positions, Py_ssize_t offset,
                                  Py_ssize_t group, str where):
        """The gradients of a low-precision bucket (bfloat16/float16 parameters, or
        state in bfloat16/int8: :class:`StoredCall`), ``grads[offset + positions[i]]``
        for ``params[i]``, checked, as the kernel takes them: a new list, with
        bfloat16 gradients as their uint16 bits.

        Each must be an ndarray of its parameter's dtype or float32 (the stored
        kernels read both), all of one dtype, shaped like its parameter,
        C-contiguous and aligned, and share no byte with any recorded array of
        group ``group`` (-1: of every group), as :meth:`check_grads` checks. Errors
        begin with ``where`` (the bucket) and name ``grads[offset + positions[i]]``.
        """
        cdef Py_ssize_t i, index, n = len(params)
        cdef int typenum, first = -1
        cdef bint bits = False
        cdef object obj, first_dtype = None
        cdef cnp.ndarray p, g
        cdef list out = PyList_New(n)
        if len(positions) != n:
            raise ValueError(f"{len(positions)} positions for {n} parameters")
        for i in range(n):
            index = offset + <Py_ssize_t>positions[i]
            obj = grads[index]
            p = <cnp.ndarray?>params[i]
            if not cnp.PyArray_Check(obj):
                raise TypeError(f"{where}: grads[{index}] must be a numpy.ndarray, got {type(obj).__name__}")
            g = <cnp.ndarray>obj
            typenum = cnp.PyArray_TYPE(g)
            if typenum != first:
                if typenum != cnp.NPY_FLOAT32 and typenum != cnp.PyArray_TYPE(p):
                    allowed = " or ".join(sorted({"float32", p.dtype.name}))
                    raise TypeError(f"{where}: grads[{index}] has dtype {g.dtype.name}; with {p.dtype.name} "
                                    f"parameters gradients are {allowed}")
                if first >= 0:
                    raise TypeError(f"{where}: grads[{index}] has dtype {g.dtype.name} but the bucket's first "
                                    f"gradient has {first_dtype.name}: one dtype per call")
                first, first_dtype = typenum, g.dtype
                bits = typenum == _bfloat16_type()
            if not _same_shape(g, p):
                raise ValueError(f"{where}: grads[{index}] has shape {obj.shape}, but its parameter has "
                                 f"{(<object>p).shape}")
            if not cnp.PyArray_IS_C_CONTIGUOUS(g) or not cnp.PyArray_ISALIGNED(g):
                raise ValueError(f"{where}: grads[{index}] must be C-contiguous and aligned")
            self.check_overlap(g, index, group)
            if bits:
                obj = fd_view_as(g, _UINT16)
            Py_INCREF(obj)
            PyList_SET_ITEM(out, i, obj)
        return out


# --------------------------------------------------- hyperparameter cache support
import numpy

# NumPy's scalars are immutable too (a schedule may well compute a rate as one).
cdef tuple _NUMPY_FLOATS = (numpy.float64, numpy.float32)
cdef tuple _NUMPY_EXACT = (numpy.bool_, numpy.int64, numpy.int32)


cdef bint _immutable(object value):
    """True for the values a cache may key on: float, int, bool, str, None, NumPy's
    float64, float32, int64, int32 and bool scalars, and tuples of them (exact
    types: no subclass can change its value or its equality)."""
    cdef type kind = type(value)
    if kind is float or kind is int or kind is bool or kind is str or value is None:
        return True
    if kind in _NUMPY_FLOATS or kind in _NUMPY_EXACT:
        return True
    if kind is tuple:
        for item in <tuple>value:
            if not _immutable(item):
                return False
        return True
    return False


cdef bint _identical(object a, object b):
    """Same type and value, floats bit for bit: unlike ==, True is not 1, 1 is not
    1.0, -0.0 is not 0.0 and numpy.float64(0.5) is not 0.5."""
    cdef double x, y
    cdef Py_ssize_t i
    if a is b:
        return True
    cdef type kind = type(a)
    if kind is not type(b):
        return False
    if kind is float:
        x, y = PyFloat_AS_DOUBLE(a), PyFloat_AS_DOUBLE(b)
        return memcmp(&x, &y, sizeof(double)) == 0
    if kind in _NUMPY_FLOATS:  # exactly representable as doubles
        x, y = float(a), float(b)
        return memcmp(&x, &y, sizeof(double)) == 0
    if kind is int or kind is str or kind in _NUMPY_EXACT:
        return bool(a == b)
    if kind is tuple:
        if len(<tuple>a) != len(<tuple>b):
            return False
        for i in range(len(<tuple>a)):
            if not _identical((<tuple>a)[i], (<tuple>b)[i]):
                return False
        return True
    return False


def immutable(value):
    """True if ``value`` is built only of float, int, bool, str, None, NumPy's
    float64, float32, int64, int32 and bool scalars, and tuples."""
    return _immutable(value)


cdef bint _same_objects(tuple a, tuple b):
    cdef Py_ssize_t i
    if len(a) != len(b):
        return False
    for i in range(len(a)):
        if <PyObject*>a[i] != <PyObject*>b[i]:
            return False
    return True


@cython.auto_pickle(False)
cdef class ExactCache:
    """A cache keyed on tuples of values that hands out an entry only for the very
    values it was stored with: the same types, floats bit for bit.

    A dict alone would not do: ``True == 1 == 1.0`` and ``-0.0 == 0.0``, and they
    hash alike, so a result computed (validated) for one would be handed out for
    another. Only keys of immutable values are stored (see
    :func:`immutable`): nothing can change them after the entry was made, so the
    very same objects as the last hit are a hit at once, without hashing.
    The cache is emptied when it holds ``limit`` entries.
    """

    cdef dict entries
    cdef tuple last        # (key, value) of the last entry stored or found
    cdef Py_ssize_t limit

    def __init__(self, Py_ssize_t limit=256):
        self.entries, self.last, self.limit = {}, None, limit

    cpdef object get(self, tuple key):
        """The value stored under ``key`` exactly, or None."""
        cdef tuple last = self.last, entry
        if last is not None and _same_objects(<tuple>last[0], key):
            return last[1]
        if not _immutable(key):
            return None
        entry = self.entries.get(key)
        if entry is None or not _identical(entry[0], key):
            return None
        self.last = entry  # one reference replaced: a thread never sees a key with another's value
        return entry[1]

    def put(self, tuple key, value):
        """Store ``value`` under ``key`` (nothing happens for a key that is not immutable)."""
        cdef tuple entry = (key, value)
        if not _immutable(key):
            return
        if len(self.entries) >= self.limit:
            self.entries.clear()
        self.entries[key] = entry
        self.last = entry

    def clear(self):
        self.entries.clear()
        self.last = None

    def __len__(self):
        return len(self.entries)


def same_values(object mapping, tuple names, tuple values):
    """True if ``mapping`` is a dict and ``mapping[names[i]] is values[i]`` for
    every i: the very objects."""
    return _same_values(mapping, names, values)


cdef bint _same_values(object mapping, tuple names, tuple values) except -1:
    cdef Py_ssize_t i
    cdef PyObject* value
    if type(mapping) is not dict or values is None or len(values) != len(names):
        return False
    for i in range(len(names)):
        value = PyDict_GetItemWithError(mapping, names[i])
        if value == NULL or value != <PyObject*>values[i]:
            return False
    return True


def update_each(list mappings, dict update):
    """``mapping.update(update)`` for every dict of ``mappings`` (a step's counters)."""
    cdef object mapping
    for mapping in mappings:
        PyDict_Update(<dict?>mapping, update)


# ------------------------------------------------------------- kernel calls and plans
cdef extern from "Python.h":
    object PyObject_Vectorcall(object function, PyObject** args, size_t nargsf, object kwnames)

cdef enum:
    # Arguments of one kernel call: params, grads, buffers, scalars, n_threads.
    MAX_KERNEL_ARGUMENTS = 48
    # Roles of a direct kernel entry (the kernels' MAX_ROLES).
    MAX_DIRECT_ROLES = 8


include "_direct_abi.pxi"
from cpython.pycapsule cimport PyCapsule_GetPointer
from cpython.contextvars cimport get_value
from contextvars import ContextVar


cdef enum:
    # Row pointers and tensors of a direct kernel call held on the stack; larger calls allocate.
    LOCAL_ROWS = 64
    LOCAL_TENSORS = 16
    # Groups of a step plan whose step scalars (Adam's bias corrections) are computed into C doubles.
    LOCAL_PLAN_GROUPS = 4


@cython.auto_pickle(False)
cdef class KernelCall:
    """One rule's kernel (or reference twin) called with its buffers and scalars by
    name: ``backend.<kernel>(params, grads, <buffer>=..., <scalar>=...,
    n_threads=...)``, the ``def`` entry every update goes through.

    The keyword names are assembled once, here; ``kernel(**scalars)`` would build
    a dict and take it apart again at every call, which costs as much as a small
    update. ``constant_names`` and ``varying_names`` name the scalars that stay
    the same from step to step and those that change with the step.

    The C paths (:class:`Face`, :class:`StepPlan`), which have checked every
    array already, go further where the backend module offers the kernel's
    direct entry (``direct_entries()``, src/kernels/_direct.pxi): the same kernel
    called with the arrays' data pointers and the scalars as C doubles, with no
    keyword parsing, no lists and no allocation.
    """

    cdef readonly str kernel
    cdef tuple kwnames, roles
    cdef Py_ssize_t n_buffers, n_constants, n_varying
    # The direct entry of the backend module bound last (None: none bound yet).
    cdef object direct_backend
    cdef direct_fn direct
    cdef Py_ssize_t n_direct_roles, n_direct_scalars
    cdef int role_map[MAX_DIRECT_ROLES]           # the entry's role j is our role role_map[j]
    cdef int scalar_map[MAX_KERNEL_ARGUMENTS]     # its scalar j is our scalar scalar_map[j] (constants, then varying)

    def __init__(self, str kernel, tuple buffer_names, tuple constant_names, tuple varying_names):
        self.kernel = kernel
        self.kwnames = (*buffer_names, *constant_names, *varying_names, "n_threads")
        self.roles = ("params", "grads", *buffer_names)
        self.n_buffers, self.n_constants, self.n_varying = len(buffer_names), len(constant_names), len(varying_names)
        if 2 + len(self.kwnames) > MAX_KERNEL_ARGUMENTS:
            raise ValueError(f"a kernel takes at most {MAX_KERNEL_ARGUMENTS} arguments")

    def __call__(self, backend, params, grads, buffers, constants, varying, n_threads):
        """Call ``backend``'s kernel: ``buffers`` (one list or None per declared
        buffer), ``constants`` and ``varying`` (the scalars' values) are tuples in
        the order of the names given to the constructor."""
        return self.call(getattr(backend, self.kernel), params, grads, buffers, constants, varying, n_threads)

    def has_direct(self, backend):
        """True if ``backend`` (a module) has a direct entry for this kernel that
        takes exactly this call's buffers and scalars."""
        return self.bind(backend)

    def call_direct(self, backend, params, grads, tuple buffers, tuple constants, tuple varying, int n_threads):
        """Call ``backend``'s direct entry as the C paths do, on arrays checked as
        :func:`checked_lists` checks them (arguments as for calling this object);
        False if it was not taken (no direct entry, a scalar not a float or a
        bool). For the tests: the C paths reach it without Python."""
        cdef Gathered g
        if not self.bind(backend):
            return False
        self._check_scalars(buffers, constants, varying)
        _gathered_init(&g)
        try:
            _gather(&g, self.roles, (params, grads, *buffers), (True, False) + (True,) * self.n_buffers)
            return self._direct(&g, constants, varying, n_threads) == 0
        finally:
            _release(&g)

    cdef object call(self, object function, object params, object grads, tuple buffers, tuple constants,
                     tuple varying, object n_threads):
        cdef PyObject* args[MAX_KERNEL_ARGUMENTS]
        cdef Py_ssize_t i, k = 2
        self._check_scalars(buffers, constants, varying)
        args[0], args[1] = <PyObject*>params, <PyObject*>grads
        for i in range(self.n_buffers):
            args[k] = <PyObject*>buffers[i]
            k += 1
        for i in range(self.n_constants):
            args[k] = <PyObject*>constants[i]
            k += 1
        for i in range(self.n_varying):
            args[k] = <PyObject*>varying[i]
            k += 1
        args[k] = <PyObject*>n_threads
        return PyObject_Vectorcall(function, args, 2, self.kwnames)

    cdef dict keywords(self, tuple buffers, tuple constants, tuple varying, object n_threads):
        """The keyword arguments of :meth:`call` as a dict (for a backend's ``stored``,
        which takes the kernel's arguments as a tuple and a dict)."""
        cdef dict kwargs = {}
        cdef Py_ssize_t i, k = 0
        cdef tuple names = self.kwnames
        self._check_scalars(buffers, constants, varying)
        for i in range(self.n_buffers):
            kwargs[names[k]] = buffers[i]
            k += 1
        for i in range(self.n_constants):
            kwargs[names[k]] = constants[i]
            k += 1
        for i in range(self.n_varying):
            kwargs[names[k]] = varying[i]
            k += 1
        kwargs[names[k]] = n_threads
        return kwargs

    cdef int _check_scalars(self, tuple buffers, tuple constants, tuple varying) except -1:
        if ((buffers is not None and len(buffers) != self.n_buffers) or len(constants) != self.n_constants
                or len(varying) != self.n_varying):
            raise ValueError(f"{self.kernel}: {len(buffers) if buffers is not None else '?'} buffers, "
                             f"{len(constants)} + {len(varying)} scalars for {self.kwnames}")
        return 0

    cdef bint bind(self, object backend) except -1:
        """Find ``backend``'s direct entry for this kernel (kept until another
        backend comes); False if it has none that takes exactly our buffers and
        scalars."""
        cdef int role_map[MAX_DIRECT_ROLES]
        cdef int scalar_map[MAX_KERNEL_ARGUMENTS]
        cdef Py_ssize_t j
        cdef void* entry_fn = NULL
        if backend is self.direct_backend:
            return self.direct != NULL
        scalars = self.kwnames[self.n_buffers:len(self.kwnames) - 1]
        if len(self.roles) <= MAX_DIRECT_ROLES and len(set(scalars)) == len(scalars):
            entry_fn = find_direct_entry(backend, self.kernel, self.roles, scalars, role_map, scalar_map)
        # No Python code from here on: a thread never sees one backend with another's entry.
        self.direct = <direct_fn>entry_fn
        if entry_fn != NULL:
            self.n_direct_roles, self.n_direct_scalars = len(self.roles), len(scalars)
            for j in range(self.n_direct_roles):
                self.role_map[j] = role_map[j]
            for j in range(self.n_direct_scalars):
                self.scalar_map[j] = scalar_map[j]
        self.direct_backend = backend
        return entry_fn != NULL

    cdef int call_gathered(self, object backend, const Gathered* g, tuple constants, tuple varying,
                           int n_threads, const double* varying_doubles=NULL) except -1:
        """Call ``backend``'s kernel on checked arrays (roles: params, grads, then the
        buffers in declared order): through its direct entry if it has one, else
        its ``def`` entry with new lists. ``varying_doubles`` (with ``varying``
        None): the varying scalars as C doubles (see KernelArguments.varying_doubles)."""
        cdef tuple lists
        cdef Py_ssize_t k
        if self.bind(backend) and self._direct(g, constants, varying, n_threads, varying_doubles) == 0:
            return 0
        if varying is None:
            varying = tuple([varying_doubles[k] for k in range(self.n_varying)])
        lists = _lists(g)
        self.call(getattr(backend, self.kernel), lists[0], lists[1], lists[2:], constants, varying, n_threads)
        return 0

    cdef int _direct(self, const Gathered* g, tuple constants, tuple varying, int n_threads,
                     const double* varying_doubles=NULL) except -1:
        """The bound direct entry on ``g``: 0 if it ran, 1 if it was not taken (a
        scalar that is not a float or a bool, or the entry declined)."""
        cdef double scalars[MAX_KERNEL_ARGUMENTS]
        cdef void* local_rows[LOCAL_ROWS]
        cdef Py_ssize_t local_offsets[LOCAL_TENSORS + 1]
        cdef void** rows = local_rows
        cdef Py_ssize_t* offsets = local_offsets
        cdef Py_ssize_t j, k, t, n = g.n_tensors, n_roles = self.n_direct_roles
        cdef PyObject* item
        cdef DirectCall call
        if varying is not None or varying_doubles == NULL:
            self._check_scalars(None, constants, varying)
        elif len(constants) != self.n_constants:
            self._check_scalars(None, constants, (None,) * self.n_varying)
        if g.n_roles != n_roles or n_threads < 1:
            return 1
        if not direct_scalars(self.scalar_map, self.n_direct_scalars, constants, varying, varying_doubles, scalars):
            return 1
        if n * n_roles > LOCAL_ROWS:
            rows = <void**>malloc(n * n_roles * sizeof(void*))
        if n > LOCAL_TENSORS:
            offsets = <Py_ssize_t*>malloc((n + 1) * sizeof(Py_ssize_t))
        try:
            if rows == NULL or offsets == NULL:
                raise MemoryError()
            offsets[0] = 0
            for t in range(n):
                offsets[t + 1] = offsets[t] + cnp.PyArray_SIZE(<cnp.ndarray>g.items[t])
                for j in range(n_roles):
                    item = g.items[self.role_map[j] * n + t]
                    rows[t * n_roles + j] = cnp.PyArray_DATA(<cnp.ndarray>item) if item != NULL else NULL
            call.rows, call.offsets, call.n_tensors, call.n_roles = rows, offsets, n, n_roles
            call.typenum, call.n_threads, call.scalars = g.typenum, n_threads, scalars
            return self.direct(&call)
        finally:
            if rows != local_rows:
                free(rows)
            if offsets != local_offsets:
                free(offsets)


cdef inline bint _same_scale(object a, object b):
    """The same object, or two floats with the same bits (-0.0 is not 0.0)."""
    cdef double x, y
    if a is b:
        return True
    if type(a) is not float or type(b) is not float:
        return False
    x, y = PyFloat_AS_DOUBLE(a), PyFloat_AS_DOUBLE(b)
    return memcmp(&x, &y, sizeof(double)) == 0


cdef struct BiasTerms:
    bint ok          # the hyperparameters are those BiasCorrections computes in C
    bint bias        # bias_correction
    double lr, b1, b2


@cython.auto_pickle(False)
cdef class BiasCorrections:
    """Adam's ``step_scalars`` in C: ``(lr / (1 - beta1**step), 1 / sqrt(1 - beta2**step))``
    from the validated hyperparameters ``lr``, ``betas`` and ``bias_correction``
    (``(lr, 1.0)`` without bias correction), the numbers of
    ``fastdescent.rules.adam.adam_bias_corrections`` bit for bit: the same libm
    ``pow`` and ``sqrt`` in double precision, for the step counts and betas that
    validation lets through (0 <= beta < 1; anything else is computed by that
    function). :class:`KernelArguments` calls it without a Python call: at every
    step of an optimizer, a Python ``step_scalars`` costs as much as the rest of
    the step's bookkeeping."""

    cdef object python

    def __init__(self, python):
        self.python = python

    def __call__(self, h, step):
        return self.compute(h, step)

    cdef tuple compute(self, object h, object step):
        cdef BiasTerms terms
        self.terms(h, &terms)
        return self.compute_terms(&terms, h, step)

    cdef int terms(self, object h, BiasTerms* t) except -1:
        """What ``compute`` reads of the hyperparameters ``h``, as C doubles (``t.ok``
        False: the Python function computes them)."""
        cdef object lr, betas, bias
        t.ok = False
        if type(h) is not dict:
            return 0
        lr, betas, bias = (<dict>h).get("lr"), (<dict>h).get("betas"), (<dict>h).get("bias_correction")
        if type(lr) is not float or (bias is not True and bias is not False):
            return 0
        t.lr, t.bias = PyFloat_AS_DOUBLE(lr), bias is True
        if bias is False:
            t.ok = True
        elif (type(betas) is tuple and len(<tuple>betas) == 2 and type((<tuple>betas)[0]) is float
                and type((<tuple>betas)[1]) is float):
            t.b1, t.b2 = PyFloat_AS_DOUBLE((<tuple>betas)[0]), PyFloat_AS_DOUBLE((<tuple>betas)[1])
            t.ok = 0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0
        return 0

    cdef tuple compute_terms(self, const BiasTerms* t, object h, object step):
        """``compute(h, step)`` with ``t`` read from ``h`` already."""
        cdef double out[2]
        if self.doubles(t, step, out):
            return (out[0], out[1])
        return self.python(h, step)

    cdef bint doubles(self, const BiasTerms* t, object step, double* out) except -1:
        """``compute(h, step)`` into ``out[0]``, ``out[1]`` if done in C (True)."""
        cdef double c1, c2, s
        if t.ok and 0 < _step_number(step) < 1LL << 53:
            if not t.bias:
                out[0], out[1] = t.lr, 1.0
                return True
            s = <double>step
            c1, c2 = 1.0 - pow(t.b1, s), 1.0 - pow(t.b2, s)
            if c1 > 0.0 and c2 > 0.0:
                out[0], out[1] = t.lr / c1, 1.0 / sqrt(c2)
                return True
        return False


@cython.auto_pickle(False)
cdef class KernelArguments:
    """The kernel call of one validated configuration (a rule's Config), step
    after step: ``(invoke, constants, varying)`` for :class:`KernelCall`.

    ``spec.prepared(spec.scalars(hyper, step=, grad_scale=, fresh=))`` gives
    ``(invoke, constants)``; it runs again only when ``fresh`` is not the very
    object of the last call, ``grad_scale`` neither is it nor a float of the same
    bits, or, if ``keyed_on_step`` (the scalars
    change with the step and the rule declares no ``step_scalars``), ``step`` is
    not. Otherwise only ``spec.step_scalars(hyper, step)`` runs, if declared: so a
    rule computes its step-independent scalars once per change of its
    hyperparameters. One tuple is read and one replaced, so threads sharing a
    configuration never mix one call's key with another's scalars. (It holds the
    spec, not the Config: no reference cycle, so a Config is freed at once.)
    """

    cdef object spec, step_scalars, hyper
    cdef bint keyed_on_step
    cdef BiasTerms bias_terms  # what BiasCorrections reads of hyper (if step_scalars is one)
    cdef tuple last          # (key, grad_scale, fresh, invoke, constants)
    cdef tuple last_varying  # (step, step_scalars(hyper, step)): arrays stepped one by one share it

    def __init__(self, spec, hyper):
        self.spec, self.hyper, self.step_scalars = spec, hyper, spec.step_scalars
        self.keyed_on_step, self.last, self.last_varying = spec.uses_step and spec.step_scalars is None, None, None
        self.bias_terms.ok = False
        if type(self.step_scalars) is BiasCorrections:
            (<BiasCorrections>self.step_scalars).terms(hyper, &self.bias_terms)

    cpdef tuple get(self, object step, object grad_scale, object fresh):
        """``(invoke, constants, varying)`` for step ``step``."""
        cdef tuple constant = self.constant(step, grad_scale, fresh)
        return constant[0], constant[1], self.varying(step)

    cpdef tuple varying(self, object step):
        """``step_scalars(hyper, step)`` (``()`` if the rule declares none), kept for
        the next call at the same step."""
        cdef tuple last = self.last_varying
        if self.step_scalars is None:
            return ()
        if last is None or type(step) is not int or type(last[0]) is not int or step != last[0]:
            if type(self.step_scalars) is BiasCorrections:
                last = (step, (<BiasCorrections>self.step_scalars).compute_terms(&self.bias_terms, self.hyper, step))
            else:
                last = (step, self.step_scalars(self.hyper, step))
            self.last_varying = last
        return last[1]

    cdef bint varying_doubles(self, object step, double* out) except -1:
        """The step scalars of ``varying(step)`` as C doubles into ``out`` (two), if
        the rule's ``step_scalars`` is a :class:`BiasCorrections` that computes
        them in C: True; else False (call ``varying``)."""
        cdef tuple last = self.last_varying
        if not self.bias_terms.ok:
            return False
        if last is not None and type(step) is int and type(last[0]) is int and step == last[0]:
            out[0], out[1] = (<tuple>last[1])[0], (<tuple>last[1])[1]  # (arrays stepped one by one)
            return True
        return (<BiasCorrections>self.step_scalars).doubles(&self.bias_terms, step, out)

    cpdef tuple constant(self, object step, object grad_scale, object fresh):
        """``(invoke, constants)`` for step ``step``: what does not change with it."""
        cdef tuple last = self.current(step, grad_scale, fresh)
        return last[3], last[4]

    cdef tuple current(self, object step, object grad_scale, object fresh):
        """``(key, grad_scale, fresh, invoke, constants)`` for step ``step``, computed
        again only when needed."""
        cdef object key = step if self.keyed_on_step else None
        cdef tuple last = self.last
        if last is None or last[0] is not key or not _same_scale(last[1], grad_scale) or last[2] is not fresh:
            invoke, constants = self.spec.prepared(self.spec.scalars(self.hyper, step=step, grad_scale=grad_scale,
                                                                     fresh=fresh))
            last = (key, grad_scale, fresh, invoke, constants)
            self.last = last
        return last


@cython.auto_pickle(False)
cdef class CallDefaults:
    """fastdescent's defaults for ``n_threads`` and ``backend``, and the one place that
    resolves a request against them. ``fastdescent._config``'s functions
    (``effective_n_threads``, ``set_num_threads``, ``num_threads``, ``set_backend``,
    ``resolve_backend``) read and write them here; the C paths of the faces and the
    step plans call the same code without a Python call.

    ``threads(n_threads)``: None takes the innermost ``num_threads`` block of the
    calling thread (``block``, a ContextVar holding ``(n,)`` or None), else
    ``default_threads`` (``set_num_threads``), else every usable core; a negative
    count counts back from the usable cores (-1: all); never more than OpenMP's limit
    for this thread (:func:`thread_limit`). A request that is neither None nor a
    nonzero int goes to ``check``, which raises for it.

    ``backend(name)``: the module of ``name`` (None: ``default_backend``, else
    ``env_backend``) in ``modules``; one not there yet comes from ``load(name)``,
    which imports the backends (or raises for an unknown name).
    """

    cdef readonly object block
    cdef readonly dict modules
    cdef readonly str env_backend
    cdef public object default_threads, default_backend
    cdef object check, load

    def __init__(self, block, dict modules not None, str env_backend not None, check, load):
        if type(block) is not ContextVar:
            raise TypeError("block must be a ContextVar")
        self.block, self.modules, self.env_backend, self.check, self.load = block, modules, env_backend, check, load
        self.default_threads = self.default_backend = None

    def threads(self, n_threads=None):
        """The number of threads a kernel uses for the request ``n_threads``."""
        return self.threads_for(n_threads)

    def backend(self, backend=None):
        """The backend module for ``backend`` (None: the default)."""
        return self.backend_for(backend)

    cdef int threads_for(self, object n_threads) except -1:
        cdef object request = n_threads, block
        cdef int limit
        if request is None:
            block = get_value(self.block)
            request = self.default_threads if block is None else block[0]
        elif type(request) is not int or request == 0:
            self.check(request)
        limit = _thread_limit()
        if request is None:
            return limit
        if request < 0:
            return max(1, limit + 1 + request)
        return limit if request > limit else <int>request

    cdef object backend_for(self, object backend):
        cdef PyObject* found
        cdef object name = backend
        if name is None:
            name = self.default_backend
            if name is None:
                name = self.env_backend
        if type(name) is str:
            found = PyDict_GetItemWithError(self.modules, name)
            if found != NULL:
                return <object>found
        return self.load(name)


cdef extern from *:
    """
    /* SplitMix64's finalizer: fastdescent.precision.splitmix64, which defines the
       keys of stochastic rounding (the kernels' fd_splitmix64 is the same). */
    static inline unsigned long long fd_key_mix(unsigned long long x) {
        unsigned long long z = x + 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }
    """
    unsigned long long fd_key_mix(unsigned long long x) noexcept nogil

from cpython.long cimport PyLong_AsUnsignedLongLongMask, PyLong_FromUnsignedLongLong


@cython.auto_pickle(False)
cdef class StoredCall:
    """The kernel call of one low-precision bucket of an optimizer (bfloat16 or int8
    state, bfloat16/float16 parameters, float32 master copies), made by
    ``fastdescent.optim.lowprec`` once for as long as the bucket's state stays as
    it is, and taken by every step, the general way's and the :class:`StepPlan`'s.

    It keeps what depends only on the state: the arrays of each role as the
    kernel takes them (``params``: the masters, the parameters or their uint16
    bits; ``buffers``: one list or None per declared buffer, bfloat16 as uint16
    bits), the formats the backend's ``stored`` takes for the stored ``roles``
    (``fastdescent.precision.stored_roles``), made once by ``formats(storage,
    step, roles)``, the tensors' ``ids`` (their rounding keys), a flat arena's
    gradients (``grads``), ``grad_kind``, the storage kind of gradients of the
    parameters' dtype (float32 ones are plain), and ``where``, the bucket as
    errors about its gradients name it. With stochastic rounding the keys of
    those formats depend on the step number: :meth:`formats_at` derives them
    again in C for each new step, as ``fastdescent.precision.stream_key`` does (in
    Python that took as long as the rest of a small step). The gradients
    :meth:`call` gets are checked already (:meth:`WrittenBuffers.check_stored_grads`).
    """

    cdef readonly list params, grads
    cdef readonly tuple buffers
    cdef readonly object ids
    cdef readonly str where      # the bucket, as errors about its gradients name it
    cdef int grad_kind
    cdef list fixed              # the formats (their keys for step 0 where they have one)
    cdef list keyed, streams     # the positions in fixed of the entries with a key, and their streams
    cdef unsigned long long seed_key
    cdef tuple last              # (step, formats) of the last step number, if keyed

    def __init__(self, list params, tuple buffers, list roles, ids, int grad_kind, storage, formats, str where,
                 list grads=None):
        self.params, self.buffers, self.ids, self.grad_kind = params, buffers, ids, grad_kind
        self.where, self.grads, self.last = where, grads, None
        self.fixed = list(formats(storage, 0, roles))
        self.keyed = [i for i, entry in enumerate(self.fixed) if entry[6] is not None]
        self.streams = [roles[i][6] for i in self.keyed]
        if self.keyed:
            self.seed_key = fd_key_mix(PyLong_AsUnsignedLongLongMask(storage.seed))

    cpdef list formats_at(self, object step):
        """The formats for step number ``step`` (an int)."""
        cdef tuple last = self.last, entry
        cdef list out
        cdef unsigned long long base
        cdef Py_ssize_t k
        if not self.keyed:
            return self.fixed
        if last is not None and type(step) is int and type(last[0]) is int and step == last[0]:
            return last[1]
        base = fd_key_mix(self.seed_key ^ PyLong_AsUnsignedLongLongMask(step))
        out = list(self.fixed)
        for k in range(len(self.keyed)):
            entry = out[self.keyed[k]]
            out[self.keyed[k]] = (entry[0], entry[1], entry[2], entry[3], entry[4], entry[5],
                                  PyLong_FromUnsignedLongLong(
                                      fd_key_mix(base ^ PyLong_AsUnsignedLongLongMask(self.streams[k]))))
        self.last = (step, out)
        return out

    def call(self, kernels, KernelCall invoke, list grads, tuple constants, tuple varying, int n_threads, step):
        """Call ``kernels``' ``stored`` (kernel or reference backend) for step number
        ``step`` on ``grads`` (checked; None: a flat arena's own) with ``invoke``'s
        kernel and scalars (``constants``, ``varying``: as for :class:`KernelCall`)."""
        cdef list formats = self.formats_at(step)
        if grads is None:
            grads = self.grads
        if grads and self.grad_kind != 0 and cnp.PyArray_TYPE(<cnp.ndarray?>grads[0]) != cnp.NPY_FLOAT32:
            formats = formats + [(grads, self.grad_kind, None, None, 0, False, None)]
        if not formats:  # (float64 state of float64 parameters)
            invoke.call(getattr(kernels, invoke.kernel), self.params, grads, self.buffers, constants, varying,
                        n_threads)
            return
        kernels.stored(getattr(kernels, invoke.kernel), (self.params, grads),
                       invoke.keywords(self.buffers, constants, varying, n_threads), formats, self.ids)


@cython.auto_pickle(False)
cdef class BucketPlan:
    """One kernel call of an optimizer's step: a group's parameters of one dtype
    (or its flat arena), their state buffers as the kernel takes them, and where
    the parameters sit in the group (``positions``: indices into its list);
    ``stored``: a low-precision bucket's :class:`StoredCall` (None for a float
    bucket, whose arrays the kernel takes as they are)."""

    cdef public list params, positions, grads
    cdef public tuple buffers
    cdef public object span        # the slice of the group's gradients, or None if not contiguous
    cdef public StoredCall stored

    def __init__(self, list params, tuple buffers, list positions, span, list grads=None, StoredCall stored=None):
        self.params, self.buffers, self.positions, self.span, self.grads = params, buffers, positions, span, grads
        self.stored = stored


@cython.auto_pickle(False)
cdef class GroupPlan:
    """What an optimizer's step needs of one parameter group while nothing changes:
    the group's dict and the hyperparameter objects last validated (``values``,
    by ``names``), its parameter list, its state dicts (the step count of
    ``states[0]``), its configuration's kernel call and scalars (``arguments``, a
    :class:`KernelArguments`) and which of the rule's buffers the kernel gets
    (``present``, as a Config's)."""

    cdef public object group, param_list
    cdef public tuple names, values, present
    cdef public list states, buckets
    cdef public KernelArguments arguments
    cdef public Py_ssize_t first, size
    cdef public bint counts_steps
    # The group's keys in order, and the values of those in names (ANY for the
    # others), as last seen with values: see _same_order.
    cdef tuple order_keys, order_values

    def __init__(self, group, tuple names, tuple values, param_list, list states, list buckets,
                 KernelArguments arguments, Py_ssize_t first, Py_ssize_t size, bint counts_steps, tuple present):
        self.group, self.names, self.values, self.param_list = group, names, values, param_list
        self.states, self.buckets, self.arguments = states, buckets, arguments
        self.first, self.size, self.counts_steps, self.present = first, size, counts_steps, present


@cython.auto_pickle(False)
cdef class StepPlan:
    """An optimizer's step while nothing but the gradients, the gradient scale and
    the hyperparameter values changes, in C.

    The optimizer builds it (in Python) after a step that went its general way,
    and uses it until anything else changes. When a hyperparameter in
    ``param_groups`` is not the object validated last time (a schedule wrote
    it), the optimizer's ``_refresh_plan(position, group_plan, step, flat)``
    validates the group again and updates the group's plan, or returns False. :meth:`run`
    returns False, before writing anything, when a refresh does, a group or its
    parameter list was replaced, a step count is not a plain int in range, or
    ``grad_scale`` is not a finite positive float; the optimizer then takes its
    general path, which validates, allocates, raises as needed and builds a new
    plan. Otherwise it checks the arrays (:class:`WrittenBuffers`; a bad gradient
    raises), gets each group's scalars (:class:`KernelArguments`: the rule's
    ``step_scalars`` each step, the others when the gradient scale changes), and
    only then writes: one kernel call per bucket, then the step counts. ``flat``:
    the plan steps the flat arenas (``run(None)``) rather than gradients given
    per array. ``fresh`` is the "no buffer created" marker the configs key on.
    """

    cdef list param_groups, groups
    cdef WrittenBuffers written
    cdef bint flat
    cdef Py_ssize_t size
    cdef object fresh
    cdef CallDefaults defaults

    def __init__(self, list param_groups, list groups, WrittenBuffers written, bint flat, fresh,
                 CallDefaults defaults):
        cdef GroupPlan plan
        self.param_groups, self.groups, self.written, self.flat = param_groups, groups, written, flat
        self.fresh, self.defaults = fresh, defaults
        self.size = 0
        for plan in groups:
            self.size += plan.size

    def run(self, object param_groups, object grads, object grad_scale, object backend, object n_threads,
            object optimizer):
        """Take the step; False if the optimizer must take its general path instead.
        ``backend`` and ``n_threads`` are the optimizer's options (None: the
        defaults). (``optimizer`` comes with each call, and its ``_refresh_plan`` is
        looked up only when a group needs it: a plan that kept it would keep its
        optimizer alive in a reference cycle, and a bound method made at every
        step costs a tenth of a small step.)"""
        cdef Py_ssize_t g, b, n = len(self.groups), offset = 0, n_buckets = 0
        cdef GroupPlan plan
        cdef BucketPlan bucket
        cdef KernelArguments arguments
        cdef object group, step, kernels
        cdef list steps = [], calls = [], stored_grads = None
        cdef tuple last
        cdef int threads
        cdef Gathered local_gathered[2]
        cdef Gathered* gathered = local_gathered
        cdef double varying_doubles[2 * LOCAL_PLAN_GROUPS]  # groups' step scalars computed in C
        if (param_groups is not self.param_groups or len(<list>param_groups) != n or (grads is None) != self.flat
                or type(grad_scale) is not float or not 0.0 < <double>grad_scale < INFINITY):
            return False
        kernels = self.defaults.backend_for(backend)
        threads = self.defaults.threads_for(n_threads)
        for g in range(n):
            plan = <GroupPlan>self.groups[g]
            group = (<list>param_groups)[g]
            if group is not plan.group or PyDict_GetItemWithError(group, "params") != <PyObject*>plan.param_list:
                return False
            step = 1
            if plan.counts_steps:
                step = (<dict>plan.states[0]).get("step")
                if type(step) is not int or not 0 <= step < MAX_STEP - 1:
                    return False
                step += 1
            if not _same_order(group, plan):
                if (not _same_values(group, plan.names, plan.values)
                        and not optimizer._refresh_plan(g, plan, step, self.flat)):
                    return False
                _take_order(group, plan)
            steps.append(step)
            n_buckets += len(plan.buckets)
        self.written.verify()
        if not self.flat:
            if type(grads) is not list and type(grads) is not tuple:
                return False
            if len(grads) != self.size:
                raise ValueError(f"{len(grads)} gradients for {self.size} parameters")
        if n_buckets > 2:
            gathered = <Gathered*>malloc(n_buckets * sizeof(Gathered))
            if gathered == NULL:
                raise MemoryError()
        for b in range(n_buckets):
            _gathered_init(&gathered[b])
        try:
            # The arrays of every call, each gradient checked (WrittenBuffers.check_grad).
            b = 0
            for g in range(n):
                plan = <GroupPlan>self.groups[g]
                for bucket in plan.buckets:
                    if bucket.stored is None:
                        _gather_bucket(&gathered[b], bucket, None if self.flat else grads, offset, plan.first,
                                       self.written)
                    elif not self.flat:  # (a flat arena's gradients are the optimizer's own)
                        if stored_grads is None:
                            stored_grads = [None] * n_buckets
                        stored_grads[b] = self.written.check_stored_grads(bucket.params, grads, bucket.positions,
                                                                          offset, -1, bucket.stored.where)
                    b += 1
                offset += plan.size
            for g in range(n):
                arguments = (<GroupPlan>self.groups[g]).arguments
                last = arguments.current(steps[g], grad_scale, self.fresh)
                if type(last[3]) is not KernelCall:
                    return False
                if g < LOCAL_PLAN_GROUPS and arguments.varying_doubles(steps[g], &varying_doubles[2 * g]):
                    calls.append((last[3], last[4], None))
                else:
                    calls.append((last[3], last[4], arguments.varying(steps[g])))
            # The writes.
            b = 0
            for g in range(n):
                plan = <GroupPlan>self.groups[g]
                invoke, constants, varying = calls[g]
                for bucket in plan.buckets:
                    if bucket.stored is None:
                        _call_bucket(<KernelCall>invoke, kernels, &gathered[b], constants, varying, threads,
                                     &varying_doubles[2 * g] if varying is None else NULL)
                    else:
                        if varying is None:
                            varying = tuple([varying_doubles[2 * g + k] for k in range((<KernelCall>invoke).n_varying)])
                        bucket.stored.call(kernels, invoke, None if stored_grads is None else stored_grads[b],
                                           constants, varying, threads, steps[g])
                    b += 1
                if plan.counts_steps:
                    _set_steps(plan.states, steps[g])
        finally:
            for b in range(n_buckets):
                _release(&gathered[b])
            if gathered != local_gathered:
                free(gathered)
        return True


cdef object ANY = object()


cdef bint _same_order(object group, GroupPlan plan) except -1:
    """True if the dict ``group`` holds the keys of the last :func:`_take_order` of
    ``plan``, in the same order, and the very same objects under the names of
    ``plan.names``: then ``_same_values(group, plan.names, plan.values)`` holds.
    One walk over the dict rather than a lookup per hyperparameter; a key
    removed and added again, or any new key, fails it (and the caller checks
    the slow way)."""
    cdef Py_ssize_t position = 0, i = 0
    cdef PyObject* key
    cdef PyObject* value
    cdef tuple keys = plan.order_keys, values = plan.order_values
    if keys is None or type(group) is not dict or PyDict_Size(group) != len(keys):
        return False
    while PyDict_Next(group, &position, &key, &value):
        if (key != PyTuple_GET_ITEM(keys, i)
                or (value != PyTuple_GET_ITEM(values, i) and PyTuple_GET_ITEM(values, i) != <PyObject*>ANY)):
            return False
        i += 1
    return True


cdef int _take_order(object group, GroupPlan plan) except -1:
    """Remember the order of ``group``'s keys and its values under ``plan.names``,
    which are ``plan.values`` (the caller has just checked them)."""
    cdef list keys = [], values = []
    if type(group) is dict:
        for key, value in (<dict>group).items():
            keys.append(key)
            values.append(value if key in plan.names else ANY)
        plan.order_keys, plan.order_values = tuple(keys), tuple(values)
    return 0


cdef int _gather_bucket(Gathered* g, BucketPlan bucket, object grads, Py_ssize_t offset, Py_ssize_t first,
                        WrittenBuffers written) except -1:
    """The arrays of one kernel call of a step plan: the bucket's parameters and
    buffers, and its gradients, ``grads[offset + position]`` (checked against their
    parameters and the written arrays), or its own (a flat arena's) if ``grads`` is
    None."""
    cdef Py_ssize_t r, k, position, n = len(bucket.params), n_roles = 2 + len(bucket.buffers)
    cdef list params = bucket.params, positions = bucket.positions
    cdef object grad
    _gathered_alloc(g, n_roles, n)
    _take_list(g, 0, params)
    if grads is None:
        _take_list(g, 1, bucket.grads)
    else:
        if len(positions) != n:
            raise ValueError(f"{len(positions)} positions for {n} parameters")
        for k in range(n):
            position = positions[k]
            grad = grads[offset + position]
            written.check_grad(grad, <cnp.ndarray>params[k], offset + position, first + position, -1)
            Py_INCREF(grad)
            g.items[n + k] = <PyObject*>grad
        g.given |= 2
    for r in range(2, n_roles):
        if bucket.buffers[r - 2] is not None:
            _take_list(g, r, bucket.buffers[r - 2])
    g.typenum = -1
    if n and cnp.PyArray_Check(<object>g.items[0]):
        g.typenum = cnp.PyArray_TYPE(<cnp.ndarray>g.items[0])
    return 0


cdef int _call_bucket(KernelCall invoke, object kernels, const Gathered* g, tuple constants, tuple varying,
                      int threads, const double* varying_doubles) except -1:
    """One kernel call of a step plan, on arrays the plan checked (WrittenBuffers).
    What the ``def`` entry itself checks (every array an ndarray of the parameters'
    dtype and size, C-contiguous) is checked again here (the flat arenas are not in
    the WrittenBuffers table): anything amiss goes to the ``def`` entry, which raises."""
    cdef Py_ssize_t r, i, k, n = g.n_tensors
    cdef PyObject* item
    cdef tuple lists
    for r in range(g.n_roles):
        for i in range(n if g.given >> r & 1 else 0):
            item = g.items[r * n + i]
            if (not cnp.PyArray_Check(<object>item) or cnp.PyArray_TYPE(<cnp.ndarray>item) != g.typenum
                    or cnp.PyArray_SIZE(<cnp.ndarray>item) != cnp.PyArray_SIZE(<cnp.ndarray>g.items[i])
                    or not cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>item)):
                lists = _lists(g)
                if varying is None:
                    varying = tuple([varying_doubles[k] for k in range(invoke.n_varying)])
                invoke.call(getattr(kernels, invoke.kernel), lists[0], lists[1], lists[2:], constants, varying,
                            threads)
                return 0
    return invoke.call_gathered(kernels, g, constants, varying, threads, varying_doubles)


cdef int _set_steps(list states, object step) except -1:
    """``state["step"] = step`` for every state dict of a group."""
    cdef object state
    for state in states:
        PyDict_SetItem(<dict?>state, "step", step)
    return 0


# ------------------------------------------------------------------ the faces
from cpython.long cimport PyLong_AsLongLongAndOverflow
from cpython.object cimport PyObject_Call, PyTypeObject
from cpython.unicode cimport PyUnicode_Compare

cdef extern from *:
    """
    /* Make instances of ``type`` callable through the vectorcall protocol, with the
       function pointer stored at ``offset`` in each instance (what CPython's own
       function objects do; Cython does not declare it for a cdef class). Every
       call, PyObject_Call's included, then takes it; tp_call (the class's
       ``__call__``) is only what ``callable()`` and ``Face.__call__`` see. */
    static void fd_enable_vectorcall(PyTypeObject* type, Py_ssize_t offset) {
        type->tp_vectorcall_offset = offset;
        type->tp_flags |= Py_TPFLAGS_HAVE_VECTORCALL;
        PyType_Modified(type);
    }
    """
    void fd_enable_vectorcall(PyTypeObject* type, Py_ssize_t offset)
    Py_ssize_t PyVectorcall_NARGS(size_t nargsf)

cdef enum:
    # Parameters of a face (its signature, plus the hyperparameters it does not take).
    MAX_FACE_SLOTS = 48


@cython.auto_pickle(False)
@cython.final
cdef class Face:
    """A rule's functional face (``fastdescent.adam_step``), callable from C.

    A Python function generated with the face's signature spent about a third of
    a small step on its own call: a frame, a dictionary lookup per keyword-only
    default not given, three tuples. This object takes its arguments through
    the vectorcall protocol instead: ``names`` (the signature's parameters, the
    positional ones first, ``n_positional`` of them) are matched against the
    keywords of the call by identity (then by value), and ``defaults`` (one per
    name, ``required`` for none, then the values of the hyperparameters the face
    does not take) fill the rest. ``slots`` says where each argument of
    :meth:`RuleSpec.face_step` is: ``(buffers, values, step, scalar_states,
    first_step, grad_scale, n_threads, backend)``, indices into the names and
    defaults (-1: not a parameter of this face; ``scalar_states``: a tuple of
    ``(name, index)``).

    The common case runs here: the hyperparameters are the very objects of the
    last call (else looked up in the rule's ``configs``, the exact-value cache
    of validated configurations), ``step`` is an int in range, ``grad_scale`` a
    finite float, the buffers given are those the configuration needs,
    ``first_step`` is False and the rule is ``simple`` (no scalar state, no
    buffers shaped otherwise than their parameters): it checks every array (as
    :func:`checked_lists`, without building the lists) and calls the kernel,
    through its direct entry where the backend has one (:class:`KernelCall`).
    Anything else goes to ``general`` (``RuleSpec.face_step``), which validates
    it all and raises or runs; both compute the same scalars and make the same
    kernel call. ``defaults`` resolves ``n_threads`` and ``backend``
    (:class:`CallDefaults`). ``__name__``, ``__doc__``, ``__signature__`` and
    the like are set by the caller (``rules._spec.make_face``).
    """

    cdef void* vectorcall
    cdef dict __dict__
    cdef str name
    cdef tuple names, defaults, roles, writable, scalar_states
    cdef object required, general, nothing_fresh
    cdef ExactCache configs
    cdef CallDefaults call_defaults
    cdef Py_ssize_t n_positional, n_names, n_slots, n_buffers, n_values
    cdef Py_ssize_t step_slot, first_step_slot, grad_scale_slot, n_threads_slot, backend_slot
    cdef int buffer_slot[MAX_FACE_SLOTS]
    cdef int value_slot[MAX_FACE_SLOTS]
    cdef bint uses_step, simple
    cdef tuple last    # (values, config, present bits, config.arguments) of the last call's hyperparameter objects

    def __cinit__(self):
        self.vectorcall = <void*>_face_vectorcall

    def __init__(self, str name, tuple names, Py_ssize_t n_positional, tuple defaults, required, tuple slots,
                 ExactCache configs, tuple roles, tuple writable, bint uses_step, bint simple, general,
                 CallDefaults call_defaults, nothing_fresh):
        cdef Py_ssize_t k
        buffers, values, step, scalar_states, first_step, grad_scale, n_threads, backend = slots
        if len(defaults) > MAX_FACE_SLOTS or len(names) > len(defaults) or not 0 <= n_positional <= len(names):
            raise ValueError(f"{name}: at most {MAX_FACE_SLOTS} parameters, one default each")
        for k in list(buffers) + list(values) + [step, first_step, grad_scale, n_threads, backend] + \
                [index for _, index in scalar_states]:
            if not -1 <= k < len(defaults):
                raise ValueError(f"{name}: no parameter {k}")
        self.name = name
        self.names = tuple([intern(n) for n in names])
        self.n_positional, self.n_names, self.n_slots = n_positional, len(names), len(defaults)
        self.defaults, self.required = defaults, required
        self.n_buffers, self.n_values = len(buffers), len(values)
        for k in range(self.n_buffers):
            self.buffer_slot[k] = buffers[k]
        for k in range(self.n_values):
            self.value_slot[k] = values[k]
        self.step_slot, self.first_step_slot, self.grad_scale_slot = step, first_step, grad_scale
        self.n_threads_slot, self.backend_slot, self.scalar_states = n_threads, backend, scalar_states
        self.configs, self.roles, self.writable, self.uses_step, self.simple = configs, roles, writable, uses_step, simple
        self.general, self.call_defaults, self.nothing_fresh = general, call_defaults, nothing_fresh
        self.last = None

    def __call__(self, *args, **kwargs):
        return PyObject_Call(self, args, kwargs)  # through the vectorcall entry

    def __get__(self, instance, owner):
        """A face stored in a class stays a plain function (as a staticmethod would)."""
        return self

    def __reduce__(self):
        return getattr(self, "__qualname__", self.name)

    def __repr__(self):
        return f"<face {getattr(self, '__module__', '?')}.{self.name}>"

    cdef object call(self, PyObject** slots):
        cdef PyObject* value
        cdef Py_ssize_t k
        cdef Gathered g
        cdef tuple last = self.last, values, varying
        cdef unsigned long long present = 0
        cdef object config = None, step, grad_scale, first_step, params, grads
        cdef KernelArguments arguments
        cdef double scale
        cdef double varying_doubles[2]
        for k in range(self.n_buffers):
            if slots[self.buffer_slot[k]] != <PyObject*>None:
                present |= 1ULL << k
        # The hyperparameters: the configuration of the last call if they are its very objects.
        if last is not None:
            values = <tuple>last[0]
            config = last[1]
            for k in range(self.n_values):
                if slots[self.value_slot[k]] != PyTuple_GET_ITEM(values, k):
                    config = None
                    break
        if config is None:
            values = PyTuple_New(self.n_values)
            for k in range(self.n_values):
                value = slots[self.value_slot[k]]
                Py_INCREF(<object>value)
                PyTuple_SET_ITEM(values, k, <object>value)
            config = self.configs.get(values)
            if config is not None:
                self.last = last = (values, config, _present_bits(config.present), config.arguments)
        step = <object>slots[self.step_slot] if self.step_slot >= 0 else None
        grad_scale = <object>slots[self.grad_scale_slot]
        first_step = <object>slots[self.first_step_slot] if self.first_step_slot >= 0 else False
        if (config is None or not self.simple or first_step is not False or <unsigned long long>last[2] != present
                or (self.uses_step and _step_number(step) < 1) or type(grad_scale) is not float):
            return self._general(slots)
        scale = PyFloat_AS_DOUBLE(grad_scale)
        if not -INFINITY < scale < INFINITY:
            return self._general(slots)
        params, grads = <object>slots[0], <object>slots[1]
        arrays = PyTuple_New(2 + self.n_buffers)
        for k in range(2 + self.n_buffers):
            value = slots[self.buffer_slot[k - 2]] if k >= 2 else slots[k]
            Py_INCREF(<object>value)
            PyTuple_SET_ITEM(arrays, k, <object>value)
        _gathered_init(&g)
        try:
            _gather(&g, self.roles, arrays, self.writable)
            kernels = self.call_defaults.backend_for(<object>slots[self.backend_slot])
            threads = self.call_defaults.threads_for(<object>slots[self.n_threads_slot])
            arguments = <KernelArguments?>last[3]
            last = arguments.current(step, grad_scale, self.nothing_fresh)
            invoke = last[3]
            if type(invoke) is KernelCall and arguments.varying_doubles(step, varying_doubles):
                (<KernelCall>invoke).call_gathered(kernels, &g, last[4], None, threads, varying_doubles)
            elif type(invoke) is KernelCall:
                (<KernelCall>invoke).call_gathered(kernels, &g, last[4], arguments.varying(step), threads)
            else:
                varying = arguments.varying(step)
                lists = _lists(&g)
                invoke(kernels, lists[0], lists[1], lists[2:], last[4], varying, threads)
        finally:
            _release(&g)
        return None

    cdef object _general(self, PyObject** slots):
        """``general(params, grads, buffers, present, values, step, grad_scale,
        first_step, scalar_state, n_threads, backend)``, as the face's Python
        function would call it."""
        cdef Py_ssize_t k
        buffers = tuple([<object>slots[self.buffer_slot[k]] for k in range(self.n_buffers)])
        present = tuple([b is not None for b in buffers])
        values = tuple([<object>slots[self.value_slot[k]] for k in range(self.n_values)])
        scalar_state = ({name: <object>slots[<Py_ssize_t>index] for name, index in self.scalar_states}
                        if self.scalar_states else None)
        return self.general(<object>slots[0], <object>slots[1], buffers, present, values,
                            <object>slots[self.step_slot] if self.step_slot >= 0 else None,
                            <object>slots[self.grad_scale_slot],
                            <object>slots[self.first_step_slot] if self.first_step_slot >= 0 else False,
                            scalar_state, <object>slots[self.n_threads_slot], <object>slots[self.backend_slot])


cdef inline long long _step_number(object step):
    """``step`` as a C integer if it is an int in [1, MAX_STEP), else 0."""
    cdef int overflow = 0
    cdef long long value
    if type(step) is not int:
        return 0
    value = PyLong_AsLongLongAndOverflow(step, &overflow)
    return value if overflow == 0 and value > 0 else 0


cdef unsigned long long _present_bits(tuple present):
    cdef unsigned long long bits = 0
    cdef Py_ssize_t k
    for k in range(len(present)):
        if present[k]:
            bits |= 1ULL << k
    return bits


cdef object _face_vectorcall(object callable, PyObject** args, size_t nargsf, PyObject* kwnames):
    """The call of a :class:`Face`: its arguments matched to its parameters, as
    Python matches a function's."""
    cdef Face face = <Face>callable
    cdef PyObject* slots[MAX_FACE_SLOTS]
    cdef Py_ssize_t k, j, n_args = PyVectorcall_NARGS(nargsf), n_kw = 0
    cdef PyObject* key
    cdef PyObject* required = <PyObject*>face.required
    cdef tuple names = face.names
    if kwnames != NULL:
        n_kw = PyTuple_GET_SIZE(<object>kwnames)
    if n_args > face.n_positional:
        raise TypeError(f"{face.name}() takes at most {face.n_positional} positional arguments "
                        f"but {n_args} were given")
    for k in range(face.n_slots):
        slots[k] = PyTuple_GET_ITEM(face.defaults, k)
    for k in range(n_args):
        slots[k] = args[k]
    for j in range(n_kw):
        key = PyTuple_GET_ITEM(<object>kwnames, j)
        k = 0
        while k < face.n_names and PyTuple_GET_ITEM(names, k) != key:
            k += 1
        if k == face.n_names:  # a keyword not interned: compare the strings
            k = 0
            while k < face.n_names and not (type(<object>key) is str and
                                            PyUnicode_Compare(<object>PyTuple_GET_ITEM(names, k), <object>key) == 0):
                k += 1
            if k == face.n_names:
                raise TypeError(f"{face.name}() got an unexpected keyword argument {<object>key!r}")
        if k < n_args:
            raise TypeError(f"{face.name}() got multiple values for argument {<object>key!r}")
        slots[k] = args[n_args + j]
    for k in range(face.n_names):
        if slots[k] == required:
            raise TypeError(f"{face.name}() missing required argument: {names[k]!r}")
    return face.call(slots)


cdef void _enable_face_calls() except *:
    cdef Face probe = Face.__new__(Face)
    fd_enable_vectorcall(<PyTypeObject*>Face, <Py_ssize_t>(<char*>&probe.vectorcall - <char*><PyObject*>probe))


_enable_face_calls()
