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


cdef extern from *:
    """
    /* AdamArgs as the float32 fused stored loops take them (cast once per call). */
    typedef struct {
        float step_size, inv_bc2_sqrt, eps, scale, wd, decay, w1, w1_rest, keep2, w2;
        int from_end, decoupled, has_wd;
    } fd_adam_floats;

    #ifdef __AVX512F__
    /* fd_adam_floats broadcast once per call (and the flags as plain ints, so
       that the loops test locals, not memory a store might have changed). */
    typedef struct {
        __m512 decay, scale, wd, w1, w1_rest, keep2, w2, step_size, inv_bc2_sqrt, eps;
        int decoupled, has_wd, from_end, unscaled;
    } fd_adam_vectors;

    static inline fd_adam_vectors fd_adam_vectors_of(const fd_adam_floats *f) {
        fd_adam_vectors c;
        c.decay = _mm512_set1_ps(f->decay);
        c.scale = _mm512_set1_ps(f->scale);
        c.wd = _mm512_set1_ps(f->wd);
        c.w1 = _mm512_set1_ps(f->w1);
        c.w1_rest = _mm512_set1_ps(f->w1_rest);
        c.keep2 = _mm512_set1_ps(f->keep2);
        c.w2 = _mm512_set1_ps(f->w2);
        c.step_size = _mm512_set1_ps(f->step_size);
        c.inv_bc2_sqrt = _mm512_set1_ps(f->inv_bc2_sqrt);
        c.eps = _mm512_set1_ps(f->eps);
        c.decoupled = f->decoupled;
        c.has_wd = f->has_wd;
        c.from_end = f->from_end;
        /* times 1, d is the gradient: same bits (a signaling NaN is quieted by
           the first operation it enters either way, and nothing else differs) */
        c.unscaled = f->scale == 1.0f;
        return c;
    }

    /* The loops are specialised on the common flags (`kind`, a constant once
       inlined): a test of a flag per vector costs about as much as an operation. */
    #define FD_ADAM_ANY 0         /* the call's flags, tested in the loop */
    #define FD_ADAM_PLAIN 1       /* no weight decay, gradient scale 1, lerp from its start (beta1 > 0.5) */
    #define FD_ADAM_DECOUPLED 2   /* the same with AdamW's decoupled decay */

    static inline int fd_adam_kind(const fd_adam_vectors *f) {
        if (f->has_wd || f->from_end || !f->unscaled) return FD_ADAM_ANY;
        return f->decoupled ? FD_ADAM_DECOUPLED : FD_ADAM_PLAIN;
    }

    /* Adam's update of 16 lanes, the operations of adam_elements in its order:
       the moments updated in place, the new parameters returned. */
    FD_V_INLINE __m512 fd_adam16(__m512 x, __m512 grad, __m512 *mean, __m512 *sq, int kind, const fd_adam_vectors *f) {
        __m512 d, diff;
        if (kind == FD_ADAM_ANY ? f->decoupled : kind == FD_ADAM_DECOUPLED) x = _mm512_mul_ps(x, f->decay);
        d = kind != FD_ADAM_ANY || f->unscaled ? grad : _mm512_mul_ps(f->scale, grad);
        if (kind == FD_ADAM_ANY && f->has_wd) d = _mm512_add_ps(d, _mm512_mul_ps(f->wd, x));
        diff = _mm512_sub_ps(d, *mean);
        *mean = kind == FD_ADAM_ANY && f->from_end ? _mm512_sub_ps(d, _mm512_mul_ps(f->w1_rest, diff))
                                                   : _mm512_add_ps(*mean, _mm512_mul_ps(f->w1, diff));
        *sq = _mm512_add_ps(_mm512_mul_ps(f->keep2, *sq), _mm512_mul_ps(_mm512_mul_ps(f->w2, d), d));
        return _mm512_sub_ps(x, _mm512_div_ps(_mm512_mul_ps(f->step_size, *mean),
                                              _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(*sq), f->inv_bc2_sqrt), f->eps)));
    }

    /* Prefetch (a large call: see FD_PREFETCH_MIN) the lines of elements
       i + FD_AHEAD .. i + FD_AHEAD + 63 of every role, the moments of
       `moment_size` bytes each: a few every 64 elements (a burst of a whole
       int8 block's was slower: it holds up the loop's own loads). */
    FD_V_INLINE void fd_adam_prefetch64(const float *p, const float *g, const void *m, const void *v, ptrdiff_t i,
                                        int moment_size) {
        ptrdiff_t at = (i + FD_AHEAD) * moment_size;
        int k;
        for (k = 0; k < 64; k += 16) {
            fd_prefetch_line(p + i + FD_AHEAD + k);
            fd_prefetch_line(g + i + FD_AHEAD + k);
        }
        for (k = 0; k < 64 * moment_size; k += 64) {
            fd_prefetch_line((const char *)m + at + k);
            fd_prefetch_line((const char *)v + at + k);
        }
    }

    /* Adam on elements i .. i + 15 with bfloat16 moments, words `high` (0: 0 .. 15,
       1: 16 .. 31) of words_m and words_v: the parameters (`full`, or the lanes
       of k) stored, the new moments rounded (fd_v_bf16_rounded: to nearest even,
       or stochastically with the random bits of the elements' index in the run). */
    FD_V_INLINE void fd_adam_bf16_16(float *p, const float *g, __m512i words_m, __m512i words_v, int high, ptrdiff_t i,
                                     __mmask16 k, int full, int kind, const fd_adam_vectors *f, fd_random random_m,
                                     fd_random random_v, int stochastic, __m512i *rounded_m, __m512i *rounded_v) {
        __m512 x = full ? _mm512_loadu_ps(p + i) : _mm512_maskz_loadu_ps(k, p + i);
        __m512 grad = full ? _mm512_loadu_ps(g + i) : _mm512_maskz_loadu_ps(k, g + i);
        __m512 mean = fd_v_bf16_values(words_m, high), sq = fd_v_bf16_values(words_v, high);
        x = fd_adam16(x, grad, &mean, &sq, kind, f);
        *rounded_m = fd_v_bf16_rounded(mean, random_m, stochastic, i);
        *rounded_v = fd_v_bf16_rounded(sq, random_v, stochastic, i);
        if (full) _mm512_storeu_ps(p + i, x);
        else _mm512_mask_storeu_ps(p + i, k, x);
    }

    FD_V_INLINE void fd_adam_bf16_32(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t i, int kind,
                                     const fd_adam_vectors *f, fd_random random_m, fd_random random_v, int stochastic) {
        __m512i words_m = _mm512_loadu_si512((const void *)(m + i)), words_v = _mm512_loadu_si512((const void *)(v + i));
        __m512i m0, v0, m1, v1;
        fd_adam_bf16_16(p, g, words_m, words_v, 0, i, 0xffff, 1, kind, f, random_m, random_v, stochastic, &m0, &v0);
        fd_adam_bf16_16(p, g, words_m, words_v, 1, i + 16, 0xffff, 1, kind, f, random_m, random_v, stochastic, &m1, &v1);
        fd_v_bf16_store32(m + i, m0, m1);
        fd_v_bf16_store32(v + i, v0, v1);
    }

    /* Elements i .. i + 15 (`full`, or the lanes of k): a run's last ones. */
    FD_V_INLINE void fd_adam_bf16_last(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t i, __mmask16 k,
                                       int full, int kind, const fd_adam_vectors *f, fd_random random_m,
                                       fd_random random_v, int stochastic) {
        __m512i m0, v0;
        fd_adam_bf16_16(p, g, fd_v_bf16_words16(m + i, k, full), fd_v_bf16_words16(v + i, k, full), 0, i, k, full, kind,
                        f, random_m, random_v, stochastic, &m0, &v0);
        fd_v_bf16_store16(m + i, k, full, m0);
        fd_v_bf16_store16(v + i, k, full, v0);
    }

    /* Adam on a run of n elements with bfloat16 moments: 64 per step (with the
       prefetches of a large call), then 16 at a time, the last ones masked. */
    FD_V_INLINE void fd_adam_bf16_run(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t n,
                                      const fd_adam_vectors *f, int kind, fd_random random_m, fd_random random_v,
                                      int stochastic, int prefetch) {
        ptrdiff_t i;
        for (i = 0; i + 64 <= n; i += 64) {
            if (prefetch) fd_adam_prefetch64(p, g, m, v, i, 2);
            fd_adam_bf16_32(p, g, m, v, i, kind, f, random_m, random_v, stochastic);
            fd_adam_bf16_32(p, g, m, v, i + 32, kind, f, random_m, random_v, stochastic);
        }
        for (; i + 16 <= n; i += 16)
            fd_adam_bf16_last(p, g, m, v, i, 0xffff, 1, kind, f, random_m, random_v, stochastic);
        if (i < n)
            fd_adam_bf16_last(p, g, m, v, i, (__mmask16)((1U << (n - i)) - 1U), 0, kind, f, random_m, random_v, stochastic);
    }

    FD_V_INLINE void fd_adam_bf16_kinds(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t n,
                                        const fd_adam_vectors *f, fd_random random_m, fd_random random_v, int stochastic,
                                        int prefetch) {
        if (fd_adam_kind(f) == FD_ADAM_PLAIN)
            fd_adam_bf16_run(p, g, m, v, n, f, FD_ADAM_PLAIN, random_m, random_v, stochastic, prefetch);
        else if (fd_adam_kind(f) == FD_ADAM_DECOUPLED)
            fd_adam_bf16_run(p, g, m, v, n, f, FD_ADAM_DECOUPLED, random_m, random_v, stochastic, prefetch);
        else
            fd_adam_bf16_run(p, g, m, v, n, f, FD_ADAM_ANY, random_m, random_v, stochastic, prefetch);
    }

    static void fd_adam_bf16(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t n, fd_adam_floats floats,
                             fd_random random_m, fd_random random_v, int prefetch) {
        const fd_adam_vectors f = fd_adam_vectors_of(&floats);
        /* both moments round alike (fused_loop_for) */
        if (random_m.stochastic) fd_adam_bf16_kinds(p, g, m, v, n, &f, random_m, random_v, 1, prefetch);
        else fd_adam_bf16_kinds(p, g, m, v, n, &f, random_m, random_v, 0, prefetch);
    }

    /* Adam's element loop on 16 lanes with an int8 first and a uint8 second
       moment (fd_adam_codes): decode, update (the operations of adam_elements,
       in its order), the parameters stored, the new moments kept in the block's
       rows and their magnitudes tracked (the second moment's bits as they are:
       fd_v_track). Lanes outside `k` (a block's last vector) read zeros and
       count as zeros. */
    FD_V_INLINE void fd_adam_codes16(float *p, const float *g, const uint8_t *m, const uint8_t *v, float *row_m,
                                     float *row_v, __mmask16 k, int full, int plain, int kind, const fd_adam_vectors *f,
                                     __m512 factor_m, __m512 scale_m, __m512 factor_v, __m512 scale_v,
                                     fd_v_range *range_m, fd_v_range *range_v) {
        __m512 x = full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
        __m512 grad = full ? _mm512_loadu_ps(g) : _mm512_maskz_loadu_ps(k, g);
        __m512 mean = fd_v_code_values(fd_v_codes(m, k, full, 1), plain, factor_m, scale_m, 1, 112);
        __m512 sq = fd_v_code_values(fd_v_codes(v, k, full, 0), plain, factor_v, scale_v, 0, 96);
        __m512i magnitude_m, bits_v;
        x = fd_adam16(x, grad, &mean, &sq, kind, f);
        magnitude_m = _mm512_and_si512(_mm512_castps_si512(mean), _mm512_set1_epi32(0x7fffffff));
        bits_v = _mm512_castps_si512(sq);
        if (!full) {
            magnitude_m = _mm512_maskz_mov_epi32(k, magnitude_m);
            bits_v = _mm512_maskz_mov_epi32(k, bits_v);
        }
        fd_v_track(range_m, magnitude_m);
        fd_v_track(range_v, bits_v);
        _mm512_store_ps(row_m, mean);
        _mm512_store_ps(row_v, sq);
        if (full) _mm512_storeu_ps(p, x);
        else _mm512_mask_storeu_ps(p, k, x);
    }

    /* A block's new moments and their tracked magnitudes, between its update and
       its encoding. */
    typedef struct {
        float m[FD_BLOCK] __attribute__((aligned(64)));
        float v[FD_BLOCK] __attribute__((aligned(64)));
        fd_v_range range_m, range_v;
    } fd_adam_rows;

    /* The previous block's plain encoding, run inside the next block's update:
       the update is bound by its divides and square roots, whose unit leaves
       the vector ports room for the encoder's operations. */
    typedef struct {
        const fd_adam_rows *rows;
        uint8_t *m, *v;
        __m512 inverse_m, inverse_v;
        fd_random random_m, random_v;
    } fd_adam_pending;

    /* The elements of one block of `count` (fd_adam_codes16 on each 16); with
       `encode` (a whole block), the 64 codes of each moment of `pending` beside
       each 64 elements. */
    FD_V_INLINE void fd_adam_codes_block(float *p, const float *g, const uint8_t *m, const uint8_t *v,
                                         fd_adam_rows *rows, int count, int plain, int kind, const fd_adam_vectors *f,
                                         float scale_m, float scale_v, int encode, const fd_adam_pending *pending,
                                         int stochastic, int prefetch) {
        __m512 factor_m = _mm512_set1_ps(0x1p112f * scale_m), factor_v = _mm512_set1_ps(0x1p96f * scale_v);
        __m512 vscale_m = _mm512_set1_ps(scale_m), vscale_v = _mm512_set1_ps(scale_v);
        /* the ranges in locals (registers), stored once: kept in `rows`, gcc loaded
           and stored them on every vector (a vector store may alias them) */
        fd_v_range range_m = fd_v_range_start(), range_v = fd_v_range_start();
        int i, j;
        for (i = 0; i + 64 <= count; i += 64) {
            if (prefetch) fd_adam_prefetch64(p, g, m, v, i, 1);
            for (j = i; j < i + 64; j += 16)
                fd_adam_codes16(p + j, g + j, m + j, v + j, rows->m + j, rows->v + j, 0xffff, 1, plain, kind, f, factor_m,
                                vscale_m, factor_v, vscale_v, &range_m, &range_v);
            if (encode) {
                fd_v_encode64(pending->rows->m, pending->m, i, pending->inverse_m, pending->random_m, stochastic, 1);
                fd_v_encode64(pending->rows->v, pending->v, i, pending->inverse_v, pending->random_v, stochastic, 0);
            }
        }
        if (!encode) {   /* encode: a whole block */
            for (; i + 16 <= count; i += 16)
                fd_adam_codes16(p + i, g + i, m + i, v + i, rows->m + i, rows->v + i, 0xffff, 1, plain, kind, f, factor_m,
                                vscale_m, factor_v, vscale_v, &range_m, &range_v);
            if (i < count)
                fd_adam_codes16(p + i, g + i, m + i, v + i, rows->m + i, rows->v + i, (__mmask16)((1U << (count - i)) - 1U),
                                0, plain, kind, f, factor_m, vscale_m, factor_v, vscale_v, &range_m, &range_v);
        }
        rows->range_m = range_m;
        rows->range_v = range_v;
    }

    /* The encodings of a block's new moments (`count` of them in `rows`) under
       their new scales, which are written to scales_m[b] and scales_v[b]. */
    FD_V_INLINE void fd_adam_encodings(const fd_adam_rows *rows, int count, float *scales_m, float *scales_v,
                                       ptrdiff_t b, fd_v_encoding *e_m, fd_v_encoding *e_v) {
        uint32_t extremes[4];
        fd_v_reduce_ranges(&rows->range_m, &rows->range_v, extremes);
        *e_m = fd_v_encoding_of(rows->m, count, extremes[0], extremes[2], 112, 0x1p-112f);
        *e_v = fd_v_encoding_of(rows->v, count, extremes[1], extremes[3], 96, 0x1p-96f);
        scales_m[b] = e_m->scale;
        scales_v[b] = e_v->scale;
    }

    /* Adam on n elements (whole blocks from a block's start) with an int8 first
       and a uint8 second moment and their block scales: per block, decode and
       update; the new moments are encoded under their new scales during the
       next block's update (or alone: the last block, a general encoding). */
    FD_V_INLINE void fd_adam_codes_run(float *p, const float *g, uint8_t *m, uint8_t *v, float *scales_m,
                                       float *scales_v, ptrdiff_t n, const fd_adam_vectors *f, int kind,
                                       fd_random random_m, fd_random random_v, int stochastic, int prefetch) {
        fd_adam_rows rows[2];
        fd_adam_pending pending;
        fd_v_encoding e_m, e_v;
        ptrdiff_t start, b;
        int count, plain, encode, has_pending = 0;
        for (start = 0, b = 0; start < n; start += FD_BLOCK, b++) {
            count = n - start < FD_BLOCK ? (int)(n - start) : FD_BLOCK;
            plain = fd_v_plain_code_pair(m + start, v + start, count, scales_m[b], scales_v[b]);
            encode = 0;
            if (has_pending) {   /* block b - 1 (whole) */
                fd_adam_encodings(pending.rows, FD_BLOCK, scales_m, scales_v, b - 1, &e_m, &e_v);
                encode = e_m.plain && e_v.plain && count == FD_BLOCK;
                if (encode) {
                    pending.inverse_m = _mm512_set1_ps(e_m.inverse_down);
                    pending.inverse_v = _mm512_set1_ps(e_v.inverse_down);
                } else {
                    fd_v_encode_block(pending.rows->m, pending.m, FD_BLOCK, e_m, pending.random_m, stochastic, 1, 112,
                                      0x1p37f, 0x7f);
                    fd_v_encode_block(pending.rows->v, pending.v, FD_BLOCK, e_v, pending.random_v, stochastic, 0, 96,
                                      0x1p53f, 0xff);
                }
            }
            /* four copies of the loop: decode plainly or not, encode the previous block beside or not */
            if (plain && encode)
                fd_adam_codes_block(p + start, g + start, m + start, v + start, &rows[b & 1], count, 1, kind, f, scales_m[b],
                                    scales_v[b], 1, &pending, stochastic, prefetch);
            else if (plain)
                fd_adam_codes_block(p + start, g + start, m + start, v + start, &rows[b & 1], count, 1, kind, f, scales_m[b],
                                    scales_v[b], 0, &pending, stochastic, prefetch);
            else if (encode)
                fd_adam_codes_block(p + start, g + start, m + start, v + start, &rows[b & 1], count, 0, kind, f, scales_m[b],
                                    scales_v[b], 1, &pending, stochastic, prefetch);
            else
                fd_adam_codes_block(p + start, g + start, m + start, v + start, &rows[b & 1], count, 0, kind, f, scales_m[b],
                                    scales_v[b], 0, &pending, stochastic, prefetch);
            if (count == FD_BLOCK && start + FD_BLOCK < n) {
                has_pending = 1;
                pending.rows = &rows[b & 1];
                pending.m = m + start;
                pending.v = v + start;
                pending.random_m = fd_random_from(random_m, (uint32_t)start);
                pending.random_v = fd_random_from(random_v, (uint32_t)start);
            } else {   /* the last block */
                fd_adam_encodings(&rows[b & 1], count, scales_m, scales_v, b, &e_m, &e_v);
                fd_v_encode_block(rows[b & 1].m, m + start, count, e_m, fd_random_from(random_m, (uint32_t)start),
                                  stochastic, 1, 112, 0x1p37f, 0x7f);
                fd_v_encode_block(rows[b & 1].v, v + start, count, e_v, fd_random_from(random_v, (uint32_t)start),
                                  stochastic, 0, 96, 0x1p53f, 0xff);
            }
        }
    }

    static void fd_adam_codes(float *p, const float *g, uint8_t *m, uint8_t *v, float *scales_m, float *scales_v,
                              ptrdiff_t n, fd_adam_floats floats, fd_random random_m, fd_random random_v, int prefetch) {
        const fd_adam_vectors f = fd_adam_vectors_of(&floats);
        /* both moments round alike (fused_loop_for) */
        if (random_m.stochastic)
            fd_adam_codes_run(p, g, m, v, scales_m, scales_v, n, &f, FD_ADAM_ANY, random_m, random_v, 1, prefetch);
        else if (fd_adam_kind(&f) == FD_ADAM_PLAIN)
            fd_adam_codes_run(p, g, m, v, scales_m, scales_v, n, &f, FD_ADAM_PLAIN, random_m, random_v, 0, prefetch);
        else if (fd_adam_kind(&f) == FD_ADAM_DECOUPLED)
            fd_adam_codes_run(p, g, m, v, scales_m, scales_v, n, &f, FD_ADAM_DECOUPLED, random_m, random_v, 0, prefetch);
        else
            fd_adam_codes_run(p, g, m, v, scales_m, scales_v, n, &f, FD_ADAM_ANY, random_m, random_v, 0, prefetch);
    }
    #else
    #include <stdlib.h>
    /* Never registered (FD_FUSED_STORED is 0 without AVX-512). */
    static void fd_adam_bf16(float *p, const float *g, uint16_t *m, uint16_t *v, ptrdiff_t n, fd_adam_floats floats,
                             fd_random random_m, fd_random random_v, int prefetch) {
        abort();
    }
    static void fd_adam_codes(float *p, const float *g, uint8_t *m, uint8_t *v, float *scales_m, float *scales_v,
                              ptrdiff_t n, fd_adam_floats f, fd_random random_m, fd_random random_v, int prefetch) {
        abort();
    }
    #endif
    """
    ctypedef struct AdamFloats "fd_adam_floats":
        float step_size, inv_bc2_sqrt, eps, scale, wd, decay, w1, w1_rest, keep2, w2
        bint from_end, decoupled, has_wd
    void fd_adam_bf16(float* p, const float* g, uint16_t* m, uint16_t* v, Py_ssize_t n, AdamFloats f,
                      fd_random random_m, fd_random random_v, bint prefetch) noexcept nogil
    void fd_adam_codes(float* p, const float* g, uint8_t* m, uint8_t* v, float* scales_m, float* scales_v,
                       Py_ssize_t n, AdamFloats f, fd_random random_m, fd_random random_v, bint prefetch) noexcept nogil


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
# bits.

cdef void adam_stored_bf16(const StoredRun* run, const void* args) noexcept nogil:
    """bfloat16 moments, rounded to nearest even or stochastically (fd_adam_bf16,
    AVX-512 intrinsics)."""
    fd_adam_bf16(<float*>run.rows[0], <const float*>run.rows[1], <uint16_t*>run.rows[2], <uint16_t*>run.rows[3],
                 run.n, adam_floats(<const AdamArgs*>args), run.random[2], run.random[3], run.prefetch)


cdef void adam_stored_codes(const StoredRun* run, const void* args) noexcept nogil:
    """int8 first and uint8 second moments: per block, decode with its scale,
    update, keep the new moments (in L1) and their largest magnitudes, then
    encode them under the new scales (fd_adam_codes, AVX-512 intrinsics)."""
    fd_adam_codes(<float*>run.rows[0], <const float*>run.rows[1], <uint8_t*>run.rows[2], <uint8_t*>run.rows[3],
                  run.scales[2], run.scales[3], run.n, adam_floats(<const AdamArgs*>args), run.random[2],
                  run.random[3], run.prefetch)


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
    register_fused_loop(adam_segment_f32, (1 << 2) | (1 << 3), 1 << 3, adam_stored_bf16, adam_stored_bf16,
                        adam_stored_codes)


cdef int adam_direct(const DirectCall* call) noexcept:
    cdef const double* s = call.scalars
    cdef AdamArgs a
    adam_args(&a, s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7] != 0.0, s[8])
    return run_direct(call, adam_segment_f32, adam_segment_f64, &a)


register_direct(adam, adam_direct)
