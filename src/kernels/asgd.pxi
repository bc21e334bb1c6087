# ASGD (averaged SGD, PyTorch's form): one pass reading param, grad and ax, writing
# param and ax. Before averaging starts (mu = 1) the average is a copy of the
# parameter, a loop that does not use its old values but still reads them (old_bits,
# in _adaptive.pxi: a copy into lines not in cache ran at 57% of the ceiling).
# Equations:
# fastdescent.rules.asgd.asgd_step. Reference twin: fastdescent/reference/asgd.py
# (same operations, same order).

cdef struct ASGDArgs:
    double eta                     # the step's rate, as PyTorch stores it (float32)
    double param_decay             # 1 - lambd * eta
    double mu                      # the averaging weight, as PyTorch stores it
    double weight_decay
    double grad_scale              # already negated for maximize
    bint averaging                 # mu != 1: ax moves toward the parameter, else copies it


cdef inline void asgd_elements(floating* p, const floating* g, floating* ax, Py_ssize_t n,
                               const ASGDArgs* a) noexcept nogil:
    cdef floating eta = <floating>a.eta, decay = <floating>a.param_decay, mu = <floating>a.mu
    cdef floating wd = <floating>a.weight_decay, scale = <floating>a.grad_scale
    cdef bint has_wd = a.weight_decay != 0.0
    cdef floating x, d
    cdef unsigned long long seen = 0
    cdef Py_ssize_t i
    if a.averaging:
        for i in range(n):
            x = p[i]
            d = scaled_grad(g[i], x, scale, wd, has_wd)
            x = x * decay - eta * d
            p[i] = x
            ax[i] = ax[i] + (x - ax[i]) * mu
    else:
        for i in range(n):
            x = p[i]
            d = scaled_grad(g[i], x, scale, wd, has_wd)
            x = x * decay - eta * d
            p[i] = x
            seen = seen | old_bits(ax, i)
            ax[i] = x
        keep_bits(seen)


cdef void asgd_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    asgd_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                  n, <const ASGDArgs*>args)


cdef void asgd_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    asgd_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                  n, <const ASGDArgs*>args)


cdef void asgd_args(ASGDArgs* a, double eta, double param_decay, double mu, double weight_decay,
                    double grad_scale) noexcept nogil:
    a.eta = eta
    a.param_decay = param_decay
    a.mu = mu
    a.weight_decay = weight_decay
    a.grad_scale = grad_scale
    a.averaging = mu != 1.0


def asgd(list params not None, list grads not None, list ax not None, *, double eta, double param_decay, double mu,
         double weight_decay, double grad_scale, int n_threads):
    """Fused ASGD step over many tensors (private: call ``fastdescent.asgd_step``).

    ``eta`` and ``mu`` are the rate and averaging weight before the step,
    ``param_decay`` = 1 - lambd * eta; ``ax`` (the averages) is a list with one array
    per tensor. ``grad_scale`` multiplies every gradient and carries the sign for
    ``maximize``.
    """
    cdef ASGDArgs a
    asgd_args(&a, eta, param_decay, mu, weight_decay, grad_scale)
    run_kernel((params, grads, ax), n_threads, asgd_segment_f32, asgd_segment_f64, &a)


cdef int asgd_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef ASGDArgs a
    asgd_args(&a, s[0], s[1], s[2], s[3], s[4])
    return run_direct(call, asgd_segment_f32, asgd_segment_f64, &a)


register_direct(asgd, asgd_direct)
