/* Which SIMD features this CPU (and its OS) supports, for choosing the kernel variant.
 *
 * Compiled with no -m flags, so it runs on any CPU of its architecture: the variants of
 * rnn_kernel.c are built with AVX-512 / AVX2 flags and must not be called on a CPU lacking
 * them (the compiler may use those instructions anywhere in such a build). On x86 the check is
 * __builtin_cpu_supports, which also checks that the OS saves the wide registers; on Linux
 * aarch64 it reads the kernel's hwcaps; on Apple silicon, sysctl.
 */
#if defined(__linux__) && defined(__aarch64__)
#include <sys/auxv.h>
#endif
#if defined(__APPLE__) && defined(__aarch64__)
#include <sys/sysctl.h>
#endif

/* Bits of fedtext_cpu_features(); fedtext/model/kernel.py names them (FEATURE_BITS). */
enum {
    F_AVX2 = 1 << 0,
    F_FMA = 1 << 1,
    F_AVX512F = 1 << 2,
    F_AVX512DQ = 1 << 3,
    F_AVX512BW = 1 << 4,
    F_AVX512VL = 1 << 5,
    F_AVX512BF16 = 1 << 6,
    F_NEON = 1 << 7,
    F_ARM_BF16 = 1 << 8,
};

int fedtext_cpu_features(void) {
    int f = 0;
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) f |= F_AVX2;
    if (__builtin_cpu_supports("fma")) f |= F_FMA;
    if (__builtin_cpu_supports("avx512f")) f |= F_AVX512F;
    if (__builtin_cpu_supports("avx512dq")) f |= F_AVX512DQ;
    if (__builtin_cpu_supports("avx512bw")) f |= F_AVX512BW;
    if (__builtin_cpu_supports("avx512vl")) f |= F_AVX512VL;
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
    (defined(__clang__) && __clang_major__ >= 12)
    if (__builtin_cpu_supports("avx512bf16")) f |= F_AVX512BF16;
#endif
#elif defined(__aarch64__)
    f |= F_NEON; /* Advanced SIMD is part of the base aarch64 ISA */
#if defined(__linux__) && defined(AT_HWCAP2)
    if (getauxval(AT_HWCAP2) & (1UL << 14)) f |= F_ARM_BF16; /* HWCAP2_BF16 */
#elif defined(__APPLE__)
    int v = 0;
    size_t n = sizeof v;
    if (sysctlbyname("hw.optional.arm.FEAT_BF16", &v, &n, 0, 0) == 0 && v) f |= F_ARM_BF16;
#endif
#endif
    return f;
}
