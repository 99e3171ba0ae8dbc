// whisper_accel's SIMD layer for fused.cc: one float vector type `simd::vf` of simd::W lanes and the
// handful of operations the kernels use, chosen at compile time by the compiler's predefined
// macros (the build's flags, whisper_accel.kernels.isa):
//
//   __AVX512F__            W = 16, __m512   (-mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c)
//   __AVX2__ && __FMA__    W = 8,  __m256   (-mavx2 -mfma -mf16c)
//   __aarch64__ NEON       W = 4,  float32x4_t (every AArch64 CPU; -march=armv8-a+simd)
//
// Every operation is one IEEE-rounded instruction per lane (fmadd / fnmadd fused, one rounding),
// so an element-wise computation gives the same bits at every width. What depends on W is only
// the order of a horizontal reduction (hsum: the lanes of an accumulator that ran with stride W),
// which the kernels keep to sums of a row (LayerNorm's mean and variance, softmax's denominator,
// RowsMatMul's dot products). The AVX2 branch is, instruction for instruction, the arithmetic of
// the kernels before this header (hsum's order included), so its results are those bit for bit.
//
// Half-precision weights: float16 (IEEE binary16: F16C on x86, FCVTL on AArch64, both part of the
// base instruction sets named above) and bfloat16 (the upper half of a float32: a shift) load as
// float32, exactly.
#ifndef WHISPER_ACCEL_SIMD_H
#define WHISPER_ACCEL_SIMD_H
#include <cstdint>
#include <cstring>

// Weights as stored: IEEE half / bfloat16 bits.
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };

#if defined(__AVX512F__)
#include <immintrin.h>
#define WHISPER_ACCEL_ISA "avx512"
namespace simd {
enum { W = 16 };
typedef __m512 vf;
static inline vf zero() { return _mm512_setzero_ps(); }
static inline vf set1(float a) { return _mm512_set1_ps(a); }
static inline vf load(const float *p) { return _mm512_loadu_ps(p); }
static inline void store(float *p, vf a) { _mm512_storeu_ps(p, a); }
static inline vf broadcast(const float *p) { return _mm512_set1_ps(*p); }
static inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
static inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
static inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
static inline vf min(vf a, vf b) { return _mm512_min_ps(a, b); }
static inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
static inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }    // a b + c
static inline vf fnmadd(vf a, vf b, vf c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a b
static inline vf round_nearest(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for integral n (in float) with n + 127 in 1..254
static inline vf pow2i(vf n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
// the AVX2 order on the two halves' sum
static inline float hsum(vf v) {
  const __m256 lo8 = _mm512_castps512_ps256(v), hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 s = _mm256_add_ps(lo8, hi8);
  __m128 lo = _mm256_castps256_ps128(s), hi = _mm256_extractf128_ps(s, 1);
  lo = _mm_add_ps(lo, hi); lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo);
}
static inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }  // exact in any order
static inline vf load(const Half *w) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)w)); }
static inline vf load(const BHalf *w) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)w)), 16));
}
static inline float load1(const Half *w) { return _cvtsh_ss(w->bits); }
static inline void pause() { _mm_pause(); }
}  // namespace simd

#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WHISPER_ACCEL_ISA "avx2"
namespace simd {
enum { W = 8 };
typedef __m256 vf;
static inline vf zero() { return _mm256_setzero_ps(); }
static inline vf set1(float a) { return _mm256_set1_ps(a); }
static inline vf load(const float *p) { return _mm256_loadu_ps(p); }
static inline void store(float *p, vf a) { _mm256_storeu_ps(p, a); }
static inline vf broadcast(const float *p) { return _mm256_broadcast_ss(p); }
static inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
static inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
static inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
static inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
static inline vf min(vf a, vf b) { return _mm256_min_ps(a, b); }
static inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
static inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }    // a b + c
static inline vf fnmadd(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  // c - a b
static inline vf round_nearest(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// 2^n for integral n (in float) with n + 127 in 1..254
static inline vf pow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline float hsum(vf v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo);
}
static inline float hmax(vf v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_max_ps(lo, hi); lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo)); lo = _mm_max_ss(lo, _mm_shuffle_ps(lo, lo, 1)); return _mm_cvtss_f32(lo);
}
static inline vf load(const Half *w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)); }
static inline vf load(const BHalf *w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
static inline float load1(const Half *w) { return _cvtsh_ss(w->bits); }
static inline void pause() { _mm_pause(); }
}  // namespace simd

#elif defined(__aarch64__) && defined(__ARM_NEON)
#include <arm_neon.h>
#define WHISPER_ACCEL_ISA "neon"
namespace simd {
enum { W = 4 };
typedef float32x4_t vf;
static inline vf zero() { return vdupq_n_f32(0.f); }
static inline vf set1(float a) { return vdupq_n_f32(a); }
static inline vf load(const float *p) { return vld1q_f32(p); }
static inline void store(float *p, vf a) { vst1q_f32(p, a); }
static inline vf broadcast(const float *p) { return vld1q_dup_f32(p); }
static inline vf add(vf a, vf b) { return vaddq_f32(a, b); }
static inline vf sub(vf a, vf b) { return vsubq_f32(a, b); }
static inline vf mul(vf a, vf b) { return vmulq_f32(a, b); }
static inline vf div(vf a, vf b) { return vdivq_f32(a, b); }
static inline vf min(vf a, vf b) { return vminq_f32(a, b); }
static inline vf max(vf a, vf b) { return vmaxq_f32(a, b); }
static inline vf fmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }   // a b + c, fused
static inline vf fnmadd(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }  // c - a b, fused
static inline vf round_nearest(vf a) { return vrndnq_f32(a); }            // ties to even, as x86's
static inline vf pow2i(vf n) {
  return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtnq_s32_f32(n), vdupq_n_s32(127)), 23));
}
static inline float hsum(vf v) { return vaddvq_f32(v); }
static inline float hmax(vf v) { return vmaxvq_f32(v); }
static inline vf load(const Half *w) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(&w->bits))); }
static inline vf load(const BHalf *w) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(&w->bits), 16)); }
static inline float load1(const Half *w) { __fp16 h; std::memcpy(&h, &w->bits, 2); return (float)h; }
static inline void pause() { __asm__ __volatile__("yield"); }
}  // namespace simd

#else
#error "whisper_accel's kernels need AVX2 + FMA (+ F16C), AVX-512F, or AArch64 NEON: see whisper_accel/kernels/isa.py"
#endif

namespace simd {
static inline float load1(const float *w) { return *w; }
static inline float load1(const BHalf *w) { uint32_t u = (uint32_t)w->bits << 16; float f; std::memcpy(&f, &u, 4); return f; }

// exp for x <= 0 (softmax after the row maximum is subtracted): Cephes' expf polynomial, ~1 ulp.
static inline vf exp(vf x) {
  x = max(x, set1(-87.0f));
  const vf fx = round_nearest(mul(x, set1(1.44269504088896341f)));
  vf r = fnmadd(fx, set1(0.693359375f), x);
  r = fnmadd(fx, set1(-2.12194440e-4f), r);
  vf p = set1(1.9875691500E-4f);
  p = fmadd(p, r, set1(1.3981999507E-3f));
  p = fmadd(p, r, set1(8.3334519073E-3f));
  p = fmadd(p, r, set1(4.1665795894E-2f));
  p = fmadd(p, r, set1(1.6666665459E-1f));
  p = fmadd(p, r, set1(5.0000001201E-1f));
  p = fmadd(p, mul(r, r), add(r, set1(1.0f)));
  return mul(p, pow2i(fx));
}
// erf as Eigen's float rational approximation (relative error ~1e-7)
static inline vf erf(vf x) {
  const vf c = set1(3.832506856900711f);
  x = min(max(x, sub(zero(), c)), c);
  const vf x2 = mul(x, x);
  vf p = set1(-2.72614225801306e-10f);
  p = fmadd(p, x2, set1(2.77068142495902e-08f));
  p = fmadd(p, x2, set1(-2.10102402082508e-06f));
  p = fmadd(p, x2, set1(-5.69250639462346e-05f));
  p = fmadd(p, x2, set1(-7.34990630326855e-04f));
  p = fmadd(p, x2, set1(-2.95459980854025e-03f));
  p = fmadd(p, x2, set1(-1.60960333262415e-02f));
  p = mul(p, x);
  vf q = set1(-1.45660718464996e-05f);
  q = fmadd(q, x2, set1(-2.13374055278905e-04f));
  q = fmadd(q, x2, set1(-1.68282697438203e-03f));
  q = fmadd(q, x2, set1(-7.37332916720468e-03f));
  q = fmadd(q, x2, set1(-1.42647390514189e-02f));
  return div(p, q);
}
// the exact GELU, x * 0.5 * (erf(x / sqrt(2)) + 1)
static inline vf gelu(vf v) {
  const vf r2 = set1(1.41421356237309504880f), h = set1(0.5f), one = set1(1.0f);
  return mul(mul(v, h), add(erf(div(v, r2)), one));
}
}  // namespace simd
#endif
