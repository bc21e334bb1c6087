# Adamax (Adam with the infinity norm): one pass reading param, grad, exp_avg and
# exp_inf, writing all but the grad.
# Equations: fastdescent.rules.adamax.adamax_step. Reference twin:
# fastdescent/reference/adamax.py (same operations, same order).

from libc.math cimport fabs, fabsf


cdef struct AdamaxArgs:
    double step_size           # lr / bias_correction1, from the face
    double beta1
    double beta2
    double eps
    double weight_decay
    double grad_scale          # already negated for maximize
    bint has_weight_decay


cdef inline void adamax_elements(floating* p, const floating* g, floating* m, floating* u,
                                 Py_ssize_t n, const AdamaxArgs* a) noexcept nogil:
    cdef floating step_size = <floating>a.step_size, eps = <floating>a.eps
    cdef floating scale = <floating>a.grad_scale, wd = <floating>a.weight_decay
    cdef Lerp toward = lerp_toward(a.beta1)
    cdef floating w1 = <floating>toward.weight, w1_rest = <floating>(1.0 - toward.weight)
    cdef floating keep2 = <floating>a.beta2
    cdef bint from_end = toward.from_end, has_wd = a.has_weight_decay
    cdef floating x, d, mean, decayed, bound
    cdef Py_ssize_t i
    for i in range(n):
        x = p[i]
        d = scaled_grad(g[i], x, scale, wd, has_wd)
        mean = lerp(m[i], d, w1, w1_rest, from_end)
        m[i] = mean
        decayed = u[i] * keep2
        if floating is float:
            bound = fabsf(d) + eps
        else:
            bound = fabs(d) + eps
        # x86 max semantics (first operand unless the second is larger): a NaN
        # gradient propagates; np.where(decayed > bound, decayed, bound) is the twin.
        bound = decayed if decayed > bound else bound
        u[i] = bound
        p[i] = x - (step_size * mean) / bound


cdef void adamax_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adamax_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                    <float*>rows[3] + start, n, <const AdamaxArgs*>args)


cdef void adamax_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adamax_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                    <double*>rows[3] + start, n, <const AdamaxArgs*>args)


cdef void adamax_args(AdamaxArgs* a, double step_size, double beta1, double beta2, double eps, double weight_decay,
                      double grad_scale) noexcept nogil:
    a.step_size = step_size
    a.beta1 = beta1
    a.beta2 = beta2
    a.eps = eps
    a.weight_decay = weight_decay
    a.grad_scale = grad_scale
    a.has_weight_decay = weight_decay != 0.0


def adamax(list params not None, list grads not None, list exp_avg not None, list exp_inf not None, *,
           double step_size, double beta1, double beta2, double eps, double weight_decay, double grad_scale,
           int n_threads):
    """Fused Adamax step over many tensors (private: call ``fastdescent.adamax_step``).

    ``step_size`` = lr / bias_correction1 comes from the face. Each buffer is a list
    with one array per tensor, named as the optimizer's state. ``grad_scale``
    multiplies every gradient and carries the sign for ``maximize``.
    """
    cdef AdamaxArgs a
    adamax_args(&a, step_size, beta1, beta2, eps, weight_decay, grad_scale)
    run_kernel((params, grads, exp_avg, exp_inf), n_threads, adamax_segment_f32, adamax_segment_f64, &a)


cdef int adamax_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdamaxArgs a
    adamax_args(&a, s[0], s[1], s[2], s[3], s[4], s[5])
    return run_direct(call, adamax_segment_f32, adamax_segment_f64, &a)


register_direct(adamax, adamax_direct)
