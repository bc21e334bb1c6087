# Low-precision storage for every rule: bfloat16 and 8-bit state, bfloat16 or
# float16 parameters (with or without a float32 master copy) and gradients.
#
# A rule's element loop runs over float32 buffers. ``stored(kernel, args, kwargs,
# formats)`` calls a rule's entry with some of its buffer lists held in another
# format; ``run_kernel`` finds them (by the identity of the lists it is handed)
# and, instead of running the rule's segment function on the arrays themselves,
# runs it block by block on float32 scratch rows:
#
#   1. each tensor is cut into blocks of BLOCK elements, aligned to the tensor's
#      own element index (an int8 block has one scale, so a block must never be
#      split between threads: the thread plan deals out whole blocks);
#   2. per block, every stored role is *loaded* into a scratch row on the stack
#      (bfloat16: a 16-bit shift; float16: a conversion; int8/uint8: code times
#      the block's scale), native float32 roles are used in place;
#   3. the rule's own float32 segment function runs on those rows;
#   4. every written stored role is *stored* back: rounded to bfloat16 (to
#      nearest even, or stochastically with counter-based random bits) or
#      requantized (a new block scale, then codes); a master copy's low-precision
#      twin is written from the updated float32 values.
#
# Three phases leave the codecs' integer work and the rule's divides and square
# roots unable to overlap, and each phase waits on its own arrays, so a rule may
# register *fused stored loops* (register_fused_loop; Adam in adam.pxi): its
# element loop with the codecs below inside it, in AVX-512 intrinsics 16 lanes at
# a time (bfloat16: decode, update, round in registers; int8: decode and update
# per block, the new values kept in L1 with their largest and smallest magnitudes,
# then encoded under the new scale during the next block's update).
# run_stored takes them when every stored role is a state buffer in bfloat16 or
# int8/uint8 and parameters and gradients are float32, in the AVX-512 variant
# (FD_FUSED_STORED); anything else runs the three phases. Same operations,
# same bits.
#
# A role's loader is also where a gradient may come from elsewhere than one
# array (issue 17, gradient accumulation: the block's gradient as (acc + g) / k,
# acc zeroed): a new kind is one case in load_role (and one in finish_role if
# it writes something back), nothing in the rules.
#
# The formats, the hash and the codes are defined in fastdescent/precision.py;
# the NumPy twin of this file is fastdescent/reference/storage.py, bit for bit.

from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    #define FD_BLOCK 256

    /* A rule's fused stored loops are written with AVX-512 intrinsics (the
       fd_v_* codecs below). Other variants run the three phases, whose loops
       gcc vectorizes everywhere. */
    #ifdef __AVX512F__
    #define FD_FUSED_STORED 1
    #else
    #define FD_FUSED_STORED 0
    #endif

    /* The formats handed to the next run_kernel of this thread (a borrowed
       Python list, alive for the duration of stored()). */
    static __thread void *fd_pending_storage = NULL;
    static void fd_set_pending_storage(void *s) { fd_pending_storage = s; }
    static void *fd_take_pending_storage(void) {
        void *s = fd_pending_storage;
        fd_pending_storage = NULL;
        return s;
    }

    static inline uint32_t fd_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float fd_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

    /* Steele, Lea & Flood's SplitMix64 finalizer. */
    static inline uint64_t fd_splitmix64(uint64_t x) {
        uint64_t z = x + 0x9E3779B97F4A7C15ULL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
        return z ^ (z >> 31);
    }

    /* Software prefetch for a fused stored loop: before each 64 elements, the
       lines of every role FD_AHEAD elements further on. A fused
       loop keeps both the memory streams and the vector ports busy: with the
       hardware prefetchers alone, its arithmetic (the codecs beside the rule's
       divide and square root) fills the out-of-order window and the streams
       stall behind it; bfloat16 Adam at 10^8 ran at 78-80% of the bandwidth of the
       same bytes without these, 91-96% with them (2,048-element runs, 4 KB of
       float32 ahead: 512-4,096 elements measured alike, a burst of a whole
       run's prefetches at once far slower). Addresses past the end of an array
       are fine: a prefetch never faults. On x86 the prefetch is an asm
       statement: with __builtin_prefetch, gcc 12 left no prefetch at all in
       Adam's fused loops (seen in the object code; the cause not found). */
    #define FD_AHEAD 1024
    /* Calls of fewer elements run their cache-resident loops without prefetches:
       in cache they made gcc's vectorized bfloat16 loop (in strips of 64) 15-20%
       slower (65,536 and 10^6 elements, one thread); the intrinsics loop runs
       alike with or without them there (65,536 to 2**22 elements, within 5%). */
    #define FD_PREFETCH_MIN ((ptrdiff_t)1 << 22)
    #if defined(__x86_64__) || defined(__i386__)
    #define fd_prefetch_line(address) __asm__ volatile("prefetcht0 (%0)" : : "r"(address))
    #else
    #define fd_prefetch_line(address) __builtin_prefetch((const void *)(address), 0, 3)
    #endif

    /* Chris Wellons' lowbias32 (hash-prospector). */
    static inline uint32_t fd_lowbias32(uint32_t x) {
        x ^= x >> 16;
        x *= 0x7feb352dU;
        x ^= x >> 15;
        x *= 0x846ca68bU;
        x ^= x >> 16;
        return x;
    }

    /* The random bits of element `index` + i of a tensor whose key is `key` are
       fd_lowbias32((low + i) ^ mixed), with low and mixed from fd_random_run, as
       long as low + i does not wrap: never inside a block (2**32 is a multiple of
       FD_BLOCK). The encoders compute them in their own loop (no array of bits). */
    typedef struct { int stochastic; uint32_t low, mixed; } fd_random;

    static inline fd_random fd_random_run(int stochastic, uint64_t key, uint64_t index) {
        fd_random r;
        r.stochastic = stochastic;
        r.low = (uint32_t)index;
        r.mixed = fd_lowbias32((uint32_t)(index >> 32) ^ (uint32_t)(key >> 32)) ^ (uint32_t)key;
        return r;
    }

    /* The random bits of element `i` of a run that fd_random_run started. */
    static inline uint32_t fd_random_bits(fd_random random, uint32_t i) {
        return fd_lowbias32((random.low + i) ^ random.mixed);
    }

    /* The same random bits from element `offset` of the run on (a block inside it). */
    static inline fd_random fd_random_from(fd_random random, uint32_t offset) {
        random.low += offset;
        return random;
    }

    /* ---- bfloat16 and float16. The per-element codecs of the block loops
       below (fd_v_bf16_* are their 16-lane twins): integer operations and
       selects only, so that gcc vectorizes those loops. */
    static inline float fd_bf16_value(uint16_t half) { return fd_float((uint32_t)half << 16); }

    /* The bfloat16 bits of x plus `add` (the rounding) truncated; NaN stays a quiet
       NaN. The comparison is signed (both sides are below 2**31: SSE2 and AVX2 have
       no unsigned one). */
    static inline uint16_t fd_bf16_rounded(float x, uint32_t add) {
        uint32_t u = fd_bits(x);
        return (uint16_t)((int32_t)(u & 0x7fffffffU) > 0x7f800000 ? (u >> 16) | 0x40U : (u + add) >> 16);
    }
    static inline uint16_t fd_bf16_nearest(float x) {   /* to nearest even */
        return fd_bf16_rounded(x, 0x7fffU + ((fd_bits(x) >> 16) & 1U));
    }
    static inline uint16_t fd_bf16_random(float x, uint32_t bits) {   /* stochastically */
        return fd_bf16_rounded(x, bits & 0xffffU);
    }

    static void fd_bf16_load(const uint16_t *restrict src, float *restrict dst, int n) {
        int i;
        for (i = 0; i < n; i++) dst[i] = fd_bf16_value(src[i]);
    }

    static void fd_bf16_store(const float *restrict src, uint16_t *restrict dst, int n, fd_random random) {
        int i;
        if (!random.stochastic) {
            for (i = 0; i < n; i++) dst[i] = fd_bf16_nearest(src[i]);
        } else {
            for (i = 0; i < n; i++) dst[i] = fd_bf16_random(src[i], fd_random_bits(random, (uint32_t)i));
        }
    }

    static void fd_f16_load(const void *src, float *dst, int n) {
        const _Float16 *half = (const _Float16 *)src;
        int i;
        for (i = 0; i < n; i++) dst[i] = (float)half[i];
    }

    static void fd_f16_store(const float *src, void *dst, int n) {
        _Float16 *half = (_Float16 *)dst;
        int i;
        for (i = 0; i < n; i++) half[i] = (_Float16)src[i];
    }

    /* ---- 8-bit codes (precision.py, Code): with y = |x| / scale in [0, 1], the
       code is the top 8 bits of the float32 y * 2**-bias, whose exponents 1..top
       are the code's binades and whose subnormals are the code's subnormals. */
    #define FD_CODE_MANTISSA 3
    #define FD_CODE_DROPPED 20   /* float32 mantissa bits below the code's 3 */

    /* 1 / scale rounded toward zero, so that |x| * inverse <= 1 for every |x| <= scale. */
    static inline float fd_inverse(float scale) {
        float inverse = 1.0f / scale;
        /* one ulp down if above 1 / scale: a subtraction, not a branch (its outcome is random) */
        return fd_float(fd_bits(inverse) - (uint32_t)((double)inverse * (double)scale > 1.0));
    }

    /* The magnitude of x as an integer (its bits), 0 for a non-finite x: the
       block's scale is the largest of them. */
    static inline int32_t fd_finite_magnitude(float x) {
        int32_t magnitude = (int32_t)(fd_bits(x) & 0x7fffffffU);
        return magnitude & -(int32_t)(magnitude < 0x7f800000);
    }

    /* A magnitude, zero made the largest: the smallest of them is the smallest
       nonzero one (a non-finite one is larger than every finite one). */
    static inline int32_t fd_nonzero_magnitude(int32_t magnitude) {
        return magnitude | (-(int32_t)(magnitude == 0) & 0x7fffffff);
    }

    /* The largest finite magnitude of src[0 .. n-1], given their largest magnitude. */
    static inline int32_t fd_largest_finite(const float *src, int n, int32_t largest) {
        int i;
        int32_t magnitude;
        if (largest < 0x7f800000) return largest;
        largest = 0;
        for (i = 0; i < n; i++) {
            magnitude = fd_finite_magnitude(src[i]);
            largest = largest > magnitude ? largest : magnitude;
        }
        return largest;
    }

    /* The bits of the float32 product z * 2**-bias (z >= 0, or non-finite: then
       a value past every code), without a subnormal operation: an x86 multiply
       whose result is subnormal takes a microcode assist of about a hundred
       cycles (measured: one element per 16 below 2**-14 of its block's largest
       made the int8 pass 8x slower). A normal result is z's bits with the
       exponent lowered; a subnormal one, whose bits are z * 2**(149 - bias)
       rounded to an integer (to nearest even, as the multiply rounds), is that
       normal product plus 2**23, rounded by the addition. `tiny_up` = 2**(149 - bias),
       `down` = 2**-bias; `plain`: no product of the block is subnormal, the
       multiply is safe (and cheaper). */
    static inline uint32_t fd_scaled_bits(float z, int plain, uint32_t bias, float down, float tiny_up) {
        if (plain) return fd_bits(z * down);   /* no product of the block is subnormal */
        uint32_t bits = fd_bits(z);
        uint32_t subnormal = fd_bits(z * tiny_up + 0x1p23f) - 0x4b000000U;
        uint32_t normal = -(uint32_t)((int32_t)bits >= (int32_t)((bias + 1) << 23));   /* a mask, not ?: (vectorizes) */
        return ((bits - (bias << 23)) & normal) | (subnormal & ~normal);
    }

    /* The code of x in a block whose scale has reciprocal `inverse` (fd_inverse),
       rounded by adding `add` below the code's bits (half of them: to nearest,
       ties away; random bits: stochastically). A code past every finite one
       (non-finite input) becomes the NaN code. Comparisons are signed: both
       sides are below 2**31, and SSE2 has no unsigned ones. */
    static inline uint8_t fd_code_bits(float x, float inverse, uint32_t add, int is_signed, uint32_t bias,
                                       int plain, float down, float tiny_up, int32_t nan_code) {
        uint32_t u = fd_bits(x);
        uint32_t y = fd_scaled_bits(fd_float(u & 0x7fffffffU) * inverse, plain, bias, down, tiny_up);
        uint32_t c = (y + add) >> FD_CODE_DROPPED;
        c = (int32_t)c < nan_code ? c : (uint32_t)nan_code;
        return (uint8_t)(is_signed ? c | ((u >> 24) & 0x80U) : c);
    }

    /* The rounding added below the code's bits: half of them, or random bits. */
    static inline uint32_t fd_code_nearest(void) { return 1U << (FD_CODE_DROPPED - 1); }
    static inline uint32_t fd_code_random(uint32_t bits) { return bits & ((1U << FD_CODE_DROPPED) - 1U); }

    /* Encode the n values of one block whose largest finite magnitude (the bits
       of the block's new scale) is `largest` into codes; returns the scale.
       `smallest`: the bits of the smallest nonzero magnitude, or 0 if unknown:
       when its product is normal, so are all (they are monotonic in |x|), and
       the plain multiply serves. */
    static inline float fd_code_encode(const float *restrict src, uint8_t *restrict dst, int n, int32_t largest,
                                       int32_t smallest, fd_random random, int is_signed, uint32_t bias,
                                       float down, float tiny_up, int32_t nan_code) {
        int i;
        float inverse = largest ? fd_inverse(fd_float((uint32_t)largest)) : 1.0f;
        int plain = smallest && (int32_t)fd_bits(fd_float((uint32_t)smallest) * inverse) >= (int32_t)((bias + 1) << 23);
        if (!random.stochastic && plain) {
            for (i = 0; i < n; i++)
                dst[i] = fd_code_bits(src[i], inverse, fd_code_nearest(), is_signed, bias, 1, down, tiny_up, nan_code);
        } else if (!random.stochastic) {
            for (i = 0; i < n; i++)
                dst[i] = fd_code_bits(src[i], inverse, fd_code_nearest(), is_signed, bias, 0, down, tiny_up, nan_code);
        } else if (plain) {
            for (i = 0; i < n; i++)
                dst[i] = fd_code_bits(src[i], inverse, fd_code_random(fd_random_bits(random, (uint32_t)i)),
                                      is_signed, bias, 1, down, tiny_up, nan_code);
        } else {
            for (i = 0; i < n; i++)
                dst[i] = fd_code_bits(src[i], inverse, fd_code_random(fd_random_bits(random, (uint32_t)i)),
                                      is_signed, bias, 0, down, tiny_up, nan_code);
        }
        return fd_float((uint32_t)largest);
    }

    /* Encode n values (one block); returns the block's scale (its largest finite magnitude). */
    static inline float fd_code_store(const float *restrict src, uint8_t *restrict dst, int n,
                                      fd_random random, int is_signed, uint32_t bias, float down,
                                      float tiny_up, int32_t nan_code) {
        int i;
        int32_t magnitude, largest = 0, smallest = 0x7fffffff;   /* smallest: nonzero */
        for (i = 0; i < n; i++) {
            magnitude = fd_finite_magnitude(src[i]);   /* non-finite: not counted */
            largest = largest > magnitude ? largest : magnitude;
            magnitude = fd_nonzero_magnitude(magnitude);
            smallest = smallest < magnitude ? smallest : magnitude;
        }
        return fd_code_encode(src, dst, n, largest, smallest, random, is_signed, bias, down, tiny_up, nan_code);
    }

    /* The value of code c in a block of `scale`: ((code bits << 20 as a float32)
       * 2**bias) * scale, as the reference computes it, with the first product
       (exact) formed in integers: a code of exponent field 0 would be a subnormal
       float32, whose multiply takes a microcode assist (see fd_scaled_bits); it
       is the number of exponent field 1 with the same fraction, minus that
       number's implicit one, 2**(bias - 126) (exact), and the sign goes on last
       (a zero code keeps its sign). */
    static inline float fd_code_value(uint32_t c, float scale, int is_signed, uint32_t bias, uint32_t nan_code) {
        /* every operation on 32-bit lanes (the code's bits moved to their float32
           place first): gcc otherwise computes the masks on bytes and widens them */
        uint32_t bits = c << FD_CODE_DROPPED;
        uint32_t magnitude = is_signed ? bits & (0x7fU << FD_CODE_DROPPED) : bits;
        uint32_t sign = is_signed ? (bits << 4) & 0x80000000U : 0U;
        uint32_t subnormal = -(uint32_t)((int32_t)magnitude < (int32_t)(1U << 23));   /* a mask */
        uint32_t exponent = (bias << 23) + (subnormal & (1U << 23));
        float y = fd_float(magnitude + exponent) - fd_float(exponent & subnormal);
        uint32_t value = magnitude == (nan_code << FD_CODE_DROPPED) ? 0x7fc00000U : fd_bits(y);
        return fd_float(value | sign) * scale;
    }

    /* Blocks without subnormal codes whose factor 2**bias * scale is finite
       take one multiply per code (the same product, the factor being exact). */
    static inline void fd_code_load(const uint8_t *restrict src, float *restrict dst, int n, float scale,
                                    int is_signed, uint32_t bias, float up, uint32_t nan_code) {
        int i;
        uint32_t c, magnitude, sign, y;
        float factor = up * scale;
        uint8_t subnormals = 0;   /* any subnormal code (magnitude 1 .. 7) in the block? */
        for (i = 0; i < n; i++) subnormals |= (uint8_t)((uint8_t)((is_signed ? src[i] & 0x7fU : src[i]) - 1U) < 7U);
        if (!subnormals && (fd_bits(factor) & 0x7f800000U) != 0x7f800000U) {
            for (i = 0; i < n; i++) {
                c = src[i];
                magnitude = is_signed ? c & 0x7fU : c;
                sign = is_signed ? (c & 0x80U) << 24 : 0U;
                y = magnitude == nan_code ? 0x7fc00000U : magnitude << FD_CODE_DROPPED;
                dst[i] = fd_float(y | sign) * factor;
            }
        } else {
            for (i = 0; i < n; i++) dst[i] = fd_code_value(src[i], scale, is_signed, bias, nan_code);
        }
    }

    /* int8: sign + E4M3, bias 112; uint8: E5M3, bias 96. */
    static void fd_int8_load(const uint8_t *restrict src, float *restrict dst, int n, float scale) {
        fd_code_load(src, dst, n, scale, 1, 112, 0x1p112f, 0x7fU);
    }
    static void fd_uint8_load(const uint8_t *restrict src, float *restrict dst, int n, float scale) {
        fd_code_load(src, dst, n, scale, 0, 96, 0x1p96f, 0xffU);
    }
    static float fd_int8_store(const float *restrict src, uint8_t *restrict dst, int n, fd_random random) {
        return fd_code_store(src, dst, n, random, 1, 112, 0x1p-112f, 0x1p37f, 0x7f);
    }
    static float fd_uint8_store(const float *restrict src, uint8_t *restrict dst, int n, fd_random random) {
        return fd_code_store(src, dst, n, random, 0, 96, 0x1p-96f, 0x1p53f, 0xff);
    }

    /* ---- 8-bit codes, 16 lanes at a time (AVX-512 intrinsics): the codecs of
       a rule's fused int8 loop (adam.pxi). gcc 12 vectorized the per-element
       codecs above into about twice the operations these take (byte masks
       widened, the subnormal-safe forms and the NaN selects on every element,
       the rule's flags masked). These decide per block what the per-element
       codecs decide per element: a block without subnormal or NaN codes is
       decoded with one multiply per code, and a block whose new values are
       finite and have no subnormal product is encoded with one multiply, an
       add and shifts; other blocks take the general forms. The same operations
       on the same values, so the same bits. Each takes `full` (16 lanes) or
       the lanes of `k` (a block's last vector), and the code's constants (int8:
       signed, bias 112, NaN 0x7f; uint8: bias 96, NaN 0xff): constants, once
       inlined. Ternary logic: 0xEA is (a & b) | c, 0xF8 is a | (b & c), 0xE4
       is c ? a : b (bitwise), 0x55 is ~c. */
    #ifdef __AVX512F__
    #include <immintrin.h>
    #define FD_V_INLINE static inline __attribute__((always_inline))

    /* 16 codes on 32-bit lanes; int8 codes sign-extended, so that shifted to
       their float32 place (<< FD_CODE_DROPPED) the sign fills bits 27..31. */
    FD_V_INLINE __m512i fd_v_codes(const uint8_t *src, __mmask16 k, int full, int is_signed) {
        __m128i c = full ? _mm_loadu_si128((const __m128i *)src) : _mm_maskz_loadu_epi8(k, src);
        return is_signed ? _mm512_cvtepi8_epi32(c) : _mm512_cvtepu8_epi32(c);
    }

    /* Are the n codes of a block of an int8 and of a uint8 role, with scales
       scale_s and scale_u, decoded with one multiply each: no subnormal code
       (magnitude 1 .. 7), no NaN code, and 2**bias * scale finite (fd_code_load's
       test, and the NaN codes)? On bytes, the int8 magnitudes moved up by 0x80:
       then for both, a subnormal code is 1 .. 7 above the smallest code and NaN
       is 0xff, found with one running minimum and maximum. */
    static inline int fd_v_plain_code_pair(const uint8_t *signed_codes, const uint8_t *unsigned_codes, int n,
                                           float scale_s, float scale_u) {
        __m512i low = _mm512_set1_epi8(-1), high = _mm512_setzero_si512(), s, u;
        __mmask64 k;
        int i;
        if ((fd_bits(0x1p112f * scale_s) & 0x7f800000U) == 0x7f800000U
                || (fd_bits(0x1p96f * scale_u) & 0x7f800000U) == 0x7f800000U)
            return 0;
        for (i = 0; i < n; i += 64) {   /* lanes past n load as zeros: neither */
            k = n - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (n - i)) - 1;
            s = _mm512_ternarylogic_epi32(_mm512_maskz_loadu_epi8(k, signed_codes + i), _mm512_set1_epi8(0x7f),
                                          _mm512_set1_epi8((char)0x80), 0xEA);
            u = _mm512_maskz_loadu_epi8(k, unsigned_codes + i);
            low = _mm512_min_epu8(low, _mm512_min_epu8(_mm512_sub_epi8(s, _mm512_set1_epi8((char)0x81)),
                                                       _mm512_sub_epi8(u, _mm512_set1_epi8(1))));
            high = _mm512_max_epu8(high, _mm512_max_epu8(s, u));
        }
        return !(_mm512_cmplt_epu8_mask(low, _mm512_set1_epi8(7)) | _mm512_cmpeq_epi8_mask(high, _mm512_set1_epi8(-1)));
    }

    /* The values of codes `c` (fd_v_codes) in a block of `scale`, as fd_code_value
       computes them: `plain` (fd_v_plain_code_pair), the code's bits times `factor`
       = 2**bias * scale; else the subnormal-safe form (exponent in integers),
       NaN codes as NaN, times scale. */
    FD_V_INLINE __m512 fd_v_code_values(__m512i c, int plain, __m512 factor, __m512 scale, int is_signed,
                                        uint32_t bias) {
        const __m512i sign_bit = _mm512_set1_epi32((int)0x80000000U), quiet_nan = _mm512_set1_epi32(0x7fc00000);
        __m512i bits = _mm512_slli_epi32(c, FD_CODE_DROPPED), y;
        __mmask16 nan, subnormal;
        __m512 value;
        if (plain)   /* sign and magnitude at once */
            return _mm512_mul_ps(_mm512_castsi512_ps(is_signed ? _mm512_and_si512(bits, _mm512_set1_epi32(
                (int)(0x80000000U | (0x7fU << FD_CODE_DROPPED)))) : bits), factor);
        nan = is_signed ? _mm512_cmpeq_epi32_mask(_mm512_slli_epi32(c, 25), _mm512_set1_epi32((int)0xfe000000U))
                        : _mm512_cmpeq_epi32_mask(c, _mm512_set1_epi32(0xff));
        y = is_signed ? _mm512_and_si512(bits, _mm512_set1_epi32(0x7f << FD_CODE_DROPPED)) : bits;
        subnormal = _mm512_cmplt_epu32_mask(y, _mm512_set1_epi32(1 << 23));
        value = _mm512_castsi512_ps(_mm512_add_epi32(y, _mm512_mask_blend_epi32(
            subnormal, _mm512_set1_epi32((int)(bias << 23)), _mm512_set1_epi32((int)((bias + 1) << 23)))));
        value = _mm512_mask_sub_ps(value, subnormal, value, _mm512_set1_ps(fd_float((bias + 1) << 23)));
        y = _mm512_mask_mov_epi32(_mm512_castps_si512(value), nan, quiet_nan);
        if (is_signed) y = _mm512_ternarylogic_epi32(y, bits, sign_bit, 0xF8);
        return _mm512_mul_ps(_mm512_castsi512_ps(y), scale);
    }

    /* A fused loop keeps, per block and moment, the lanes' largest and smallest
       nonzero magnitudes (bits) of the new values: fd_v_track. For a uint8
       moment it may pass the values' bits themselves: a negative one then
       counts as past every finite value, and sends the block to the general
       encoder, which takes magnitudes. */
    typedef struct { __m512i largest, smallest_less_one; } fd_v_range;

    FD_V_INLINE fd_v_range fd_v_range_start(void) {
        fd_v_range r;
        r.largest = _mm512_setzero_si512();
        r.smallest_less_one = _mm512_set1_epi32(-1);
        return r;
    }

    /* magnitude - 1 wraps 0 to the largest unsigned: zeros drop out of the minimum */
    FD_V_INLINE void fd_v_track(fd_v_range *r, __m512i magnitude) {
        r->largest = _mm512_max_epu32(r->largest, magnitude);
        r->smallest_less_one = _mm512_min_epu32(r->smallest_less_one, _mm512_sub_epi32(magnitude, _mm512_set1_epi32(1)));
    }

    /* The largest magnitudes of ranges a and b (out[0], out[1]) and their smallest
       nonzero ones (out[2], out[3]; 0: none), in one reduction: the minima as
       maxima of complements, the four vectors' lanes folded together. */
    FD_V_INLINE void fd_v_reduce_ranges(const fd_v_range *a, const fd_v_range *b, uint32_t out[4]) {
        uint32_t lanes[16] __attribute__((aligned(64)));
        __m512i not_a = _mm512_ternarylogic_epi32(a->smallest_less_one, a->smallest_less_one, a->smallest_less_one, 0x55);
        __m512i not_b = _mm512_ternarylogic_epi32(b->smallest_less_one, b->smallest_less_one, b->smallest_less_one, 0x55);
        __m512i x = _mm512_max_epu32(_mm512_shuffle_i64x2(a->largest, b->largest, 0x44),
                                     _mm512_shuffle_i64x2(a->largest, b->largest, 0xEE));
        __m512i y = _mm512_max_epu32(_mm512_shuffle_i64x2(not_a, not_b, 0x44), _mm512_shuffle_i64x2(not_a, not_b, 0xEE));
        __m512i z = _mm512_max_epu32(_mm512_shuffle_i64x2(x, y, 0x88), _mm512_shuffle_i64x2(x, y, 0xDD));
        z = _mm512_max_epu32(z, _mm512_shuffle_epi32(z, (_MM_PERM_ENUM)0x4E));
        z = _mm512_max_epu32(z, _mm512_shuffle_epi32(z, (_MM_PERM_ENUM)0xB1));
        _mm512_store_si512((void *)lanes, z);   /* 128-bit lane j: the maximum of vector j */
        out[0] = lanes[0];
        out[1] = lanes[4];
        out[2] = ~lanes[8] + 1U;
        out[3] = ~lanes[12] + 1U;
    }

    /* The codes (on 32-bit lanes) of 16 values of bits `u` under a block's
       `inverse` (fd_inverse), rounded by adding `add`, as fd_code_bits computes
       them. The bits of z * 2**-bias without a subnormal operation: z's bits with
       the exponent lowered where the product is normal, else z * 2**(149 - bias)
       (exact) converted to an integer to nearest even, as the multiply would
       round the subnormal product. */
    FD_V_INLINE __m512i fd_v_code_bits(__m512i u, __m512 inverse, __m512i add, int is_signed, uint32_t bias,
                                       float tiny_up, uint32_t nan_code) {
        __m512 z = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff))), inverse);
        __m512i zbits = _mm512_castps_si512(z), y, c;
        __mmask16 normal = _mm512_cmpge_epi32_mask(zbits, _mm512_set1_epi32((int)((bias + 1) << 23)));
        y = _mm512_cvt_roundps_epi32(_mm512_mul_ps(z, _mm512_set1_ps(tiny_up)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        y = _mm512_mask_sub_epi32(y, normal, zbits, _mm512_set1_epi32((int)(bias << 23)));
        c = _mm512_min_epu32(_mm512_srli_epi32(_mm512_add_epi32(y, add), FD_CODE_DROPPED),
                             _mm512_set1_epi32((int)nan_code));
        return is_signed ? _mm512_mask_or_epi32(c, _mm512_movepi32_mask(u), c, _mm512_set1_epi32(0x80)) : c;
    }

    /* The same codes in a block of finite values whose products z * 2**-bias are
       all normal or zero, and `inverse_down` = inverse * 2**-bias normal: then
       x * inverse_down rounds the same real product once, into the normal range,
       as the two multiplies do, and the sign rides along (x's sign is the
       product's). An int8 code comes with its sign on bit 11 (bits 7 .. 10 are
       0: the product is below 2**-111): fd_v_store_codes64 moves it to bit 7. */
    FD_V_INLINE __m512i fd_v_code_bits_plain(__m512i u, __m512 inverse_down, __m512i add) {
        return _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(u),
                                                                                     inverse_down)), add),
                                 FD_CODE_DROPPED);
    }

    /* fd_lowbias32 on 16 lanes. */
    FD_V_INLINE __m512i fd_v_lowbias32(__m512i x) {
        x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32(0x7feb352d));
        x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 15));
        x = _mm512_mullo_epi32(x, _mm512_set1_epi32((int)0x846ca68bU));
        return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
    }

    /* The random bits of elements i .. i + 15 of a run (fd_random_bits). */
    FD_V_INLINE __m512i fd_v_random_bits(fd_random random, ptrdiff_t i) {
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        return fd_v_lowbias32(_mm512_xor_si512(_mm512_add_epi32(_mm512_set1_epi32((int)(random.low + (uint32_t)i)), lanes),
                                               _mm512_set1_epi32((int)random.mixed)));
    }

    /* The rounding of elements i .. i + 15: half of the dropped bits, or the
       low bits of their random bits (fd_code_random). */
    FD_V_INLINE __m512i fd_v_rounding(fd_random random, int stochastic, int i) {
        if (!stochastic) return _mm512_set1_epi32((int)fd_code_nearest());
        return _mm512_and_si512(fd_v_random_bits(random, i), _mm512_set1_epi32((1 << FD_CODE_DROPPED) - 1));
    }

    /* Store the codes on the lanes of c0 .. c3 (64 codes) at dst: each below 256,
       or with `sign_on_11` (fd_v_code_bits_plain's int8 codes) below 2**12, the
       sign on bit 11 (bits 7 .. 10 clear) moved to bit 7 on 16-bit lanes: one
       multiply-add of the lanes' bytes, low * 1 + high * 16 (high is 8 or 0). */
    FD_V_INLINE void fd_v_store_codes64(uint8_t *dst, __m512i c0, __m512i c1, __m512i c2, __m512i c3, int sign_on_11) {
        /* the packs keep every lane (no saturation), in 128-bit lane order */
        __m512i low = _mm512_packus_epi32(c0, c1), high = _mm512_packus_epi32(c2, c3);
        if (sign_on_11) {
            low = _mm512_maddubs_epi16(low, _mm512_set1_epi16(0x1001));
            high = _mm512_maddubs_epi16(high, _mm512_set1_epi16(0x1001));
        }
        _mm512_storeu_si512((void *)dst, _mm512_permutexvar_epi32(
            _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), _mm512_packus_epi16(low, high)));
    }

    /* How a block's n new values (row: 64-byte aligned, BLOCK floats), whose
       largest and smallest nonzero magnitudes are `largest` and `smallest`
       (fd_v_reduce_ranges), are encoded: the block's new scale, `inverse`
       (fd_inverse of the scale, 1 for 0) and `plain`: the values are all finite,
       none has a subnormal product, and inverse_down = inverse * 2**-bias is
       normal (fd_v_code_bits_plain). */
    typedef struct { float scale, inverse, inverse_down; int plain; } fd_v_encoding;

    FD_V_INLINE fd_v_encoding fd_v_encoding_of(const float *row, int n, uint32_t largest, uint32_t smallest,
                                               uint32_t bias, float down) {
        fd_v_encoding e;
        int32_t scale = (int32_t)largest;
        e.plain = largest < 0x7f800000U;   /* every value finite (and, uint8 bits, not negative) */
        if (!e.plain) scale = fd_largest_finite(row, n, 0x7f800000);
        e.scale = fd_float((uint32_t)scale);
        e.inverse = scale ? fd_inverse(e.scale) : 1.0f;
        e.inverse_down = e.inverse * down;
        e.plain = e.plain && (int32_t)fd_bits(e.inverse_down) >= (int32_t)(1U << 23)
                  && (smallest == 0 || (int32_t)fd_bits(fd_float(smallest) * e.inverse) >= (int32_t)((bias + 1) << 23));
        return e;
    }

    /* Codes i .. i + 63 of a block encoded plainly (fd_v_encoding's inverse_down). */
    FD_V_INLINE void fd_v_encode64(const float *row, uint8_t *dst, int i, __m512 inverse_down, fd_random random,
                                   int stochastic, int is_signed) {
        fd_v_store_codes64(dst + i,
            fd_v_code_bits_plain(_mm512_load_si512((const void *)(row + i)), inverse_down,
                                 fd_v_rounding(random, stochastic, i)),
            fd_v_code_bits_plain(_mm512_load_si512((const void *)(row + i + 16)), inverse_down,
                                 fd_v_rounding(random, stochastic, i + 16)),
            fd_v_code_bits_plain(_mm512_load_si512((const void *)(row + i + 32)), inverse_down,
                                 fd_v_rounding(random, stochastic, i + 32)),
            fd_v_code_bits_plain(_mm512_load_si512((const void *)(row + i + 48)), inverse_down,
                                 fd_v_rounding(random, stochastic, i + 48)), is_signed);
    }

    /* The codes of one block's n values under encoding `e`, rounded to nearest or
       with the random bits of `random`. */
    FD_V_INLINE void fd_v_encode_block(const float *row, uint8_t *dst, int n, fd_v_encoding e, fd_random random,
                                       int stochastic, int is_signed, uint32_t bias, float tiny_up,
                                       uint32_t nan_code) {
        __m512 inverse;
        int i;
        if (e.plain && n == FD_BLOCK) {
            inverse = _mm512_set1_ps(e.inverse_down);
            for (i = 0; i < FD_BLOCK; i += 64) fd_v_encode64(row, dst, i, inverse, random, stochastic, is_signed);
        } else {
            /* the general form, also for a tensor's last, short block (lanes past n: not stored) */
            inverse = _mm512_set1_ps(e.inverse);
            for (i = 0; i < n; i += 16)
                _mm512_mask_cvtepi32_storeu_epi8(dst + i, n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1U << (n - i)) - 1U),
                    fd_v_code_bits(_mm512_load_si512((const void *)(row + i)), inverse,
                                   fd_v_rounding(random, stochastic, i), is_signed, bias, tiny_up, nan_code));
        }
    }

    /* ---- bfloat16, 16 lanes at a time: the codecs of a rule's fused bfloat16
       loop (adam.pxi), fd_bf16_value and fd_bf16_rounded on 16 lanes. Not
       vcvtneps2bf16: it flushes subnormals to zero. */

    /* 16 bfloat16 words (`full`, or the lanes of k; zeros past them) in the low
       half of a vector. */
    FD_V_INLINE __m512i fd_v_bf16_words16(const uint16_t *src, __mmask16 k, int full) {
        return full ? _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)src)) : _mm512_maskz_loadu_epi16(k, src);
    }

    /* The float32 values of words 0 .. 15 (`high`: 16 .. 31) of 32 bfloat16 words:
       each word moved to the top of its lane, zeros below (one permute). */
    FD_V_INLINE __m512 fd_v_bf16_values(__m512i words, int high) {
        const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        __m512i index = _mm512_slli_epi32(_mm512_add_epi32(lanes, _mm512_set1_epi32(16 * high)), 16);
        return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAA, index, words));
    }

    /* x's bits plus the rounding (to nearest even, or the low half of the random
       bits of elements i .. i + 15 of a run), the bfloat16 bits on top; a NaN's
       bits with the quiet bit set instead (fpclass 0x81: quiet or signaling NaN). */
    FD_V_INLINE __m512i fd_v_bf16_rounded(__m512 x, fd_random random, int stochastic, ptrdiff_t i) {
        __m512i u = _mm512_castps_si512(x), add;
        if (stochastic)
            add = _mm512_and_si512(fd_v_random_bits(random, i), _mm512_set1_epi32(0xffff));
        else
            add = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
        return _mm512_mask_or_epi32(_mm512_add_epi32(u, add), _mm512_fpclass_ps_mask(x, 0x81), u, _mm512_set1_epi32(0x400000));
    }

    /* Store the bfloat16 bits of 16 rounded values (`full`, or the lanes of k). */
    FD_V_INLINE void fd_v_bf16_store16(uint16_t *dst, __mmask16 k, int full, __m512i rounded) {
        if (full) _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
        else _mm512_mask_cvtepi32_storeu_epi16(dst, k, _mm512_srli_epi32(rounded, 16));
    }

    /* Store those of 32: a's (elements 0 .. 15) and b's, interleaved by a word
       blend and put in order by one permute (vpmovdw is two shuffles per 16). */
    FD_V_INLINE void fd_v_bf16_store32(uint16_t *dst, __m512i a, __m512i b) {
        const __m512i order = _mm512_setr_epi32(0x00020000, 0x00060004, 0x000a0008, 0x000e000c, 0x00120010, 0x00160014,
                                                0x001a0018, 0x001e001c, 0x00030001, 0x00070005, 0x000b0009, 0x000f000d,
                                                0x00130011, 0x00170015, 0x001b0019, 0x001f001d);
        _mm512_storeu_si512((void *)dst, _mm512_permutexvar_epi16(order, _mm512_mask_blend_epi16(0xAAAAAAAA,
                                                                                                 _mm512_srli_epi32(a, 16), b)));
    }
    #endif
    """
    const bint FD_FUSED_STORED
    const Py_ssize_t FD_PREFETCH_MIN
    void fd_set_pending_storage(void* s) noexcept nogil
    void* fd_take_pending_storage() noexcept nogil
    uint64_t fd_splitmix64(uint64_t x) noexcept nogil
    ctypedef struct fd_random:
        pass
    fd_random fd_random_run(int stochastic, uint64_t key, uint64_t index) noexcept nogil
    void fd_bf16_load(const uint16_t* src, float* dst, int n) noexcept nogil
    void fd_bf16_store(const float* src, uint16_t* dst, int n, fd_random random) noexcept nogil
    void fd_f16_load(const void* src, float* dst, int n) noexcept nogil
    void fd_f16_store(const float* src, void* dst, int n) noexcept nogil
    void fd_int8_load(const uint8_t* src, float* dst, int n, float scale) noexcept nogil
    void fd_uint8_load(const uint8_t* src, float* dst, int n, float scale) noexcept nogil
    float fd_int8_store(const float* src, uint8_t* dst, int n, fd_random random) noexcept nogil
    float fd_uint8_store(const float* src, uint8_t* dst, int n, fd_random random) noexcept nogil


cdef enum:
    BLOCK = 256
    # Blocks per call of a rule's segment function: its per-call setup (scalar
    # casts, lerp constants) is then small against the elements it runs.
    CHUNK_BLOCKS = 8
    CHUNK = BLOCK * CHUNK_BLOCKS
    # Blocks per call of a fused stored loop (no scratch rows: only its per-call
    # setup, and int8's last block, encoded alone, count). Calls are aligned to
    # this in the tensor, so that none crosses a multiple of 2**32 elements, where
    # the high word of the random bits' index changes (fd_random_run).
    FUSED_CHUNK_BLOCKS = 64
    # Storage kinds (fastdescent.precision numbers them the same way).
    KIND_NATIVE = 0
    KIND_BF16 = 1
    KIND_F16 = 2
    KIND_INT8 = 3
    KIND_UINT8 = 4


cdef struct RoleStorage:
    int kind               # how the role's arrays hold their values
    int copy_kind          # KIND_BF16 / KIND_F16: a rounded copy of the updated values (master weights)
    bint written           # stored back after the update (not the gradient)
    bint stochastic        # round stochastically, with random bits under `key`
    uint64_t key


cdef struct Storage:
    RoleStorage roles[MAX_ROLES]
    uint64_t* tensor_ids   # the tensors' ids in the random bits' keys
    float** scales         # scales[t * n_roles + r]: the block scales of an int8/uint8 role
    void** copies          # copies[t * n_roles + r]: the copy of a master role
    Py_ssize_t* block_offsets   # n_tensors + 1 prefix sums of the tensors' block counts


cdef struct StoredRun:
    # One run of whole blocks of one tensor for a rule's fused stored loop:
    # every pointer already at the run's first element (or block).
    void* rows[MAX_ROLES]       # the roles' arrays, each in its own format (NULL: absent)
    float* scales[MAX_ROLES]    # int8/uint8 roles: the scales of the run's blocks
    fd_random random[MAX_ROLES]  # written stored roles: their random bits from the run's first element
    bint prefetch               # a large call: the loop prefetches FD_AHEAD elements on
    Py_ssize_t n


# A rule's element loop over stored rows, with the decoding and encoding inside
# it (adam.pxi): the codecs' integer work then overlaps the rule's divides and
# square roots, and every array streams at once, instead of three phases over
# float32 scratch rows that each wait on their own arrays.
ctypedef void (*stored_loop_fn)(const StoredRun* run, const void* args) noexcept nogil


cdef struct FusedLoop:
    segment_fn plain            # the rule's float32 segment function (run_kernel's fn32)
    int stored_roles            # bit r: role r is a state buffer the fused loops take stored
    int unsigned_roles          # bit r: in 8 bits, role r is uint8 codes (else int8)
    stored_loop_fn bf16         # those roles in bfloat16, rounded to nearest even
    stored_loop_fn bf16_random  # in bfloat16, rounded stochastically
    stored_loop_fn codes        # in int8/uint8 codes (either rounding: the block encoders take it)


cdef enum:
    MAX_FUSED_LOOPS = 16

cdef FusedLoop fused_loops[MAX_FUSED_LOOPS]
cdef int n_fused_loops = 0


cdef int register_fused_loop(segment_fn plain, int stored_roles, int unsigned_roles, stored_loop_fn bf16,
                             stored_loop_fn bf16_random, stored_loop_fn codes) except -1:
    """Declare the fused stored loops of the rule whose float32 segment function
    is ``plain`` (NULL for a storage it has none for). One is used when
    parameters and gradients are float32 (no master copy) and the roles of
    ``stored_roles`` (bit r for role r, roles 2 and up) are all present and all
    bfloat16 or all 8-bit codes (uint8 for the roles of ``unsigned_roles``, int8
    for the others), written back and rounded alike, the other roles from 2 up
    absent. Anything else runs the three-phase blocks."""
    global n_fused_loops
    if n_fused_loops == MAX_FUSED_LOOPS:
        raise RuntimeError("too many fused stored loops")
    fused_loops[n_fused_loops].plain = plain
    fused_loops[n_fused_loops].stored_roles = stored_roles
    fused_loops[n_fused_loops].unsigned_roles = unsigned_roles
    fused_loops[n_fused_loops].bf16 = bf16
    fused_loops[n_fused_loops].bf16_random = bf16_random
    fused_loops[n_fused_loops].codes = codes
    n_fused_loops += 1
    return 0


cdef stored_loop_fn fused_loop_for(segment_fn fn, const Plan* plan, const Storage* storage) noexcept nogil:
    """The fused loop that runs this call's formats, or NULL."""
    cdef int e, r, family = 0, kind
    cdef bint present, stochastic = False
    cdef FusedLoop* entry = NULL
    for e in range(n_fused_loops):
        if fused_loops[e].plain == fn:
            entry = &fused_loops[e]
    if entry == NULL or plan.n_tensors == 0:
        return NULL
    for r in range(plan.n_roles):
        present = plan.rows[r] != NULL
        kind = storage.roles[r].kind
        if storage.roles[r].copy_kind != KIND_NATIVE:
            return NULL
        if r < 2:
            if not present or kind != KIND_NATIVE:
                return NULL
        elif entry.stored_roles & (1 << r):
            if not present or kind == KIND_NATIVE or kind == KIND_F16 or not storage.roles[r].written:
                return NULL
            if kind != KIND_BF16 and kind != (KIND_UINT8 if entry.unsigned_roles & (1 << r) else KIND_INT8):
                return NULL
            if family == 0:
                family = KIND_BF16 if kind == KIND_BF16 else KIND_INT8
                stochastic = storage.roles[r].stochastic
            if family != (KIND_BF16 if kind == KIND_BF16 else KIND_INT8) or storage.roles[r].stochastic != stochastic:
                return NULL
        elif present:
            return NULL
    if family == KIND_INT8:
        return entry.codes
    if family == KIND_BF16:
        return entry.bf16_random if stochastic else entry.bf16
    return NULL


cdef struct StoredJob:
    const Plan* plan
    const Storage* storage
    segment_fn fn
    const void* args
    stored_loop_fn fused        # the rule's fused stored loop, or NULL: three phases


cdef inline void load_role(int kind, const void* base, Py_ssize_t lo, int n, const float* scales,
                           float* row) noexcept nogil:
    """The float32 values of elements lo .. lo + n - 1 (one block) of a stored role."""
    if kind == KIND_BF16:
        fd_bf16_load(<const uint16_t*>base + lo, row, n)
    elif kind == KIND_F16:
        fd_f16_load(<const uint16_t*>base + lo, row, n)
    elif kind == KIND_INT8:
        fd_int8_load(<const uint8_t*>base + lo, row, n, scales[lo // BLOCK])
    elif kind == KIND_UINT8:
        fd_uint8_load(<const uint8_t*>base + lo, row, n, scales[lo // BLOCK])


cdef inline void store_row(int kind, const float* row, void* base, Py_ssize_t lo, int n, float* scales,
                           fd_random random) noexcept nogil:
    """Write updated float32 values (one block, when ``random`` is stochastic or
    ``kind`` int8/uint8) into a role (or copy) of ``kind``."""
    if kind == KIND_BF16:
        fd_bf16_store(row, <uint16_t*>base + lo, n, random)
    elif kind == KIND_F16:
        fd_f16_store(row, <uint16_t*>base + lo, n)
    elif kind == KIND_INT8:
        scales[lo // BLOCK] = fd_int8_store(row, <uint8_t*>base + lo, n, random)
    elif kind == KIND_UINT8:
        scales[lo // BLOCK] = fd_uint8_store(row, <uint8_t*>base + lo, n, random)


cdef void stored_chunk(const StoredJob* job, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t n) noexcept nogil:
    """Elements lo .. lo + n - 1 of tensor ``t`` (whole blocks, at most CHUNK
    elements, lo a multiple of BLOCK): load, update, store."""
    cdef float scratch[MAX_ROLES][CHUNK]
    cdef void* rows[MAX_ROLES]
    cdef const Plan* plan = job.plan
    cdef const Storage* storage = job.storage
    cdef Py_ssize_t n_roles = plan.n_roles, r, k, b, n_blocks = (n + BLOCK - 1) // BLOCK
    cdef uint64_t key
    cdef const RoleStorage* role
    cdef void* base
    for r in range(n_roles):
        k = t * n_roles + r
        base = plan.rows[k]
        role = &storage.roles[r]
        if base == NULL:
            rows[r] = NULL
        elif role.kind == KIND_NATIVE:
            rows[r] = <float*>base + lo
        else:
            for b in range(n_blocks):
                load_role(role.kind, base, lo + b * BLOCK, <int>min(<Py_ssize_t>BLOCK, n - b * BLOCK),
                          storage.scales[k], &scratch[r][b * BLOCK])
            rows[r] = scratch[r]
    job.fn(rows, 0, n, job.args)
    for r in range(n_roles):
        k = t * n_roles + r
        base = plan.rows[k]
        role = &storage.roles[r]
        if base == NULL or not role.written:
            continue
        if role.kind != KIND_NATIVE:
            key = fd_splitmix64(role.key ^ storage.tensor_ids[t]) if role.stochastic else 0
            for b in range(n_blocks):
                store_row(role.kind, &scratch[r][b * BLOCK], base, lo + b * BLOCK,
                          <int>min(<Py_ssize_t>BLOCK, n - b * BLOCK), storage.scales[k],
                          fd_random_run(role.stochastic, key, <uint64_t>(lo + b * BLOCK)))
        if role.copy_kind != KIND_NATIVE:
            store_row(role.copy_kind, <const float*>rows[r], storage.copies[k], lo, <int>n, NULL,
                      fd_random_run(0, 0, 0))


cdef void fused_chunk(const StoredJob* job, Py_ssize_t t, Py_ssize_t lo, Py_ssize_t n) noexcept nogil:
    """Elements lo .. lo + n - 1 of tensor ``t`` (whole blocks, lo a multiple of
    BLOCK) through the rule's fused stored loop."""
    cdef StoredRun run
    cdef const Plan* plan = job.plan
    cdef const Storage* storage = job.storage
    cdef const RoleStorage* role
    cdef Py_ssize_t r, k, itemsize
    cdef char* base
    run.n = n
    run.prefetch = plan.total >= FD_PREFETCH_MIN
    for r in range(plan.n_roles):
        k = t * plan.n_roles + r
        base = <char*>plan.rows[k]
        role = &storage.roles[r]
        run.scales[r] = NULL
        run.rows[r] = NULL
        if base == NULL:
            continue
        if role.kind == KIND_NATIVE:
            itemsize = sizeof(float)
        elif role.kind == KIND_BF16:
            itemsize = sizeof(uint16_t)
        else:
            itemsize = sizeof(uint8_t)
            run.scales[r] = storage.scales[k] + lo // BLOCK
        run.rows[r] = base + lo * itemsize
        run.random[r] = fd_random_run(role.stochastic and role.written,
                                      fd_splitmix64(role.key ^ storage.tensor_ids[t]) if role.stochastic else 0,
                                      <uint64_t>lo)
    job.fused(&run, job.args)


cdef void run_blocks(const void* ctx, Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """Run blocks [begin, end) of the call's block index space (the blocks of
    every tensor, one tensor after the other), up to CHUNK_BLOCKS (fused loops:
    FUSED_CHUNK_BLOCKS) at a time, aligned to that in the tensor."""
    cdef const StoredJob* job = <const StoredJob*>ctx
    cdef const Plan* plan = job.plan
    cdef const Py_ssize_t* blocks = job.storage.block_offsets
    cdef Py_ssize_t lo = 0, hi = plan.n_tensors, mid, t, stop, first, size
    cdef Py_ssize_t chunk = FUSED_CHUNK_BLOCKS if job.fused != NULL else CHUNK_BLOCKS
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if blocks[mid] <= begin:
            lo = mid
        else:
            hi = mid
    t = lo
    while begin < end:
        while blocks[t + 1] <= begin:
            t += 1
        stop = min(end, blocks[t + 1], begin + chunk - (begin - blocks[t]) % chunk)
        first = (begin - blocks[t]) * BLOCK
        size = plan.offsets[t + 1] - plan.offsets[t]
        if job.fused != NULL:
            fused_chunk(job, t, first, min((stop - begin) * BLOCK, size - first))
        else:
            stored_chunk(job, t, first, min((stop - begin) * BLOCK, size - first))
        begin = stop


cdef dict ROLE_DTYPES = {KIND_NATIVE: cnp.NPY_FLOAT32, KIND_BF16: cnp.NPY_UINT16, KIND_F16: cnp.NPY_FLOAT16,
                         KIND_INT8: cnp.NPY_INT8, KIND_UINT8: cnp.NPY_UINT8}


cdef enum StoredArray:   # what check_stored_array checks, for its message
    STORED_ROLE, STORED_SCALES, STORED_COPY


cdef int check_stored_array(object obj, int kind, Py_ssize_t n, StoredArray what, Py_ssize_t r,
                            Py_ssize_t t) except -1:
    # The message is built only when raising: per array and call, building it cost
    # 0.4-0.7 us per tensor (43-70 us of a 100-tensor step).
    cdef cnp.ndarray a = <cnp.ndarray?>obj
    if cnp.PyArray_TYPE(a) != ROLE_DTYPES[kind] or cnp.PyArray_SIZE(a) != n or not cnp.PyArray_IS_C_CONTIGUOUS(a):
        label = (f"role {r} of tensor {t}", f"the scales of role {r}", f"the copy of role {r}")[what]
        raise ValueError(f"stored kernel buffers: {label} must be a contiguous {cnp.dtype(ROLE_DTYPES[kind])} "
                         f"array of {n} elements")
    return 0


cdef int stored_plan_init(Plan* plan, Storage* storage, tuple roles, list formats, object tensor_ids,
                          int n_threads) except -1:
    """Gather the pointers of ``roles`` as ``plan_init`` does, each role in the
    format ``formats`` gives its list (native float32 if none does)."""
    cdef Py_ssize_t r, t, n, k, n_tensors, n_roles = len(roles)
    cdef list params = <list?>roles[0]
    cdef object entry, arrays, scales, copies
    cdef RoleStorage* role
    cdef list found = []
    if n_roles > MAX_ROLES:
        raise ValueError(f"at most {MAX_ROLES} buffer roles")
    if n_threads < 1:
        raise ValueError(f"n_threads must be at least 1, got {n_threads}")
    n_tensors = len(params)
    plan.n_roles = n_roles
    plan.n_tensors = n_tensors
    plan.typenum = cnp.NPY_FLOAT32
    plan.offsets = <Py_ssize_t*>malloc((n_tensors + 1) * sizeof(Py_ssize_t))
    plan.rows = <void**>malloc((n_tensors * n_roles + 1) * sizeof(void*))
    storage.scales = <float**>malloc((n_tensors * n_roles + 1) * sizeof(float*))
    storage.copies = <void**>malloc((n_tensors * n_roles + 1) * sizeof(void*))
    storage.block_offsets = <Py_ssize_t*>malloc((n_tensors + 1) * sizeof(Py_ssize_t))
    storage.tensor_ids = <uint64_t*>malloc((n_tensors + 1) * sizeof(uint64_t))
    if (plan.offsets == NULL or plan.rows == NULL or storage.scales == NULL or storage.copies == NULL
            or storage.block_offsets == NULL or storage.tensor_ids == NULL):
        raise MemoryError()
    if tensor_ids is not None and len(tensor_ids) != n_tensors:
        raise ValueError(f"{len(tensor_ids)} tensor ids for {n_tensors} tensors")
    for t in range(n_tensors):
        storage.tensor_ids[t] = t if tensor_ids is None else <uint64_t>tensor_ids[t]
    for r in range(n_roles):
        role = &storage.roles[r]
        role.kind = KIND_NATIVE
        role.copy_kind = KIND_NATIVE
        role.written = r != 1
        role.stochastic = False
        role.key = 0
        entry = None
        scales = copies = None
        for candidate in formats:
            if candidate[0] is roles[r] and roles[r] is not None:
                entry = candidate
        if entry is None:
            continue
        found.append(entry)
        arrays, kind, scales, copies, copy_kind, written, key = entry
        if kind not in ROLE_DTYPES or copy_kind not in (KIND_NATIVE, KIND_BF16, KIND_F16):
            raise ValueError(f"unknown storage kind {kind} / copy kind {copy_kind}")
        if (kind in (KIND_INT8, KIND_UINT8)) != (scales is not None) or (copy_kind != KIND_NATIVE) != (copies is not None):
            raise ValueError("int8/uint8 roles need scales, copied roles need copies, and only they")
        if copy_kind != KIND_NATIVE and kind != KIND_NATIVE:
            raise ValueError("only a float32 role has a rounded copy")
        if r == 1 and written:
            raise ValueError("the gradient is read only")
        role.kind = kind
        role.copy_kind = copy_kind
        role.written = written
        role.stochastic = key is not None
        role.key = 0 if key is None else <uint64_t>key
    if len(found) != len(formats):
        raise TypeError("this kernel does not hand all of its stored buffers to run_kernel: "
                        "it cannot run on low-precision storage")
    plan.offsets[0] = 0
    storage.block_offsets[0] = 0
    for t in range(n_tensors):
        n = cnp.PyArray_SIZE(<cnp.ndarray?>params[t])
        plan.offsets[t + 1] = plan.offsets[t] + n
        storage.block_offsets[t + 1] = storage.block_offsets[t] + (n + BLOCK - 1) // BLOCK
        for r in range(n_roles):
            k = t * n_roles + r
            storage.scales[k] = NULL
            storage.copies[k] = NULL
            if roles[r] is None:
                plan.rows[k] = NULL
                continue
            role = &storage.roles[r]
            arrays = <list?>roles[r]
            if len(arrays) != n_tensors:
                raise ValueError(f"{len(arrays)} arrays for {n_tensors} parameters in buffer role {r}")
            check_stored_array(arrays[t], role.kind, n, STORED_ROLE, r, t)
            plan.rows[k] = cnp.PyArray_DATA(<cnp.ndarray>arrays[t])
            if role.kind in (KIND_INT8, KIND_UINT8) or role.copy_kind != KIND_NATIVE:
                for entry in found:
                    if entry[0] is arrays:
                        scales, copies = entry[2], entry[3]
                if scales is not None:
                    check_stored_array(scales[t], KIND_NATIVE, (n + BLOCK - 1) // BLOCK, STORED_SCALES, r, t)
                    storage.scales[k] = <float*>cnp.PyArray_DATA(<cnp.ndarray>scales[t])
                if copies is not None:
                    check_stored_array(copies[t], role.copy_kind, n, STORED_COPY, r, t)
                    storage.copies[k] = cnp.PyArray_DATA(<cnp.ndarray>copies[t])
    plan.total = plan.offsets[n_tensors]
    plan.n_parts = choose_parts(plan.total, n_threads)
    return 0


cdef int run_stored(tuple pending, tuple roles, int n_threads, segment_fn fn32, const void* args) except -1:
    """``run_kernel`` on stored roles: the rule's float32 segment function, block by block."""
    cdef Plan plan
    cdef Storage storage
    cdef StoredJob job
    plan.offsets = NULL
    plan.rows = NULL
    storage.scales = NULL
    storage.copies = NULL
    storage.block_offsets = NULL
    storage.tensor_ids = NULL
    try:
        stored_plan_init(&plan, &storage, roles, pending[0], pending[1], n_threads)
        job.plan = &plan
        job.storage = &storage
        job.fn = fn32
        job.args = args
        job.fused = fused_loop_for(fn32, &plan, &storage)
        with nogil:
            fd_pool_run(plan.n_parts, storage.block_offsets[plan.n_tensors], 1, chunk_items(BLOCK),
                        run_blocks, &job)
            call_finished()
    finally:
        plan_free(&plan)
        free(storage.scales)
        free(storage.copies)
        free(storage.block_offsets)
        free(storage.tensor_ids)
    return 0


def stored(kernel, tuple args, dict kwargs, formats, tensor_ids=None):
    """Call ``kernel(*args, **kwargs)``, a rule's entry of this module, with some
    of its buffer lists in low-precision storage (private: optimizers call it
    through ``RuleSpec.call``).

    ``formats`` lists ``(arrays, kind, scales, copies, copy_kind, written, key)``
    tuples, ``arrays`` being one of the lists the entry hands to ``run_kernel``
    (found by identity): ``kind`` its storage (``fastdescent.precision``: 1
    bfloat16 as uint16, 2 float16, 3 int8 codes, 4 uint8 codes), ``scales`` the
    float32 block scales of each tensor (int8/uint8), ``copies`` the bfloat16 or
    float16 arrays (``copy_kind``) that receive the updated values of a float32
    master role, ``written`` whether the role is stored back, ``key`` the 64-bit
    key of its stochastic rounding (None: round to nearest even).
    ``tensor_ids`` (default: the positions) enter each tensor's random bits.
    """
    cdef tuple pending = (list(formats), tensor_ids)
    cdef void* unused
    fd_set_pending_storage(<void*>pending)
    try:
        kernel(*args, **kwargs)
    finally:
        unused = fd_take_pending_storage()
    if unused != NULL:
        raise TypeError(f"{getattr(kernel, '__name__', kernel)!r} did not run on run_kernel's plan: "
                        "it cannot run on low-precision storage")
