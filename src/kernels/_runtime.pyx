"""Run-time support shared by every kernel variant and by the reference backend.

Built once, for the baseline instruction set, so that it can always be imported to
find out which kernel variant this CPU can run.

* OpenMP queries (a build without OpenMP answers as a single thread).
* CPU feature detection for the instruction-set dispatch.
* ``check_buffers``: the validation every functional face runs before any array
  is written, whichever backend then does the update. It is in Cython because a
  Python version (``np.shares_memory`` per pair) costs more than a whole update of a
  thousand elements.
"""

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
    return max(1, min(omp_get_max_threads(), NUM_PROCS))


_LEVELS = {"baseline": 1, "avx2": 3, "avx512": 4}


def cpu_supports(variant):
    """True if this CPU and OS can run the kernel variant named ``variant``."""
    try:
        level = _LEVELS[variant]
    except KeyError:
        raise ValueError(f"unknown kernel variant {variant!r}; known: {sorted(_LEVELS)}") from None
    return bool(fd_cpu_level(level))


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


def check_buffers(tuple names, tuple arrays, tuple writable, bint indexed=True):
    """Validate the buffers of one update before anything is written.

    ``names[r]`` is the role of ``arrays[r]``, a list with one array per tensor
    (``None`` for a role the update does not use); role 0 is the parameters.
    Every array must be a C-contiguous, aligned float32/float64 ``ndarray`` with the
    dtype and shape of its parameter, all parameters of one dtype; ``writable[r]`` roles must be writeable; and
    no writable buffer may share memory with another buffer of the same tensor.

    Raises TypeError (not an ndarray, wrong or mixed dtype) or ValueError (shape,
    layout, read-only, aliasing, list lengths). Returns the total element count.
    """
    cdef Py_ssize_t n_roles = len(names), r, s, i, n_tensors, total = 0
    cdef list params, role
    cdef cnp.ndarray param, a, b
    cdef char* a_lo
    cdef char* b_lo
    cdef Py_ssize_t a_bytes, b_bytes
    if len(arrays) != n_roles or len(writable) != n_roles:
        raise ValueError("names, arrays and writable must have the same length")
    params = arrays[0]
    n_tensors = len(params)
    for r in range(1, n_roles):
        if arrays[r] is not None and len(<list>arrays[r]) != n_tensors:
            raise ValueError(f"{len(<list>arrays[r])} {names[r]} arrays for {n_tensors} parameters")
    for i in range(n_tensors):
        _check_array(params[i], names[0], i, indexed, writable[0], None, None)
        param = <cnp.ndarray>params[i]
        if cnp.PyArray_TYPE(param) != cnp.PyArray_TYPE(<cnp.ndarray>params[0]):
            raise TypeError(
                f"{names[0]}[{i}] has dtype {param.dtype} but {names[0]}[0] has "
                f"{(<cnp.ndarray>params[0]).dtype}: one call takes one dtype"
            )
        total += cnp.PyArray_SIZE(param)
        for r in range(1, n_roles):
            if arrays[r] is not None:
                _check_array((<list>arrays[r])[i], names[r], i, indexed, writable[r], param, names[0])
        if cnp.PyArray_SIZE(param) == 0:
            continue
        # Aliasing: contiguous buffers overlap iff their byte ranges intersect.
        for r in range(n_roles):
            if arrays[r] is None:
                continue
            a = <cnp.ndarray>(params[i] if r == 0 else (<list>arrays[r])[i])
            a_lo = cnp.PyArray_BYTES(a)
            a_bytes = cnp.PyArray_NBYTES(a)
            for s in range(r + 1, n_roles):
                if arrays[s] is None or not (writable[r] or writable[s]):
                    continue
                b = <cnp.ndarray>(<list>arrays[s])[i]
                b_lo = cnp.PyArray_BYTES(b)
                b_bytes = cnp.PyArray_NBYTES(b)
                if a_lo < b_lo + b_bytes and b_lo < a_lo + a_bytes:
                    raise ValueError(
                        f"{_label(names[s], i, indexed)} shares memory with "
                        f"{_label(names[r], i, indexed)}; every buffer of an update must be distinct"
                    )
    return total


def check_distinct(str name, list arrays):
    """Raise ValueError if any two of ``arrays`` (C-contiguous ndarrays) overlap.

    Used once when an optimizer is built: the per-step check only compares the
    buffers of one tensor with each other. O(n log n) in the number of arrays.
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
