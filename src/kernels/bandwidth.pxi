# The in-run bandwidth ceiling: a kernel with a rule's memory access pattern and
# (almost) none of its arithmetic. It reads R buffers and writes W of them back in
# place, one pass, through the same multi-tensor plan and thread split as every rule
# (run_kernel), so its speed is what the memory system allows that pattern on this
# machine, for this size, dtype and thread count. The benchmarks report a rule's
# speed as a fraction of it.
#
# Written buffers get w = w * one + s * zero, where s is the element of the read-only
# buffer and one = 1, zero = 0 arrive at run time (the compiler cannot fold them), so
# the kernel leaves every finite value unchanged and can run on a rule's own arrays.

cdef extern from *:
    # A store the compiler must keep: the read-only kernel's result lands here.
    """
    static volatile unsigned int fastdescent_stream_sink;
    """
    unsigned int fastdescent_stream_sink

cdef enum:
    MAX_STREAM_WRITES = 4


cdef struct StreamArgs:
    int n_written          # the first n_written roles are read and written
    bint has_read_only     # role n_written is read only (the gradient, say)
    int n_read_only        # 1 or 2 read-only roles when none is written (a reduction's pattern)
    double one
    double zero


cdef inline void stream_elements(floating* w0, floating* w1, floating* w2, floating* w3,
                                 const floating* r, Py_ssize_t n, const StreamArgs* a) noexcept nogil:
    cdef floating one = <floating>a.one, zero = <floating>a.zero, s = zero
    cdef Py_ssize_t i
    # One loop per pattern: a loop over roles inside the element loop would not vectorize.
    if r != NULL:
        if a.n_written == 1:
            for i in range(n):
                s = r[i] * zero
                w0[i] = w0[i] * one + s
        elif a.n_written == 2:
            for i in range(n):
                s = r[i] * zero
                w0[i] = w0[i] * one + s
                w1[i] = w1[i] * one + s
        elif a.n_written == 3:
            for i in range(n):
                s = r[i] * zero
                w0[i] = w0[i] * one + s
                w1[i] = w1[i] * one + s
                w2[i] = w2[i] * one + s
        else:
            for i in range(n):
                s = r[i] * zero
                w0[i] = w0[i] * one + s
                w1[i] = w1[i] * one + s
                w2[i] = w2[i] * one + s
                w3[i] = w3[i] * one + s
    elif a.n_written == 1:
        for i in range(n):
            w0[i] = w0[i] * one + s
    elif a.n_written == 2:
        for i in range(n):
            w0[i] = w0[i] * one + s
            w1[i] = w1[i] * one + s
    elif a.n_written == 3:
        for i in range(n):
            w0[i] = w0[i] * one + s
            w1[i] = w1[i] * one + s
            w2[i] = w2[i] * one + s
    else:
        for i in range(n):
            w0[i] = w0[i] * one + s
            w1[i] = w1[i] * one + s
            w2[i] = w2[i] * one + s
            w3[i] = w3[i] * one + s


cdef inline void stream_read_only(const unsigned int* words, const unsigned int* others,
                                  Py_ssize_t n) noexcept nogil:
    # OR of the bit patterns: an integer reduction vectorizes without reassociating
    # floating-point sums, so the loop runs at load speed. ``others`` (or NULL): a
    # second array read side by side.
    global fastdescent_stream_sink
    cdef unsigned int acc = 0
    cdef Py_ssize_t i
    if others == NULL:
        for i in range(n):
            acc = acc | words[i]
    else:
        for i in range(n):
            acc = acc | words[i] | others[i]
    if acc == 0:  # all-zero data only; the store keeps the loop alive
        fastdescent_stream_sink = acc


cdef inline void stream_segment(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args,
                                floating kind) noexcept nogil:
    cdef const StreamArgs* a = <const StreamArgs*>args
    cdef floating* w[MAX_STREAM_WRITES]
    cdef const floating* r = NULL
    cdef Py_ssize_t k
    if a.n_written == 0:
        stream_read_only(<const unsigned int*>(<const floating*>rows[0] + start),
                         (<const unsigned int*>(<const floating*>rows[1] + start)) if a.n_read_only == 2 else NULL,
                         n * (sizeof(floating) // 4))
        return
    for k in range(MAX_STREAM_WRITES):
        w[k] = (<floating*>rows[k] + start) if k < a.n_written else NULL
    if a.has_read_only:
        r = <const floating*>rows[a.n_written] + start
    stream_elements(w[0], w[1], w[2], w[3], r, n, a)


cdef void stream_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    stream_segment(rows, start, n, args, <float>0)


cdef void stream_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    stream_segment(rows, start, n, args, <double>0)


def stream(arrays, int n_written, int n_threads):
    """Bandwidth probe with a rule's access pattern: read every buffer once, write
    the first ``n_written`` back in place, through the rules' thread plan.

    ``arrays`` lists the roles, written ones first: each an ndarray or a list of
    ndarrays (one per tensor, as in a multi-tensor step); all C-contiguous, of one
    dtype (float32 or float64), with equal sizes per tensor. Supported patterns:
    1 to 4 written roles plus at most one read-only role, or one or two read-only
    roles alone (a reduction's pattern). Values are left unchanged (written buffers get
    ``w * 1 + r * 0``). Bytes moved per element = (len(arrays) + n_written) * itemsize.
    """
    cdef StreamArgs a
    cdef list roles = [list(x) if isinstance(x, (list, tuple)) else [x] for x in arrays]
    n_read_only = len(roles) - n_written
    if not (0 <= n_written <= MAX_STREAM_WRITES and 0 <= n_read_only <= (2 if n_written == 0 else 1) and roles):
        raise ValueError(f"stream supports 1 to {MAX_STREAM_WRITES} written arrays plus at most "
                         f"one read-only array (or one or two read-only arrays alone); got {len(roles)} "
                         f"arrays with n_written={n_written}")
    for role in roles:
        if len(role) != len(roles[0]):
            raise ValueError("every role needs one array per tensor")
    for role in roles[:n_written]:
        for x in role:
            if not (<cnp.ndarray?>x).flags.writeable:
                raise ValueError("stream writes the first n_written arrays: they must be writable")
    a.n_written = n_written
    a.has_read_only = n_read_only == 1
    a.n_read_only = n_read_only
    a.one = 1.0
    a.zero = 0.0
    run_kernel(tuple(roles), n_threads, stream_segment_f32, stream_segment_f64, &a)
