# Reductions over many gradient tensors: the sum of squares behind the global
# gradient norm (optionally clamping every element in place first: clipping by
# value) and the largest magnitude. Face: fastdescent.optim.clipping.global_norm.
# Reference twin: fastdescent/reference/norms.py (same operations, same order).
#
# The result must not depend on the thread count, and a sum of floating-point
# numbers depends on its order. So the order is fixed by the data alone: the
# concatenated elements of all tensors are cut into blocks of NORM_BLOCK elements
# (tensor boundaries play no part, so one flat buffer and the same elements in
# many arrays give the same bits); inside a block, element k goes to lane
# k % NORM_LANES, each lane adds its squares in index order, and the lanes are
# combined by a fixed pairwise tree; the per-block partial sums are then added in
# block order. Threads only decide who computes which block.
#
# Squares are taken and summed in double: a float32 square cannot overflow or
# underflow there. float64 squares can; the face then rescales by a power of two
# (found with max_abs) and sums again, as LAPACK's nrm2 avoids overflow.

from libc.math cimport fabs, INFINITY

cdef enum:
    NORM_LANES = 16     # independent partial sums per block: vector width x 2
    NORM_BLOCK = 4096   # a multiple of NORM_LANES


cdef struct NormArgs:
    double limit        # clamp each element to [-limit, limit] in place (if clamp)
    double scale        # multiplies every (clamped) element before it is squared
    bint clamp


# Accumulate the elements [start, start + n) of one tensor row into the lanes;
# ``lane`` is the lane of the first of them.
ctypedef void (*lanes_fn)(void* row, Py_ssize_t start, Py_ssize_t lane, Py_ssize_t n,
                          double* acc, const NormArgs* args) noexcept nogil


cdef inline double clamped_square(floating* x, Py_ssize_t i, floating limit, double scale,
                                  bint clamp) noexcept nogil:
    cdef floating v = x[i]
    cdef double w
    if clamp:
        # NaN compares false both times and stays NaN, as numpy.clip.
        if v > limit:
            v = limit
        if v < -limit:
            v = -limit
        x[i] = v
    w = scale * <double>v
    return w * w


cdef inline void add_square_rows(floating* x, Py_ssize_t n_rows, double* acc, floating limit,
                                 double scale, bint clamp) noexcept nogil:
    # Whole rows of lanes; each lane is an independent sum, so this vectorizes. Only
    # constant indices touch ``lanes``, so the compiler keeps it in registers.
    cdef double lanes[NORM_LANES]
    cdef double w
    cdef floating v
    cdef Py_ssize_t r, j
    for j in range(NORM_LANES):
        lanes[j] = acc[j]
    if clamp:
        for r in range(n_rows):
            for j in range(NORM_LANES):
                v = x[r * NORM_LANES + j]
                if v > limit:
                    v = limit
                if v < -limit:
                    v = -limit
                x[r * NORM_LANES + j] = v
                w = scale * <double>v
                lanes[j] += w * w
    else:
        for r in range(n_rows):
            for j in range(NORM_LANES):
                w = scale * <double>x[r * NORM_LANES + j]
                lanes[j] += w * w
    for j in range(NORM_LANES):
        acc[j] = lanes[j]


cdef inline void add_squares(floating* x, Py_ssize_t lane, Py_ssize_t n, double* acc,
                             const NormArgs* a) noexcept nogil:
    cdef floating limit = <floating>a.limit
    cdef Py_ssize_t i = 0, n_rows
    # Head: single elements up to the next lane-0 element; then whole rows; then the tail.
    while i < n and (lane + i) % NORM_LANES != 0:
        acc[(lane + i) % NORM_LANES] += clamped_square(x, i, limit, a.scale, a.clamp)
        i += 1
    n_rows = (n - i) // NORM_LANES
    add_square_rows(x + i, n_rows, acc, limit, a.scale, a.clamp)
    i += n_rows * NORM_LANES
    while i < n:
        acc[(lane + i) % NORM_LANES] += clamped_square(x, i, limit, a.scale, a.clamp)
        i += 1


cdef inline void add_max_abs(const floating* x, Py_ssize_t lane, Py_ssize_t n, double* acc) noexcept nogil:
    # Lane-wise like add_squares (any order gives the same maximum; lanes vectorize).
    # NaN compares false and is skipped.
    cdef Py_ssize_t i
    cdef double v
    for i in range(n):
        v = fabs(<double>x[i])
        if v > acc[(lane + i) % NORM_LANES]:
            acc[(lane + i) % NORM_LANES] = v


cdef void squares_f32(void* row, Py_ssize_t start, Py_ssize_t lane, Py_ssize_t n,
                      double* acc, const NormArgs* a) noexcept nogil:
    add_squares(<float*>row + start, lane, n, acc, a)


cdef void squares_f64(void* row, Py_ssize_t start, Py_ssize_t lane, Py_ssize_t n,
                      double* acc, const NormArgs* a) noexcept nogil:
    add_squares(<double*>row + start, lane, n, acc, a)


cdef void max_abs_f32(void* row, Py_ssize_t start, Py_ssize_t lane, Py_ssize_t n,
                      double* acc, const NormArgs* a) noexcept nogil:
    add_max_abs(<const float*>row + start, lane, n, acc)


cdef void max_abs_f64(void* row, Py_ssize_t start, Py_ssize_t lane, Py_ssize_t n,
                      double* acc, const NormArgs* a) noexcept nogil:
    add_max_abs(<const double*>row + start, lane, n, acc)


cdef double reduce_block(const Plan* plan, Py_ssize_t b, Py_ssize_t t, lanes_fn fn,
                         const NormArgs* a, bint take_max) noexcept nogil:
    """Block ``b``, whose first element lies in tensor ``t``: its lanes, combined."""
    cdef double acc[NORM_LANES]
    cdef Py_ssize_t begin = b * NORM_BLOCK, end = min(begin + NORM_BLOCK, plan.total)
    cdef Py_ssize_t stop, j, width
    for j in range(NORM_LANES):
        acc[j] = 0.0
    while begin < end:
        stop = min(end, plan.offsets[t + 1])
        if stop > begin:
            fn(plan.rows[t * plan.n_roles], begin - plan.offsets[t], begin % NORM_LANES,
               stop - begin, acc, a)
            begin = stop
        t += 1
    # Pairwise tree over the lanes: (0+1), (2+3), ... then again, down to one.
    width = NORM_LANES // 2
    while width >= 1:
        for j in range(width):
            if take_max:
                acc[j] = acc[2 * j] if acc[2 * j] > acc[2 * j + 1] else acc[2 * j + 1]
            else:
                acc[j] = acc[2 * j] + acc[2 * j + 1]
        width //= 2
    return acc[0]


cdef struct BlockJob:
    const Plan* plan
    const Py_ssize_t* first     # the tensor holding each block's first element
    double* partial             # each block's result
    lanes_fn fn
    const NormArgs* args
    bint take_max


cdef void reduce_block_range(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """The partial results of blocks [begin, end)."""
    cdef const BlockJob* job = <const BlockJob*>ctx
    cdef Py_ssize_t b
    for b in range(begin, end):
        job.partial[b] = reduce_block(job.plan, b, job.first[b], job.fn, job.args, job.take_max)


cdef double reduce_blocks(list arrays, int n_threads, lanes_fn fn32, lanes_fn fn64,
                          const NormArgs* a, bint take_max) except? -1.0:
    """Every block's partial result, then their sum (or maximum) in block order."""
    cdef Plan plan
    cdef lanes_fn fn
    cdef Py_ssize_t n_blocks, b, t
    cdef double* partial = NULL
    cdef Py_ssize_t* first = NULL
    cdef double result = 0.0
    cdef BlockJob job
    plan.offsets = NULL
    plan.rows = NULL
    try:
        plan_init(&plan, (arrays,), n_threads)
        fn = fn32 if plan.typenum == cnp.NPY_FLOAT32 else fn64
        n_blocks = (plan.total + NORM_BLOCK - 1) // NORM_BLOCK
        partial = <double*>malloc((n_blocks + 1) * sizeof(double))
        first = <Py_ssize_t*>malloc((n_blocks + 1) * sizeof(Py_ssize_t))
        if partial == NULL or first == NULL:
            raise MemoryError()
        with nogil:
            # The tensor holding each block's first element (skipping empty tensors).
            t = 0
            for b in range(n_blocks):
                while plan.offsets[t + 1] <= b * NORM_BLOCK:
                    t += 1
                first[b] = t
            job = BlockJob(&plan, first, partial, fn, a, take_max)
            fd_pool_run(plan.n_parts, n_blocks, 1, chunk_items(NORM_BLOCK), reduce_block_range, &job)
            call_finished()
            for b in range(n_blocks):
                if take_max:
                    if partial[b] > result:
                        result = partial[b]
                else:
                    result = result + partial[b]
    finally:
        plan_free(&plan)
        free(partial)
        free(first)
    return result


def sum_squares(list arrays not None, *, double clip_value, double scale, int n_threads):
    """Sum of ``(scale * x)**2`` over every element of ``arrays``, in double, in the
    fixed blocked order (private: call ``fastdescent.global_norm``).

    With a finite ``clip_value`` every element is first clamped in place to
    ``[-clip_value, clip_value]`` (NaN stays NaN) and the clamped value is squared.
    ``scale`` should be a power of two (exact). All arrays share one dtype.
    """
    cdef NormArgs a
    a.limit = clip_value
    a.clamp = clip_value < INFINITY
    a.scale = scale
    return reduce_blocks(arrays, n_threads, squares_f32, squares_f64, &a, False)


def max_abs(list arrays not None, *, int n_threads):
    """Largest ``abs(x)`` over every element of ``arrays`` (0 if none; NaN skipped)."""
    cdef NormArgs a
    a.limit = INFINITY
    a.clamp = False
    a.scale = 1.0
    return reduce_blocks(arrays, n_threads, max_abs_f32, max_abs_f64, &a, True)
