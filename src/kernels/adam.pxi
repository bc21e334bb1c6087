# Adam and AdamW (decoupled weight decay), with or without AMSGrad: one pass reading
# param, grad, exp_avg, exp_avg_sq (and max_exp_avg_sq), writing all but the grad.
# AMSGrad has its own loop, so the plain loop never touches the absent buffer.
# Equations: fastdescent.rules.adam.adam_step. Reference twin:
# fastdescent/reference/adam.py (same operations, same order).

cdef struct AdamArgs:
    double step_size               # lr / bias_correction1, from the face
    double inv_bias_correction2_sqrt   # 1 / sqrt(bias_correction2), from the face
    double beta1
    double beta2
    double eps
    double weight_decay
    double param_decay             # 1 - lr * weight_decay, used iff decoupled
    double grad_scale              # already negated for maximize
    bint decoupled
    bint has_weight_decay          # coupled (L2) decay: added to the gradient


cdef inline void adam_elements(floating* p, const floating* g, floating* m, floating* v,
                               floating* v_max, Py_ssize_t n, const AdamArgs* a) noexcept nogil:
    cdef floating step_size = <floating>a.step_size, inv_bc2_sqrt = <floating>a.inv_bias_correction2_sqrt
    cdef floating eps = <floating>a.eps, scale = <floating>a.grad_scale
    cdef floating wd = <floating>a.weight_decay, decay = <floating>a.param_decay
    cdef Lerp toward = lerp_toward(a.beta1)
    cdef floating w1 = <floating>toward.weight, w1_rest = <floating>(1.0 - toward.weight)
    cdef floating keep2 = <floating>a.beta2, w2 = <floating>(1.0 - a.beta2)
    cdef bint from_end = toward.from_end, decoupled = a.decoupled
    cdef bint has_wd = a.has_weight_decay and not decoupled
    cdef floating x, d, mean, sq, sq_max
    cdef Py_ssize_t i
    if v_max == NULL:
        for i in range(n):
            x = p[i]
            if decoupled:
                x = x * decay
            d = scaled_grad(g[i], x, scale, wd, has_wd)
            mean = lerp(m[i], d, w1, w1_rest, from_end)
            m[i] = mean
            sq = average_square(v[i], d, keep2, w2)
            v[i] = sq
            p[i] = x - (step_size * mean) / (root(sq) * inv_bc2_sqrt + eps)
    else:
        for i in range(n):
            x = p[i]
            if decoupled:
                x = x * decay
            d = scaled_grad(g[i], x, scale, wd, has_wd)
            mean = lerp(m[i], d, w1, w1_rest, from_end)
            m[i] = mean
            sq = average_square(v[i], d, keep2, w2)
            v[i] = sq
            # x86 max semantics (first operand unless the second is larger): a NaN
            # in the new average propagates; np.where(m > v, m, v) is the twin.
            sq_max = v_max[i]
            sq_max = sq_max if sq_max > sq else sq
            v_max[i] = sq_max
            p[i] = x - (step_size * mean) / (root(sq_max) * inv_bc2_sqrt + eps)


cdef void adam_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adam_elements(<float*>rows[0] + start, <const float*>rows[1] + start, <float*>rows[2] + start,
                  <float*>rows[3] + start, (<float*>rows[4] + start) if rows[4] != NULL else NULL,
                  n, <const AdamArgs*>args)


cdef void adam_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    adam_elements(<double*>rows[0] + start, <const double*>rows[1] + start, <double*>rows[2] + start,
                  <double*>rows[3] + start, (<double*>rows[4] + start) if rows[4] != NULL else NULL,
                  n, <const AdamArgs*>args)


cdef void adam_args(AdamArgs* a, double lr, double step_size, double inv_bias_correction2_sqrt, double beta1,
                    double beta2, double eps, double weight_decay, bint decoupled, double grad_scale) noexcept nogil:
    a.step_size = step_size
    a.inv_bias_correction2_sqrt = inv_bias_correction2_sqrt
    a.beta1 = beta1
    a.beta2 = beta2
    a.eps = eps
    a.weight_decay = weight_decay
    a.param_decay = 1.0 - lr * weight_decay
    a.grad_scale = grad_scale
    a.decoupled = decoupled and weight_decay != 0.0
    a.has_weight_decay = weight_decay != 0.0


def adam(list params not None, list grads not None, list exp_avg not None, list exp_avg_sq not None,
         max_exp_avg_sq=None, *,
         double lr, double step_size, double inv_bias_correction2_sqrt, double beta1, double beta2,
         double eps, double weight_decay, bint decoupled, double grad_scale, int n_threads):
    """Fused Adam/AdamW step over many tensors (private: call ``fastdescent.adam_step``).

    ``step_size`` = lr / bias_correction1 and ``inv_bias_correction2_sqrt`` come from
    the face (1 and lr without bias correction). ``decoupled`` selects AdamW's
    weight decay, ``p *= 1 - lr * weight_decay``; else it is added to the gradient.
    Each buffer is a list with one array per tensor, named as the optimizer's
    state; ``max_exp_avg_sq`` is a list (AMSGrad) or None. ``grad_scale`` multiplies
    every gradient and carries the sign for ``maximize``.
    """
    cdef AdamArgs a
    adam_args(&a, lr, step_size, inv_bias_correction2_sqrt, beta1, beta2, eps, weight_decay, decoupled, grad_scale)
    run_kernel((params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq), n_threads,
               adam_segment_f32, adam_segment_f64, &a)


cdef int adam_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdamArgs a
    adam_args(&a, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] != 0.0, s[8])
    return run_direct(call, adam_segment_f32, adam_segment_f64, &a)


register_direct("adam", adam_direct, ("params", "grads", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
                ("lr", "step_size", "inv_bias_correction2_sqrt", "beta1", "beta2", "eps", "weight_decay",
                 "decoupled", "grad_scale"))
