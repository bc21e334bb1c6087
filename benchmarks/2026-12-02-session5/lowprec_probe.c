// Probe of issue 16's bfloat16 question (branch lowprec-speed, 2026-12-02): at 10^8
// float32 elements, what per-core bandwidth does a 28 B/element (float32 Adam) and a
// 20 B/element (bfloat16 moments) in-place pattern get, and how close do variants of
// the fused bfloat16 Adam loop come to it: as gcc compiles fastdescent's (flags as
// masks), flags specialised, the encoder as VCVTNEPS2BF16 (AVX512-BF16), and each
// with a software prefetch per 64-element strip PF elements ahead.
// Wall time and per-thread CPU time (the latter survives other processes on the
// cores, not their memory traffic); kernels alternate, medians over the rounds.
//   gcc -O3 -march=x86-64-v4 -mprefer-vector-width=512 -fno-math-errno -ffp-contract=off -pthread \
//       lowprec_probe.c -o probe -lm
//   ./probe N THREADS ROUNDS PF CHUNK KERNELS[,..] [INNER]
//   e.g. ./probe 100000000 2 7 1024 2048 stream_bf16,adam_bf16,adam_bf16p,adam_bf16sp,adam_bf16icp
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <immintrin.h>

static inline uint32_t fd_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float fd_float(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline float bf16v(uint16_t h) { return fd_float((uint32_t)h << 16); }
static inline uint16_t bf16r(float x, uint32_t add) {
    uint32_t u = fd_bits(x);
    return (uint16_t)((int32_t)(u & 0x7fffffffU) > 0x7f800000 ? (u >> 16) | 0x40U : (u + add) >> 16);
}
static inline uint16_t bf16n(float x) { return bf16r(x, 0x7fffU + ((fd_bits(x) >> 16) & 1U)); }

typedef struct { float step_size, inv_bc2, eps, scale, wd, decay, w1, w1r, keep2, w2; int from_end, decoupled, has_wd; } A;
static A a;
static volatile uint32_t sinkv;
static int PF = 0;      // prefetch distance in elements (0: none)
static int CH = 2048;   // elements per call
static int INNER = 1;

typedef void (*kfn)(float *p, const float *g, void *m, void *v, long n);

#define ADAM_BODY(MEAN_LOAD, SQ_LOAD, MEAN_STORE, SQ_STORE) \
    float x = p[i]; if (a.decoupled) x = x * a.decay; \
    float mean = MEAN_LOAD, sq = SQ_LOAD; \
    float d = a.scale * g[i]; if (a.has_wd) d = d + a.wd * x; \
    float diff = d - mean; mean = a.from_end ? d - a.w1r * diff : mean + a.w1 * diff; \
    sq = a.keep2 * sq + (a.w2 * d) * d; \
    MEAN_STORE; SQ_STORE; \
    p[i] = x - (a.step_size * mean) / (sqrtf(sq) * a.inv_bc2 + a.eps);

__attribute__((noinline)) static void adam_f32(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    float *restrict m = mv, *restrict v = vv;
    for (long i = 0; i < n; i++) { ADAM_BODY(m[i], v[i], m[i] = mean, v[i] = sq) }
}
__attribute__((noinline)) static void adam_bf16(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    for (long i = 0; i < n; i++) { ADAM_BODY(bf16v(m[i]), bf16v(v[i]), m[i] = bf16n(mean), v[i] = bf16n(sq)) }
}
__attribute__((noinline, target("prefer-vector-width=256"))) static void adam_bf16y(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    for (long i = 0; i < n; i++) { ADAM_BODY(bf16v(m[i]), bf16v(v[i]), m[i] = bf16n(mean), v[i] = bf16n(sq)) }
}
__attribute__((noinline, target("prefer-vector-width=256"))) static void adam_f32y(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    float *restrict m = mv, *restrict v = vv;
    for (long i = 0; i < n; i++) { ADAM_BODY(m[i], v[i], m[i] = mean, v[i] = sq) }
}
// the flag-free (specialised) loop's constants and body, and one strip's prefetches
#define SPECIAL_CONSTS const float step_size = a.step_size, inv_bc2 = a.inv_bc2, eps = a.eps, scale = a.scale, \
    w1 = a.w1, keep2 = a.keep2, w2 = a.w2;
#define SPECIAL_BODY { float x = p[i], mean = bf16v(m[i]), sq = bf16v(v[i]); float d = scale * g[i]; \
    mean = mean + w1 * (d - mean); sq = keep2 * sq + (w2 * d) * d; m[i] = bf16n(mean); v[i] = bf16n(sq); \
    p[i] = x - (step_size * mean) / (sqrtf(sq) * inv_bc2 + eps); }
#define PREFETCH_STRIP(s) { const char *pp = (const char *)(p + (s) + PF), *gp = (const char *)(g + (s) + PF), \
    *mp = (const char *)(m + (s) + PF), *vp = (const char *)(v + (s) + PF); \
    for (int k = 0; k < 256; k += 64) { __builtin_prefetch(pp + k, 1); __builtin_prefetch(gp + k, 0); } \
    for (int k = 0; k < 128; k += 64) { __builtin_prefetch(mp + k, 1); __builtin_prefetch(vp + k, 1); } }

// prefetch interleaved: per strip of 64 elements, the lines PF elements ahead
#define STRIP 64
__attribute__((noinline)) static void adam_bf16p(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    long s = 0;
    for (; s + STRIP <= n; s += STRIP) {
        PREFETCH_STRIP(s)
        for (long i = s; i < s + STRIP; i++) { ADAM_BODY(bf16v(m[i]), bf16v(v[i]), m[i] = bf16n(mean), v[i] = bf16n(sq)) }
    }
    for (long i = s; i < n; i++) { ADAM_BODY(bf16v(m[i]), bf16v(v[i]), m[i] = bf16n(mean), v[i] = bf16n(sq)) }
}
// flags specialised (no decay, no wd, not from_end): what a flag-free loop costs
__attribute__((noinline)) static void adam_bf16s(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    SPECIAL_CONSTS
    for (long i = 0; i < n; i++) {
        SPECIAL_BODY
    }
}
__attribute__((noinline, target("prefer-vector-width=256"))) static void adam_bf16sy(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    SPECIAL_CONSTS
    for (long i = 0; i < n; i++) {
        SPECIAL_BODY
    }
}
__attribute__((noinline)) static void adam_bf16sp(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    SPECIAL_CONSTS
    long s = 0;
    for (; s < n; s += STRIP) {
        PREFETCH_STRIP(s)
        long e = s + STRIP < n ? s + STRIP : n;
        for (long i = s; i < e; i++) {
        SPECIAL_BODY
        }
    }
}

static inline __m256i enc_manual(__m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i add = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, add), 16);
    __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
}
__attribute__((target("avx512bf16"))) static inline __m256i enc_cvt(__m512 x, int *denormal) {
    *denormal |= _mm512_fpclass_ps_mask(x, 0x20);
    return (__m256i)_mm512_cvtneps_pbh(x);
}
#define ADAM_INTRIN(ENC) \
    uint16_t *restrict m = mv, *restrict v = vv; \
    const __m512 step_size = _mm512_set1_ps(a.step_size), inv_bc2 = _mm512_set1_ps(a.inv_bc2), eps = _mm512_set1_ps(a.eps), \
        scale = _mm512_set1_ps(a.scale), w1 = _mm512_set1_ps(a.w1), keep2 = _mm512_set1_ps(a.keep2), w2 = _mm512_set1_ps(a.w2); \
    int denormal = 0; \
    for (long i = 0; i + 16 <= n; i += 16) { \
        __m512 x = _mm512_loadu_ps(p + i); \
        __m512 mean = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(m + i))), 16)); \
        __m512 sq = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + i))), 16)); \
        __m512 d = _mm512_mul_ps(scale, _mm512_loadu_ps(g + i)); \
        mean = _mm512_add_ps(mean, _mm512_mul_ps(w1, _mm512_sub_ps(d, mean))); \
        sq = _mm512_add_ps(_mm512_mul_ps(keep2, sq), _mm512_mul_ps(_mm512_mul_ps(w2, d), d)); \
        _mm256_storeu_si256((__m256i *)(m + i), ENC(mean)); \
        _mm256_storeu_si256((__m256i *)(v + i), ENC(sq)); \
        __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(sq), inv_bc2), eps); \
        _mm512_storeu_ps(p + i, _mm512_sub_ps(x, _mm512_div_ps(_mm512_mul_ps(step_size, mean), den))); \
    } \
    if (denormal) sinkv = 1;

__attribute__((noinline)) static void adam_bf16im(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
#define ENC_M(x) enc_manual(x)
    ADAM_INTRIN(ENC_M)
}
__attribute__((noinline, target("avx512bf16"))) static void adam_bf16ic(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
#define ENC_C(x) enc_cvt(x, &denormal)
    ADAM_INTRIN(ENC_C)
}

__attribute__((noinline, target("avx512bf16"))) static void adam_bf16icp(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv;
    const __m512 step_size = _mm512_set1_ps(a.step_size), inv_bc2 = _mm512_set1_ps(a.inv_bc2), eps = _mm512_set1_ps(a.eps),
        scale = _mm512_set1_ps(a.scale), w1 = _mm512_set1_ps(a.w1), keep2 = _mm512_set1_ps(a.keep2), w2 = _mm512_set1_ps(a.w2);
    int denormal = 0;
    for (long i = 0; i + 16 <= n; i += 16) {
        if ((i & 63) == 0) {
            const char *pp = (const char *)(p + i + PF), *gp = (const char *)(g + i + PF), *mp = (const char *)(m + i + PF), *vp = (const char *)(v + i + PF);
            _mm_prefetch(pp, _MM_HINT_T0); _mm_prefetch(pp + 64, _MM_HINT_T0); _mm_prefetch(pp + 128, _MM_HINT_T0); _mm_prefetch(pp + 192, _MM_HINT_T0);
            _mm_prefetch(gp, _MM_HINT_T0); _mm_prefetch(gp + 64, _MM_HINT_T0); _mm_prefetch(gp + 128, _MM_HINT_T0); _mm_prefetch(gp + 192, _MM_HINT_T0);
            _mm_prefetch(mp, _MM_HINT_T0); _mm_prefetch(mp + 64, _MM_HINT_T0); _mm_prefetch(vp, _MM_HINT_T0); _mm_prefetch(vp + 64, _MM_HINT_T0);
        }
        __m512 x = _mm512_loadu_ps(p + i);
        __m512 mean = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(m + i))), 16));
        __m512 sq = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + i))), 16));
        __m512 d = _mm512_mul_ps(scale, _mm512_loadu_ps(g + i));
        mean = _mm512_add_ps(mean, _mm512_mul_ps(w1, _mm512_sub_ps(d, mean)));
        sq = _mm512_add_ps(_mm512_mul_ps(keep2, sq), _mm512_mul_ps(_mm512_mul_ps(w2, d), d));
        _mm256_storeu_si256((__m256i *)(m + i), enc_cvt(mean, &denormal));
        _mm256_storeu_si256((__m256i *)(v + i), enc_cvt(sq, &denormal));
        __m512 den = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(sq), inv_bc2), eps);
        _mm512_storeu_ps(p + i, _mm512_sub_ps(x, _mm512_div_ps(_mm512_mul_ps(step_size, mean), den)));
    }
    if (denormal) sinkv = 1;
}
__attribute__((noinline)) static void stream_f32(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint32_t *restrict m = mv, *restrict v = vv, *restrict pp = (uint32_t *)p; const uint32_t *gg = (const uint32_t *)g;
    uint32_t z = sinkv, acc = 0;
    for (long i = 0; i < n; i++) { pp[i] |= z; m[i] |= z; v[i] |= z; acc |= gg[i]; }
    if (acc == z + 1) sinkv = acc;
}
__attribute__((noinline)) static void stream_bf16(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv; uint32_t *restrict pp = (uint32_t *)p; const uint32_t *gg = (const uint32_t *)g;
    uint32_t z = sinkv, acc = 0;
    for (long i = 0; i < n; i++) { pp[i] |= z; m[i] |= (uint16_t)z; v[i] |= (uint16_t)z; acc |= gg[i]; }
    if (acc == z + 1) sinkv = acc;
}
// sequential roles (like stream_mixed): each row in turn
__attribute__((noinline)) static void seq_bf16(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint16_t *restrict m = mv, *restrict v = vv; uint32_t *restrict pp = (uint32_t *)p; const uint32_t *gg = (const uint32_t *)g;
    uint32_t z = sinkv, acc = 0;
    for (long i = 0; i < n; i++) pp[i] |= z;
    for (long i = 0; i < n; i++) acc |= gg[i];
    for (long i = 0; i < n; i++) m[i] |= (uint16_t)z;
    for (long i = 0; i < n; i++) v[i] |= (uint16_t)z;
    if (acc == z + 1) sinkv = acc;
}
__attribute__((noinline)) static void seq_f32(float *restrict p, const float *restrict g, void *mv, void *vv, long n) {
    uint32_t *restrict m = mv, *restrict v = vv; uint32_t *restrict pp = (uint32_t *)p; const uint32_t *gg = (const uint32_t *)g;
    uint32_t z = sinkv, acc = 0;
    for (long i = 0; i < n; i++) pp[i] |= z;
    for (long i = 0; i < n; i++) acc |= gg[i];
    for (long i = 0; i < n; i++) m[i] |= z;
    for (long i = 0; i < n; i++) v[i] |= z;
    if (acc == z + 1) sinkv = acc;
}

typedef struct { const char *name; kfn fn; int msize; } K;
static K kernels[] = {
    {"stream_f32", stream_f32, 4}, {"stream_bf16", stream_bf16, 2}, {"seq_f32", seq_f32, 4}, {"seq_bf16", seq_bf16, 2},
    {"adam_f32", adam_f32, 4}, {"adam_bf16", adam_bf16, 2}, {"adam_bf16p", adam_bf16p, 2}, {"adam_bf16s", adam_bf16s, 2}, {"adam_bf16im", adam_bf16im, 2}, {"adam_bf16ic", adam_bf16ic, 2}, {"adam_bf16icp", adam_bf16icp, 2}, {"adam_bf16sy", adam_bf16sy, 2}, {"adam_bf16sp", adam_bf16sp, 2}, {"adam_bf16y", adam_bf16y, 2}, {"adam_f32y", adam_f32y, 4},
};

static float *P, *G; static char *M, *V; static long N; static int NT; static K *cur;
static pthread_barrier_t bar;
static double cpu_t[4], wall_t[4];

static double now(clockid_t c) { struct timespec ts; clock_gettime(c, &ts); return ts.tv_sec + 1e-9 * ts.tv_nsec; }

static void run_range(long lo, long hi) {
    int ms = cur->msize;
    for (long s = lo; s < hi; s += CH) {
        long n = hi - s < CH ? hi - s : CH;
        if (PF < 0) {
            // prefetch the chunk PF elements ahead, one line per 64 bytes of each stream
            long q = s + PF;
            if (q < hi) {
                long e = q + n < hi ? q + n : hi;
                for (long i = q; i < e; i += 16) { __builtin_prefetch(P + i, 1); __builtin_prefetch(G + i, 0); }
                for (long i = q; i < e; i += 64 / ms) { __builtin_prefetch(M + i * ms, 1); __builtin_prefetch(V + i * ms, 1); }
            }
        }
        cur->fn(P + s, G + s, M + s * ms, V + s * ms, n);
    }
}

static void *worker(void *arg) {
    int k = (int)(long)arg;
    cpu_set_t set; CPU_ZERO(&set); CPU_SET(k, &set); pthread_setaffinity_np(pthread_self(), sizeof set, &set);
    long lo = N * k / NT / 64 * 64, hi = k == NT - 1 ? N : N * (k + 1) / NT / 64 * 64;
    pthread_barrier_wait(&bar);
    double c0 = now(CLOCK_THREAD_CPUTIME_ID), w0 = now(CLOCK_MONOTONIC);
    for (int r = 0; r < INNER; r++) run_range(lo, hi);
    cpu_t[k] = now(CLOCK_THREAD_CPUTIME_ID) - c0; wall_t[k] = now(CLOCK_MONOTONIC) - w0;
    pthread_barrier_wait(&bar);
    return NULL;
}

static void *alloc(size_t bytes) {
    void *p = aligned_alloc(2 << 20, (bytes + (2 << 20) - 1) / (2 << 20) * (2 << 20));
    madvise(p, bytes, MADV_HUGEPAGE);
    memset(p, 0, bytes);
    return p;
}

int main(int argc, char **argv) {
    N = argc > 1 ? atol(argv[1]) : 100000000;
    NT = argc > 2 ? atoi(argv[2]) : 1;
    int reps = argc > 3 ? atoi(argv[3]) : 5;
    PF = argc > 4 ? atoi(argv[4]) : 0;
    CH = argc > 5 ? atoi(argv[5]) : 2048;
    const char *only = argc > 6 ? argv[6] : NULL;
    INNER = argc > 7 ? atoi(argv[7]) : 1;
    P = alloc(N * 4); G = alloc(N * 4); M = alloc(N * 4); V = alloc(N * 4);
    srand(1);
    for (long i = 0; i < N; i++) { P[i] = (float)rand() / RAND_MAX - 0.5f; G[i] = 0.1f * ((float)rand() / RAND_MAX - 0.5f);
        ((float *)M)[i] = 0.01f * G[i]; ((float *)V)[i] = 0.001f * G[i] * G[i]; }
    a.step_size = 1e-3f; a.inv_bc2 = 1.1f; a.eps = 1e-8f; a.scale = 1; a.wd = 0; a.decay = 1; a.w1 = 0.1f; a.w1r = 0.9f;
    a.keep2 = 0.999f; a.w2 = 0.001f; a.from_end = 0; a.decoupled = 0; a.has_wd = 0;
    int nk = sizeof kernels / sizeof *kernels;
    static double W[64][200], C[64][200];
    int sel[64], ns = 0;
    for (int k = 0; k < nk; k++) {
        if (!only) { sel[ns++] = k; continue; }
        char buf[512]; strcpy(buf, only);
        for (char *t = strtok(buf, ","); t; t = strtok(NULL, ",")) if (!strcmp(t, kernels[k].name)) sel[ns++] = k;
    }
    for (int r = 0; r < reps + 1; r++) {
        for (int q = 0; q < ns; q++) {
            cur = &kernels[sel[q]];
            pthread_t th[4];
            pthread_barrier_init(&bar, NULL, NT);
            for (int t = 0; t < NT; t++) pthread_create(&th[t], NULL, worker, (void *)(long)t);
            for (int t = 0; t < NT; t++) pthread_join(th[t], NULL);
            pthread_barrier_destroy(&bar);
            double w = 0, c = 0;
            for (int t = 0; t < NT; t++) { if (wall_t[t] > w) w = wall_t[t]; if (cpu_t[t] > c) c = cpu_t[t]; }
            if (r) { W[q][r - 1] = w; C[q][r - 1] = c; }
        }
    }
    for (int q = 0; q < ns; q++) {
        cur = &kernels[sel[q]];
        double ws[200], cs[200];
        memcpy(ws, W[q], reps * sizeof(double)); memcpy(cs, C[q], reps * sizeof(double));
        for (int x = 0; x < reps; x++) for (int y = x + 1; y < reps; y++) { if (ws[y] < ws[x]) { double t = ws[x]; ws[x] = ws[y]; ws[y] = t; } if (cs[y] < cs[x]) { double t = cs[x]; cs[x] = cs[y]; cs[y] = t; } }
        double el = (double)N * INNER;
        int bytes = cur->msize == 4 ? 28 : 20;
        printf("%-12s N=%ld thr=%d pf=%d  wall med %6.0f min %6.0f Melem/s (%5.1f GB/s) | cpu med %6.0f min %6.0f Melem/s\n",
               cur->name, N, NT, PF, el / ws[reps / 2] / 1e6, el / ws[0] / 1e6, el * bytes / ws[0] / 1e9, el / cs[reps / 2] / 1e6, el / cs[0] / 1e6);
    }
    return 0;
}
