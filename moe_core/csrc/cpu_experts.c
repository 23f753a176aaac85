/* Routed experts for CPU inference on x86 with AVX-512: every expert of a layer in one call.
 *
 * A decode step sends a few tokens to each expert, so the work is reading expert weights; one oneDNN call per
 * expert reads them at about half the core's streaming bandwidth and pays a fixed cost per call. Here each
 * weight is packed so that a block of 64 output columns is one contiguous stream, read once for up to
 * MAX_TILE tokens.
 *
 * Two builds of this file: bf16 (the default; needs AVX512-BF16), whose vdpbf16ps sums two bf16 products into
 * each fp32 lane, so the weights go in k-pairs (K_STEP 2), and fp32 (-DEXPERTS_FP32; AVX512F), one fused
 * multiply-add per k (K_STEP 1). Both accumulate in fp32.
 *
 * Packed layout of a [N, K] weight (N outputs, K inputs, N % 64 == 0, K % K_STEP == 0):
 * [N/64][K/K_STEP][64][K_STEP], element (b, p, n, t) = W[64b + n, K_STEP p + t]. For gate_up the 64 columns of
 * block b are gate rows 32b..32b+31 then up rows 32b..32b+31, so one block yields 32 finished swiglu outputs.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 64
#define MAX_TILE 6

#ifdef EXPERTS_FP32
typedef float elem_t;   /* weights, activations and outputs */
typedef float xunit_t;  /* one k-step of an activation row */
typedef __m512 wvec_t;
#define K_STEP 1
#define ENTRY experts_fp32
#define ROUND(v) (v)
#define LOAD_W(p) _mm512_loadu_ps(p)
#define BROADCAST_X(x) _mm512_set1_ps(x)
#define MULADD(acc, w, xb) _mm512_fmadd_ps(w, xb, acc)
#define STORE16(dst, v) _mm512_storeu_ps(dst, v)
#else
typedef uint16_t elem_t;
typedef uint32_t xunit_t;  /* a pair of bf16 */
typedef __m512bh wvec_t;
#define K_STEP 2
#define ENTRY experts_bf16
/* fp32 -> bf16 -> fp32, rounding to nearest even as torch does (vcvtneps2bf16). */
static inline __m512 round_bf16(__m512 v) {
    __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
#define ROUND(v) round_bf16(v)
#define LOAD_W(p) ((__m512bh)_mm512_loadu_si512(p))
#define BROADCAST_X(x) ((__m512bh)_mm512_set1_epi32((int)(x)))
#define MULADD(acc, w, xb) _mm512_dpbf16_ps(acc, w, xb)
#define STORE16(dst, v) _mm256_storeu_si256((__m256i *)(dst), (__m256i)_mm512_cvtneps_pbh(v))
#endif
#define VEC (16 * K_STEP)  /* weight elements per 64-byte vector: 16 output columns x K_STEP */

/* exp(v) for v <= 0 to about 2 ulp: 2^n * p(r) with r = v - n ln2, Cephes' degree-6 polynomial. */
static inline __m512 exp_neg(__m512 v) {
    v = _mm512_max_ps(v, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(v, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), v);
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

/* dst[0..15] = silu(gate) * up with the reference's roundings: in bf16, gate, up and silu(gate) each rounded. */
static inline void swiglu16(elem_t *dst, __m512 gate, __m512 up) {
    __m512 g = ROUND(gate), u = ROUND(up);
    __m512 e = exp_neg(_mm512_min_ps(g, _mm512_sub_ps(_mm512_setzero_ps(), g)));  /* exp(-|g|) */
    __m512 one = _mm512_set1_ps(1.0f);
    /* sigmoid(g) = 1 / (1 + exp(-g)); for g < 0 that is e / (1 + e), without overflow */
    __m512 sig = _mm512_mask_div_ps(_mm512_div_ps(one, _mm512_add_ps(one, e)),
                                    _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ),
                                    e, _mm512_add_ps(one, e));
    STORE16(dst, _mm512_mul_ps(ROUND(_mm512_mul_ps(g, sig)), u));
}

/* acc[m][j] (m < tile, j < 4) = x[m] . block column 16j .. 16j+15, over K / K_STEP k-steps. */
static inline __attribute__((always_inline)) void dot_block(
    const xunit_t *x, int64_t x_stride, const elem_t *w, int64_t steps, int tile, __m512 acc[MAX_TILE][4]) {
    for (int m = 0; m < MAX_TILE; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < steps; p++) {
        const elem_t *wp = w + p * (K_STEP * BLOCK);
        wvec_t w0 = LOAD_W(wp), w1 = LOAD_W(wp + VEC), w2 = LOAD_W(wp + 2 * VEC), w3 = LOAD_W(wp + 3 * VEC);
        for (int m = 0; m < tile; m++) {
            wvec_t xb = BROADCAST_X(x[m * x_stride + p]);
            acc[m][0] = MULADD(acc[m][0], w0, xb);
            acc[m][1] = MULADD(acc[m][1], w1, xb);
            acc[m][2] = MULADD(acc[m][2], w2, xb);
            acc[m][3] = MULADD(acc[m][3], w3, xb);
        }
    }
}

/* The tile loop is specialised per tile height so the compiler keeps the accumulators in registers. */
#define TILE_CASES(BODY) \
    switch (tile) { case 1: BODY(1); break; case 2: BODY(2); break; case 3: BODY(3); break; \
                    case 4: BODY(4); break; case 5: BODY(5); break; default: BODY(6); break; }

/* One packed block of 64 columns for every row of one expert: in [rows, K] times the block. With swiglu (gate_up)
 * the block's 32 gate and 32 up columns become 32 outputs, else (down) its 64 columns are the outputs; out points
 * at the block's first output column of row 0, out_stride apart. */
static void block_rows(const elem_t *in, int64_t rows, int64_t K, const elem_t *w, int swiglu, elem_t *out,
                       int64_t out_stride) {
    __m512 acc[MAX_TILE][4];
    for (int64_t r = 0; r < rows; r += MAX_TILE) {
        int tile = rows - r < MAX_TILE ? (int)(rows - r) : MAX_TILE;
        const xunit_t *steps = (const xunit_t *)(in + r * K);
#define DOT(T) dot_block(steps, K / K_STEP, w, K / K_STEP, T, acc)
        TILE_CASES(DOT)
#undef DOT
        for (int m = 0; m < tile; m++) {
            elem_t *o = out + (r + m) * out_stride;
            if (swiglu) {
                swiglu16(o, acc[m][0], acc[m][2]);
                swiglu16(o + 16, acc[m][1], acc[m][3]);
            } else {
                for (int j = 0; j < 4; j++) STORE16(o + 16 * j, acc[m][j]);
            }
        }
    }
}

/* in [S, K] times each expert's packed weight (w_size elements apart, blocks of BLOCK x K), for the slots of each
 * expert, into out [S, out_stride], each block's outputs out_block columns apart. A work-sharing loop of the
 * enclosing parallel region; dynamic, because experts with no slots cost nothing and equal static shares of
 * (expert, block) would not balance. */
static void all_experts(const elem_t *in, const int64_t *offsets, int64_t E, int64_t K, int64_t blocks,
                        const elem_t *w, int64_t w_size, int swiglu, elem_t *out, int64_t out_stride,
                        int64_t out_block) {
#pragma omp for schedule(dynamic, 4) collapse(2)
    for (int64_t e = 0; e < E; e++)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t rows = offsets[e + 1] - offsets[e];
            if (rows)
                block_rows(in + offsets[e] * K, rows, K, w + e * w_size + b * BLOCK * K, swiglu,
                           out + offsets[e] * out_stride + b * out_block, out_stride);
        }
}

/* x [S, D] slots sorted by expert, offsets [E + 1] their boundaries; gate_up [E][F/32 blocks], down [E][D/64
 * blocks] packed as above; h [S, F] scratch; y [S, D] the output. */
void ENTRY(const elem_t *x, const int64_t *offsets, int64_t E, int64_t D, int64_t F, const elem_t *gate_up,
           const elem_t *down, elem_t *h, elem_t *y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        all_experts(x, offsets, E, D, F / 32, gate_up, 2 * F * D, 1, h, F, 32); /* the loop's barrier: h done */
        all_experts(h, offsets, E, F, D / BLOCK, down, D * F, 0, y, D, BLOCK);
    }
}
