// whisper_accel's fused float32 CPU kernels for the Whisper encoder and the decoder step (its
// vocabulary projection, RowsMatMul, and whole layers, DecoderLayer), as MindSpore Custom AOT
// operators (ops.Custom("<lib>:<Name>", func_type="aot")): each takes contiguous float32
// inputs (DecoderLayer's position: int32) and writes its outputs (the params after the
// inputs). They replace chains of MindSpore CPU element-wise operators that run one pass over memory each, some single-threaded
// (Erf: ~13 ms for the tiny encoder's 2.3M fc1 activations; benchmarks/PROFILE_NOTES.md section 17).
//
//   LayerNorm(x, g, b)              -> LN(x) over the last dim, eps 1e-5 (two-pass mean/variance)
//   ResLayerNorm(x, y, bias, g, b)  -> (r = x + (y + bias), LN(r))
//   BiasResidual(x, y, bias)        -> x + (y + bias)
//   BiasGelu(y, b)                  -> gelu(y + b), b over the last dim
//   ChanBiasGelu(y (.., C, T), b)   -> gelu(y + b[c]) (a conv1d output, channels first)
//   Attention(q, k, v)              -> softmax(q k^T) v per head; q (B, T, H, Dh) already scaled,
//                                      k, v (B, S, H, Dh); out (B, T, H, Dh)
//   AttentionBias(q, k, v, bq, bv, scale) -> the same on q' = (q + bq) scale, v' = v + bv (the
//                                      host encoder's form: no passes of their own over q and v)
//   RowsMatMul(x (M, K), w (N, K))  -> x w^T for a few rows M (the decoder step's vocabulary
//                                      projection): streams w once, split over the threads;
//                                      RowsMatMulF16 / BF16: w float16 / bfloat16 as stored
//   DecoderLayer(x (R, D), ...)     -> one decoder layer of a one-token step for R rows (greedy
//                                      or beam), this step's K/V for the cache (see below);
//                                      DecoderLayerF16 / BF16: its weight matrices half precision
//   CrossKV(enc (B, S, D), per layer Wk, Wv, bv) -> every decoder layer's cross-attention K^T
//                                      (B, H, Dh, S) and V (B, H, S, Dh), one launch (see below)
//
// GELU is the exact erf form, x * 0.5 * (erf(x / sqrt(2)) + 1), with erf as Eigen's float
// rational approximation (relative error ~1e-7, as MindSpore's own erff). AVX2 + FMA (+ F16C for
// float16 weights). The
// element-wise kernels are single-threaded (MindSpore's pool runs the MatMuls around them);
// Attention, most of a layer's arithmetic, splits its work over the CPUs this process may run
// on (WHISPER_ACCEL_KERNEL_THREADS overrides the count). Built once per machine by
// whisper_accel.runtime.native with the system C++ compiler.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <thread>
#include <vector>
#include <sched.h>
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
// exp for x <= 0 (softmax after the row max is subtracted): Cephes' expf polynomial, ~1 ulp.
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500E-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
static int threads_for(int64_t items) {
  cpu_set_t set; int n = 1;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (const char *e = std::getenv("WHISPER_ACCEL_KERNEL_THREADS")) { int v = std::atoi(e); if (v > 0) n = v; }
  if (n > 64) n = 64;
  return (int)std::max<int64_t>(1, std::min<int64_t>(n, items));
}
template <class F> static void parallel(int64_t items, F f) {
  int n = threads_for(items);
  if (n == 1) { f(0, items); return; }
  std::vector<std::thread> pool;
  for (int i = 1; i < n; i++) pool.emplace_back([=] { f(items * i / n, items * (i + 1) / n); });
  f(0, items / n);
  for (auto &t : pool) t.join();
}
enum { MR = 6, NR = 16 };
// Scores of MR query rows (q: MR rows of Dh, stride qs) against one packed K tile (Dh x NR);
// with mx, also each row's running maximum (8 lanes, mx[r * 8]) over the tile's 16 keys.
// (The unrolled inner loops measured 0.92x the time of plain ones: PROFILE_NOTES section 30.)
static inline void qk_tile(const float *q, int64_t qs, const float *kt, int64_t dh, float *out, int64_t os,
                           float *mx = nullptr) {
  __m256 a[MR][2];
  for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
  for (int64_t d = 0; d < dh; d++) {
    const __m256 k0 = _mm256_loadu_ps(kt + d * NR), k1 = _mm256_loadu_ps(kt + d * NR + 8);
    for (int r = 0; r < MR; r++) {
      const __m256 qb = _mm256_broadcast_ss(q + r * qs + d);
      a[r][0] = _mm256_fmadd_ps(qb, k0, a[r][0]); a[r][1] = _mm256_fmadd_ps(qb, k1, a[r][1]);
    }
  }
  for (int r = 0; r < MR; r++) {
    _mm256_storeu_ps(out + r * os, a[r][0]); _mm256_storeu_ps(out + r * os + 8, a[r][1]);
    if (mx) _mm256_storeu_ps(mx + r * 8, _mm256_max_ps(_mm256_loadu_ps(mx + r * 8), _mm256_max_ps(a[r][0], a[r][1])));
  }
}
// MR rows of P (stride ps, sp columns) times packed V (sp x dh, dh a multiple of NR), added to o
// (MR x dh) when add, else written.
static inline void pv_tile(const float *p, int64_t ps, const float *v, int64_t sp, int64_t dh, float *o, bool add) {
  for (int64_t c = 0; c < dh; c += NR) {
    __m256 a[MR][2];
    if (add) for (int r = 0; r < MR; r++) { a[r][0] = _mm256_loadu_ps(o + r * dh + c); a[r][1] = _mm256_loadu_ps(o + r * dh + c + 8); }
    else for (int r = 0; r < MR; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 4
    for (int64_t s = 0; s < sp; s++) {
      const __m256 v0 = _mm256_loadu_ps(v + s * dh + c), v1 = _mm256_loadu_ps(v + s * dh + c + 8);
      for (int r = 0; r < MR; r++) {
        const __m256 pb = _mm256_broadcast_ss(p + r * ps + s);
        a[r][0] = _mm256_fmadd_ps(pb, v0, a[r][0]); a[r][1] = _mm256_fmadd_ps(pb, v1, a[r][1]);
      }
    }
    for (int r = 0; r < MR; r++) { _mm256_storeu_ps(o + r * dh + c, a[r][0]); _mm256_storeu_ps(o + r * dh + c + 8, a[r][1]); }
  }
}
// softmax(q' k^T) v' per head, without writing the score matrix out: q' = (q + bq) * scale and
// v' = v + bv where bq / bv are given, else q and v. q (B, T, H, Dh); k, v (B, S, H, Dh) ->
// o (B, T, H, Dh). K^T is packed in 16-key tiles and V per head. The work, blocks of QB query
// rows of one head, is taken by the threads from a shared counter. A block's QB x S scores stay
// in a per-thread buffer (in L2), so each packed K tile and V chunk is read once per QB rows;
// each row's maximum is taken as its scores are stored. The arithmetic is the 6-row kernel's of
// before, bit for bit (PROFILE_NOTES section 30: applying 1 / sum to the output row instead of
// the probabilities moved beam scores by up to 1.1e-4 from stock's).
enum { QT = 8, QB = MR * QT, VC = 64 };
static int attention(const float *q, const float *k, const float *v, const float *bq, const float *bv, float scale,
                     float *o, int64_t B, int64_t T, int64_t H, int64_t Dh, int64_t S) {
  if (S <= 0 || Dh <= 0) return 1;
  const int64_t SP = (S + NR - 1) / NR * NR, DP = (Dh + NR - 1) / NR * NR, D = H * Dh, BH = B * H;
  const int64_t full = S / NR * NR;  // keys in whole tiles; the rest (and the padding) in the last
  std::vector<float> kt((size_t)(BH * SP * Dh)), vp((size_t)(BH * SP * DP), 0.f);
  parallel(BH, [&](int64_t lo, int64_t hi) {
    for (int64_t bh = lo; bh < hi; bh++) {
      const int64_t b = bh / H, h = bh % H;
      float *K = kt.data() + bh * SP * Dh, *V = vp.data() + bh * SP * DP;
      for (int64_t s = 0; s < SP; s++) {
        float *tile = K + (s / NR) * Dh * NR + (s % NR);
        if (s < S) {
          const float *ks = k + (b * S + s) * D + h * Dh, *vs = v + (b * S + s) * D + h * Dh;
          for (int64_t d = 0; d < Dh; d++) tile[d * NR] = ks[d];
          if (bv) for (int64_t d = 0; d < Dh; d++) V[s * DP + d] = vs[d] + bv[h * Dh + d];
          else std::memcpy(V + s * DP, vs, Dh * sizeof(float));
        } else {
          for (int64_t d = 0; d < Dh; d++) tile[d * NR] = 0.f;
        }
      }
    }
  });
  const int64_t nblk = (T + QB - 1) / QB, items = BH * nblk;
  std::atomic<int64_t> next{0};
  parallel(std::min<int64_t>(items, 64), [&](int64_t, int64_t) {
    std::vector<float> sc((size_t)(QB * SP)), qb((size_t)(QB * Dh)), ob((size_t)(QB * DP)), mx((size_t)(QB * 8));
    for (int64_t it; (it = next.fetch_add(1)) < items;) {
      const int64_t bh = it / nblk, blk = it % nblk, b = bh / H, h = bh % H, t0 = blk * QB;
      const int64_t rows = std::min<int64_t>(QB, T - t0), tiles = (rows + MR - 1) / MR;
      for (int64_t r = 0; r < tiles * MR; r++) {
        float *dst = &qb[r * Dh];
        const float *src = q + (b * T + t0 + r) * D + h * Dh;
        if (r >= rows) std::memset(dst, 0, Dh * sizeof(float));
        else if (bq) for (int64_t d = 0; d < Dh; d++) dst[d] = (src[d] + bq[h * Dh + d]) * scale;
        else std::memcpy(dst, src, Dh * sizeof(float));
      }
      std::fill(mx.begin(), mx.end(), -INFINITY);
      const float *K = kt.data() + bh * SP * Dh, *V = vp.data() + bh * SP * DP;
      for (int64_t s = 0; s < full; s += NR)
        for (int64_t rt = 0; rt < tiles; rt++)
          qk_tile(&qb[rt * MR * Dh], Dh, K + (s / NR) * Dh * NR, Dh, &sc[rt * MR * SP + s], SP, &mx[rt * MR * 8]);
      if (full < SP)  // the last tile: its padded keys do not count in the maximum
        for (int64_t rt = 0; rt < tiles; rt++) qk_tile(&qb[rt * MR * Dh], Dh, K + (full / NR) * Dh * NR, Dh, &sc[rt * MR * SP + full], SP);
      for (int64_t r = 0; r < tiles * MR; r++) {  // exp over the S real keys; the padded ones get 0
        float *row = &sc[r * SP];
        float m = hmax8(_mm256_loadu_ps(&mx[r * 8]));
        for (int64_t s = full; s < S; s++) m = std::fmax(m, row[s]);
        const __m256 M = _mm256_set1_ps(m); __m256 z8 = _mm256_setzero_ps(); int64_t s = 0;
        for (; s + 8 <= S; s += 8) { __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + s), M)); _mm256_storeu_ps(row + s, e); z8 = _mm256_add_ps(z8, e); }
        float z = hsum8(z8); for (; s < S; s++) { row[s] = std::exp(row[s] - m); z += row[s]; }
        for (; s < SP; s++) row[s] = 0.f;
        const float iz = 1.0f / z; const __m256 Z = _mm256_set1_ps(iz); s = 0;
        for (; s + 8 <= S; s += 8) _mm256_storeu_ps(row + s, _mm256_mul_ps(_mm256_loadu_ps(row + s), Z));
        for (; s < S; s++) row[s] *= iz;
      }
      for (int64_t s0 = 0; s0 < SP; s0 += VC)
        for (int64_t rt = 0; rt < tiles; rt++)
          pv_tile(&sc[rt * MR * SP + s0], SP, V + s0 * DP, std::min<int64_t>(VC, SP - s0), DP, &ob[rt * MR * DP], s0 > 0);
      for (int64_t r = 0; r < rows; r++) std::memcpy(o + (b * T + t0 + r) * D + h * Dh, &ob[r * DP], Dh * sizeof(float));
    }
  });
  return 0;
}
// Attention(q, k, v) -> o, q already scaled (the graphs' form)
extern "C" int Attention(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  return attention((const float *)params[0], (const float *)params[1], (const float *)params[2], nullptr, nullptr, 1.0f,
                   (float *)params[3], shapes[0][0], shapes[0][1], shapes[0][2], shapes[0][3], shapes[1][1]);
}
// AttentionBias(q, k, v, bq (D), bv (D), scale (1)) -> o: q, v before their biases, q before its
// scaling (the host encoder's form: no separate passes over q and v)
extern "C" int AttentionBias(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  if (nparam != 7 || shapes[3][0] != shapes[0][2] * shapes[0][3] || shapes[4][0] != shapes[3][0]) return 1;
  return attention((const float *)params[0], (const float *)params[1], (const float *)params[2], (const float *)params[3],
                   (const float *)params[4], *(const float *)params[5], (float *)params[6], shapes[0][0], shapes[0][1],
                   shapes[0][2], shapes[0][3], shapes[1][1]);
}
// y (M, N) = x (M, K) w^T, w (N, K) as stored, for a few rows M (a decoder step's last position,
// one row per beam). MindSpore's CPU MatMul runs this single-threaded and, past one row, at
// well under memory speed; here the threads split w's rows and each w row is read once for up
// to MB rows of x (x stays in L1): NW w rows at a time for one row of x (more streams in flight),
// two at a time for several.
// Weights as stored: float32, float16 (IEEE half, converted with F16C) or bfloat16 (the upper
// half of a float32). Either conversion to float32 is exact, so a kernel that reads half-precision
// weights computes what it computes on their float32 copy, bit for bit, and reads half the bytes.
struct Half { uint16_t bits; };
struct BHalf { uint16_t bits; };
static inline __m256 load8(const float *w) { return _mm256_loadu_ps(w); }
static inline __m256 load8(const Half *w) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)w)); }
static inline __m256 load8(const BHalf *w) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)w)), 16));
}
static inline float load1(const float *w) { return *w; }
static inline float load1(const Half *w) { return _cvtsh_ss(w->bits); }
static inline float load1(const BHalf *w) { uint32_t u = (uint32_t)w->bits << 16; float f; std::memcpy(&f, &u, 4); return f; }
template <int NW, class W> static inline void rows_block(const float *x, const W *w, float *y, int64_t M, int64_t K,
                                                         int64_t N, int64_t n0) {
  enum { MB = NW == 2 ? 4 : 1 };
  const int64_t K8 = K / 8 * 8;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mm = std::min<int64_t>(MB, M - m0);
    __m256 a[MB][NW];
    for (int i = 0; i < MB; i++) for (int j = 0; j < NW; j++) a[i][j] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
      __m256 wv[NW];
      for (int j = 0; j < NW; j++) wv[j] = load8(w + (n0 + j) * K + k);
      for (int i = 0; i < MB; i++) {
        if (i < mm) {
          const __m256 xv = _mm256_loadu_ps(x + (m0 + i) * K + k);
          for (int j = 0; j < NW; j++) a[i][j] = _mm256_fmadd_ps(xv, wv[j], a[i][j]);
        }
      }
    }
    for (int64_t i = 0; i < mm; i++) {
      const float *xr = x + (m0 + i) * K;
      for (int j = 0; j < NW; j++) {
        const W *wr = w + (n0 + j) * K; float acc = hsum8(a[i][j]);
        for (int64_t k = K8; k < K; k++) acc = std::fma(xr[k], load1(wr + k), acc);  // one rounding, in every instantiation
        y[(m0 + i) * N + n0 + j] = acc;
      }
    }
  }
}
// y[:, n0:n1] = x (R, K) w[n0:n1]^T (+ b), y with row stride N
template <class W> static void rows_part(const float *x, int64_t R, int64_t K, const W *w, int64_t N, const float *b,
                                         float *y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (R == 1) for (; n + 8 <= n1; n += 8) rows_block<8>(x, w, y, R, K, N, n);
  for (; n + 2 <= n1; n += 2) rows_block<2>(x, w, y, R, K, N, n);
  for (; n < n1; n++) rows_block<1>(x, w, y, R, K, N, n);
  if (b) for (int64_t r = 0; r < R; r++) for (int64_t j = n0; j < n1; j++) y[r * N + j] += b[j];
}
template <class W> static int rows_matmul(void **params, int64_t **shapes) {
  const float *x = (const float *)params[0]; const W *w = (const W *)params[1]; float *y = (float *)params[2];
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[1][0];
  if (shapes[1][1] != K) return 1;
  enum { CH = 64 };
  parallel((N + CH - 1) / CH,
           [&](int64_t lo, int64_t hi) { rows_part(x, M, K, w, N, nullptr, y, lo * CH, std::min(N, hi * CH)); });
  return 0;
}
extern "C" int RowsMatMul(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  return rows_matmul<float>(params, shapes);
}
// The same with w float16 / bfloat16 (host steps of a half-precision model: the weights as stored)
extern "C" int RowsMatMulF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  return rows_matmul<Half>(params, shapes);
}
extern "C" int RowsMatMulBF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra) {
  return rows_matmul<BHalf>(params, shapes);
}
// softmax(s[0..n)) in place; entries at -inf (masked) give 0
static inline void softmax_row(float *s, int64_t n) {
  float m = -INFINITY;
  for (int64_t i = 0; i < n; i++) m = std::max(m, s[i]);
  float z = 0.f;
  for (int64_t i = 0; i < n; i++) { s[i] = std::exp(s[i] - m); z += s[i]; }
  const float iz = 1.0f / z;
  for (int64_t i = 0; i < n; i++) s[i] *= iz;
}
// The threads of one DecoderLayer call meet here between its phases: they spin (the phases are
// tens of microseconds, and every thread has work in each), then yield the core.
struct SpinBarrier {
  std::atomic<int> count{0}, gen{0};
  const int n;
  explicit SpinBarrier(int n_) : n(n_) {}
  void wait() {
    const int g = gen.load(std::memory_order_acquire);
    if (count.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      count.store(0, std::memory_order_relaxed);
      gen.fetch_add(1, std::memory_order_acq_rel);
    } else {
      // spin briefly, then yield: a thread of ours may be waiting for a core (other work on it)
      for (int spins = 0; gen.load(std::memory_order_acquire) == g; spins++) {
        if (spins < 4000) _mm_pause();
        else std::this_thread::yield();
      }
    }
  }
};
// One decoder layer for R rows at one new position each (a greedy or beam step after the
// prompt), what graphs._decoder's layer body computes:
//   h = LN1(x); q = (h Wq^T + bq) * scaling; k = h Wk^T; v = h Wv^T + bv
//   self-attention over the cache slots s <= pos0 with key_ok[s] (slot pos0: this step's k, v)
//   x += attn Wo^T + bo; cross-attention of (LN2(x) Wcq^T + bcq) * scaling against the row's
//   audio (K^T (B, H, Dh, S), V (B, H, S, Dh); R / B consecutive rows, the beams, share one)
//   x += cross Wco^T + bco; x += gelu(LN3(x) W1^T + b1) W2^T + b2
// inputs: 0 x (R, D); 1-2 LN1; 3 Wq 4 bq 5 Wk 6 Wv 7 bv 8 Wo 9 bo; 10 k_cache, 11 v_cache
// (R, H, S, Dh); 12 pos0 (1,) int32; 13 key_ok (1 or R, S) float (nonzero: attendable); 14-15
// LN2; 16 Wcq 17 bcq 18 Wco 19 bco; 20 K^T, 21 V of the audio; 22-23 LN3; 24 W1 25 b1 26 W2 27 b2;
// 28 scaling (1,). outputs: 29 x (R, D); 30 k, 31 v (R, H, 1, Dh): this step's, for the cache.
// The threads split each linear layer's outputs and the attention's (row, head) pairs, and
// meet between phases: one launch a layer instead of ~30 operators (PROFILE_NOTES section 22).
static std::atomic<long long> decoder_layer_calls{0};
// How many DecoderLayer calls this process made (tests check that steps take the kernel).
extern "C" long long DecoderLayerCalls() { return decoder_layer_calls.load(); }
// DecoderLayerF16 / DecoderLayerBF16: the same with the eight weight matrices (Wq, Wk, Wv, Wo,
// Wcq, Wco, W1, W2) float16 / bfloat16 as stored; everything else float32.
template <class W> static int decoder_layer(void **params, int64_t **shapes) {
  decoder_layer_calls.fetch_add(1);
  auto P = [&](int i) { return (const float *)params[i]; };
  auto M = [&](int i) { return (const W *)params[i]; };
  const int64_t R = shapes[0][0], D = shapes[0][1], H = shapes[10][1], S = shapes[10][2], Dh = shapes[10][3];
  const int64_t B = shapes[20][0], Se = shapes[20][3], F = shapes[24][0], KR = shapes[13][0];
  if (H * Dh != D || R % B != 0 || (KR != 1 && KR != R) || shapes[13][1] != S || shapes[21][2] != Se) return 1;
  const int64_t beams = R / B, pos0 = ((const int32_t *)params[12])[0];
  if (pos0 < 0 || pos0 >= S) return 1;
  const float scaling = P(28)[0];
  float *xo = (float *)params[29], *kn = (float *)params[30], *vn = (float *)params[31];
  const int n = threads_for(D / 8);
  std::vector<float> q(R * D), a(R * D), f(R * F), hs(n * R * D), scs(n * std::max(S, Se));
  std::memcpy(xo, P(0), sizeof(float) * R * D);
  SpinBarrier bar(n);
  parallel(n, [&](int64_t i0, int64_t) {
    const int i = (int)i0;
    float *h = hs.data() + i * R * D, *sc = scs.data() + i * std::max(S, Se);
    auto lo = [&](int64_t N) { return N * i / n / 8 * 8; };
    auto hi = [&](int64_t N) { return i == n - 1 ? N : N * (i + 1) / n / 8 * 8; };
    const int64_t p0 = R * H * i / n, p1 = R * H * (i + 1) / n;  // this thread's (row, head) pairs
    auto norm = [&](const float *g, const float *b) { for (int64_t r = 0; r < R; r++) ln_row(xo + r * D, g, b, h + r * D, D, 1e-5f); };
    std::vector<float> t(R * D);
    auto add_into_x = [&](const W *w, const float *b, const float *in, int64_t K) {
      // xo[:, lo:hi] += in (R, K) w[lo:hi]^T + b[lo:hi]
      rows_part(in, R, K, w, D, b, t.data(), lo(D), hi(D));
      for (int64_t r = 0; r < R; r++) for (int64_t j = lo(D); j < hi(D); j++) xo[r * D + j] += t[r * D + j];
    };
    norm(P(1), P(2));
    rows_part(h, R, D, M(3), D, P(4), q.data(), lo(D), hi(D));
    rows_part(h, R, D, M(5), D, nullptr, kn, lo(D), hi(D));
    rows_part(h, R, D, M(6), D, P(7), vn, lo(D), hi(D));
    bar.wait();
    const float *kc = P(10), *vc = P(11), *ok = P(13);
    for (int64_t p = p0; p < p1; p++) {  // self-attention
      const int64_t r = p / H, hh = p % H;
      const float *okr = ok + (KR == 1 ? 0 : r) * S, *qv = q.data() + r * D + hh * Dh;
      const float *kr = kc + (r * H + hh) * S * Dh, *vr = vc + (r * H + hh) * S * Dh;
      const float *knew = kn + r * D + hh * Dh, *vnew = vn + r * D + hh * Dh;
      bool any = false;
      for (int64_t s = 0; s < S; s++) {
        if (s > pos0 || okr[s] == 0.f) { sc[s] = -INFINITY; continue; }
        const float *kv = s == pos0 ? knew : kr + s * Dh;
        float acc = 0.f;
        for (int64_t d = 0; d < Dh; d++) acc += qv[d] * scaling * kv[d];
        sc[s] = acc; any = true;
      }
      if (any) softmax_row(sc, S);
      else for (int64_t s = 0; s < S; s++) sc[s] = 1.0f / (float)S;  // nothing attendable: uniform, as the graph's finite mask
      float *o = a.data() + r * D + hh * Dh;
      for (int64_t d = 0; d < Dh; d++) o[d] = 0.f;
      for (int64_t s = 0; s < S; s++) {
        if (sc[s] == 0.f) continue;
        const float *vv = s == pos0 ? vnew : vr + s * Dh;
        for (int64_t d = 0; d < Dh; d++) o[d] += sc[s] * vv[d];
      }
    }
    bar.wait();
    add_into_x(M(8), P(9), a.data(), D);
    bar.wait();
    norm(P(14), P(15));
    rows_part(h, R, D, M(16), D, P(17), q.data(), lo(D), hi(D));
    bar.wait();
    const float *kx = P(20), *vx = P(21);
    for (int64_t p = p0; p < p1; p++) {  // cross-attention
      const int64_t r = p / H, hh = p % H, b = r / beams;
      const float *qv = q.data() + r * D + hh * Dh, *kt = kx + (b * H + hh) * Dh * Se, *vv = vx + (b * H + hh) * Se * Dh;
      for (int64_t s = 0; s < Se; s++) sc[s] = 0.f;
      for (int64_t d = 0; d < Dh; d++) {
        const float qd = qv[d] * scaling;
        const float *row = kt + d * Se;
        for (int64_t s = 0; s < Se; s++) sc[s] += qd * row[s];
      }
      softmax_row(sc, Se);
      float *o = a.data() + r * D + hh * Dh;
      for (int64_t d = 0; d < Dh; d++) o[d] = 0.f;
      for (int64_t s = 0; s < Se; s++) {
        const float w = sc[s], *vs = vv + s * Dh;
        for (int64_t d = 0; d < Dh; d++) o[d] += w * vs[d];
      }
    }
    bar.wait();
    add_into_x(M(18), P(19), a.data(), D);
    bar.wait();
    norm(P(22), P(23));
    rows_part(h, R, D, M(24), F, P(25), f.data(), lo(F), hi(F));
    for (int64_t r = 0; r < R; r++) gelu_row(f.data() + r * F + lo(F), nullptr, 0.f, f.data() + r * F + lo(F), hi(F) - lo(F));
    bar.wait();
    add_into_x(M(26), P(27), f.data(), F);
  });
  return 0;
}
extern "C" int DecoderLayer(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                            void *extra) {
  return decoder_layer<float>(params, shapes);
}
extern "C" int DecoderLayerF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                               void *stream, void *extra) {
  return decoder_layer<Half>(params, shapes);
}
extern "C" int DecoderLayerBF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                void *stream, void *extra) {
  return decoder_layer<BHalf>(params, shapes);
}
// C (MR x NR, row stride ldc) = A (MR rows packed k-major: ap[k][MR]) x B (packed: bp[k][NR]), kc terms.
// add: C += instead of C =. A 6 x 16 register tile: 12 accumulators, 2 B loads and 6 broadcasts
// per k.
static inline void gemm_tile(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, bool add) {
  __m256 acc[MR][2];
  for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kc; k++) {
    const __m256 b0 = _mm256_loadu_ps(bp), b1 = _mm256_loadu_ps(bp + 8);
    for (int r = 0; r < MR; r++) {
      const __m256 a = _mm256_broadcast_ss(ap + r);
      acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]); acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
    }
    ap += MR; bp += NR;
  }
  for (int r = 0; r < MR; r++) {
    float *row = c + r * ldc;
    if (add) { acc[r][0] = _mm256_add_ps(acc[r][0], _mm256_loadu_ps(row)); acc[r][1] = _mm256_add_ps(acc[r][1], _mm256_loadu_ps(row + 8)); }
    _mm256_storeu_ps(row, acc[r][0]); _mm256_storeu_ps(row + 8, acc[r][1]);
  }
}
// The cross-attention K and V of every decoder layer from the encoder output, in one launch and
// straight into the layouts the step graphs read (no transposes after the MatMuls): what
// graphs.cross_kv computes per layer, k = enc Wk^T, v = enc Wv^T + bv, as K^T (B, H, Dh, S) and
// V (B, H, S, Dh). inputs: 0 enc (B, S, D); then per layer Wk (D, D), Wv (D, D), bv (D).
// outputs, after the inputs: per layer K^T, V. The encoder rows are packed once (6-row panels,
// k-major); the work items, (layer, K or V, audio, 64 output columns), pack their weight columns
// once and run the 6 x 16 tile over 96-row blocks (PROFILE_NOTES section 23).
extern "C" int CrossKV(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if ((nparam - 1) % 5 != 0 || nparam < 6) return 1;
  const int64_t L = (nparam - 1) / 5, B = shapes[0][0], S = shapes[0][1], D = shapes[0][2];
  const int64_t H = shapes[1 + 3 * L][1], Dh = shapes[1 + 3 * L][2];
  if (H * Dh != D) return 1;
  for (int64_t l = 0; l < L; l++)
    if (shapes[1 + 3 * l][0] != D || shapes[1 + 3 * l][1] != D || shapes[2 + 3 * l][0] != D || shapes[3 + 3 * l][0] != D) return 1;
  const float *enc = (const float *)params[0];
  enum { GROUP = 4 * NR, KC = 256, MC = 96 };
  const int64_t panels = (B * S + MR - 1) / MR;  // row panels over all audios' frames
  std::vector<float> ap(panels * MR * D);  // ap[p][k][MR]
  parallel(panels, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; p++) {
      float *dst = ap.data() + p * MR * D;
      for (int i = 0; i < MR; i++) {
        const int64_t row = p * MR + i;
        if (row < B * S) { const float *src = enc + row * D; for (int64_t k = 0; k < D; k++) dst[k * MR + i] = src[k]; }
        else for (int64_t k = 0; k < D; k++) dst[k * MR + i] = 0.f;
      }
    }
  });
  const int64_t groups = (D + GROUP - 1) / GROUP;
  parallel(L * 2 * B * groups, [&](int64_t lo, int64_t hi) {
    std::vector<float> bp(D * GROUP), cb(MC * GROUP);
    for (int64_t item = lo; item < hi; item++) {
      const int64_t g = item % groups, b = item / groups % B, kind = item / groups / B % 2, l = item / groups / B / 2;
      const float *w = (const float *)params[1 + 3 * l + kind], *bias = kind ? (const float *)params[3 + 3 * l] : nullptr;
      float *out = (float *)params[1 + 3 * L + 2 * l + kind];
      const int64_t n0 = g * GROUP, nc = std::min<int64_t>(GROUP, D - n0);
      int64_t col[GROUP];  // V's offset of column n0 + j from its frame's row of head 0
      for (int64_t j = 0; j < nc; j++) col[j] = (n0 + j) / Dh * S * Dh + (n0 + j) % Dh;
      for (int64_t s = 0; s < GROUP / NR; s++)  // bp[s][k][NR] = w[n0 + s NR + j][k], zeros past D
        for (int j = 0; j < NR; j++) {
          const int64_t n = n0 + s * NR + j;
          float *dst = bp.data() + s * D * NR + j;
          if (n < D) { const float *src = w + n * D; for (int64_t k = 0; k < D; k++) dst[k * NR] = src[k]; }
          else for (int64_t k = 0; k < D; k++) dst[k * NR] = 0.f;
        }
      // this audio's frames: rows b S .. b S + S of the packed panels (a panel may straddle two audios)
      for (int64_t m0 = b * S / MR * MR; m0 < (b + 1) * S; m0 += MC) {
        const int64_t mc = std::min<int64_t>(MC, (b + 1) * S - m0);
        for (int64_t k0 = 0; k0 < D; k0 += KC) {
          const int64_t kc = std::min<int64_t>(KC, D - k0);
          for (int64_t s = 0; s * NR < nc; s++)
            for (int64_t i = 0; i < mc; i += MR)
              gemm_tile(kc, ap.data() + (m0 + i) / MR * MR * D + k0 * MR, bp.data() + s * D * NR + k0 * NR,
                        cb.data() + i * GROUP + s * NR, GROUP, k0 > 0);
        }
        const int64_t i0 = std::max<int64_t>(0, b * S - m0);  // the block's first row of this audio
        if (kind == 0)  // K^T (B, H, Dh, S) is (B, D, S): column n of the block is a run of frames
          for (int64_t j = 0; j < nc; j++) {
            float *o = out + (b * D + n0 + j) * S + (m0 - b * S);
            for (int64_t i = i0; i < mc; i++) o[i] = cb[i * GROUP + j];
          }
        else  // V (B, H, S, Dh): column n is element n % Dh of head n / Dh
          for (int64_t i = i0; i < mc; i++) {
            float *o = out + (b * H * S + m0 + i - b * S) * Dh;
            for (int64_t j = 0; j < nc; j++) o[col[j]] = cb[i * GROUP + j] + bias[n0 + j];
          }
      }
    }
  });
  return 0;
}
