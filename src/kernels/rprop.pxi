# Rprop (resilient backpropagation, PyTorch's form): one pass reading param, grad,
# prev and step_size, writing all but the grad. Each element's step size grows or
# shrinks with the sign of grad * prev; the step is its size times the gradient's
# sign. Equations: fastdescent.rules.rprop.rprop_step. Reference twin:
# fastdescent/reference/rprop.py (same operations, same order).

cdef struct RpropArgs:
    double etaminus
    double etaplus
    double step_size_min
    double step_size_max
    double grad_scale              # already negated for maximize


cdef inline void rprop_elements(floating* p, const floating* g, floating* prev, floating* step_size,
                                Py_ssize_t n, const RpropArgs* a) noexcept nogil:
    cdef floating down = <floating>a.etaminus, up = <floating>a.etaplus
    cdef floating lo = <floating>a.step_size_min, hi = <floating>a.step_size_max
    cdef floating scale = <floating>a.grad_scale, zero = 0.0, one = 1.0
    cdef floating d, product, s
    cdef Py_ssize_t i
    for i in range(n):
        d = scale * g[i]
        product = d * prev[i]
        # PyTorch's factor: etaplus where the sign held, etaminus where it flipped, 1
        # where the product is zero (or NaN); then its clamp, min(max(s, lo), hi).
        s = step_size[i] * (up if product > zero else (down if product < zero else one))
        s = lo if s < lo else s
        s = hi if s > hi else s
        step_size[i] = s
        # Where the sign flipped: no step, and +0 stored, so the next factor is 1.
        d = zero if product < zero else d
        prev[i] = d
        p[i] = p[i] - (s if d > zero else (-s if d < zero else zero))


cdef void rprop_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    rprop_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                   <float*>rows[3] + start, n, <const RpropArgs*>args)


cdef void rprop_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    rprop_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                   <double*>rows[3] + start, n, <const RpropArgs*>args)


cdef void rprop_args(RpropArgs* a, double etaminus, double etaplus, double step_size_min, double step_size_max,
                     double grad_scale) noexcept nogil:
    a.etaminus = etaminus
    a.etaplus = etaplus
    a.step_size_min = step_size_min
    a.step_size_max = step_size_max
    a.grad_scale = grad_scale


def rprop(list params not None, list grads not None, list prev not None, list step_size not None, *,
          double etaminus, double etaplus, double step_size_min, double step_size_max, double grad_scale,
          int n_threads):
    """Fused Rprop step over many tensors (private: call ``fastdescent.rprop_step``).

    ``prev`` (the last gradient, zero where its sign flipped) and ``step_size`` (each
    element's step) are lists with one array per tensor, named as the optimizer's
    state. ``grad_scale`` multiplies every gradient and carries the sign for
    ``maximize``.
    """
    cdef RpropArgs a
    rprop_args(&a, etaminus, etaplus, step_size_min, step_size_max, grad_scale)
    run_kernel((params, grads, prev, step_size), n_threads, rprop_segment_f32, rprop_segment_f64, &a)


cdef int rprop_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef RpropArgs a
    rprop_args(&a, s[0], s[1], s[2], s[3], s[4])
    return run_direct(call, rprop_segment_f32, rprop_segment_f64, &a)


register_direct(rprop, rprop_direct)
