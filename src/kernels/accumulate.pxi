# Gradient accumulation over micro-batches (an optimizer's accumulate_steps=k).
#
# * accumulate: one pass over every accumulator of a bucket, acc = s * g on the
#   first micro-step of a window (no read of acc), acc = acc + s * g after it.
# * step_accumulated: the k-th micro-step, fused with the rule's own step. It arms
#   this thread's pending accumulation and calls the rule's kernel; run_kernel
#   (_common.pxi) sees it armed and runs the rule's segment function through
#   accumulating_elements instead: each thread, for each small block of its
#   part, writes S = acc + s * g into a block on its stack (it stays in L1),
#   zeroes acc, and runs the rule's segment function on that block with S as the
#   gradient. acc and g cross the memory bus once, and the rule's kernel is
#   unchanged: per-step scalars are computed once, by its def entry, as usual.
#   Rules are elementwise (see _common.pxi), so the result is bit-identical to the
#   rule's step on S computed whole, for any block size and thread count.
# Reference twin: fastdescent/reference/accumulate.py.

cdef extern from *:
    """
    /* The accumulation the next run_kernel call of this thread finishes, if any
       (thread-local: another Python thread's kernel calls never see it). */
    typedef struct {
        PyObject *grads;        /* the rule kernel's gradient list (borrowed) */
        PyObject *accumulated;  /* the accumulators, aligned with it (borrowed) */
        double grad_scale;
        int armed;
        int used;
    } fd_accumulation;
    static __thread fd_accumulation fd_pending_accumulation;
    """
    ctypedef struct fd_accumulation:
        void* grads
        void* accumulated
        double grad_scale
        int armed
        int used
    fd_accumulation fd_pending_accumulation


cdef enum:
    # Elements per block of the fused step: 8 KB (float32) or 16 KB (float64) on
    # each thread's stack, well inside L1, and long enough for the rule's loop.
    ACCUMULATE_BLOCK = 2048


cdef struct AccumulateArgs:
    double grad_scale
    bint first


cdef struct AccumulatingArgs:
    segment_fn step32          # the rule's segment functions and arguments
    segment_fn step64
    const void* step_args
    double grad_scale
    Py_ssize_t accumulated_role   # the accumulators' role: after the rule's own


cdef inline void accumulate_elements(floating* acc, const floating* g, Py_ssize_t n,
                                     const AccumulateArgs* a) noexcept nogil:
    cdef floating scale = <floating>a.grad_scale
    cdef Py_ssize_t i
    if a.first:
        for i in range(n):
            acc[i] = scale * g[i]
    else:
        for i in range(n):
            acc[i] = acc[i] + scale * g[i]


cdef void accumulate_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    accumulate_elements(<float*>rows[0] + start, <const float*>rows[1] + start, n, <const AccumulateArgs*>args)


cdef void accumulate_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    accumulate_elements(<double*>rows[0] + start, <const double*>rows[1] + start, n, <const AccumulateArgs*>args)


cdef inline void sum_and_clear(floating* total, floating* acc, const floating* g, Py_ssize_t n,
                               floating scale) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        total[i] = acc[i] + scale * g[i]
        acc[i] = 0


cdef inline void accumulating_elements(floating* block, void** rows, Py_ssize_t start, Py_ssize_t n,
                                       const AccumulatingArgs* a, segment_fn step) noexcept nogil:
    cdef void* step_rows[MAX_ROLES]
    cdef floating* acc = <floating*>rows[a.accumulated_role] + start
    cdef const floating* g = <const floating*>rows[1] + start
    cdef floating scale = <floating>a.grad_scale
    cdef Py_ssize_t r, done = 0, m
    for r in range(a.accumulated_role):
        step_rows[r] = rows[r]
    while done < n:
        m = min(<Py_ssize_t>ACCUMULATE_BLOCK, n - done)
        sum_and_clear(block, acc + done, g + done, m, scale)
        # The rule indexes its rows from the tensor's start: its gradient row is the
        # block, placed so that element start + done is block[0] (integer arithmetic:
        # the address is only ever used from there on).
        step_rows[1] = <void*>(<size_t>block - <size_t>(start + done) * sizeof(floating))
        step(step_rows, start + done, m, a.step_args)
        done += m


cdef void accumulating_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    cdef float block[ACCUMULATE_BLOCK]
    cdef const AccumulatingArgs* a = <const AccumulatingArgs*>args
    accumulating_elements(block, rows, start, n, a, a.step32)


cdef void accumulating_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    cdef double block[ACCUMULATE_BLOCK]
    cdef const AccumulatingArgs* a = <const AccumulatingArgs*>args
    accumulating_elements(block, rows, start, n, a, a.step64)


cdef int run_accumulating(tuple roles, int n_threads, segment_fn fn32, segment_fn fn64, const void* args) except -1:
    """run_kernel of a rule while an accumulation is armed: disarm it, and run the
    rule's segment functions on the accumulated sums (see the top of this file)."""
    cdef AccumulatingArgs a
    cdef object accumulated = <object>fd_pending_accumulation.accumulated
    fd_pending_accumulation.armed = 0
    if roles[1] is not <object>fd_pending_accumulation.grads:
        raise RuntimeError("step_accumulated: the rule's kernel did not get the gradients it was given")
    fd_pending_accumulation.used = 1
    a.step32, a.step64, a.step_args = fn32, fn64, args
    a.grad_scale = fd_pending_accumulation.grad_scale
    a.accumulated_role = len(roles)
    return run_kernel(roles + (accumulated,), n_threads, accumulating_segment_f32, accumulating_segment_f64, &a)


def accumulate(list accumulated not None, list grads not None, *, double grad_scale, bint first, int n_threads):
    """One micro-step of gradient accumulation over many tensors (private: see
    ``fastdescent.optim.accumulate``): ``acc = grad_scale * g`` if ``first``, else
    ``acc = acc + grad_scale * g``, for each accumulator and its gradient."""
    cdef AccumulateArgs a
    a.grad_scale = grad_scale
    a.first = first
    run_kernel((accumulated, grads), n_threads, accumulate_segment_f32, accumulate_segment_f64, &a)


def step_accumulated(step, list params not None, list grads not None, list accumulated not None, *,
                     double grad_scale, int n_threads):
    """The last micro-step of an accumulation, fused with the rule's step (private:
    see ``fastdescent.optim.accumulate``).

    Calls ``step(params, grads)``, which must make exactly one rule kernel call
    with these lists; that call reads, for each element, ``S = acc + grad_scale *
    g`` as its gradient instead of ``g`` and sets ``acc`` to zero, in the same
    pass. ``n_threads`` is the rule call's own (accepted for the twin's signature).
    """
    if fd_pending_accumulation.armed:
        raise RuntimeError("step_accumulated: an accumulation is already armed on this thread")
    if len(accumulated) != len(grads):
        raise ValueError(f"{len(accumulated)} accumulators for {len(grads)} gradients")
    fd_pending_accumulation.grads = <void*>grads
    fd_pending_accumulation.accumulated = <void*>accumulated
    fd_pending_accumulation.grad_scale = grad_scale
    fd_pending_accumulation.used = 0
    fd_pending_accumulation.armed = 1
    try:
        step(params, grads)
    finally:
        fd_pending_accumulation.armed = 0
        fd_pending_accumulation.grads = NULL
        fd_pending_accumulation.accumulated = NULL
    if not fd_pending_accumulation.used:
        raise RuntimeError("step_accumulated: the step made no kernel call; nothing was accumulated into it")
