/* Runs every entry point of fedtext/model/csrc/rnn_kernel.c on fixed pseudo-random inputs
 * and writes all outputs (float32) to argv[1]; argv[2] = 1 for bf16. Built once natively and
 * once for another architecture (run under qemu), the two outputs must agree: see
 * test_recurrences.py::test_neon_build_under_qemu. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

size_t fedtext_rnn_workspace(int cell, int T, int B, int H, int bf16);
int fedtext_gru_forward(int, int, int, int, int, const float *, const float *, const float *,
                        float *, float *, void *, int);
int fedtext_gru_backward(int, int, int, int, int, const float *, const float *, const float *,
                         const float *, float *, float *, float *, void *, int);
int fedtext_lstm_forward(int, int, int, int, const float *, const float *, float *, float *,
                         float *, void *, int);
int fedtext_lstm_backward(int, int, int, int, const float *, const float *, const float *,
                          const float *, const float *, float *, float *, float *, void *, int);

static uint64_t state = 88172645463325252ull;
static float rnd(void) { /* xorshift64: the same numbers on every machine */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (float)((state >> 11) * (1.0 / 9007199254740992.0)) * 2 - 1;
}
static float *arr(size_t n, float scale) {
    float *a = malloc(n * sizeof(float) + 64);
    for (size_t i = 0; i < n; i++) a[i] = rnd() * scale;
    return a;
}

int main(int argc, char **argv) {
    if (argc < 2) return 2;
    FILE *f = fopen(argv[1], "wb");
    int bf = argc > 2 ? atoi(argv[2]) : 0;
    int shapes[][3] = {{1, 1, 5}, {7, 3, 20}, {5, 13, 33}, {9, 8, 64}, {3, 2, 17}}; /* T B H */
    for (int si = 0; si < 5; si++) {
        int T = shapes[si][0], B = shapes[si][1], H = shapes[si][2];
        for (int cell = 0; cell < 3; cell++) { /* GRU reset_after, GRU reset_before, LSTM */
            int G = cell == 2 ? 4 : 3, NG = cell == 2 ? 5 : 4;
            size_t TBH = (size_t)T * B * H;
            float *xp = arr(TBH * G, 1), *w = arr((size_t)G * H * H, 1.0f / H), *b = arr(G * H, 1);
            float *hs = arr(TBH + B * H, 0.5f), *cs = arr(TBH + B * H, 0.5f);
            float *gates = arr(TBH * NG, 0), *d_out = arr(TBH, 1), *dcn = arr(B * H, 1);
            float *dG = arr(TBH * 3, 0), *dxp = arr(TBH * G, 0), *dh0 = arr(B * H, 0);
            float *dc0 = arr(B * H, 0);
            size_t ws = fedtext_rnn_workspace(cell, T, B, H, bf);
            void *work = aligned_alloc(64, (ws + 63) / 64 * 64);
            int rc;
            if (cell < 2) {
                rc = fedtext_gru_forward(cell == 0, bf, T, B, H, xp, w, b, hs, gates, work, 2);
                rc |= fedtext_gru_backward(cell == 0, bf, T, B, H, d_out, w, hs, gates,
                                           cell == 0 ? dG : NULL, dxp, dh0, work, 2);
            } else {
                rc = fedtext_lstm_forward(bf, T, B, H, xp, w, hs, cs, gates, work, 2);
                rc |= fedtext_lstm_backward(bf, T, B, H, d_out, dcn, w, cs, gates, dxp, dh0, dc0,
                                            work, 2);
            }
            if (rc) return 1;
            fwrite(hs, sizeof(float), TBH + B * H, f);
            if (cell == 2) fwrite(cs, sizeof(float), TBH + B * H, f);
            fwrite(gates, sizeof(float), TBH * NG, f);
            fwrite(dxp, sizeof(float), TBH * G, f);
            fwrite(dh0, sizeof(float), B * H, f);
            if (cell == 2) fwrite(dc0, sizeof(float), B * H, f);
            free(xp), free(w), free(b), free(hs), free(cs), free(gates), free(d_out), free(dcn);
            free(dG), free(dxp), free(dh0), free(dc0), free(work);
        }
    }
    return fclose(f) != 0;
}
