/* The GRU time loop (reset_after=True, float32) for CPUs with AVX-512.
 *
 * Plain C, no dependence on torch or Python: fedtext/gru_kernel.py compiles it with the system
 * C compiler on first use and calls it through ctypes with raw data pointers. Only the parts
 * that must run step by step live here; torch does the large matmuls before and after.
 *
 * Layouts (all row-major float32, gate order [r|z|n] as torch.nn.GRU):
 *   xp     (T, B, 3H)  input projections, b_ih included
 *   hs     (T+1, B, H) hidden states, hs[0] = h0
 *   gates  (T, B, 4H)  [r | z | n | hn] per step, hn = h W_hn^T + b_hn (kept for the backward)
 *   w_hh   (3H, H)     torch's weight_hh_l0
 *
 * Forward step:  g = h W_hh^T + b_hh;  r, z = sigmoid(x_r + g_r), sigmoid(x_z + g_z)
 *                n = tanh(x_n + r * g_n);  h' = n + z * (h - n)
 * Backward step (dh = dL/dh_t):  dn~ = dh (1-z)(1-n^2),  dz~ = dh (h_prev-n) z (1-z),
 *                dr~ = dn~ hn r (1-r);  dxp = [dr~, dz~, dn~];  dG = [dr~, dz~, dn~ r]
 *                dh_{t-1} = dh z + dG W_hh  (+ the output gradient at t-1)
 *
 * Work is split across threads by hidden units, 16 at a time (one AVX-512 vector). Weights are
 * re-arranged into per-thread panels so that one panel holds every weight the thread's units
 * need in the order the inner loop reads them:
 *   forward panel p:  for k in 0..H-1: [W_r[16p..16p+15, k] | W_z[...] | W_n[...]]  (48 floats)
 *     so the r, z and n pre-activations of the same 16 units end up in registers together
 *     and the gates are computed right there, with no second pass over memory;
 *   backward panel p: for j in 0..3H-1: W_hh[j, 16p..16p+15]  (16 floats)
 * Each thread packs its own panels, so packing needs no synchronisation. One barrier per time
 * step: a step needs every unit of the previous step.
 */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Callable on any x86-64 CPU: whether this CPU runs the AVX-512 code below. */
int fedtext_gru_cpu_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
}

int fedtext_gru_version(void) { return 1; }

#pragma GCC target("avx512f,avx512dq,fma")
#include <immintrin.h>

#define NR 8 /* rows (batch entries) per micro-kernel: 8 rows x 3 gates = 24 accumulators */

/* ---------------------------------------------------------------- vector math (float32) */

/* exp(x): Cody-Waite range reduction x = n ln2 + r, then a degree-6 polynomial for e^r
 * (the Cephes expf coefficients), scaled by 2^n. About 1 ulp. */
static inline __m512 v_exp(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 v_sigmoid(__m512 x) {
    __m512 one = _mm512_set1_ps(1.0f);
    return _mm512_div_ps(one, _mm512_add_ps(one, v_exp(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

/* tanh(x): an odd polynomial near 0 (no cancellation there), 1 - 2/(e^{2|x|}+1) elsewhere. */
static inline __m512 v_tanh(__m512 x) {
    __m512 ax = _mm512_abs_ps(x);
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 e = v_exp(_mm512_add_ps(ax, ax));
    __m512 big = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
    big = _mm512_castsi512_ps(_mm512_or_si512(
        _mm512_castps_si512(big),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u))));
    __m512 z = _mm512_mul_ps(x, x);
    __m512 p = _mm512_set1_ps(-5.70498872745e-3f);
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(2.06390887954e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-5.37397155531e-2f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.33314422036e-1f));
    p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(-3.33332819422e-1f));
    __m512 small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), x, x);
    __mmask16 is_small = _mm512_cmp_ps_mask(ax, _mm512_set1_ps(0.625f), _CMP_LT_OQ);
    return _mm512_mask_blend_ps(is_small, big, small);
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
        if (spins < 20000) _mm_pause(); else sched_yield();
    }
}

typedef struct {
    int T, B, H, nthreads;
    const float *xp, *w_hh, *b_hh, *d_out;
    float *hs, *gates, *pack, *dG, *dxp, *dh_buf, *dh0;
    barrier_t barrier;
    atomic_int go; /* start gate: 1 = run, -1 = abort (a thread could not be created) */
} job_t;

typedef struct {
    job_t *job;
    int tid;
    void *(*fn)(void *);
} task_t;

static void *gated(void *arg) {
    task_t *task = arg;
    int go;
    while ((go = atomic_load_explicit(&task->job->go, memory_order_acquire)) == 0) _mm_pause();
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

/* This thread's share of the 16-unit panels: [*p0, *p1). */
static void my_panels(int H, int nthreads, int tid, int *p0, int *p1) {
    int P = (H + 15) / 16;
    *p0 = (int)((long)P * tid / nthreads);
    *p1 = (int)((long)P * (tid + 1) / nthreads);
}

static inline __mmask16 lane_mask(int H, int j0) {
    int left = H - j0;
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

/* ---------------------------------------------------------------- forward */

static void pack_forward(const float *w, int H, int p, float *panel) {
    /* panel[k*48 + g*16 + l] = w[(g*H + 16p + l)*H + k], zero beyond H */
    for (int g = 0; g < 3; g++)
        for (int l = 0; l < 16; l++) {
            int j = 16 * p + l;
            if (j < H) {
                const float *row = w + ((size_t)g * H + j) * H;
                for (int k = 0; k < H; k++) panel[(size_t)k * 48 + g * 16 + l] = row[k];
            } else {
                for (int k = 0; k < H; k++) panel[(size_t)k * 48 + g * 16 + l] = 0.0f;
            }
        }
}

/* One time step for rows [b0, b0+nb) and the 16 units of one panel. */
static inline __attribute__((always_inline)) void fwd_tile(const job_t *J, int t, int b0, int nb,
                                                           int p, const float *panel) {
    const int H = J->H, B = J->B, j0 = 16 * p;
    const float *h = J->hs + ((size_t)t * B + b0) * H; /* h_{t-1} rows */
    __m512 ar[NR], az[NR], an[NR];
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) ar[b] = az[b] = an[b] = _mm512_setzero_ps();
    for (int k = 0; k < H; k++) {
        const float *w = panel + (size_t)k * 48;
        __m512 wr = _mm512_load_ps(w), wz = _mm512_load_ps(w + 16), wn = _mm512_load_ps(w + 32);
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) {
            __m512 hb = _mm512_set1_ps(h[(size_t)b * H + k]);
            ar[b] = _mm512_fmadd_ps(hb, wr, ar[b]);
            az[b] = _mm512_fmadd_ps(hb, wz, az[b]);
            an[b] = _mm512_fmadd_ps(hb, wn, an[b]);
        }
    }
    __mmask16 m = lane_mask(H, j0);
    __m512 bhr = _mm512_maskz_loadu_ps(m, J->b_hh + j0);
    __m512 bhz = _mm512_maskz_loadu_ps(m, J->b_hh + H + j0);
    __m512 bhn = _mm512_maskz_loadu_ps(m, J->b_hh + 2 * H + j0);
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b;
        const float *x = J->xp + row * 3 * H + j0;
        float *g = J->gates + row * 4 * H + j0;
        __m512 r = v_sigmoid(_mm512_add_ps(_mm512_maskz_loadu_ps(m, x), _mm512_add_ps(ar[b], bhr)));
        __m512 z = v_sigmoid(_mm512_add_ps(_mm512_maskz_loadu_ps(m, x + H), _mm512_add_ps(az[b], bhz)));
        __m512 hn = _mm512_add_ps(an[b], bhn);
        __m512 n = v_tanh(_mm512_fmadd_ps(r, hn, _mm512_maskz_loadu_ps(m, x + 2 * H)));
        __m512 hp = _mm512_maskz_loadu_ps(m, h + (size_t)b * H + j0);
        __m512 hnew = _mm512_fmadd_ps(z, _mm512_sub_ps(hp, n), n);
        _mm512_mask_storeu_ps(J->hs + (row + B) * H + j0, m, hnew);
        _mm512_mask_storeu_ps(g, m, r);
        _mm512_mask_storeu_ps(g + H, m, z);
        _mm512_mask_storeu_ps(g + 2 * H, m, n);
        _mm512_mask_storeu_ps(g + 3 * H, m, hn);
    }
}

static void fwd_rows(const job_t *J, int t, int p, const float *panel) {
    for (int b0 = 0; b0 < J->B; b0 += NR) {
        int nb = J->B - b0 < NR ? J->B - b0 : NR;
        switch (nb) { /* constant nb: the accumulators stay in registers */
        case 8: fwd_tile(J, t, b0, 8, p, panel); break;
        case 7: fwd_tile(J, t, b0, 7, p, panel); break;
        case 6: fwd_tile(J, t, b0, 6, p, panel); break;
        case 5: fwd_tile(J, t, b0, 5, p, panel); break;
        case 4: fwd_tile(J, t, b0, 4, p, panel); break;
        case 3: fwd_tile(J, t, b0, 3, p, panel); break;
        case 2: fwd_tile(J, t, b0, 2, p, panel); break;
        default: fwd_tile(J, t, b0, 1, p, panel); break;
        }
    }
}

static void *fwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J->H, J->nthreads, task->tid, &p0, &p1);
    size_t panel_size = (size_t)J->H * 48;
    for (int p = p0; p < p1; p++) pack_forward(J->w_hh, J->H, p, J->pack + p * panel_size);
    for (int t = 0; t < J->T; t++) {
        for (int p = p0; p < p1; p++) fwd_rows(J, t, p, J->pack + p * panel_size);
        barrier_wait(&J->barrier);
    }
    return NULL;
}

/* hs[0] must hold h0. pack: ceil(H/16)*H*48 floats, 64-byte aligned. */
int fedtext_gru_forward(int T, int B, int H, const float *xp, const float *w_hh,
                        const float *b_hh, float *hs, float *gates, float *pack, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int P = (H + 15) / 16;
    if (nthreads > P) nthreads = P;
    if (nthreads > 64) nthreads = 64;
    job_t J = {.T = T, .B = B, .H = H, .nthreads = nthreads, .xp = xp, .w_hh = w_hh,
               .b_hh = b_hh, .hs = hs, .gates = gates, .pack = pack};
    atomic_init(&J.barrier.count, 0);
    atomic_init(&J.barrier.phase, 0);
    J.barrier.n = nthreads;
    run_threads(&J, fwd_worker);
    return 0;
}

/* ---------------------------------------------------------------- backward */

static void pack_backward(const float *w, int H, int p, float *panel) {
    /* panel[j*16 + l] = w[j*H + 16p + l], zero beyond H */
    int k0 = 16 * p, n = H - k0 < 16 ? H - k0 : 16;
    for (int j = 0; j < 3 * H; j++) {
        float *dst = panel + (size_t)j * 16;
        memcpy(dst, w + (size_t)j * H + k0, (size_t)n * sizeof(float));
        for (int l = n; l < 16; l++) dst[l] = 0.0f;
    }
}

/* Step t of the backward for rows [b0, b0+nb) and the 16 units of panel p:
 * dh_t = d_out[t] + (t < T-1 ? dh_{t+1} z_{t+1} + dG_{t+1} W_hh : 0), then the gate gradients.
 * With t == -1 it only finishes dh0. */
static inline __attribute__((always_inline)) void bwd_tile(const job_t *J, int t, int b0, int nb,
                                                           int p, const float *panel) {
    const int H = J->H, B = J->B, T = J->T, j0 = 16 * p, H3 = 3 * H;
    __mmask16 m = lane_mask(H, j0);
    __m512 dh[NR];
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) dh[b] = _mm512_setzero_ps();
    if (t < T - 1) {
        /* dG_{t+1} W_hh for this panel's 16 columns; two accumulator sets for more ILP. */
        const float *dG = J->dG + ((size_t)(t + 1) * B + b0) * H3;
        __m512 a0[NR], a1[NR];
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) a0[b] = a1[b] = _mm512_setzero_ps();
        int j = 0;
        for (; j + 1 < H3; j += 2) {
            __m512 w0 = _mm512_load_ps(panel + (size_t)j * 16);
            __m512 w1 = _mm512_load_ps(panel + (size_t)(j + 1) * 16);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++) {
                a0[b] = _mm512_fmadd_ps(_mm512_set1_ps(dG[(size_t)b * H3 + j]), w0, a0[b]);
                a1[b] = _mm512_fmadd_ps(_mm512_set1_ps(dG[(size_t)b * H3 + j + 1]), w1, a1[b]);
            }
        }
        if (j < H3) { /* odd 3H */
            __m512 w0 = _mm512_load_ps(panel + (size_t)j * 16);
#pragma GCC unroll 8
            for (int b = 0; b < nb; b++)
                a0[b] = _mm512_fmadd_ps(_mm512_set1_ps(dG[(size_t)b * H3 + j]), w0, a0[b]);
        }
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) {
            size_t row = (size_t)(t + 1) * B + b0 + b;
            __m512 z1 = _mm512_maskz_loadu_ps(m, J->gates + row * 4 * H + H + j0);
            __m512 dh1 = _mm512_maskz_loadu_ps(m, J->dh_buf + (size_t)(b0 + b) * H + j0);
            dh[b] = _mm512_fmadd_ps(dh1, z1, _mm512_add_ps(a0[b], a1[b]));
        }
    }
    if (t < 0) {
#pragma GCC unroll 8
        for (int b = 0; b < nb; b++) _mm512_mask_storeu_ps(J->dh0 + (size_t)(b0 + b) * H + j0, m, dh[b]);
        return;
    }
    __m512 one = _mm512_set1_ps(1.0f);
#pragma GCC unroll 8
    for (int b = 0; b < nb; b++) {
        size_t row = (size_t)t * B + b0 + b;
        __m512 d = _mm512_add_ps(dh[b], _mm512_maskz_loadu_ps(m, J->d_out + row * H + j0));
        _mm512_mask_storeu_ps(J->dh_buf + (size_t)(b0 + b) * H + j0, m, d);
        const float *g = J->gates + row * 4 * H + j0;
        __m512 r = _mm512_maskz_loadu_ps(m, g), z = _mm512_maskz_loadu_ps(m, g + H);
        __m512 n = _mm512_maskz_loadu_ps(m, g + 2 * H), hn = _mm512_maskz_loadu_ps(m, g + 3 * H);
        __m512 hp = _mm512_maskz_loadu_ps(m, J->hs + row * H + j0); /* h_{t-1} = hs[t] */
        __m512 dn = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(one, z)),
                                  _mm512_fnmadd_ps(n, n, one));
        __m512 dz = _mm512_mul_ps(_mm512_mul_ps(d, _mm512_sub_ps(hp, n)),
                                  _mm512_mul_ps(z, _mm512_sub_ps(one, z)));
        __m512 dr = _mm512_mul_ps(_mm512_mul_ps(dn, hn), _mm512_mul_ps(r, _mm512_sub_ps(one, r)));
        float *dx = J->dxp + row * H3 + j0;
        float *dg = J->dG + row * H3 + j0;
        _mm512_mask_storeu_ps(dx, m, dr);
        _mm512_mask_storeu_ps(dx + H, m, dz);
        _mm512_mask_storeu_ps(dx + 2 * H, m, dn);
        _mm512_mask_storeu_ps(dg, m, dr);
        _mm512_mask_storeu_ps(dg + H, m, dz);
        _mm512_mask_storeu_ps(dg + 2 * H, m, _mm512_mul_ps(dn, r));
    }
}

static void bwd_rows(const job_t *J, int t, int p, const float *panel) {
    for (int b0 = 0; b0 < J->B; b0 += NR) {
        int nb = J->B - b0 < NR ? J->B - b0 : NR;
        switch (nb) {
        case 8: bwd_tile(J, t, b0, 8, p, panel); break;
        case 7: bwd_tile(J, t, b0, 7, p, panel); break;
        case 6: bwd_tile(J, t, b0, 6, p, panel); break;
        case 5: bwd_tile(J, t, b0, 5, p, panel); break;
        case 4: bwd_tile(J, t, b0, 4, p, panel); break;
        case 3: bwd_tile(J, t, b0, 3, p, panel); break;
        case 2: bwd_tile(J, t, b0, 2, p, panel); break;
        default: bwd_tile(J, t, b0, 1, p, panel); break;
        }
    }
}

static void *bwd_worker(void *arg) {
    task_t *task = arg;
    job_t *J = task->job;
    int p0, p1;
    my_panels(J->H, J->nthreads, task->tid, &p0, &p1);
    size_t panel_size = (size_t)J->H * 48; /* = 3H * 16 */
    for (int p = p0; p < p1; p++) pack_backward(J->w_hh, J->H, p, J->pack + p * panel_size);
    for (int t = J->T - 1; t >= -1; t--) {
        for (int p = p0; p < p1; p++) bwd_rows(J, t, p, J->pack + p * panel_size);
        barrier_wait(&J->barrier);
    }
    return NULL;
}

/* d_out (T,B,H): dL/dhs[1:]. Writes dG, dxp (T,B,3H) and dh0 (B,H); dh_buf (B,H) is scratch. */
int fedtext_gru_backward(int T, int B, int H, const float *d_out, const float *w_hh,
                         const float *hs, const float *gates, float *dG, float *dxp,
                         float *dh0, float *dh_buf, float *pack, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    int P = (H + 15) / 16;
    if (nthreads > P) nthreads = P;
    if (nthreads > 64) nthreads = 64;
    job_t J = {.T = T, .B = B, .H = H, .nthreads = nthreads, .w_hh = w_hh, .d_out = d_out,
               .hs = (float *)hs, .gates = (float *)gates, .pack = pack, .dG = dG, .dxp = dxp,
               .dh_buf = dh_buf, .dh0 = dh0};
    atomic_init(&J.barrier.count, 0);
    atomic_init(&J.barrier.phase, 0);
    J.barrier.n = nthreads;
    run_threads(&J, bwd_worker);
    return 0;
}
