/* NF4 dequantization on x86-64 CPUs with AVX2 and F16C: w_i = NF4[q_i] * absmax[i / blocksize],
 * the product in fp32, then rounded to the output dtype (bf16 and fp16: round to nearest even).
 *
 * Built and loaded by peftcore/kernels/nf4_cpu.py; the values are those of peftcore.nf4_format's
 * PyTorch path (and of bitsandbytes), bit for bit.
 *
 * Within a block every weight is one of 16 values, NF4[k] * absmax, so each block first rounds its
 * 16 products to the output dtype (two 8-lane multiplies), and each packed byte (high nibble =
 * the first weight) then becomes two table lookups:
 *   - 2-byte outputs: the 16 entries split into a table of low bytes and one of high bytes, and
 *     vpshufb looks up 32 nibbles at once in each; unpacking interleaves them back into order;
 *   - fp32 outputs: vpermps looks up 8 nibbles in entries 0-7 and in 8-15, and bit 3 of the
 *     nibble chooses between them; with AVX-512, one vpermps looks up 16 nibbles in all 16.
 * 64 weights (32 packed bytes) per step; blocks of 32 weights and the tail of a partial last
 * block go through the same tables one byte at a time.
 */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum { OUT_FLOAT32 = 0, OUT_BFLOAT16 = 1, OUT_FLOAT16 = 2 };

/* The block scales: stored in fp32, or double-quantized (QLoRA eq. 6) as uint8 codes of the 8-bit
 * dynamic map with one fp32 scale per 256 blocks and an offset: DYN8[q8_j] * absmax2[j / 256] +
 * offset, a product and a sum each rounded to fp32, as the PyTorch path computes them. */
typedef struct {
    const float *absmax;       /* fp32 scales, or NULL when double-quantized */
    const uint8_t *codes8;     /* the 8-bit codes */
    const float *dynamic8;     /* the 256 values of the dynamic map */
    const float *absmax2;      /* one per 256 blocks */
    float offset;
} Scales;

/* The weights a vector step leaves (a partial block, blocks of 32), a byte at a time through the
 * block's table of 16 entries, of the output's type (hence a macro: uint16_t and float). */
#define LOOK_UP_THE_REST(in, dst, entries, done, count)         \
    for (; (done) < (count); (done) += 2, ++(in), (dst) += 2) { \
        (dst)[0] = (entries)[*(in) >> 4];                       \
        if ((done) + 1 < (count)) (dst)[1] = (entries)[*(in) & 0x0F]; \
    }

static inline float block_scale(const Scales *scales, int64_t block) {
    if (scales->absmax) return scales->absmax[block];
    float product = scales->dynamic8[scales->codes8[block]] * scales->absmax2[block / 256];
    return product + scales->offset;
}

enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

/* What this CPU runs: AVX2 + F16C (every path), AVX-512F (a faster fp32 path), or neither. */
int peftcore_nf4_cpu_isa(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return ISA_NONE;
    return __builtin_cpu_supports("avx512f") ? ISA_AVX512 : ISA_AVX2;
}

/* Round 8 fp32 values to bf16 (nearest even), one per 32-bit lane; NaN becomes 0x7FC0 where the
 * block's scale is not finite (the only way a product of the finite codes can be NaN). */
__attribute__((target("avx2"))) static __m256i to_bf16_lanes(__m256 x, int finite) {
    __m256i bits = _mm256_castps_si256(x);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    if (finite) return rounded;
    __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(rounded, _mm256_set1_epi32(0x7FC0), nan);
}

/* The 16 products of a block rounded to 16-bit values; bf16 as [0-3 8-11 | 4-7 12-15] (packus
 * works within 128-bit lanes), fp16 in order [0-7 | 8-15]. */
__attribute__((target("avx2,f16c"))) static __m256i table16(__m256 low, __m256 high, int kind, int finite) {
    if (kind == OUT_FLOAT16) {
        __m128i l = _mm256_cvtps_ph(low, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m128i h = _mm256_cvtps_ph(high, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        return _mm256_set_m128i(h, l);
    }
    return _mm256_packus_epi32(to_bf16_lanes(low, finite), to_bf16_lanes(high, finite));
}

__attribute__((target("avx2,f16c"))) static void dequantize_16bit(
    const uint8_t *packed, const Scales *scales, const float *codes, int64_t n, int64_t blocksize,
    int64_t first_block, int64_t end_block, uint16_t *out, int kind) {
    const __m256 codes_low = _mm256_loadu_ps(codes), codes_high = _mm256_loadu_ps(codes + 8);
    /* Per 128-bit lane of 8 entries: the low bytes of entries 0-3, of 4-7, their high bytes, of 4-7.
     * Then the dwords that hold entries 0-15's low bytes (and high bytes) in order, in both lanes. */
    const __m256i split_bytes = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                 0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    const __m256i low_dwords = kind == OUT_FLOAT16 ? _mm256_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5)
                                                   : _mm256_setr_epi32(0, 4, 1, 5, 0, 4, 1, 5);
    const __m256i high_dwords = kind == OUT_FLOAT16 ? _mm256_setr_epi32(2, 3, 6, 7, 2, 3, 6, 7)
                                                    : _mm256_setr_epi32(2, 6, 3, 7, 2, 6, 3, 7);
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    uint16_t entries[16];
    for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t start = block * blocksize;
        const float scale_value = block_scale(scales, block);
        const __m256 scale = _mm256_set1_ps(scale_value);
        const int finite = scale_value - scale_value == 0.0f;
        __m256i table = table16(_mm256_mul_ps(codes_low, scale), _mm256_mul_ps(codes_high, scale), kind, finite);
        __m256i split = _mm256_shuffle_epi8(table, split_bytes);
        const __m256i low_bytes = _mm256_permutevar8x32_epi32(split, low_dwords);
        const __m256i high_bytes = _mm256_permutevar8x32_epi32(split, high_dwords);

        const int64_t count = n - start < blocksize ? n - start : blocksize;
        const uint8_t *in = packed + start / 2;
        uint16_t *dst = out + start;
        int64_t done = 0;
        for (; done + 64 <= count; done += 64, in += 32, dst += 64) {
            __m256i bytes = _mm256_loadu_si256((const __m256i *)in);
            __m256i first = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);  /* high nibbles */
            __m256i second = _mm256_and_si256(bytes, nibble);
            __m256i first_lo = _mm256_shuffle_epi8(low_bytes, first), first_hi = _mm256_shuffle_epi8(high_bytes, first);
            __m256i second_lo = _mm256_shuffle_epi8(low_bytes, second), second_hi = _mm256_shuffle_epi8(high_bytes, second);
            /* 16-bit values of bytes [0-7 | 16-23] and [8-15 | 24-31], for each nibble */
            __m256i first_a = _mm256_unpacklo_epi8(first_lo, first_hi), first_b = _mm256_unpackhi_epi8(first_lo, first_hi);
            __m256i second_a = _mm256_unpacklo_epi8(second_lo, second_hi), second_b = _mm256_unpackhi_epi8(second_lo, second_hi);
            /* pairs in order: bytes [0-3 | 16-19], [4-7 | 20-23], [8-11 | 24-27], [12-15 | 28-31] */
            __m256i w0 = _mm256_unpacklo_epi16(first_a, second_a), w1 = _mm256_unpackhi_epi16(first_a, second_a);
            __m256i w2 = _mm256_unpacklo_epi16(first_b, second_b), w3 = _mm256_unpackhi_epi16(first_b, second_b);
            _mm256_storeu_si256((__m256i *)dst, _mm256_permute2x128_si256(w0, w1, 0x20));
            _mm256_storeu_si256((__m256i *)(dst + 16), _mm256_permute2x128_si256(w2, w3, 0x20));
            _mm256_storeu_si256((__m256i *)(dst + 32), _mm256_permute2x128_si256(w0, w1, 0x31));
            _mm256_storeu_si256((__m256i *)(dst + 48), _mm256_permute2x128_si256(w2, w3, 0x31));
        }
        if (done < count) {  /* the tail, through the same table in order */
            __m128i low = _mm256_castsi256_si128(low_bytes), high = _mm256_castsi256_si128(high_bytes);
            _mm_storeu_si128((__m128i *)entries, _mm_unpacklo_epi8(low, high));
            _mm_storeu_si128((__m128i *)(entries + 8), _mm_unpackhi_epi8(low, high));
        }
        LOOK_UP_THE_REST(in, dst, entries, done, count);
    }
}

__attribute__((target("avx2"))) static void dequantize_float32(
    const uint8_t *packed, const Scales *scales, const float *codes, int64_t n, int64_t blocksize,
    int64_t first_block, int64_t end_block, float *out) {
    const __m256 codes_low = _mm256_loadu_ps(codes), codes_high = _mm256_loadu_ps(codes + 8);
    float entries[16];
    for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t start = block * blocksize;
        const __m256 scale = _mm256_set1_ps(block_scale(scales, block));
        const __m256 low = _mm256_mul_ps(codes_low, scale), high = _mm256_mul_ps(codes_high, scale);
        _mm256_storeu_ps(entries, low);
        _mm256_storeu_ps(entries + 8, high);

        const int64_t count = n - start < blocksize ? n - start : blocksize;
        const uint8_t *in = packed + start / 2;
        float *dst = out + start;
        int64_t done = 0;
        for (; done + 16 <= count; done += 16, in += 8, dst += 16) {
            int64_t eight;
            memcpy(&eight, in, 8);
            __m256i bytes = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight));
            __m256i first = _mm256_srli_epi32(bytes, 4), second = _mm256_and_si256(bytes, _mm256_set1_epi32(0x0F));
            /* vpermps reads the low 3 bits; bit 3, moved to the sign, picks the upper 8 entries */
            __m256 a = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, first), _mm256_permutevar8x32_ps(high, first),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(first, 28)));
            __m256 b = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low, second), _mm256_permutevar8x32_ps(high, second),
                                        _mm256_castsi256_ps(_mm256_slli_epi32(second, 28)));
            __m256 pairs_lo = _mm256_unpacklo_ps(a, b), pairs_hi = _mm256_unpackhi_ps(a, b);  /* [0,1|4,5], [2,3|6,7] */
            _mm256_storeu_ps(dst, _mm256_permute2f128_ps(pairs_lo, pairs_hi, 0x20));
            _mm256_storeu_ps(dst + 8, _mm256_permute2f128_ps(pairs_lo, pairs_hi, 0x31));
        }
        LOOK_UP_THE_REST(in, dst, entries, done, count);
    }
}

/* fp32 with AVX-512: vpermps over 16 lanes looks a whole nibble up in the block's 16 products. */
__attribute__((target("avx512f"))) static void dequantize_float32_avx512(
    const uint8_t *packed, const Scales *scales, const float *codes, int64_t n, int64_t blocksize,
    int64_t first_block, int64_t end_block, float *out) {
    const __m512 codes16 = _mm512_loadu_ps(codes);
    const __m128i nibble = _mm_set1_epi8(0x0F);
    float entries[16];
    for (int64_t block = first_block; block < end_block; ++block) {
        const int64_t start = block * blocksize;
        const __m512 table = _mm512_mul_ps(codes16, _mm512_set1_ps(block_scale(scales, block)));
        const int64_t count = n - start < blocksize ? n - start : blocksize;
        const uint8_t *in = packed + start / 2;
        float *dst = out + start;
        int64_t done = 0;
        for (; done + 32 <= count; done += 32, in += 16, dst += 32) {
            __m128i bytes = _mm_loadu_si128((const __m128i *)in);
            __m128i first = _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble), second = _mm_and_si128(bytes, nibble);
            /* the nibbles in weight order: bytes 0-7's, then 8-15's */
            __m128i ordered_lo = _mm_unpacklo_epi8(first, second), ordered_hi = _mm_unpackhi_epi8(first, second);
            _mm512_storeu_ps(dst, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(ordered_lo), table));
            _mm512_storeu_ps(dst + 16, _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(ordered_hi), table));
        }
        if (done < count) _mm512_storeu_ps(entries, table);
        LOOK_UP_THE_REST(in, dst, entries, done, count);
    }
}

/* packed: ceil(n / 2) bytes; absmax: ceil(n / blocksize) fp32 scales, or NULL with codes8,
 * dynamic8, absmax2 and offset (double quantization); codes: the 16 NF4 values; blocksize: even;
 * out: n values of `kind`; isa: the instruction set to use, at most peftcore_nf4_cpu_isa().
 * One thread: a second one measured slower on t5-base's weights (its
 * start costs more than half of a 0.1-0.4 ms pass). Returns 0, or -1 for an unknown kind or an
 * odd block size. */
int peftcore_nf4_dequantize(const uint8_t *packed, const float *absmax, const uint8_t *codes8,
                            const float *dynamic8, const float *absmax2, float offset, const float *codes,
                            int64_t n, int64_t blocksize, void *out, int kind, int isa) {
    if (blocksize <= 0 || blocksize % 2) return -1;
    const Scales scales = {absmax, codes8, dynamic8, absmax2, offset};
    const int64_t blocks = (n + blocksize - 1) / blocksize;
    if (kind == OUT_FLOAT32 && isa >= ISA_AVX512)
        dequantize_float32_avx512(packed, &scales, codes, n, blocksize, 0, blocks, out);
    else if (kind == OUT_FLOAT32)
        dequantize_float32(packed, &scales, codes, n, blocksize, 0, blocks, out);
    else if (kind == OUT_BFLOAT16 || kind == OUT_FLOAT16)
        dequantize_16bit(packed, &scales, codes, n, blocksize, 0, blocks, out, kind);
    else
        return -1;
    return 0;
}
