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


cdef inline void adam_moments(floating x, floating g, floating* mean, floating* sq, floating scale, floating wd,
                              bint has_wd, floating w1, floating w1_rest, bint from_end, floating keep2,
                              floating w2) noexcept nogil:
    """Both averages of one element, in place (``x`` already decayed)."""
    cdef floating d = scaled_grad(g, x, scale, wd, has_wd)
    mean[0] = lerp(mean[0], d, w1, w1_rest, from_end)
    sq[0] = average_square(sq[0], d, keep2, w2)


cdef inline floating adam_descent(floating x, floating mean, floating sq, floating step_size,
                                  floating inv_bc2_sqrt, floating eps) noexcept nogil:
    """The updated parameter."""
    return x - (step_size * mean) / (root(sq) * inv_bc2_sqrt + eps)


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
    cdef floating x, mean, sq, sq_max
    cdef Py_ssize_t i
    if v_max == NULL:
        for i in range(n):
            x = p[i]
            if decoupled:
                x = x * decay
            mean = m[i]
            sq = v[i]
            adam_moments(x, g[i], &mean, &sq, scale, wd, has_wd, w1, w1_rest, from_end, keep2, w2)
            m[i] = mean
            v[i] = sq
            p[i] = adam_descent(x, mean, sq, step_size, inv_bc2_sqrt, eps)
    else:
        for i in range(n):
            x = p[i]
            if decoupled:
                x = x * decay
            mean = m[i]
            sq = v[i]
            adam_moments(x, g[i], &mean, &sq, scale, wd, has_wd, w1, w1_rest, from_end, keep2, w2)
            m[i] = mean
            v[i] = sq
            # x86 max semantics (first operand unless the second is larger): a NaN
            # in the new average propagates; np.where(m > v, m, v) is the twin.
            sq_max = v_max[i]
            sq_max = sq_max if sq_max > sq else sq
            v_max[i] = sq_max
            p[i] = adam_descent(x, mean, sq_max, step_size, inv_bc2_sqrt, eps)


cdef struct AdamFloats:
    # AdamArgs as the float32 loops take them (cast once per call)
    float step_size, inv_bc2_sqrt, eps, scale, wd, decay, w1, w1_rest, keep2, w2
    bint from_end, decoupled, has_wd


cdef inline AdamFloats adam_floats(const AdamArgs* a) noexcept nogil:
    cdef AdamFloats f
    cdef Lerp toward = lerp_toward(a.beta1)
    f.step_size = <float>a.step_size
    f.inv_bc2_sqrt = <float>a.inv_bias_correction2_sqrt
    f.eps = <float>a.eps
    f.scale = <float>a.grad_scale
    f.wd = <float>a.weight_decay
    f.decay = <float>a.param_decay
    f.w1 = <float>toward.weight
    f.w1_rest = <float>(1.0 - toward.weight)
    f.keep2 = <float>a.beta2
    f.w2 = <float>(1.0 - a.beta2)
    f.from_end = toward.from_end
    f.decoupled = a.decoupled
    f.has_wd = a.has_weight_decay and not a.decoupled
    return f


# Adam on float32 parameters and gradients with both moments stored, decoded and
# encoded inside the element loop (register_fused_loop, _storage.pxi): the same
# operations as decoding into float32, adam_elements and encoding, so the same
# bits. One function per storage (gcc 12 vectorizes neither bfloat16 loop when
# they share a function with the int8 one).

cdef inline void adam_bf16_elements(float* p, const float* g, uint16_t* m, uint16_t* v, Py_ssize_t n,
                                    AdamFloats f) noexcept nogil:
    """n elements, bfloat16 moments rounded to nearest even."""
    cdef float x, mean, sq
    cdef Py_ssize_t i
    for i in range(n):
        x = p[i]
        if f.decoupled:
            x = x * f.decay
        mean = fd_bf16_value(m[i])
        sq = fd_bf16_value(v[i])
        adam_moments(x, g[i], &mean, &sq, f.scale, f.wd, f.has_wd, f.w1, f.w1_rest, f.from_end, f.keep2, f.w2)
        m[i] = fd_bf16_nearest(mean)
        v[i] = fd_bf16_nearest(sq)
        p[i] = adam_descent(x, mean, sq, f.step_size, f.inv_bc2_sqrt, f.eps)


cdef inline void adam_bf16_random_elements(float* p, const float* g, uint16_t* m, uint16_t* v, Py_ssize_t n,
                                           AdamFloats f, fd_random random_m, fd_random random_v) noexcept nogil:
    """n elements, bfloat16 moments rounded stochastically (random bits from the first)."""
    cdef float x, mean, sq
    cdef Py_ssize_t i
    for i in range(n):
        x = p[i]
        if f.decoupled:
            x = x * f.decay
        mean = fd_bf16_value(m[i])
        sq = fd_bf16_value(v[i])
        adam_moments(x, g[i], &mean, &sq, f.scale, f.wd, f.has_wd, f.w1, f.w1_rest, f.from_end, f.keep2, f.w2)
        m[i] = fd_bf16_random(mean, fd_random_bits(random_m, <uint32_t>i))
        v[i] = fd_bf16_random(sq, fd_random_bits(random_v, <uint32_t>i))
        p[i] = adam_descent(x, mean, sq, f.step_size, f.inv_bc2_sqrt, f.eps)


# The bfloat16 loops run in strips of FD_STRIP elements, each after prefetching
# the strip FD_AHEAD elements on (_storage.pxi: the streams would otherwise wait
# behind the arithmetic).

cdef void adam_stored_bf16(const StoredRun* run, const void* args) noexcept nogil:
    """bfloat16 moments, rounded to nearest even."""
    cdef AdamFloats f = adam_floats(<const AdamArgs*>args)
    cdef float* p = <float*>run.rows[0]
    cdef const float* g = <const float*>run.rows[1]
    cdef uint16_t* m = <uint16_t*>run.rows[2]
    cdef uint16_t* v = <uint16_t*>run.rows[3]
    cdef Py_ssize_t s = 0, strip = FD_STRIP if run.prefetch else run.n
    while s < run.n:   # one call site: gcc vectorized neither copy of the loop when there were two
        if run.prefetch:
            prefetch_strip(run, s)
        adam_bf16_elements(p + s, g + s, m + s, v + s, min(strip, run.n - s), f)
        s += strip


cdef void adam_stored_bf16_random(const StoredRun* run, const void* args) noexcept nogil:
    """bfloat16 moments, rounded stochastically."""
    cdef AdamFloats f = adam_floats(<const AdamArgs*>args)
    cdef float* p = <float*>run.rows[0]
    cdef const float* g = <const float*>run.rows[1]
    cdef uint16_t* m = <uint16_t*>run.rows[2]
    cdef uint16_t* v = <uint16_t*>run.rows[3]
    cdef Py_ssize_t s = 0, strip = FD_STRIP if run.prefetch else run.n
    while s < run.n:
        if run.prefetch:
            prefetch_strip(run, s)
        adam_bf16_random_elements(p + s, g + s, m + s, v + s, min(strip, run.n - s), f,
                                  fd_random_from(run.random[2], <uint32_t>s), fd_random_from(run.random[3], <uint32_t>s))
        s += strip


cdef void adam_stored_codes(const StoredRun* run, const void* args) noexcept nogil:
    """int8 first and uint8 second moments: per block, decode with its scale,
    update, keep the new moments (in L1) and their largest magnitudes, then
    encode them under the new scales."""
    cdef AdamFloats f = adam_floats(<const AdamArgs*>args)
    cdef float* p = <float*>run.rows[0]
    cdef const float* g = <const float*>run.rows[1]
    cdef uint8_t* m = <uint8_t*>run.rows[2]
    cdef uint8_t* v = <uint8_t*>run.rows[3]
    cdef float block_m[BLOCK]
    cdef float block_v[BLOCK]
    cdef float x, mean, sq, scale_m, scale_v
    cdef int32_t largest_m, largest_v, smallest_m, smallest_v, magnitude
    cdef Py_ssize_t i, b, start = 0, stop
    while start < run.n:
        stop = min(run.n, start + BLOCK)
        b = start // BLOCK
        scale_m = run.scales[2][b]
        scale_v = run.scales[3][b]
        largest_m = 0
        largest_v = 0
        smallest_m = 0x7fffffff
        smallest_v = 0x7fffffff
        for i in range(start, stop):
            x = p[i]
            if f.decoupled:
                x = x * f.decay
            mean = fd_int8_value(m[i], scale_m)
            sq = fd_uint8_value(v[i], scale_v)
            adam_moments(x, g[i], &mean, &sq, f.scale, f.wd, f.has_wd, f.w1, f.w1_rest, f.from_end, f.keep2, f.w2)
            block_m[i - start] = mean
            block_v[i - start] = sq
            magnitude = fd_magnitude(mean)
            largest_m = largest_m if largest_m > magnitude else magnitude
            magnitude = fd_nonzero_magnitude(magnitude)
            smallest_m = smallest_m if smallest_m < magnitude else magnitude
            magnitude = fd_magnitude(sq)
            largest_v = largest_v if largest_v > magnitude else magnitude
            magnitude = fd_nonzero_magnitude(magnitude)
            smallest_v = smallest_v if smallest_v < magnitude else magnitude
            p[i] = adam_descent(x, mean, sq, f.step_size, f.inv_bc2_sqrt, f.eps)
        run.scales[2][b] = fd_int8_encode(block_m, m + start, <int>(stop - start), largest_m, smallest_m,
                                          fd_random_from(run.random[2], <uint32_t>start))
        run.scales[3][b] = fd_uint8_encode(block_v, v + start, <int>(stop - start), largest_v, smallest_v,
                                           fd_random_from(run.random[3], <uint32_t>start))
        start = stop


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


if FD_FUSED_STORED:
    # exp_avg (role 2) and exp_avg_sq (role 3, non-negative: uint8 codes)
    register_fused_loop(adam_segment_f32, (1 << 2) | (1 << 3), 1 << 3, adam_stored_bf16, adam_stored_bf16_random,
                        adam_stored_codes)


cdef int adam_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdamArgs a
    adam_args(&a, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] != 0.0, s[8])
    return run_direct(call, adam_segment_f32, adam_segment_f64, &a)


register_direct(adam, adam_direct)
