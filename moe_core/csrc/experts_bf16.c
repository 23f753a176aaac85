/* Routed experts for bf16 inference on x86 CPUs with AVX512-BF16: every expert of a layer in one call.
 *
 * A decode step sends a few tokens to each expert, so the work is reading expert weights; one oneDNN call per
 * expert reads them at about half the core's streaming bandwidth and pays a fixed cost per call. Here each
 * weight is packed so that a block of 64 output columns is one contiguous stream, read once for up to
 * MAX_TILE tokens, and multiplied with vdpbf16ps (two bf16 products summed into fp32 per lane).
 *
 * Packed layout of a [N, K] weight (N outputs, K inputs, N % 64 == 0, K even): [N/64][K/2][64][2], element
 * (b, p, n, t) = W[64b + n, 2p + t]. For gate_up the 64 columns of block b are gate rows 32b..32b+31 then
 * up rows 32b..32b+31, so one block yields 32 finished swiglu outputs.
 */
#include <immintrin.h>
#include <stdint.h>

#define BLOCK 64
#define MAX_TILE 6

/* fp32 -> bf16 -> fp32, rounding to nearest even as torch does (vcvtneps2bf16). */
static inline __m512 round_bf16(__m512 v) {
    __m256i b = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

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

/* silu(gate) * up with the reference's roundings: gate, up and silu(gate) each in bf16. */
static inline __m256bh swiglu16(__m512 gate, __m512 up) {
    __m512 g = round_bf16(gate), u = round_bf16(up);
    __m512 e = exp_neg(_mm512_min_ps(g, _mm512_sub_ps(_mm512_setzero_ps(), g)));  /* exp(-|g|) */
    __m512 one = _mm512_set1_ps(1.0f);
    /* sigmoid(g) = 1 / (1 + exp(-g)); for g < 0 that is e / (1 + e), without overflow */
    __m512 sig = _mm512_mask_div_ps(_mm512_div_ps(one, _mm512_add_ps(one, e)),
                                    _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ),
                                    e, _mm512_add_ps(one, e));
    return _mm512_cvtneps_pbh(_mm512_mul_ps(round_bf16(_mm512_mul_ps(g, sig)), u));
}

/* acc[m][j] (m < tile, j < 4) = x[m] . block column 16j .. 16j+15, for K/2 k-pairs. */
static inline __attribute__((always_inline)) void dot_block(
    const uint32_t *x, int64_t x_stride, const uint16_t *w, int64_t pairs, int tile, __m512 acc[MAX_TILE][4]) {
    for (int m = 0; m < MAX_TILE; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const uint16_t *wp = w + p * (2 * BLOCK);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(wp), w1 = (__m512bh)_mm512_loadu_si512(wp + 32);
        __m512bh w2 = (__m512bh)_mm512_loadu_si512(wp + 64), w3 = (__m512bh)_mm512_loadu_si512(wp + 96);
        for (int m = 0; m < tile; m++) {
            __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[m * x_stride + p]);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w0, xb);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w1, xb);
            acc[m][2] = _mm512_dpbf16_ps(acc[m][2], w2, xb);
            acc[m][3] = _mm512_dpbf16_ps(acc[m][3], w3, xb);
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
static void block_rows(const uint16_t *in, int64_t rows, int64_t K, const uint16_t *w, int swiglu, uint16_t *out,
                       int64_t out_stride) {
    __m512 acc[MAX_TILE][4];
    for (int64_t r = 0; r < rows; r += MAX_TILE) {
        int tile = rows - r < MAX_TILE ? (int)(rows - r) : MAX_TILE;
        const uint32_t *pairs = (const uint32_t *)(in + r * K);
#define DOT(T) dot_block(pairs, K / 2, w, K / 2, T, acc)
        TILE_CASES(DOT)
#undef DOT
        for (int m = 0; m < tile; m++) {
            uint16_t *o = out + (r + m) * out_stride;
            if (swiglu) {
                _mm256_storeu_si256((__m256i *)o, (__m256i)swiglu16(acc[m][0], acc[m][2]));
                _mm256_storeu_si256((__m256i *)(o + 16), (__m256i)swiglu16(acc[m][1], acc[m][3]));
            } else {
                for (int j = 0; j < 4; j++)
                    _mm256_storeu_si256((__m256i *)(o + 16 * j), (__m256i)_mm512_cvtneps_pbh(acc[m][j]));
            }
        }
    }
}

/* in [S, K] times each expert's packed weight (w_size elements apart, blocks of BLOCK x K), for the slots of each
 * expert, into out [S, out_stride], each block's outputs out_block columns apart. A work-sharing loop of the
 * enclosing parallel region; dynamic, because experts with no slots cost nothing and equal static shares of
 * (expert, block) would not balance. */
static void all_experts(const uint16_t *in, const int64_t *offsets, int64_t E, int64_t K, int64_t blocks,
                        const uint16_t *w, int64_t w_size, int swiglu, uint16_t *out, int64_t out_stride,
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
void experts_bf16(const uint16_t *x, const int64_t *offsets, int64_t E, int64_t D, int64_t F,
                  const uint16_t *gate_up, const uint16_t *down, uint16_t *h, uint16_t *y, int threads) {
#pragma omp parallel num_threads(threads)
    {
        all_experts(x, offsets, E, D, F / 32, gate_up, 2 * F * D, 1, h, F, 32); /* the loop's barrier: h done */
        all_experts(h, offsets, E, F, D / BLOCK, down, D * F, 0, y, D, BLOCK);
    }
}
