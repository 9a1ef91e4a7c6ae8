/* The recurrent time loops of fedtext's GRU (both variants) and LSTM, forward and backward.
 *
 * Plain C with no dependence on torch or Python. fedtext/model/kernel.py compiles this one
 * source several times, once per SIMD variant, each into its own shared library:
 *   -DFEDTEXT_AVX512 -mavx512f -mavx512dq -mavx512bw -mavx512vl -mavx2 -mfma  (W = 16 floats)
 *   -DFEDTEXT_AVX2   -mavx2 -mfma                                       (W = 8)
 *   -DFEDTEXT_NEON   (aarch64; NEON is part of the base ISA)             (W = 4)
 *   no flags: the scalar build, the last resort before the PyTorch path  (W = 1)
 * plus -fopenmp -DFEDTEXT_OPENMP where the compiler has it, and loads the best one the CPU
 * runs (cpu_probe.c says which). The vector code is written
 * once with GCC/Clang vector extensions (`vf` below is W floats), so the variants differ only
 * in W and in how many accumulators fit in registers. bf16 (-DFEDTEXT_BF16, with AVX512-BF16
 * or ARM BF16) swaps the recurrent matmul for bf16 dot products with float32 accumulation.
 * Only what must run step by step lives here; torch does the big matmuls before and after.
 *
 * Layouts (row-major float32; gate order is torch's: GRU [r|z|n], LSTM [i|f|g|o]):
 *   xp     (T, B, G*H)  input projections, input bias included
 *   w_hh   (G*H, H)     torch's weight_hh_l{k}
 *   hs     (T+1, B, H)  hidden states, hs[0] = h0;  cs (T+1, B, H) LSTM cells, cs[0] = c0
 *   gates  (T, B, 4H)   GRU reset_after=True:  [r | z | n | hn],  hn = h W_hn^T + b_hn
 *                       GRU reset_after=False: [r | z | n | rh],  rh = r * h
 *          (T, B, 5H)   LSTM: [i | f | g | o | tanh(c)]
 *
 * GRU, reset_after=True, one barrier per step:
 *   fwd: g = h W^T + b_hh; r, z = sig(x_r + g_r), sig(x_z + g_z); n = tanh(x_n + r g_n);
 *        h' = n + z (h - n)
 *   bwd: dn~ = dh (1-z)(1-n^2); dz~ = dh (h-n) z(1-z); dr~ = dn~ hn r(1-r);
 *        dxp = [dr~, dz~, dn~]; dG = [dr~, dz~, dn~ r]; dh_prev = dh z + dG W
 * GRU, reset_after=False (r multiplies h before the matmul), two barriers per step:
 *   fwd: r, z = sig(x_rz + h W_rz^T) | rh = r h | n = tanh(x_n + rh W_n^T); h' = n + z (h - n)
 *   bwd: dn~, dz~ as above | drh = dn~ W_n; dr~ = drh h r(1-r) |
 *        dh_prev = dh z + drh r + [dr~, dz~] W_rz
 * LSTM, one barrier per step:
 *   fwd: i, f, o = sig(.), g = tanh(.) of x + h W^T; c' = f c + i g; h' = o tanh(c')
 *   bwd: dc = dc' f' + dh o (1 - tanh^2 c); do~ = dh tanh(c) o(1-o); di~ = dc g i(1-i);
 *        dg~ = dc i (1-g^2); df~ = dc c_prev f(1-f); dxp = [di~, df~, dg~, do~];
 *        dh_prev = dxp W
 * The backward fuses each step's "dh_prev" matmul with the next (earlier) step's gate
 * gradients, so a step is one pass over memory.
 *
 * Work is split across threads by hidden units, W at a time ("panel" p = units
 * [pW, pW+W)). Each thread re-arranges the weights its units need into panels laid out in
 * the order the inner loop reads them, so packing needs no synchronisation:
 *   forward panel, G gates:  for k < H: [W_g0[units, k] | W_g1[units, k] | ...]  (G*W floats)
 *     so every gate of the same W units ends up in registers together and the gates are
 *     computed right there, with no second pass over memory;
 *   backward panel:          for j < K: W[j, units]  (W floats)
 *   bf16 panels interleave pairs of k (j) per lane, the layout of the bf16 dot products.
 * A thread owns the same units in every phase, so per-unit carries need no locking.
 *
 * Speed, in order of what mattered (GRU 1024, batch 8: 12 MB of W_hh per step, far more than
 * L2, so a step is bound by how often the weights come from L3 and how well the FMAs are fed):
 *   - threads are a team of torch's own OpenMP pool (FEDTEXT_OPENMP), not threads of our own
 *     competing with torch's workers, which spin for milliseconds after every torch op;
 *   - broadcasts are real broadcasts (see VSET1), all accumulators stay in registers;
 *   - a tile's rows x gates fill the registers (NR*); backward tiles take two panels, so a
 *     broadcast feeds two FMAs; rows beyond one tile share each k-chunk of a panel while it is
 *     in L1 (group_mm), so the weights come from L3 once per step;
 *   - panels are visited in snake order: a step starts on the weights the last one ended on.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* ---------------------------------------------------------------- the SIMD layer */

#if defined(FEDTEXT_AVX512)
#define W 16
#define NREGS 32
#elif defined(FEDTEXT_AVX2)
#define W 8
#define NREGS 16
#elif defined(FEDTEXT_NEON)
#define W 4
#define NREGS 32
#else
#define W 1 /* the scalar build: a 1-lane "vector" is a float */
#define NREGS 16
#endif

/* bf16 dot products: vdpbf16ps (AVX512-BF16) and BFDOT (ARM BF16) both add
 * a[2i] w[2i] + a[2i+1] w[2i+1] into float32 lane i, so one tile serves both: `wbf` is a
 * vector of 2W bf16, BF_BCAST broadcasts a pair (as 32 bits), BF_DOT accumulates. */
#if defined(FEDTEXT_BF16) && W == 16
#include <immintrin.h>
typedef __m512i wbf;
#define BF_LOAD(p) _mm512_loadu_si512(p)
#define BF_BCAST(pair) _mm512_set1_epi32(pair)
#define BF_DOT(acc, x, w) ((vf)_mm512_dpbf16_ps((__m512)(acc), (__m512bh)(x), (__m512bh)(w)))
#elif defined(FEDTEXT_BF16) && W == 4
#include <arm_neon.h>
typedef bfloat16x8_t wbf;
#define BF_LOAD(p) vld1q_bf16((const bfloat16_t *)(p))
#define BF_BCAST(pair) vreinterpretq_bf16_u32(vdupq_n_u32((uint32_t)(pair)))
#define BF_DOT(acc, x, w) ((vf)vbfdotq_f32((float32x4_t)(acc), x, w))
#elif defined(FEDTEXT_BF16)
#error "FEDTEXT_BF16 needs FEDTEXT_AVX512 (AVX512-BF16) or FEDTEXT_NEON (ARM BF16)"
#endif

typedef float vf __attribute__((vector_size(4 * W)));
typedef int32_t vi __attribute__((vector_size(4 * W)));

static inline vf vzero(void) { return (vf){0}; }
/* A broadcast, spelled as a constructor of W copies: GCC makes that a vbroadcastss (from
 * memory, or folded into the FMA). `zero + s` would cost a real add and a shuffle per
 * broadcast (0 + s is not s for s = -0, so it can't fold away). */
#if W == 16
#define VSET1(s) (vf){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}
#elif W == 8
#define VSET1(s) (vf){s, s, s, s, s, s, s, s}
#elif W == 4
#define VSET1(s) (vf){s, s, s, s}
#else
#define VSET1(s) (vf){s}
#endif
static inline vf vset1(float s) { return VSET1(s); }
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* n < W lanes at the end of a row (H not a multiple of W): the rest read as 0. */
static inline vf vload_n(const float *p, int n) {
    if (n == W) return vload(p);
    vf v = vzero();
    memcpy(&v, p, (size_t)n * sizeof(float));
    return v;
}
static inline void vstore_n(float *p, vf v, int n) {
    if (n == W) vstore(p, v);
    else memcpy(p, &v, (size_t)n * sizeof(float));
}
static inline vf vselect(vi mask, vf a, vf b) { return (vf)((mask & (vi)a) | (~mask & (vi)b)); }
static inline vf vmin(vf a, vf b) { return vselect(a < b, a, b); }
static inline vf vmax(vf a, vf b) { return vselect(a > b, a, b); }
static inline vf vabs(vf x) { return (vf)((vi)x & 0x7fffffff); }

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* exp(x): Cody-Waite range reduction x = n ln2 + r, a degree-6 polynomial for e^r (the
 * Cephes expf coefficients), times 2^n built in the exponent bits. About 1 ulp. */
static inline vf v_exp(vf x) {
    x = vmin(vmax(x, vset1(-87.0f)), vset1(88.0f));
    /* round to nearest: adding 1.5 * 2^23 pushes the fraction out of the mantissa */
    vf n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf p = vset1(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + (r + 1.0f);
    vi e = (__builtin_convertvector(n, vi) + 127) << 23; /* n in [-126, 127]: 2^n is normal */
    return p * (vf)e;
}

static inline vf v_sigmoid(vf x) { return 1.0f / (1.0f + v_exp(-x)); }

/* tanh(x): an odd polynomial near 0 (no cancellation there), 1 - 2/(e^{2|x|}+1) elsewhere. */
static inline vf v_tanh(vf x) {
    vf ax = vabs(x);
    vf big = 1.0f - 2.0f / (v_exp(ax + ax) + 1.0f);
    big = (vf)((vi)big | ((vi)x & (int32_t)0x80000000u)); /* the sign of x */
    vf z = x * x;
    vf p = vset1(-5.70498872745e-3f);
    p = p * z + 2.06390887954e-2f;
    p = p * z + -5.37397155531e-2f;
    p = p * z + 1.33314422036e-1f;
    p = p * z + -3.33332819422e-1f;
    vf small = (p * z) * x + x;
    return vselect(ax < 0.625f, small, big);
}

/* float -> bfloat16 bits, round to nearest even (what torch's .to(torch.bfloat16) does). */
static inline uint16_t bf16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ---------------------------------------------------------------- threads */

typedef struct {
    atomic_int count;
    atomic_int phase;
    int n;
} barrier_t;

static void barrier_wait(barrier_t *b) {
    if (b->n == 1) return;
    int phase = atomic_load_explicit(&b->phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&b->count, 1, memory_order_acq_rel) == b->n - 1) {
        atomic_store_explicit(&b->count, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    /* Spin (a step takes ~0.1 ms), but yield if the other thread seems descheduled. */
    for (long spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; spins++) {
        if (spins < 20000) cpu_relax(); else sched_yield();
    }
}

enum { GRU_RESET_AFTER = 0, GRU_RESET_BEFORE = 1, LSTM = 2 };

typedef struct {
    int cell, T, B, H, P, bf16, nthreads;
    const float *xp, *w, *b, *d_out, *dc_n;
    float *hs, *cs, *gates, *dxp, *dG, *dh0, *dc0;
    float *dh_buf, *dc_buf, *drh_buf; /* (B, H) per-unit carries of the backward */
    char *pack;                       /* weight panels: phase q's panel p at off[q] + p*psz[q] */
    size_t off[2], psz[2];            /* in elements (float, or uint16 in bf16 mode) */
    uint16_t *ab[2];                  /* bf16 copies of the matmuls' left operands */
    int ldab[2];                      /* their row strides: even, for the k pairs */
    barrier_t barrier;
    atomic_int go; /* start gate: 1 = run, -1 = abort (a thread could not be created) */
} job_t;

typedef struct {
    job_t *job;
    int tid;
    void *(*fn)(void *);
} task_t;

#if defined(FEDTEXT_OPENMP)
#include <omp.h>
/* Run fn on a team of torch's own OpenMP pool (this library binds to the libgomp torch has
 * loaded): torch's workers spin for a while after each parallel op, and threads of our own
 * would share their cores with those spinning threads. The team may be smaller than asked. */
static void run_threads(job_t *job, void *(*fn)(void *)) {
    atomic_init(&job->barrier.count, 0);
    atomic_init(&job->barrier.phase, 0);
#pragma omp parallel num_threads(job->nthreads)
    {
#pragma omp single
        {
            job->nthreads = omp_get_num_threads();
            job->barrier.n = job->nthreads;
        } /* (an implied barrier) */
        task_t task = {job, omp_get_thread_num(), fn};
        fn(&task);
    }
}
#else
static void *gated(void *arg) {
    task_t *task = arg;
    int go;
    while ((go = atomic_load_explicit(&task->job->go, memory_order_acquire)) == 0) cpu_relax();
    return go > 0 ? task->fn(arg) : NULL;
}

/* Run fn on nthreads threads (the caller is thread 0). If a thread cannot be created, the ones
 * that were are told to quit before doing any work, and everything runs on the caller. */
static void run_threads(job_t *job, void *(*fn)(void *)) {
    int n = job->nthreads, started = 0;
    pthread_t th[64];
    task_t tasks[64];
    for (int i = 0; i < n; i++) tasks[i] = (task_t){job, i, fn};
    atomic_init(&job->go, 0);
    atomic_init(&job->barrier.count, 0);
    atomic_init(&job->barrier.phase, 0);
    job->barrier.n = n;
    for (int i = 1; i < n; i++) {
        if (pthread_create(&th[i], NULL, gated, &tasks[i]) != 0) break;
        started++;
    }
    if (started != n - 1) {
        atomic_store_explicit(&job->go, -1, memory_order_release);
        for (int i = 1; i <= started; i++) pthread_join(th[i], NULL);
        job->nthreads = 1;
        job->barrier.n = 1;
        fn(&tasks[0]);
        return;
    }
    atomic_store_explicit(&job->go, 1, memory_order_release);
    fn(&tasks[0]);
    for (int i = 1; i < n; i++) pthread_join(th[i], NULL);
}
#endif

/* This thread's share of the panels: [*p0, *p1). */
static void my_panels(const job_t *J, int tid, int *p0, int *p1) {
    *p0 = (int)((long)J->P * tid / J->nthreads);
    *p1 = (int)((long)J->P * (tid + 1) / J->nthreads);
}

/* The i-th of this thread's panels [p0, p1) at step t: every other step backwards, so that a
 * step starts on the weights the last one ended with, still in this core's L2 (the weights
 * of GRU 1024 are 12 MB: they stream from L3 at every step otherwise). */
static inline int snake(int i, int p0, int p1, int t) { return t & 1 ? p1 - 1 - i : p0 + i; }

static inline int lanes(const job_t *J, int p) { return J->H - p * W < W ? J->H - p * W : W; }
static inline int even(int k) { return (k + 1) & ~1; }

/* ---------------------------------------------------------------- packing the weights */

/* Forward panel p of G gates from gate g0: panel[(k G + g) W + l] = w[((g0+g) H + pW + l) H + k]
 * (bf16: k pairs interleaved per lane). Lanes beyond H are 0, so they add nothing. A
 * transpose: done in blocks of KB k's, so that reads (W rows) and writes (KB lines) stay in L1. */
static void pack_forward(const job_t *J, int q, int g0, int G, int p) {
    enum { KB = 16 };
    const int H = J->H, n = lanes(J, p), Hk = J->bf16 ? even(H) : H;
    float *pf = (float *)J->pack + J->off[q] + p * J->psz[q];
    uint16_t *pb = (uint16_t *)J->pack + J->off[q] + p * J->psz[q];
    for (int g = 0; g < G; g++)
        for (int k0 = 0; k0 < Hk; k0 += KB)
            for (int l = 0; l < W; l++) {
                const float *row = J->w + ((size_t)(g0 + g) * H + p * W + (l < n ? l : 0)) * H;
                int k1 = k0 + KB < Hk ? k0 + KB : Hk;
                for (int k = k0; k < k1; k++) {
                    float v = l < n && k < H ? row[k] : 0.0f;
                    if (J->bf16) pb[(((size_t)(k / 2) * G + g) * W + l) * 2 + (k & 1)] = bf16_bits(v);
                    else pf[((size_t)k * G + g) * W + l] = v;
                }
            }
}

/* Backward panels [p0, p1) over K rows of w from row j0: panel[j W + l] = w[(j0+j) H + pW + l].
 * Row by row across the panels: each row is read once, contiguously (walking one panel's
 * column down the rows would touch a new page per row). */
static void pack_backward(const job_t *J, int q, int j0, int K, int p0, int p1) {
    const int H = J->H, Kk = J->bf16 ? even(K) : K;
    for (int j = 0; j < Kk; j++) {
        const float *row = J->w + (size_t)(j0 + (j < K ? j : 0)) * H;
        for (int p = p0; p < p1; p++) {
            const int n = lanes(J, p);
            if (!J->bf16) {
                float *dst = (float *)J->pack + J->off[q] + p * J->psz[q] + (size_t)j * W;
                memcpy(dst, row + p * W, (size_t)n * sizeof(float));
                for (int l = n; l < W; l++) dst[l] = 0.0f;
                continue;
            }
            uint16_t *dst = (uint16_t *)J->pack + J->off[q] + p * J->psz[q] +
                            ((size_t)(j / 2) * W) * 2 + (j & 1);
            for (int l = 0; l < W; l++) dst[2 * l] = bf16_bits(l < n && j < K ? row[p * W + l] : 0.0f);
        }
    }
}

/* ---------------------------------------------------------------- the matmul tile */

/* Accumulators per tile: NR rows x G vectors must fit in the vector registers beside the G
 * weight vectors and a broadcast. In the forward the G vectors are the gates of one panel's
 * units; in the backward (one output per unit) they are two adjacent panels, so that each
 * broadcast of the left operand feeds two FMAs (with one, a tile would wait on loads). A lone
 * vector (G = 1) uses two k-interleaved accumulator sets (S = 2): more FMA chains in flight. */
#if NREGS >= 32
enum { NR1 = 8, NR2 = 8, NR3 = 8, NR4 = 6 };
#else
enum { NR1 = 4, NR2 = 6, NR3 = 4, NR4 = 3 };
#endif
#define NRMAX 8 /* rows per tile, at most */
#define GMAX 4

/* acc[b G + g] (+)= sum_k a[b lda + k] * panel[k ks + g gs + lanes], b < nb: the fp32 tile
 * (`more`: add to acc). With nb, G and S constants after inlining, the accumulators live in
 * registers. */
static inline __attribute__((always_inline)) void mm_f32(vf *acc, int nb, int G, int S,
                                                         const float *a, size_t lda, int K,
                                                         const float *panel, size_t ks,
                                                         size_t gs, int more) {
    vf c[2][NRMAX][GMAX];
#pragma GCC unroll 2
    for (int s = 0; s < S; s++)
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++)
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) c[s][b][g] = s == 0 && more ? acc[b * G + g] : vzero();
    int k = 0;
    for (; k + S <= K; k += S) {
#pragma GCC unroll 2
        for (int s = 0; s < S; s++) {
            const float *w = panel + (size_t)(k + s) * ks;
            vf wg[GMAX];
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) wg[g] = vload(w + g * gs);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                vf x = vset1(a[(size_t)b * lda + k + s]);
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) c[s][b][g] += x * wg[g];
            }
        }
    }
    for (; k < K; k++) { /* odd K with S = 2 */
        const float *w = panel + (size_t)k * ks;
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) {
            vf x = vset1(a[(size_t)b * lda + k]);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) c[0][b][g] += x * vload(w + g * gs);
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++)
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) acc[b * G + g] = S == 2 ? c[0][b][g] + c[1][b][g] : c[0][b][g];
}

#if defined(FEDTEXT_BF16)
/* The same with bf16 operands and float32 accumulators: a holds bf16 rows (even length) and
 * the panel k pairs per lane; ks and gs count uint16 per k pair. */
static inline __attribute__((always_inline)) void mm_bf16(vf *acc, int nb, int G, int S,
                                                          const uint16_t *a, size_t lda, int K,
                                                          const uint16_t *panel, size_t ks,
                                                          size_t gs, int more) {
    vf c[2][NRMAX][GMAX];
    const int K2 = even(K) / 2;
#pragma GCC unroll 2
    for (int s = 0; s < S; s++)
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++)
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) c[s][b][g] = s == 0 && more ? acc[b * G + g] : vzero();
    int k = 0;
    for (; k + S <= K2; k += S) {
#pragma GCC unroll 2
        for (int s = 0; s < S; s++) {
            const uint16_t *w = panel + (size_t)(k + s) * ks;
            wbf wg[GMAX];
#pragma GCC unroll 4
            for (int g = 0; g < G; g++) wg[g] = BF_LOAD(w + g * gs);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                int32_t pair;
                memcpy(&pair, a + (size_t)b * lda + 2 * (k + s), 4);
#pragma GCC unroll 4
                for (int g = 0; g < G; g++) c[s][b][g] = BF_DOT(c[s][b][g], BF_BCAST(pair), wg[g]);
            }
        }
    }
    for (; k < K2; k++) {
        const uint16_t *w = panel + (size_t)k * ks;
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) {
            int32_t pair;
            memcpy(&pair, a + (size_t)b * lda + 2 * k, 4);
#pragma GCC unroll 4
            for (int g = 0; g < G; g++)
                c[0][b][g] = BF_DOT(c[0][b][g], BF_BCAST(pair), BF_LOAD(w + g * gs));
        }
    }
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++)
#pragma GCC unroll 4
        for (int g = 0; g < G; g++) acc[b * G + g] = S == 2 ? c[0][b][g] + c[1][b][g] : c[0][b][g];
}
#endif

/* bf16 mode only: store n lanes of v as bf16 into row `row` of ab[q] at column j; a row of
 * odd length K gets its pad element zeroed (the k pairs read it). */
static inline void put_bf16(const job_t *J, int q, size_t row, int j, vf v, int n, int K) {
#if defined(FEDTEXT_BF16)
    if (!J->bf16) return;
    uint16_t *dst = J->ab[q] + row * J->ldab[q];
#if W == 16
    __m256bh h = _mm512_cvtneps_pbh((__m512)v);
    memcpy(dst + j, &h, (size_t)n * 2);
#else
    for (int l = 0; l < n; l++) dst[j + l] = bf16_bits(v[l]);
#endif
    if ((K & 1) && j + n == K) dst[K] = 0;
#else
    (void)J, (void)q, (void)row, (void)j, (void)v, (void)n, (void)K;
#endif
}

/* One tile of a matmul: rows [0, nb) of the fp32 rows a (stride lda), or in bf16 mode of
 * their copies ab[q] (from row ab_row), over k in [k0, k0 + kn), times phase q's panels
 * from p, into acc (`more`: added to it). Forward: the G gates of panel p (S = 2 for a lone
 * gate). Backward: G adjacent panels. */
static inline __attribute__((always_inline)) void tile_mm(vf *acc, int nb, int G, int backward,
                                                          const job_t *J, int q, int p,
                                                          const float *a, size_t lda,
                                                          size_t ab_row, int k0, int kn,
                                                          int more) {
    const int S = G == 1 ? 2 : 1;
#if defined(FEDTEXT_BF16)
    if (J->bf16) { /* k0 is even: whole k pairs */
        const uint16_t *panel = (const uint16_t *)J->pack + J->off[q] + p * J->psz[q];
        size_t ks = backward ? 2 * W : (size_t)G * 2 * W;
        mm_bf16(acc, nb, G, S, J->ab[q] + ab_row * J->ldab[q] + k0, J->ldab[q], kn,
                panel + (size_t)(k0 / 2) * ks, ks, backward ? J->psz[q] : 2 * W, more);
        return;
    }
#else
    (void)ab_row;
#endif
    const float *panel = (const float *)J->pack + J->off[q] + p * J->psz[q];
    size_t ks = backward ? W : (size_t)G * W;
    mm_f32(acc, nb, G, S, a + k0, lda, kn, panel + (size_t)k0 * ks, ks, backward ? J->psz[q] : W,
           more);
}

#define RG 16 /* rows per row group: the accumulators of a group wait on the stack */
#define KC 64 /* k per chunk (even): a chunk of a panel, G*W*KC floats, stays in L1 */

/* acc[b G + g] for the rows [0, ng) (ng <= RG) of a row group: row blocks of NR rows (then
 * 4, 2, 1, so that each tile_mm instance has a constant row count). With more than one block,
 * k goes in chunks and every block works on a chunk while it is in L1: the panel then comes
 * from memory once per step, not once per row block. */
static inline __attribute__((always_inline)) void group_mm(vf *acc, int ng, int G, int NR,
                                                           int backward, const job_t *J, int q,
                                                           int p, const float *a, size_t lda,
                                                           size_t ab_row, int K) {
    const int kc = ng <= NR ? K : KC;
    for (int k0 = 0; k0 < K; k0 += kc) {
        const int kn = K - k0 < kc ? K - k0 : kc, more = k0 > 0;
        int b0 = 0;
        for (; b0 + NR <= ng; b0 += NR)
            tile_mm(acc + b0 * G, NR, G, backward, J, q, p, a + b0 * lda, lda, ab_row + b0, k0,
                    kn, more);
        if (NR > 4 && b0 + 4 <= ng) {
            tile_mm(acc + b0 * G, 4, G, backward, J, q, p, a + b0 * lda, lda, ab_row + b0, k0,
                    kn, more);
            b0 += 4;
        }
        if (NR > 2 && b0 + 2 <= ng) {
            tile_mm(acc + b0 * G, 2, G, backward, J, q, p, a + b0 * lda, lda, ab_row + b0, k0,
                    kn, more);
            b0 += 2;
        }
        if (NR > 1 && b0 + 1 <= ng)
            tile_mm(acc + b0 * G, 1, G, backward, J, q, p, a + b0 * lda, lda, ab_row + b0, k0,
                    kn, more);
    }
}

/* Run PANELS(J, t, p, np) over this thread's panels [p0, p1), two at a time (np = 2, for
 * the backward), the odd one alone, in snake() order. */
#define PANEL_PAIRS(PANELS, J, t, p0, p1)                                            \
    for (int i_ = 0, n_ = ((p1) - (p0) + 1) / 2; i_ < n_; i_++) {                    \
        int p_ = (p0) + 2 * snake(i_, 0, n_, t);                                     \
        if (p_ + 1 < (p1)) PANELS(J, t, p_, 2);                                      \
        else PANELS(J, t, p_, 1);                                                    \
    }

#define INLINE static inline __attribute__((always_inline)) void

/* bf16 mode: this thread's units of hs[t] rows as bf16 into ab[q] row block t. */
static void h_to_bf16(const job_t *J, int q, int t, int p) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p);
    for (int b = 0; b < B; b++) {
        size_t row = (size_t)t * B + b;
        put_bf16(J, q, row, j0, vload_n(J->hs + row * H + j0, n), n, H);
    }
}

/* ---------------------------------------------------------------- GRU forward */

/* reset_after=True, step t, rows [b0, b0+nb), units of panel p. */
INLINE gru_ra_fwd_tile(const job_t *J, int t, int b0, int nb, int p) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p);
    const float *h = J->hs + ((size_t)t * B + b0) * H; /* h_{t-1} rows */
    vf acc[RG * 3];
    group_mm(acc, nb, 3, NR3, 0, J, 0, p, h, H, (size_t)t * B + b0, H);
    vf bhr = vload_n(J->b + j0, n), bhz = vload_n(J->b + H + j0, n);
    vf bhn = vload_n(J->b + 2 * H + j0, n);
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b;
        const float *x = J->xp + row * 3 * H + j0;
        float *g = J->gates + row * 4 * H + j0;
        vf r = v_sigmoid(vload_n(x, n) + acc[3 * b] + bhr);
        vf z = v_sigmoid(vload_n(x + H, n) + acc[3 * b + 1] + bhz);
        vf hn = acc[3 * b + 2] + bhn;
        vf nn = v_tanh(vload_n(x + 2 * H, n) + r * hn);
        vf hp = vload_n(h + (size_t)b * H + j0, n);
        vf hnew = nn + z * (hp - nn);
        vstore_n(J->hs + (row + B) * H + j0, hnew, n);
        put_bf16(J, 0, row + B, j0, hnew, n, H);
        vstore_n(g, r, n);
        vstore_n(g + H, z, n);
        vstore_n(g + 2 * H, nn, n);
        vstore_n(g + 3 * H, hn, n);
    }
}

/* reset_after=False, first half of step t: r, z and rh = r * h. */
INLINE gru_rb_fwd_rz_tile(const job_t *J, int t, int b0, int nb, int p) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p);
    const float *h = J->hs + ((size_t)t * B + b0) * H;
    vf acc[RG * 2];
    group_mm(acc, nb, 2, NR2, 0, J, 0, p, h, H, (size_t)t * B + b0, H);
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b;
        const float *x = J->xp + row * 3 * H + j0;
        float *g = J->gates + row * 4 * H + j0;
        vf r = v_sigmoid(vload_n(x, n) + acc[2 * b]);
        vf z = v_sigmoid(vload_n(x + H, n) + acc[2 * b + 1]);
        vf rh = r * vload_n(h + (size_t)b * H + j0, n);
        vstore_n(g, r, n);
        vstore_n(g + H, z, n);
        vstore_n(g + 3 * H, rh, n);
        put_bf16(J, 1, row, j0, rh, n, H);
    }
}

/* reset_after=False, second half of step t: n = tanh(x_n + rh W_n^T) and h'. */
INLINE gru_rb_fwd_n_tile(const job_t *J, int t, int b0, int nb, int p) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p);
    size_t row0 = (size_t)t * B + b0;
    vf acc[RG];
    group_mm(acc, nb, 1, NR1, 0, J, 1, p, J->gates + row0 * 4 * H + 3 * H, 4 * H, row0, H);
    for (int b = 0; b < nb; b++) {
        size_t row = row0 + b;
        float *g = J->gates + row * 4 * H + j0;
        vf nn = v_tanh(vload_n(J->xp + row * 3 * H + 2 * H + j0, n) + acc[b]);
        vf z = vload_n(g + H, n);
        vf hp = vload_n(J->hs + row * H + j0, n);
        vf hnew = nn + z * (hp - nn);
        vstore_n(g + 2 * H, nn, n);
        vstore_n(J->hs + (row + B) * H + j0, hnew, n);
        put_bf16(J, 0, row + B, j0, hnew, n, H);
    }
}

static void gru_ra_fwd_rows(const job_t *J, int t, int p) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_ra_fwd_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p);
}
static void gru_rb_fwd_rz_rows(const job_t *J, int t, int p) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_rb_fwd_rz_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p);
}
static void gru_rb_fwd_n_rows(const job_t *J, int t, int p) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_rb_fwd_n_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p);
}

static void *gru_fwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J, task->tid, &p0, &p1);
    const int before = J->cell == GRU_RESET_BEFORE;
    for (int p = p0; p < p1; p++) {
        if (before) {
            pack_forward(J, 0, 0, 2, p);
            pack_forward(J, 1, 2, 1, p);
        } else {
            pack_forward(J, 0, 0, 3, p);
        }
        if (J->bf16) h_to_bf16(J, 0, 0, p);
    }
    if (J->bf16) barrier_wait(&J->barrier);
    for (int t = 0; t < J->T; t++) {
        if (before) {
            for (int i = 0; i < p1 - p0; i++) gru_rb_fwd_rz_rows(J, t, snake(i, p0, p1, t));
            barrier_wait(&J->barrier);
            for (int i = 0; i < p1 - p0; i++) gru_rb_fwd_n_rows(J, t, snake(i, p0, p1, t));
        } else {
            for (int i = 0; i < p1 - p0; i++) gru_ra_fwd_rows(J, t, snake(i, p0, p1, t));
        }
        barrier_wait(&J->barrier);
    }
    return NULL;
}

/* ---------------------------------------------------------------- GRU backward
 * Each backward tile does the matmul for np panels (accumulator g of row b at acc[b np + g]),
 * then the per-unit part for each panel. acc == NULL: no matmul term (the last step). */

/* reset_after=True, step t (t = -1: only dh0): dh_t = d_out[t] + dh_{t+1} z_{t+1} +
 * dG_{t+1} W, then the gate gradients of step t. */
INLINE gru_ra_bwd_units(const job_t *J, int t, int b0, int nb, int p, const vf *acc, int np) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p), H3 = 3 * H;
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b, row1 = (size_t)(t + 1) * B + b0 + b;
        size_t u = (size_t)(b0 + b) * H + j0;
        vf dh = vzero();
        if (acc) dh = acc[b * np] + vload_n(J->dh_buf + u, n) *
                                    vload_n(J->gates + row1 * 4 * H + H + j0, n); /* z_{t+1} */
        if (t < 0) {
            vstore_n(J->dh0 + u, dh, n);
            continue;
        }
        vf d = dh + vload_n(J->d_out + row * H + j0, n);
        vstore_n(J->dh_buf + u, d, n);
        const float *g = J->gates + row * 4 * H + j0;
        vf r = vload_n(g, n), z = vload_n(g + H, n), nn = vload_n(g + 2 * H, n);
        vf hn = vload_n(g + 3 * H, n), hp = vload_n(J->hs + row * H + j0, n);
        vf dn = d * (1.0f - z) * (1.0f - nn * nn);
        vf dz = d * (hp - nn) * (z * (1.0f - z));
        vf dr = dn * hn * (r * (1.0f - r));
        float *dx = J->dxp + row * H3 + j0, *dg = J->dG + row * H3 + j0;
        vstore_n(dx, dr, n);
        vstore_n(dx + H, dz, n);
        vstore_n(dx + 2 * H, dn, n);
        vstore_n(dg, dr, n);
        vstore_n(dg + H, dz, n);
        vstore_n(dg + 2 * H, dn * r, n);
        put_bf16(J, 0, row, j0, dr, n, H3);
        put_bf16(J, 0, row, H + j0, dz, n, H3);
        put_bf16(J, 0, row, 2 * H + j0, dn * r, n, H3);
    }
}

INLINE gru_ra_bwd_tile(const job_t *J, int t, int b0, int nb, int p, int np) {
    const int H3 = 3 * J->H;
    vf acc[RG * 2];
    const int mm = t < J->T - 1;
    size_t row1 = (size_t)(t + 1) * J->B + b0;
    if (mm) group_mm(acc, nb, np, NR1, 1, J, 0, p, J->dG + row1 * H3, H3, row1, H3);
    for (int g = 0; g < np; g++) gru_ra_bwd_units(J, t, b0, nb, p + g, mm ? acc + g : NULL, np);
}

INLINE gru_ra_bwd_panels(const job_t *J, int t, int p, int np) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_ra_bwd_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p, np);
}

/* reset_after=False, first half of step t (t = -1: only dh0): dh_t = d_out[t] +
 * dh_{t+1} z_{t+1} + drh_{t+1} r_{t+1} + [dr~, dz~]_{t+1} W_rz, then dn~ and dz~ of step t. */
INLINE gru_rb_bwd_h_units(const job_t *J, int t, int b0, int nb, int p, const vf *acc, int np) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p), H3 = 3 * H;
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b, row1 = (size_t)(t + 1) * B + b0 + b;
        size_t u = (size_t)(b0 + b) * H + j0;
        vf dh = vzero();
        if (acc) {
            const float *g1 = J->gates + row1 * 4 * H + j0;
            dh = acc[b * np] + vload_n(J->dh_buf + u, n) * vload_n(g1 + H, n) +
                 vload_n(J->drh_buf + u, n) * vload_n(g1, n);
        }
        if (t < 0) {
            vstore_n(J->dh0 + u, dh, n);
            continue;
        }
        vf d = dh + vload_n(J->d_out + row * H + j0, n);
        vstore_n(J->dh_buf + u, d, n);
        const float *g = J->gates + row * 4 * H + j0;
        vf z = vload_n(g + H, n), nn = vload_n(g + 2 * H, n);
        vf hp = vload_n(J->hs + row * H + j0, n);
        vf dn = d * (1.0f - z) * (1.0f - nn * nn);
        vf dz = d * (hp - nn) * (z * (1.0f - z));
        float *dx = J->dxp + row * H3 + j0;
        vstore_n(dx + H, dz, n);
        vstore_n(dx + 2 * H, dn, n);
        put_bf16(J, 0, row, H + j0, dz, n, 2 * H);
        put_bf16(J, 1, row, j0, dn, n, H);
    }
}

INLINE gru_rb_bwd_h_tile(const job_t *J, int t, int b0, int nb, int p, int np) {
    const int H = J->H;
    vf acc[RG * 2];
    const int mm = t < J->T - 1;
    size_t row1 = (size_t)(t + 1) * J->B + b0;
    if (mm) group_mm(acc, nb, np, NR1, 1, J, 0, p, J->dxp + row1 * 3 * H, 3 * H, row1, 2 * H);
    for (int g = 0; g < np; g++) gru_rb_bwd_h_units(J, t, b0, nb, p + g, mm ? acc + g : NULL, np);
}

INLINE gru_rb_bwd_h_panels(const job_t *J, int t, int p, int np) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_rb_bwd_h_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p, np);
}

/* reset_after=False, second half of step t: drh = dn~ W_n, dr~ = drh h_prev r (1 - r). */
INLINE gru_rb_bwd_r_tile(const job_t *J, int t, int b0, int nb, int p, int np) {
    const int H = J->H, B = J->B, H3 = 3 * H;
    size_t row0 = (size_t)t * B + b0;
    vf acc[RG * 2];
    group_mm(acc, nb, np, NR1, 1, J, 1, p, J->dxp + row0 * H3 + 2 * H, H3, row0, H);
    for (int g = 0; g < np; g++) {
        const int j0 = (p + g) * W, n = lanes(J, p + g);
        for (int b = 0; b < nb; b++) {
            size_t row = row0 + b;
            vf drh = acc[b * np + g];
            vf r = vload_n(J->gates + row * 4 * H + j0, n);
            vf dr = drh * vload_n(J->hs + row * H + j0, n) * (r * (1.0f - r));
            vstore_n(J->drh_buf + (size_t)(b0 + b) * H + j0, drh, n);
            vstore_n(J->dxp + row * H3 + j0, dr, n);
            put_bf16(J, 0, row, j0, dr, n, 2 * H);
        }
    }
}

INLINE gru_rb_bwd_r_panels(const job_t *J, int t, int p, int np) {
    for (int r0 = 0; r0 < J->B; r0 += RG) gru_rb_bwd_r_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p, np);
}

static void *gru_bwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J, task->tid, &p0, &p1);
    const int H = J->H, before = J->cell == GRU_RESET_BEFORE;
    if (before) {
        pack_backward(J, 0, 0, 2 * H, p0, p1);
        pack_backward(J, 1, 2 * H, H, p0, p1);
    } else {
        pack_backward(J, 0, 0, 3 * H, p0, p1);
    }
    for (int t = J->T - 1; t >= -1; t--) {
        if (before) {
            PANEL_PAIRS(gru_rb_bwd_h_panels, J, t, p0, p1)
            if (t < 0) break;
            barrier_wait(&J->barrier);
            PANEL_PAIRS(gru_rb_bwd_r_panels, J, t, p0, p1)
        } else {
            PANEL_PAIRS(gru_ra_bwd_panels, J, t, p0, p1)
        }
        barrier_wait(&J->barrier);
    }
    return NULL;
}

/* ---------------------------------------------------------------- LSTM */

INLINE lstm_fwd_tile(const job_t *J, int t, int b0, int nb, int p) {
    const int H = J->H, B = J->B, j0 = p * W, n = lanes(J, p);
    const float *h = J->hs + ((size_t)t * B + b0) * H;
    vf acc[RG * 4];
    group_mm(acc, nb, 4, NR4, 0, J, 0, p, h, H, (size_t)t * B + b0, H);
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b;
        const float *x = J->xp + row * 4 * H + j0;
        float *g = J->gates + row * 5 * H + j0;
        vf i = v_sigmoid(vload_n(x, n) + acc[4 * b]);
        vf f = v_sigmoid(vload_n(x + H, n) + acc[4 * b + 1]);
        vf gg = v_tanh(vload_n(x + 2 * H, n) + acc[4 * b + 2]);
        vf o = v_sigmoid(vload_n(x + 3 * H, n) + acc[4 * b + 3]);
        vf c = f * vload_n(J->cs + row * H + j0, n) + i * gg;
        vf tc = v_tanh(c);
        vf hnew = o * tc;
        vstore_n(J->cs + (row + B) * H + j0, c, n);
        vstore_n(J->hs + (row + B) * H + j0, hnew, n);
        put_bf16(J, 0, row + B, j0, hnew, n, H);
        vstore_n(g, i, n);
        vstore_n(g + H, f, n);
        vstore_n(g + 2 * H, gg, n);
        vstore_n(g + 3 * H, o, n);
        vstore_n(g + 4 * H, tc, n);
    }
}

/* Step t (t = -1: only dh0, dc0): dh_t = d_out[t] + dxp_{t+1} W;
 * dc_t = dc_{t+1} f_{t+1} (dc_n at t = T-1) + dh_t o (1 - tanh^2 c_t), then the gates'. */
INLINE lstm_bwd_units(const job_t *J, int t, int b0, int nb, int p, const vf *acc, int np) {
    const int H = J->H, B = J->B, T = J->T, j0 = p * W, n = lanes(J, p), H4 = 4 * H;
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b, u = (size_t)(b0 + b) * H + j0;
        vf dh = acc ? acc[b * np] : vzero();
        if (t < 0) {
            vf f0 = vload_n(J->gates + (size_t)(b0 + b) * 5 * H + H + j0, n);
            vstore_n(J->dh0 + u, dh, n);
            vstore_n(J->dc0 + u, vload_n(J->dc_buf + u, n) * f0, n);
            continue;
        }
        vf d = dh + vload_n(J->d_out + row * H + j0, n);
        const float *g = J->gates + row * 5 * H + j0;
        vf i = vload_n(g, n), f = vload_n(g + H, n), gg = vload_n(g + 2 * H, n);
        vf o = vload_n(g + 3 * H, n), tc = vload_n(g + 4 * H, n);
        vf dc = vload_n(J->dc_buf + u, n);
        if (t < T - 1) dc = dc * vload_n(J->gates + (row + B) * 5 * H + H + j0, n); /* f_{t+1} */
        dc = dc + d * o * (1.0f - tc * tc);
        vstore_n(J->dc_buf + u, dc, n);
        vf cp = vload_n(J->cs + row * H + j0, n); /* c_{t-1} = cs[t] */
        vf di = dc * gg * (i * (1.0f - i));
        vf df = dc * cp * (f * (1.0f - f));
        vf dg = dc * i * (1.0f - gg * gg);
        vf dout = d * tc * (o * (1.0f - o));
        float *dx = J->dxp + row * H4 + j0;
        vstore_n(dx, di, n);
        vstore_n(dx + H, df, n);
        vstore_n(dx + 2 * H, dg, n);
        vstore_n(dx + 3 * H, dout, n);
        put_bf16(J, 0, row, j0, di, n, H4);
        put_bf16(J, 0, row, H + j0, df, n, H4);
        put_bf16(J, 0, row, 2 * H + j0, dg, n, H4);
        put_bf16(J, 0, row, 3 * H + j0, dout, n, H4);
    }
}

INLINE lstm_bwd_tile(const job_t *J, int t, int b0, int nb, int p, int np) {
    const int H4 = 4 * J->H;
    vf acc[RG * 2];
    const int mm = t < J->T - 1;
    size_t row1 = (size_t)(t + 1) * J->B + b0;
    if (mm) group_mm(acc, nb, np, NR1, 1, J, 0, p, J->dxp + row1 * H4, H4, row1, H4);
    for (int g = 0; g < np; g++) lstm_bwd_units(J, t, b0, nb, p + g, mm ? acc + g : NULL, np);
}

INLINE lstm_bwd_panels(const job_t *J, int t, int p, int np) {
    for (int r0 = 0; r0 < J->B; r0 += RG) lstm_bwd_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p, np);
}

static void lstm_fwd_rows(const job_t *J, int t, int p) {
    for (int r0 = 0; r0 < J->B; r0 += RG) lstm_fwd_tile(J, t, r0, J->B - r0 < RG ? J->B - r0 : RG, p);
}

static void *lstm_fwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J, task->tid, &p0, &p1);
    for (int p = p0; p < p1; p++) {
        pack_forward(J, 0, 0, 4, p);
        if (J->bf16) h_to_bf16(J, 0, 0, p);
    }
    if (J->bf16) barrier_wait(&J->barrier);
    for (int t = 0; t < J->T; t++) {
        for (int i = 0; i < p1 - p0; i++) lstm_fwd_rows(J, t, snake(i, p0, p1, t));
        barrier_wait(&J->barrier);
    }
    return NULL;
}

static void *lstm_bwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J, task->tid, &p0, &p1);
    const int H = J->H;
    pack_backward(J, 0, 0, 4 * H, p0, p1);
    for (int p = p0; p < p1; p++) /* the cell's carry starts as dL/dc_n (or 0) */
        for (int b = 0; b < J->B; b++)
            for (int l = 0; l < lanes(J, p); l++) {
                size_t u = (size_t)b * H + p * W + l;
                J->dc_buf[u] = J->dc_n ? J->dc_n[u] : 0.0f;
            }
    for (int t = J->T - 1; t >= -1; t--) {
        PANEL_PAIRS(lstm_bwd_panels, J, t, p0, p1)
        barrier_wait(&J->barrier);
    }
    return NULL;
}

/* ---------------------------------------------------------------- the exported API */

#if W == 16
const char *fedtext_rnn_variant(void) { return "avx512"; }
#elif W == 8
const char *fedtext_rnn_variant(void) { return "avx2"; }
#elif W == 4
const char *fedtext_rnn_variant(void) { return "neon"; }
#else
const char *fedtext_rnn_variant(void) { return "scalar"; }
#endif

int fedtext_rnn_version(void) { return 2; }

#if defined(FEDTEXT_OPENMP)
const char *fedtext_rnn_threading(void) { return "openmp"; }
#else
const char *fedtext_rnn_threading(void) { return "pthreads"; }
#endif

int fedtext_rnn_has_bf16(void) {
#if defined(FEDTEXT_BF16)
    return 1;
#else
    return 0;
#endif
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Bytes of workspace a call needs (64-byte aligned, reusable between calls): the weight
 * panels, the bf16 operand copies and the backward's (B, H) carries. */
size_t fedtext_rnn_workspace(int cell, int T, int B, int H, int bf16) {
    size_t NG = cell == LSTM ? 4 : 3, P = ((size_t)H + W - 1) / W;
    size_t pack = P * W * (NG * H + NG) * sizeof(float);
    size_t ab = bf16 ? 2 * ((size_t)T + 1) * B * (NG * H + 2) * sizeof(uint16_t) : 0;
    return align64(pack) + align64(ab) + 3 * align64((size_t)B * H * sizeof(float)) + 64;
}

/* Fill J's shape fields and carve the workspace. q-th panel set: G gates, or K rows. */
static int setup(job_t *J, int cell, int T, int B, int H, int bf16, void *work, int nthreads,
                 int backward) {
    if (T < 0 || B < 1 || H < 1) return -1;
#if !defined(FEDTEXT_BF16)
    if (bf16) return -2;
#endif
    J->cell = cell, J->T = T, J->B = B, J->H = H, J->bf16 = bf16;
    J->P = (H + W - 1) / W;
    J->nthreads = nthreads < 1 ? 1 : nthreads > J->P ? J->P : nthreads > 64 ? 64 : nthreads;
    size_t Hp = bf16 ? (size_t)even(H) : (size_t)H;
    int NG = cell == LSTM ? 4 : 3;
    if (!backward) { /* forward panels: G gates x H rows of k */
        int G0 = cell == GRU_RESET_BEFORE ? 2 : NG;
        J->psz[0] = (size_t)G0 * W * Hp;
        J->psz[1] = (size_t)W * Hp; /* reset_after=False: the n gate */
    } else if (cell == GRU_RESET_BEFORE) {
        J->psz[0] = (size_t)W * 2 * H; /* [dr, dz] W_rz */
        J->psz[1] = (size_t)W * Hp;    /* dn W_n */
    } else {
        J->psz[0] = (size_t)W * (bf16 ? even(NG * H) : NG * H);
        J->psz[1] = 0;
    }
    J->off[0] = 0;
    J->off[1] = J->P * J->psz[0];
    char *base = (char *)work;
    size_t pack_bytes = align64((size_t)J->P * W * ((size_t)NG * H + NG) * sizeof(float));
    J->pack = base;
    base += pack_bytes;
    /* bf16 operand copies: forward ab[0] = h rows (T+1), ab[1] = rh rows; backward ab[0] =
     * dG (or [dr, dz]) rows, ab[1] = dn rows. */
    J->ldab[0] = even(backward ? (cell == GRU_RESET_BEFORE ? 2 * H : NG * H) : H);
    J->ldab[1] = even(H);
    J->ab[0] = (uint16_t *)base;
    J->ab[1] = J->ab[0] + ((size_t)T + 1) * B * J->ldab[0];
    if (bf16) base += align64(2 * ((size_t)T + 1) * B * ((size_t)NG * H + 2) * sizeof(uint16_t));
    J->dh_buf = (float *)base;
    base += align64((size_t)B * H * sizeof(float));
    J->dc_buf = (float *)base;
    base += align64((size_t)B * H * sizeof(float));
    J->drh_buf = (float *)base;
    return 0;
}

/* hs[0] must hold h0. gates: (T, B, 4H). b_hh: (3H,) for reset_after=True, else unused. */
int fedtext_gru_forward(int reset_after, int bf16, int T, int B, int H, const float *xp,
                        const float *w_hh, const float *b_hh, float *hs, float *gates,
                        void *work, int nthreads) {
    job_t J = {0};
    int err = setup(&J, reset_after ? GRU_RESET_AFTER : GRU_RESET_BEFORE, T, B, H, bf16, work,
                    nthreads, 0);
    if (err) return err;
    J.xp = xp, J.w = w_hh, J.b = b_hh, J.hs = hs, J.gates = gates;
    run_threads(&J, gru_fwd_worker);
    return 0;
}

/* d_out (T, B, H) = dL/dhs[1:]. Writes dxp (T, B, 3H), dh0 (B, H) and, for reset_after=True,
 * dG (T, B, 3H) = dL/d(h W^T + b_hh) (reset_after=False: dG is dxp, pass NULL). */
int fedtext_gru_backward(int reset_after, int bf16, int T, int B, int H, const float *d_out,
                         const float *w_hh, const float *hs, const float *gates, float *dG,
                         float *dxp, float *dh0, void *work, int nthreads) {
    job_t J = {0};
    int err = setup(&J, reset_after ? GRU_RESET_AFTER : GRU_RESET_BEFORE, T, B, H, bf16, work,
                    nthreads, 1);
    if (err) return err;
    J.d_out = d_out, J.w = w_hh, J.hs = (float *)hs, J.gates = (float *)gates;
    J.dG = dG, J.dxp = dxp, J.dh0 = dh0;
    run_threads(&J, gru_bwd_worker);
    return 0;
}

/* hs[0], cs[0] must hold h0, c0. gates: (T, B, 5H). */
int fedtext_lstm_forward(int bf16, int T, int B, int H, const float *xp, const float *w_hh,
                         float *hs, float *cs, float *gates, void *work, int nthreads) {
    job_t J = {0};
    int err = setup(&J, LSTM, T, B, H, bf16, work, nthreads, 0);
    if (err) return err;
    J.xp = xp, J.w = w_hh, J.hs = hs, J.cs = cs, J.gates = gates;
    run_threads(&J, lstm_fwd_worker);
    return 0;
}

/* d_out (T, B, H) = dL/dhs[1:], dc_n (B, H) = dL/dc_T or NULL. Writes dxp (T, B, 4H) (which
 * is also dL/d(h W^T)), dh0 and dc0 (B, H). */
int fedtext_lstm_backward(int bf16, int T, int B, int H, const float *d_out, const float *dc_n,
                          const float *w_hh, const float *cs, const float *gates, float *dxp,
                          float *dh0, float *dc0, void *work, int nthreads) {
    job_t J = {0};
    int err = setup(&J, LSTM, T, B, H, bf16, work, nthreads, 1);
    if (err) return err;
    J.d_out = d_out, J.dc_n = dc_n, J.w = w_hh, J.cs = (float *)cs, J.gates = (float *)gates;
    J.dxp = dxp, J.dh0 = dh0, J.dc0 = dc0;
    run_threads(&J, lstm_bwd_worker);
    return 0;
}
