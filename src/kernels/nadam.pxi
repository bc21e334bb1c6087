# NAdam (Adam with Nesterov momentum) and NAdamW (decoupled weight decay): one pass
# reading param, grad, exp_avg and exp_avg_sq, writing all but the grad.
# Equations: fastdescent.rules.nadam.nadam_step. Reference twin:
# fastdescent/reference/nadam.py (same operations, same order).

cdef struct NAdamArgs:
    double grad_coefficient    # -lr (1 - mu_t) / (1 - mu_product_t), from the face
    double mean_coefficient    # -lr mu_{t+1} / (1 - mu_product_t mu_{t+1}), from the face
    double bias_correction2
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_decay         # 1 - lr * weight_decay, used iff decoupled
    double grad_scale          # already negated for maximize
    bint decoupled
    bint has_weight_decay      # coupled (L2) decay: added to the gradient


cdef inline void nadam_elements(floating* p, const floating* g, floating* m, floating* v,
                                Py_ssize_t n, const NAdamArgs* a) noexcept nogil:
    cdef floating c_grad = <floating>a.grad_coefficient, c_mean = <floating>a.mean_coefficient
    cdef floating bc2 = <floating>a.bias_correction2, eps = <floating>a.eps
    cdef floating scale = <floating>a.grad_scale, wd = <floating>a.weight_decay, decay = <floating>a.param_decay
    cdef Lerp toward = lerp_toward(a.beta1)
    cdef floating w1 = <floating>toward.weight, w1_rest = <floating>(1.0 - toward.weight)
    cdef floating keep2 = <floating>a.beta2, w2 = <floating>(1.0 - a.beta2)
    cdef bint from_end = toward.from_end, decoupled = a.decoupled
    cdef bint has_wd = a.has_weight_decay and not decoupled
    cdef floating x, d, mean, sq, denom
    cdef Py_ssize_t i
    for i in range(n):
        x = p[i]
        if decoupled:
            x = x * decay
        d = scaled_grad(g[i], x, scale, wd, has_wd)
        mean = lerp(m[i], d, w1, w1_rest, from_end)
        m[i] = mean
        sq = average_square(v[i], d, keep2, w2)
        v[i] = sq
        denom = root(sq / bc2) + eps
        # PyTorch's two addcdiv_ calls, the gradient's share first.
        x = x + (c_grad * d) / denom
        p[i] = x + (c_mean * mean) / denom


cdef void nadam_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    nadam_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                   <float*>rows[3] + start, n, <const NAdamArgs*>args)


cdef void nadam_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    nadam_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                   <double*>rows[3] + start, n, <const NAdamArgs*>args)


cdef void nadam_args(NAdamArgs* a, double lr, double grad_coefficient, double mean_coefficient,
                     double bias_correction2, double beta1, double beta2, double eps, double weight_decay,
                     bint decoupled, double grad_scale) noexcept nogil:
    a.grad_coefficient = grad_coefficient
    a.mean_coefficient = mean_coefficient
    a.bias_correction2 = bias_correction2
    a.beta1 = beta1
    a.beta2 = beta2
    a.eps = eps
    a.weight_decay = weight_decay
    a.param_decay = 1.0 - lr * weight_decay
    a.grad_scale = grad_scale
    a.decoupled = decoupled and weight_decay != 0.0
    a.has_weight_decay = weight_decay != 0.0


def nadam(list params not None, list grads not None, list exp_avg not None, list exp_avg_sq not None, *,
          double lr, double grad_coefficient, double mean_coefficient, double bias_correction2, double beta1,
          double beta2, double eps, double weight_decay, bint decoupled, double grad_scale, int n_threads):
    """Fused NAdam/NAdamW step over many tensors (private: call ``fastdescent.nadam_step``).

    ``grad_coefficient`` and ``mean_coefficient`` (the momentum schedule and
    ``mu_product``) and ``bias_correction2`` come from the face. ``decoupled``
    selects NAdamW's weight decay, ``p *= 1 - lr * weight_decay``; else it is added
    to the gradient. Each buffer is a list with one array per tensor, named as the
    optimizer's state. ``grad_scale`` multiplies every gradient and carries the
    sign for ``maximize``.
    """
    cdef NAdamArgs a
    nadam_args(&a, lr, grad_coefficient, mean_coefficient, bias_correction2, beta1, beta2, eps, weight_decay, decoupled, grad_scale)
    run_kernel((params, grads, exp_avg, exp_avg_sq), n_threads, nadam_segment_f32, nadam_segment_f64, &a)


cdef int nadam_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef NAdamArgs a
    nadam_args(&a, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8] != 0.0, s[9])
    return run_direct(call, nadam_segment_f32, nadam_segment_f64, &a)


register_direct(nadam, nadam_direct)
