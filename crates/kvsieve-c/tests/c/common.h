/* Helpers shared by the C test programs: check counters, error expectations, random data,
 * float16/bfloat16 conversion, tensor descriptors and a plain double-precision attention
 * reference. Everything is static inline so each program compiles it on its own. */
#ifndef KVSIEVE_TEST_COMMON_H
#define KVSIEVE_TEST_COMMON_H

#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kvsieve.h"

static int g_passed = 0;
static int g_failed = 0;

static inline void check_at(int ok, const char *file, int line, const char *fmt, ...) {
    if (ok) {
        g_passed++;
        return;
    }
    g_failed++;
    printf("FAIL %s:%d: ", file, line);
    va_list ap;
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
}

/** Count a check; print the formatted description if it fails. */
#define CHECK(cond, ...) check_at((cond) ? 1 : 0, __FILE__, __LINE__, __VA_ARGS__)

/** Expect success; on failure print the error's message. Frees the error. */
#define EXPECT_OK(call) expect_ok_at((call), #call, __FILE__, __LINE__)

/** Expect an error with `code` whose message contains `needle`. Frees the error. */
#define EXPECT_ERR(call, code, needle) expect_err_at((call), (code), (needle), #call, __FILE__, __LINE__)

static inline int expect_ok_at(kvsieve_error_t *err, const char *what, const char *file, int line) {
    if (err == NULL) {
        g_passed++;
        return 1;
    }
    g_failed++;
    printf("FAIL %s:%d: %s: unexpected error %s: %s\n", file, line, what, kvsieve_error_code_name(kvsieve_error_code(err)),
           kvsieve_error_message(err));
    kvsieve_error_free(err);
    return 0;
}

static inline int expect_err_at(kvsieve_error_t *err, kvsieve_error_code_t code, const char *needle, const char *what,
                                const char *file, int line) {
    if (err == NULL) {
        g_failed++;
        printf("FAIL %s:%d: %s: succeeded, expected error %s\n", file, line, what, kvsieve_error_code_name(code));
        return 0;
    }
    kvsieve_error_code_t got = kvsieve_error_code(err);
    const char *msg = kvsieve_error_message(err);
    int ok = got == code && strstr(msg, needle) != NULL;
    if (ok) {
        g_passed++;
        printf("  expected error [%s] %s\n", kvsieve_error_code_name(got), msg);
    } else {
        g_failed++;
        printf("FAIL %s:%d: %s: got [%s] \"%s\", expected [%s] containing \"%s\"\n", file, line, what,
               kvsieve_error_code_name(got), msg, kvsieve_error_code_name(code), needle);
    }
    kvsieve_error_free(err);
    return ok;
}

/** Print the section result line the Rust harness looks for. */
static inline void section_done(const char *name, int failed_before) {
    if (g_failed == failed_before) {
        printf("ok - %s\n", name);
    } else {
        printf("not ok - %s\n", name);
    }
}

/** Print the final summary line; the process exit status. */
static inline int finish(void) {
    printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed == 0 ? 0 : 1;
}

/* Random data -------------------------------------------------------------------------- */

static inline uint64_t *rng_state(void) {
    static uint64_t state = 0x2545F4914F6CDD1DULL;
    return &state;
}

static inline void rng_seed(uint64_t seed) { *rng_state() = seed; }

/** SplitMix64. */
static inline uint64_t rng_next(void) {
    uint64_t z = (*rng_state() += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/** Uniform in [-scale, scale). */
static inline float rng_uniform(float scale) {
    return ((float)(rng_next() >> 40) / 16777216.0f * 2.0f - 1.0f) * scale;
}

static inline float *rand_floats(size_t n, float scale) {
    float *p = (float *)malloc(n * sizeof(float) + 1);
    for (size_t i = 0; i < n; i++) p[i] = rng_uniform(scale);
    return p;
}

static inline float *nan_floats(size_t n) {
    float *p = (float *)malloc(n * sizeof(float) + 1);
    for (size_t i = 0; i < n; i++) p[i] = NAN;
    return p;
}

/* float16 / bfloat16 ------------------------------------------------------------------- */

static inline uint16_t f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t e = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (e == 0xffu) return (uint16_t)(sign | 0x7c00u | (mant ? 0x200u : 0u));
    int32_t exp = (int32_t)e - 127 + 15;
    if (exp >= 31) return (uint16_t)(sign | 0x7c00u);
    if (exp <= 0) {
        if (exp < -10) return (uint16_t)sign;
        mant |= 0x800000u;
        uint32_t shift = (uint32_t)(14 - exp);
        uint32_t half = mant >> shift;
        uint32_t rem = mant & ((1u << shift) - 1u);
        uint32_t mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half & 1u))) half++;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) half++;
    return (uint16_t)half;
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t x;
    if (exp == 0) {
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    } else if (exp == 31) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((exp - 15u + 127u) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;
    x += 0x7fffu + ((x >> 16) & 1u);
    return (uint16_t)(x >> 16);
}

static inline float bf16_to_f32(uint16_t b) {
    uint32_t x = (uint32_t)b << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/** Round every value to what a float16 can hold. */
static inline void round_f16(float *p, size_t n) {
    for (size_t i = 0; i < n; i++) p[i] = f16_to_f32(f32_to_f16(p[i]));
}

static inline uint16_t *to_f16(const float *p, size_t n) {
    uint16_t *h = (uint16_t *)malloc(n * 2 + 1);
    for (size_t i = 0; i < n; i++) h[i] = f32_to_f16(p[i]);
    return h;
}

static inline uint16_t *to_bf16(const float *p, size_t n) {
    uint16_t *h = (uint16_t *)malloc(n * 2 + 1);
    for (size_t i = 0; i < n; i++) h[i] = f32_to_bf16(p[i]);
    return h;
}

/* Tensors ------------------------------------------------------------------------------ */

/** A tensor descriptor together with the shape and stride arrays it points to. */
typedef struct {
    kvsieve_tensor_t t;
    int64_t shape[4];
    int64_t strides[4];
} test_tensor;

static inline kvsieve_dtype_t dtype_of(uint8_t code, uint8_t bits) {
    kvsieve_dtype_t d;
    d.code = code;
    d.bits = bits;
    d.lanes = 1;
    return d;
}

static inline kvsieve_dtype_t dt_f32(void) { return dtype_of(KVSIEVE_DTYPE_CODE_FLOAT, 32); }
static inline kvsieve_dtype_t dt_f16(void) { return dtype_of(KVSIEVE_DTYPE_CODE_FLOAT, 16); }
static inline kvsieve_dtype_t dt_bf16(void) { return dtype_of(KVSIEVE_DTYPE_CODE_BFLOAT, 16); }

/** A contiguous 3-D host tensor `[a, b, c]` over `data`. Returns `&tt->t`. */
static inline const kvsieve_tensor_t *tensor3(test_tensor *tt, void *data, kvsieve_dtype_t dtype, int64_t a, int64_t b,
                                              int64_t c) {
    memset(tt, 0, sizeof *tt);
    tt->shape[0] = a;
    tt->shape[1] = b;
    tt->shape[2] = c;
    tt->t.data = data;
    tt->t.device.device_type = KVSIEVE_DEVICE_CPU;
    tt->t.device.device_id = 0;
    tt->t.ndim = 3;
    tt->t.dtype = dtype;
    tt->t.shape = tt->shape;
    tt->t.strides = NULL;
    tt->t.byte_offset = 0;
    return &tt->t;
}

/** Give a tensor explicit strides (in elements). */
static inline void set_strides3(test_tensor *tt, int64_t s0, int64_t s1, int64_t s2) {
    tt->strides[0] = s0;
    tt->strides[1] = s1;
    tt->strides[2] = s2;
    tt->t.strides = tt->strides;
}

/** Initialise `n` window entries to "no window". */
static inline void init_windows(kvsieve_streaming_window_t *w, size_t n) {
    for (size_t i = 0; i < n; i++) kvsieve_streaming_window_init(&w[i]);
}

/* Reference ---------------------------------------------------------------------------- */

/**
 * Attention of one query token, in double precision.
 * q: [hq][d]; k, v: token-major [n][hk][d]; the first `n_visible` tokens are attended.
 * scale 0 means 1/sqrt(d); soft_cap 0 means off. out: [hq][d]; lse: [hq].
 */
static inline void ref_attention(const float *q, const float *k, const float *v, size_t n_visible, size_t hq, size_t hk,
                                 size_t d, double scale, double soft_cap, float *out, float *lse) {
    size_t group = hq / hk;
    if (scale == 0.0) scale = 1.0 / sqrt((double)d);
    double *s = (double *)malloc((n_visible + 1) * sizeof(double));
    double *acc = (double *)malloc(d * sizeof(double));
    for (size_t h = 0; h < hq; h++) {
        size_t kh = h / group;
        double m = -INFINITY;
        for (size_t t = 0; t < n_visible; t++) {
            double dot = 0.0;
            for (size_t c = 0; c < d; c++) dot += (double)q[h * d + c] * (double)k[(t * hk + kh) * d + c];
            dot *= scale;
            if (soft_cap > 0.0) dot = soft_cap * tanh(dot / soft_cap);
            s[t] = dot;
            if (dot > m) m = dot;
        }
        double sum = 0.0;
        for (size_t c = 0; c < d; c++) acc[c] = 0.0;
        for (size_t t = 0; t < n_visible; t++) {
            double w = exp(s[t] - m);
            sum += w;
            for (size_t c = 0; c < d; c++) acc[c] += w * (double)v[(t * hk + kh) * d + c];
        }
        for (size_t c = 0; c < d; c++) out[h * d + c] = n_visible ? (float)(acc[c] / sum) : 0.0f;
        lse[h] = n_visible ? (float)(m + log(sum)) : -INFINITY;
    }
    free(s);
    free(acc);
}

/** Largest |a - b| over n values (NaN counts as infinite; equal infinities as 0). */
static inline double max_abs_diff(const float *a, const float *b, size_t n) {
    double worst = 0.0;
    for (size_t i = 0; i < n; i++) {
        double e;
        if (isinf(a[i]) && isinf(b[i]) && (a[i] > 0) == (b[i] > 0)) {
            e = 0.0;
        } else {
            e = fabs((double)a[i] - (double)b[i]);
            if (e != e) e = INFINITY;
        }
        if (e > worst) worst = e;
    }
    return worst;
}

/** Rotate one head vector (RoPE) by `position`, in double precision from the float32
 *  inverse frequencies kvsieve uses. style: a kvsieve_rope_style_t value. */
static inline void ref_rope(float *x, size_t d, double position, double theta, uint32_t style) {
    size_t half = d / 2;
    for (size_t i = 0; i < half; i++) {
        double freq = (double)(float)pow(theta, -2.0 * (double)i / (double)d);
        double ang = position * freq;
        size_t a = style == KVSIEVE_ROPE_HALF_SPLIT ? i : 2 * i;
        size_t b = style == KVSIEVE_ROPE_HALF_SPLIT ? i + half : 2 * i + 1;
        double xa = x[a], xb = x[b];
        x[a] = (float)(xa * cos(ang) - xb * sin(ang));
        x[b] = (float)(xa * sin(ang) + xb * cos(ang));
    }
}

/**
 * Attention of one pre-RoPE query token over pre-RoPE keys: for key t, the query is rotated
 * by q_pos[t] and the key by k_pos[t] (RoPE theta 10000, `style`), then as ref_attention.
 */
static inline void ref_attention_rope(const float *q, const float *k, const float *v, size_t n_visible, size_t hq,
                                      size_t hk, size_t d, const double *q_pos, const double *k_pos, uint32_t style,
                                      float *out, float *lse) {
    size_t group = hq / hk;
    double scale = 1.0 / sqrt((double)d);
    double *s = (double *)malloc((n_visible + 1) * sizeof(double));
    float *qr = (float *)malloc(d * sizeof(float)), *kr = (float *)malloc(d * sizeof(float));
    for (size_t h = 0; h < hq; h++) {
        size_t kh = h / group;
        double m = -INFINITY, sum = 0.0;
        for (size_t t = 0; t < n_visible; t++) {
            double dot = 0.0;
            memcpy(qr, q + h * d, d * sizeof(float));
            memcpy(kr, k + (t * hk + kh) * d, d * sizeof(float));
            ref_rope(qr, d, q_pos[t], 10000.0, style);
            ref_rope(kr, d, k_pos[t], 10000.0, style);
            for (size_t c = 0; c < d; c++) dot += (double)qr[c] * (double)kr[c];
            s[t] = dot * scale;
            if (s[t] > m) m = s[t];
        }
        for (size_t c = 0; c < d; c++) out[h * d + c] = 0.0f;
        for (size_t t = 0; t < n_visible; t++) sum += exp(s[t] - m);
        for (size_t t = 0; t < n_visible; t++) {
            double w = exp(s[t] - m) / sum;
            for (size_t c = 0; c < d; c++) out[h * d + c] += (float)(w * (double)v[(t * hk + kh) * d + c]);
        }
        lse[h] = n_visible ? (float)(m + log(sum)) : -INFINITY;
    }
    free(s);
    free(qr);
    free(kr);
}

/**
 * Attention of one query token over per-KV-head token lists, in double precision.
 * q: [hq][d]; k, v: token-major [n][hk][d] for the whole sequence. KV head kh reads the
 * tokens `indices[head_indptr[kh] .. head_indptr[kh+1]]` that are at most `q_token`; with
 * `windows` (NULL or hk entries) and `windows[kh].window > 0`, only those with
 * `t < sinks` or `q_token - t < window`. scale 1/sqrt(d). out: [hq][d]; lse: [hq].
 */
static inline void ref_attention_sel(const float *q, const float *k, const float *v, size_t hq, size_t hk, size_t d,
                                     const uint32_t *head_indptr, const uint32_t *indices, size_t q_token,
                                     const kvsieve_streaming_window_t *windows, float *out, float *lse) {
    size_t group = hq / hk, h, i, c;
    double scale = 1.0 / sqrt((double)d);
    for (h = 0; h < hq; h++) {
        size_t kh = h / group, n = 0;
        size_t start = head_indptr[kh], end = head_indptr[kh + 1];
        double *s = (double *)malloc((end - start + 1) * sizeof(double));
        size_t *tok = (size_t *)malloc((end - start + 1) * sizeof(size_t));
        double m = -INFINITY, sum = 0.0;
        for (i = start; i < end; i++) {
            size_t t = indices[i];
            double dot = 0.0;
            if (t > q_token) continue;
            if (windows && windows[kh].window > 0 && !(t < windows[kh].sinks || q_token - t < windows[kh].window)) continue;
            for (c = 0; c < d; c++) dot += (double)q[h * d + c] * (double)k[(t * hk + kh) * d + c];
            s[n] = dot * scale;
            tok[n++] = t;
            if (dot * scale > m) m = dot * scale;
        }
        for (c = 0; c < d; c++) out[h * d + c] = 0.0f;
        for (i = 0; i < n; i++) sum += exp(s[i] - m);
        for (c = 0; c < d; c++) {
            double acc = 0.0;
            for (i = 0; i < n; i++) acc += exp(s[i] - m) / sum * (double)v[(tok[i] * hk + kh) * d + c];
            out[h * d + c] = n ? (float)acc : 0.0f;
        }
        lse[h] = n ? (float)(m + log(sum)) : -INFINITY;
        free(s);
        free(tok);
    }
}

/** Sorted random subset of 0..n-1, each token kept with probability `p`; returns its size. */
static inline size_t rand_subset(uint32_t *out, size_t n, double p) {
    size_t t, m = 0;
    for (t = 0; t < n; t++) {
        if ((double)(rng_next() >> 11) / 9007199254740992.0 < p) out[m++] = (uint32_t)t;
    }
    return m;
}

#endif /* KVSIEVE_TEST_COMMON_H */
