# Weight averaging: the running equal average of SWA, the exponential moving
# average (EMA), and the in-place exchange of two sets of arrays that swaps an
# average into the parameters for evaluation and back. One pass each, reading the
# average and the parameter, writing the average (both, for the exchange).
# Equations: fastdescent.rules.averaging. Reference twin: fastdescent/reference/averaging.py.

from cpython.pyport cimport PY_SSIZE_T_MAX

cdef struct SWAArgs:
    double count               # n + 1: the average then holds n + 1 snapshots
    bint first                 # n = 0: the average is the parameter itself


cdef struct EMAArgs:
    double decay


cdef inline void swa_elements(floating* avg, const floating* p, Py_ssize_t n, const SWAArgs* a) noexcept nogil:
    cdef floating count = <floating>a.count
    cdef Py_ssize_t i
    if a.first:
        for i in range(n):
            avg[i] = p[i]
    else:
        for i in range(n):
            avg[i] = avg[i] + (p[i] - avg[i]) / count


cdef inline void ema_elements(floating* avg, const floating* p, Py_ssize_t n, const EMAArgs* a) noexcept nogil:
    cdef floating keep = <floating>a.decay, take = <floating>(1.0 - a.decay)
    cdef Py_ssize_t i
    for i in range(n):
        avg[i] = keep * avg[i] + take * p[i]


cdef inline void swap_elements(floating* x, floating* y, Py_ssize_t n) noexcept nogil:
    cdef floating held
    cdef Py_ssize_t i
    for i in range(n):
        held = x[i]
        x[i] = y[i]
        y[i] = held


cdef void swa_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    swa_elements(<float*>rows[0] + start, <const float*>rows[1] + start, n, <const SWAArgs*>args)


cdef void swa_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    swa_elements(<double*>rows[0] + start, <const double*>rows[1] + start, n, <const SWAArgs*>args)


cdef void ema_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    ema_elements(<float*>rows[0] + start, <const float*>rows[1] + start, n, <const EMAArgs*>args)


cdef void ema_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    ema_elements(<double*>rows[0] + start, <const double*>rows[1] + start, n, <const EMAArgs*>args)


cdef void swap_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    swap_elements(<float*>rows[0] + start, <float*>rows[1] + start, n)


cdef void swap_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    swap_elements(<double*>rows[0] + start, <double*>rows[1] + start, n)


def swa(list averages not None, list params not None, *, Py_ssize_t n_averaged, int n_threads):
    """Fold ``params`` into the equal running averages (private: call ``fastdescent.swa_update``)."""
    cdef SWAArgs a
    if n_averaged < 0 or n_averaged == PY_SSIZE_T_MAX:  # n_averaged + 1 would overflow
        raise ValueError(f"n_averaged must be in [0, {PY_SSIZE_T_MAX - 1}], got {n_averaged}")
    a.count = <double>(n_averaged + 1)
    a.first = n_averaged == 0
    run_kernel((averages, params), n_threads, swa_segment_f32, swa_segment_f64, &a)


def ema(list averages not None, list params not None, *, double decay, int n_threads):
    """Blend ``params`` into the exponential averages (private: call ``fastdescent.ema_update``)."""
    cdef EMAArgs a
    a.decay = decay
    run_kernel((averages, params), n_threads, ema_segment_f32, ema_segment_f64, &a)


def swap(list first not None, list second not None, *, int n_threads):
    """Exchange the contents of two lists of arrays (private: call ``fastdescent.swap_arrays``)."""
    run_kernel((first, second), n_threads, swap_segment_f32, swap_segment_f64, NULL)
