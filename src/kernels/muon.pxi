# Muon's two elementwise passes, around its Newton-Schulz orthogonalization (NumPy
# matrix products, the same calls for both backends: fastdescent.rules.muon):
#
# * muon_momentum reads grad and momentum_buffer, writes the buffer (and, with
#   Nesterov, the update to orthogonalize: its own loop, which writes one more array,
#   reading its old lines first: old_bits, in _adaptive.pxi);
# * muon reads param and the orthogonalized update, writes param.
#
# Equations: fastdescent.rules.muon.muon_step. Reference twins:
# fastdescent/reference/muon.py (same operations, same order).

cdef struct MuonMomentumArgs:
    double momentum
    double grad_scale


cdef struct MuonArgs:
    double lr                      # adjusted to the matrix's shape
    double param_decay             # 1 - lr * weight_decay, with the unadjusted lr


cdef inline void muon_momentum_elements(const floating* g, floating* buf, floating* update, Py_ssize_t n,
                                        const MuonMomentumArgs* a) noexcept nogil:
    # The buffer moves toward the gradient by 1 - momentum (torch's buf.lerp_); the
    # Nesterov update from the gradient toward the new buffer by momentum (grad.lerp).
    cdef Lerp toward = lerp_toward(a.momentum)
    cdef floating w = <floating>toward.weight, w_rest = <floating>(1.0 - toward.weight)
    cdef floating ahead = <floating>a.momentum, ahead_rest = <floating>(1.0 - a.momentum)
    cdef bint from_end = toward.from_end, ahead_from_end = not (a.momentum < 0.5)
    cdef floating scale = <floating>a.grad_scale
    cdef floating d, b
    cdef unsigned long long seen = 0
    cdef Py_ssize_t i
    if update == NULL:
        for i in range(n):
            buf[i] = lerp(buf[i], scale * g[i], w, w_rest, from_end)
    else:
        for i in range(n):
            d = scale * g[i]
            b = lerp(buf[i], d, w, w_rest, from_end)
            buf[i] = b
            seen = seen | old_bits(update, i)
            update[i] = lerp(d, b, ahead, ahead_rest, ahead_from_end)
        keep_bits(seen)


cdef inline void muon_elements(floating* p, const floating* orthogonal, Py_ssize_t n,
                               const MuonArgs* a) noexcept nogil:
    cdef floating lr = <floating>a.lr, decay = <floating>a.param_decay
    cdef Py_ssize_t i
    for i in range(n):
        p[i] = p[i] * decay - lr * orthogonal[i]


cdef void muon_momentum_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    muon_momentum_elements(<const float*>rows[0] + start, <float*>rows[1] + start,
                           (<float*>rows[2] + start) if rows[2] != NULL else NULL, n,
                           <const MuonMomentumArgs*>args)


cdef void muon_momentum_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    muon_momentum_elements(<const double*>rows[0] + start, <double*>rows[1] + start,
                           (<double*>rows[2] + start) if rows[2] != NULL else NULL, n,
                           <const MuonMomentumArgs*>args)


cdef void muon_segment_f32(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    muon_elements(<float*>rows[0] + start, <const float*>rows[1] + start, n, <const MuonArgs*>args)


cdef void muon_segment_f64(void** rows, Py_ssize_t start, Py_ssize_t n, const void* args) noexcept nogil:
    muon_elements(<double*>rows[0] + start, <const double*>rows[1] + start, n, <const MuonArgs*>args)


def muon_momentum(list grads not None, list momentum_buffer not None, updates=None, *, double momentum,
                  double grad_scale, int n_threads):
    """Muon's momentum pass over many tensors (private: call ``fastdescent.muon_step``).

    Updates ``momentum_buffer`` (one array per tensor) in place and, if ``updates``
    is a list (Nesterov), writes the update to orthogonalize into it; else the
    buffer is that update. ``grad_scale`` multiplies every gradient.
    """
    cdef MuonMomentumArgs a
    a.momentum = momentum
    a.grad_scale = grad_scale
    run_kernel((grads, momentum_buffer, updates), n_threads, muon_momentum_segment_f32,
               muon_momentum_segment_f64, &a)


def muon(list params not None, list orthogonalized not None, *, double lr, double param_decay, int n_threads):
    """Muon's parameter update over many tensors (private: call ``fastdescent.muon_step``):
    ``p = p * param_decay - lr * o``, ``o`` the orthogonalized update of ``p``."""
    cdef MuonArgs a
    a.lr = lr
    a.param_decay = param_decay
    run_kernel((params, orthogonalized), n_threads, muon_segment_f32, muon_segment_f64, &a)
