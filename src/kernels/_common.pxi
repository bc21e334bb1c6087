# Shared plumbing for every update-rule kernel: how a multi-tensor call is split
# among threads, and how each piece reaches a rule's element loop.
#
# A call updates T tensors, each with R buffers of equal length (the roles: param,
# grad, and the rule's state). The T lengths are concatenated into one index space
# [0, total) and cut into n_parts nearly equal, contiguous parts, one per thread
# (OpenMP static schedule). A part may cover the tail of one tensor, many small
# tensors and the head of another: small arrays are grouped and large ones split,
# so the threads share the work evenly whatever the sizes. A rule supplies only a
# *segment function*: the element loop over one contiguous run of one tensor.
#
# Every rule is elementwise, so the result does not depend on how the index space
# is cut: any thread count gives bit-identical results.

cimport numpy as cnp
from cython.parallel cimport prange
from libc.stdlib cimport malloc, free
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cnp.import_array()

cdef enum:
    MAX_ROLES = 8
    # Part boundaries fall on multiples of 64 elements (whole cache lines for either
    # dtype), so two threads never write the same line.
    PART_ALIGN = 64

# A thread is only given a part of at least this many elements; smaller updates run
# serially, without entering an OpenMP region. Two thresholds, because waking a
# sleeping thread team costs far more than reusing one that is still spinning:
#
# * warm: the team ran a region less than TEAM_WARM_SECONDS ago (back-to-back
#   calls: several groups of one step, benchmarks). Measured on the 2-core
#   development machine: 2 threads pay for float32 Adam from about 2**15 elements.
# * cold: otherwise (a training loop, where the forward and backward passes sit
#   between two steps). Measured after 20 ms of other work: 2 threads were 0.63x
#   one thread at 65,536 elements and broke even at about 2**20 (BENCHMARKS.md).
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD = 32768
cdef Py_ssize_t MIN_ELEMENTS_PER_THREAD_COLD = 524288
cdef double TEAM_WARM_SECONDS = 2e-3
cdef double last_region_end = -1e300     # monotonic seconds; written by the calling thread


cdef inline double monotonic_seconds() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + 1e-9 * ts.tv_nsec


def get_min_elements_per_thread(bint cold=False):
    """Smallest part a thread is given (``cold``: when the thread team is asleep)."""
    return MIN_ELEMENTS_PER_THREAD_COLD if cold else MIN_ELEMENTS_PER_THREAD


def set_min_elements_per_thread(Py_ssize_t n, cold=None):
    """Change the serial thresholds (for benchmarking them): ``n`` for a warm team,
    ``cold`` (default: ``n`` too) for a sleeping one."""
    global MIN_ELEMENTS_PER_THREAD, MIN_ELEMENTS_PER_THREAD_COLD
    cdef Py_ssize_t n_cold = n if cold is None else cold
    if n < 1 or n_cold < 1:
        raise ValueError(f"the minimum part size must be at least 1, got {n} and {n_cold}")
    MIN_ELEMENTS_PER_THREAD = n
    MIN_ELEMENTS_PER_THREAD_COLD = n_cold


# The element loop of a rule over one contiguous run of one tensor: ``rows[r]`` is
# the data pointer of role r for that tensor, the run is [start, start + n).
ctypedef void (*segment_fn)(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil


cdef struct Plan:
    Py_ssize_t n_tensors
    Py_ssize_t n_roles
    Py_ssize_t total
    Py_ssize_t n_parts
    int typenum                # NPY_FLOAT32 or NPY_FLOAT64
    Py_ssize_t* offsets        # n_tensors + 1 prefix sums of the tensor sizes
    void** rows                # rows[t * n_roles + r]: data of role r of tensor t


cdef int plan_init(Plan* plan, tuple roles, int n_threads) except -1:
    """Gather the data pointers of ``roles`` (lists of arrays, or None) into ``plan``.

    On error the caller still owns what was allocated: call ``plan_free``.

    The functional faces validate every buffer first (``_runtime.check_buffers``);
    the checks here are only the cheap ones that keep a direct call of a private
    kernel from reading out of bounds.
    """
    cdef Py_ssize_t r, t, n
    cdef list params = <list?>roles[0]
    cdef cnp.ndarray a
    plan.n_roles = len(roles)
    plan.n_tensors = len(params)
    if plan.n_roles > MAX_ROLES:
        raise ValueError(f"at most {MAX_ROLES} buffer roles")
    plan.offsets = <Py_ssize_t*>malloc((plan.n_tensors + 1) * sizeof(Py_ssize_t))
    plan.rows = <void**>malloc((plan.n_tensors * plan.n_roles + 1) * sizeof(void*))
    if plan.offsets == NULL or plan.rows == NULL:
        raise MemoryError()
    plan.typenum = cnp.NPY_FLOAT32
    plan.offsets[0] = 0
    for t in range(plan.n_tensors):
        a = <cnp.ndarray?>params[t]
        if t == 0:
            plan.typenum = cnp.PyArray_TYPE(a)
        n = cnp.PyArray_SIZE(a)
        plan.offsets[t + 1] = plan.offsets[t] + n
        for r in range(plan.n_roles):
            if roles[r] is None:
                plan.rows[t * plan.n_roles + r] = NULL
                continue
            a = <cnp.ndarray?>(<list?>roles[r])[t]
            if (cnp.PyArray_TYPE(a) != plan.typenum or cnp.PyArray_SIZE(a) != n
                    or not cnp.PyArray_IS_C_CONTIGUOUS(a)):
                raise ValueError("kernel buffers must be contiguous, of one dtype and equal sizes")
            plan.rows[t * plan.n_roles + r] = cnp.PyArray_DATA(a)
    if plan.typenum != cnp.NPY_FLOAT32 and plan.typenum != cnp.NPY_FLOAT64:
        raise TypeError("kernels take float32 or float64 buffers")
    plan.total = plan.offsets[plan.n_tensors]
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    cdef Py_ssize_t per_thread = MIN_ELEMENTS_PER_THREAD
    if monotonic_seconds() - last_region_end > TEAM_WARM_SECONDS:
        per_thread = MIN_ELEMENTS_PER_THREAD_COLD
    plan.n_parts = max(1, min(n_threads, plan.total // per_thread))
    return 0


cdef void plan_free(Plan* plan) noexcept:
    free(plan.offsets)
    free(plan.rows)
    plan.offsets = NULL
    plan.rows = NULL


cdef inline Py_ssize_t part_edge(const Plan* plan, Py_ssize_t k) noexcept nogil:
    """Start of part k (k = n_parts gives total), aligned down to PART_ALIGN."""
    if k >= plan.n_parts:
        return plan.total
    return (plan.total * k // plan.n_parts) // PART_ALIGN * PART_ALIGN


cdef void run_part(const Plan* plan, Py_ssize_t k, segment_fn fn, const void* args) noexcept nogil:
    """Call ``fn`` on every tensor run inside part k, in index order."""
    cdef Py_ssize_t begin = part_edge(plan, k), end = part_edge(plan, k + 1)
    cdef Py_ssize_t lo = 0, hi = plan.n_tensors, mid, t, stop
    if begin >= end:
        return
    # The tensor holding index ``begin``: the last t with offsets[t] <= begin.
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if plan.offsets[mid] <= begin:
            lo = mid
        else:
            hi = mid
    t = lo
    while begin < end:
        stop = min(end, plan.offsets[t + 1])
        if stop > begin:
            fn(&plan.rows[t * plan.n_roles], begin - plan.offsets[t], stop - begin, args)
            begin = stop
        t += 1


cdef void run_plan(const Plan* plan, segment_fn fn, const void* args) noexcept nogil:
    """Run ``fn`` over the whole plan, one part per thread."""
    global last_region_end
    cdef Py_ssize_t k
    if plan.n_parts == 1:
        run_part(plan, 0, fn, args)   # no OpenMP region at all
    else:
        for k in prange(plan.n_parts, num_threads=plan.n_parts, schedule="static"):
            run_part(plan, k, fn, args)
        last_region_end = monotonic_seconds()


cdef int run_kernel(tuple roles, int n_threads, segment_fn fn32, segment_fn fn64,
                    const void* args) except -1:
    """Entry shared by every rule: gather ``roles``, release the GIL, run."""
    cdef Plan plan
    cdef segment_fn fn
    plan.offsets = NULL
    plan.rows = NULL
    try:
        plan_init(&plan, roles, n_threads)
        fn = fn32 if plan.typenum == cnp.NPY_FLOAT32 else fn64
        with nogil:
            run_plan(&plan, fn, args)
    finally:
        plan_free(&plan)
    return 0
