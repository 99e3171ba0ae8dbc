// whisper_accel's fused float32 CPU kernels for the Whisper encoder, as MindSpore Custom AOT
// operators (ops.Custom("<lib>:<Name>", func_type="aot")): each takes contiguous float32
// inputs and writes its outputs (the params after the inputs). They replace chains of MindSpore
// CPU element-wise operators that run one pass over memory each, some single-threaded
// (Erf: ~13 ms for the tiny encoder's 2.3M fc1 activations; benchmarks/PROFILE_NOTES.md section 17).
//
//   LayerNorm(x, g, b)              -> LN(x) over the last dim, eps 1e-5 (two-pass mean/variance)
//   ResLayerNorm(x, y, bias, g, b)  -> (r = x + (y + bias), LN(r))
//   BiasResidual(x, y, bias)        -> x + (y + bias)
//   BiasGelu(y, b)                  -> gelu(y + b), b over the last dim
//   ChanBiasGelu(y (.., C, T), b)   -> gelu(y + b[c]) (a conv1d output, channels first)
//
// GELU is the exact erf form, x * 0.5 * (erf(x / sqrt(2)) + 1), with erf as Eigen's float
// rational approximation (relative error ~1e-7, as MindSpore's own erff). AVX2 + FMA;
// single-threaded (MindSpore's pool runs the MatMuls around them). Built once per machine by
// whisper_accel.runtime.native with the system C++ compiler.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
static inline int64_t numel(int nd, const int64_t *s) { int64_t n = 1; for (int i = 0; i < nd; i++) n *= s[i]; return n; }
static inline float erf_rat(float x) {
  const float c = 3.832506856900711f;
  x = std::fmin(std::fmax(x, -c), c);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f; p = p * x2 + -2.10102402082508e-06f; p = p * x2 + -5.69250639462346e-05f;
  p = p * x2 + -7.34990630326855e-04f; p = p * x2 + -2.95459980854025e-03f; p = p * x2 + -1.60960333262415e-02f;
  p = p * x;
  float q = -1.45660718464996e-05f;
  q = q * x2 + -2.13374055278905e-04f; q = q * x2 + -1.68282697438203e-03f; q = q * x2 + -7.37332916720468e-03f;
  q = q * x2 + -1.42647390514189e-02f;
  return p / q;
}
static inline __m256 erf8(__m256 x) {
  const __m256 c = _mm256_set1_ps(3.832506856900711f);
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_sub_ps(_mm256_setzero_ps(), c)), c);
  const __m256 x2 = _mm256_mul_ps(x, x);
  __m256 p = _mm256_set1_ps(-2.72614225801306e-10f);
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(2.77068142495902e-08f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.10102402082508e-06f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-5.69250639462346e-05f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-7.34990630326855e-04f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-2.95459980854025e-03f));
  p = _mm256_fmadd_ps(p, x2, _mm256_set1_ps(-1.60960333262415e-02f));
  p = _mm256_mul_ps(p, x);
  __m256 q = _mm256_set1_ps(-1.45660718464996e-05f);
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-2.13374055278905e-04f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.68282697438203e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-7.37332916720468e-03f));
  q = _mm256_fmadd_ps(q, x2, _mm256_set1_ps(-1.42647390514189e-02f));
  return _mm256_div_ps(p, q);
}
static inline __m256 gelu8(__m256 v) {
  const __m256 r2 = _mm256_set1_ps(1.41421356237309504880f), h = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
  return _mm256_mul_ps(_mm256_mul_ps(v, h), _mm256_add_ps(erf8(_mm256_div_ps(v, r2)), one));
}
static inline float gelu1(float v) { return v * 0.5f * (erf_rat(v / 1.41421356237309504880f) + 1.0f); }
static void gelu_row(const float *x, const float *b, float bb, float *y, int64_t n) {
  int64_t j = 0;
  if (b) { for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, gelu8(_mm256_add_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(b + j)))); for (; j < n; j++) y[j] = gelu1(x[j] + b[j]); }
  else { const __m256 B = _mm256_set1_ps(bb); for (; j + 8 <= n; j += 8) _mm256_storeu_ps(y + j, gelu8(_mm256_add_ps(_mm256_loadu_ps(x + j), B))); for (; j < n; j++) y[j] = gelu1(x[j] + bb); }
}
// y = gelu(x + b), b over the last dim
extern "C" int BiasGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  const float *x = (const float *)params[0], *b = (const float *)params[1]; float *y = (float *)params[nparam - 1];
  int64_t n = numel(ndims[0], shapes[0]), c = shapes[0][ndims[0] - 1], rows = n / c;
  for (int64_t r = 0; r < rows; r++) gelu_row(x + r * c, b, 0.f, y + r * c, c);
  return 0;
}
// y[.., c, t] = gelu(x[.., c, t] + b[c])  (channel-major conv output)
extern "C" int ChanBiasGelu(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  const float *x = (const float *)params[0], *b = (const float *)params[1]; float *y = (float *)params[nparam - 1];
  int64_t n = numel(ndims[0], shapes[0]), t = shapes[0][ndims[0] - 1], ch = shapes[0][ndims[0] - 2], rows = n / t;
  for (int64_t r = 0; r < rows; r++) gelu_row(x + r * t, nullptr, b[r % ch], y + r * t, t);
  return 0;
}
static inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi); lo = _mm_hadd_ps(lo, lo); lo = _mm_hadd_ps(lo, lo); return _mm_cvtss_f32(lo);
}
static inline float hmax8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_max_ps(lo, hi); lo = _mm_max_ps(lo, _mm_movehl_ps(lo, lo)); lo = _mm_max_ss(lo, _mm_shuffle_ps(lo, lo, 1)); return _mm_cvtss_f32(lo);
}
static inline void ln_row(const float *x, const float *g, const float *b, float *y, int64_t c, float eps) {
  __m256 s = _mm256_setzero_ps(); int64_t j = 0; float ss = 0.f;
  for (; j + 8 <= c; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(x + j));
  float sum = hsum8(s); for (; j < c; j++) sum += x[j];
  const float mean = sum / (float)c; const __m256 M = _mm256_set1_ps(mean);
  __m256 v = _mm256_setzero_ps(); j = 0;
  for (; j + 8 <= c; j += 8) { __m256 d = _mm256_sub_ps(_mm256_loadu_ps(x + j), M); v = _mm256_fmadd_ps(d, d, v); }
  ss = hsum8(v); for (; j < c; j++) { float d = x[j] - mean; ss += d * d; }
  const float rstd = 1.0f / std::sqrt(ss / (float)c + eps); const __m256 R = _mm256_set1_ps(rstd);
  j = 0;
  for (; j + 8 <= c; j += 8) {
    __m256 d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + j), M), R);
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(d, _mm256_loadu_ps(g + j), _mm256_loadu_ps(b + j)));
  }
  for (; j < c; j++) y[j] = (x[j] - mean) * rstd * g[j] + b[j];
}
// y = LayerNorm(x) over the last dim, eps 1e-5. inputs x, gamma, beta.
extern "C" int LayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  const float *x = (const float *)params[0], *g = (const float *)params[1], *b = (const float *)params[2];
  float *y = (float *)params[3];
  int64_t n = numel(ndims[0], shapes[0]), c = shapes[0][ndims[0] - 1], rows = n / c;
  for (int64_t r = 0; r < rows; r++) ln_row(x + r * c, g, b, y + r * c, c, 1e-5f);
  return 0;
}
// inputs x (.., C), y (.., C), bias (C), gamma, beta -> outputs r = x + (y + bias), n = LayerNorm(r)
extern "C" int ResLayerNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  const float *x = (const float *)params[0], *y = (const float *)params[1], *bias = (const float *)params[2];
  const float *g = (const float *)params[3], *b = (const float *)params[4];
  float *r = (float *)params[5], *o = (float *)params[6];
  int64_t n = numel(ndims[0], shapes[0]), c = shapes[0][ndims[0] - 1], rows = n / c;
  for (int64_t i = 0; i < rows; i++) {
    const float *xr = x + i * c, *yr = y + i * c; float *rr = r + i * c;
    int64_t j = 0;
    for (; j + 8 <= c; j += 8) _mm256_storeu_ps(rr + j, _mm256_add_ps(_mm256_loadu_ps(xr + j), _mm256_add_ps(_mm256_loadu_ps(yr + j), _mm256_loadu_ps(bias + j))));
    for (; j < c; j++) rr[j] = xr[j] + (yr[j] + bias[j]);
    ln_row(rr, g, b, o + i * c, c, 1e-5f);
  }
  return 0;
}
// inputs x, y, bias -> x + (y + bias)   (bias over the last dim)
extern "C" int BiasResidual(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  const float *x = (const float *)params[0], *y = (const float *)params[1], *bias = (const float *)params[2];
  float *r = (float *)params[3];
  int64_t n = numel(ndims[0], shapes[0]), c = shapes[0][ndims[0] - 1], rows = n / c;
  for (int64_t i = 0; i < rows; i++) {
    const float *xr = x + i * c, *yr = y + i * c; float *rr = r + i * c; int64_t j = 0;
    for (; j + 8 <= c; j += 8) _mm256_storeu_ps(rr + j, _mm256_add_ps(_mm256_loadu_ps(xr + j), _mm256_add_ps(_mm256_loadu_ps(yr + j), _mm256_loadu_ps(bias + j))));
    for (; j < c; j++) rr[j] = xr[j] + (yr[j] + bias[j]);
  }
  return 0;
}
