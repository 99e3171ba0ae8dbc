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
// rational approximation (relative error ~1e-7, as MindSpore's own erff). One source for every
// instruction set: the vectors are simd.h's (simd::vf, W float lanes: AVX-512 16, AVX2 + FMA 8,
// AArch64 NEON 4), chosen by the build's flags (whisper_accel.kernels.isa / build). The AVX2 build
// computes what the AVX2-only kernels before it did, bit for bit; the others differ only in the
// order of a row's horizontal sums (see simd.h). The
// element-wise kernels are single-threaded (MindSpore's pool runs the MatMuls around them);
// Attention, most of a layer's arithmetic, splits its work over the CPUs this process may run
// on (WHISPER_ACCEL_KERNEL_THREADS overrides the count). Built once per machine by
// whisper_accel.runtime.native with the system C++ compiler.
#include "simd.h"
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <atomic>
#include <thread>
#include <condition_variable>
#include <mutex>
#include <string>
#include <unistd.h>
#include <vector>
#include <sched.h>
using simd::vf;
using simd::W;
// Which branch of simd.h this library was built with ("avx512", "avx2", "neon"), and its lanes.
extern "C" const char *KernelISA() { return WHISPER_ACCEL_ISA; }
extern "C" int KernelLanes() { return W; }
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
static inline float gelu1(float v) { return v * 0.5f * (erf_rat(v / 1.41421356237309504880f) + 1.0f); }
static void gelu_row(const float *x, const float *b, float bb, float *y, int64_t n) {
  int64_t j = 0;
  if (b) { for (; j + W <= n; j += W) simd::store(y + j, simd::gelu(simd::add(simd::load(x + j), simd::load(b + j)))); for (; j < n; j++) y[j] = gelu1(x[j] + b[j]); }
  else { const vf B = simd::set1(bb); for (; j + W <= n; j += W) simd::store(y + j, simd::gelu(simd::add(simd::load(x + j), B))); for (; j < n; j++) y[j] = gelu1(x[j] + bb); }
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
static inline void ln_row(const float *x, const float *g, const float *b, float *y, int64_t c, float eps) {
  vf s = simd::zero(); int64_t j = 0; float ss = 0.f;
  for (; j + W <= c; j += W) s = simd::add(s, simd::load(x + j));
  float sum = simd::hsum(s); for (; j < c; j++) sum += x[j];
  const float mean = sum / (float)c; const vf M = simd::set1(mean);
  vf v = simd::zero(); j = 0;
  for (; j + W <= c; j += W) { vf d = simd::sub(simd::load(x + j), M); v = simd::fmadd(d, d, v); }
  ss = simd::hsum(v); for (; j < c; j++) { float d = x[j] - mean; ss += d * d; }
  const float rstd = 1.0f / std::sqrt(ss / (float)c + eps); const vf R = simd::set1(rstd);
  j = 0;
  for (; j + W <= c; j += W) {
    vf d = simd::mul(simd::sub(simd::load(x + j), M), R);
    simd::store(y + j, simd::fmadd(d, simd::load(g + j), simd::load(b + j)));
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
    for (; j + W <= c; j += W) simd::store(rr + j, simd::add(simd::load(xr + j), simd::add(simd::load(yr + j), simd::load(bias + j))));
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
    for (; j + W <= c; j += W) simd::store(rr + j, simd::add(simd::load(xr + j), simd::add(simd::load(yr + j), simd::load(bias + j))));
    for (; j < c; j++) rr[j] = xr[j] + (yr[j] + bias[j]);
  }
  return 0;
}
static int threads_for(int64_t items) {
  cpu_set_t set; int n = 1;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) n = CPU_COUNT(&set);
  if (const char *e = std::getenv("WHISPER_ACCEL_KERNEL_THREADS")) { int v = std::atoi(e); if (v > 0) n = v; }
  if (n > 64) n = 64;
  return (int)std::max<int64_t>(1, std::min<int64_t>(n, items));
}
// Worker threads kept for the process: a kernel call hands them its parts instead of starting
// threads (starting and joining one cost ~45 us here, and a greedy step makes five calls). The
// workers are made on first use (one fewer than threads_for allows then), spin briefly after a part
// (a step's kernels come back to back; past SPIN_PAUSES they yield the core, so other threads,
// MindSpore's among them, get it), then sleep until the next call. One call uses the pool at a
// time: a call that finds it busy (a kernel on another thread) or too small starts threads of
// its own, as it did before the pool. A forked child makes a pool of its own. Never destroyed:
// its threads are detached and end with the process.
class Pool {
 public:
  typedef void (*Part)(void *ctx, int i);
  static Pool *get() {
    static std::atomic<Pool *> pool{nullptr};
    static std::mutex made;
    Pool *p = pool.load(std::memory_order_acquire);
    if (p && p->pid_ == getpid()) return p;
    std::lock_guard<std::mutex> lock(made);
    p = pool.load(std::memory_order_acquire);
    if (!p || p->pid_ != getpid()) {  // none yet, or one of the parent's (its threads are not in this process)
      p = new Pool(threads_for(INT64_MAX) - 1);
      pool.store(p, std::memory_order_release);
    }
    return p;
  }
  // part(ctx, i) for i in 0..n-1 (0 on this thread); false (nothing run) when the pool is busy
  // or has fewer than n - 1 workers
  bool run(int n, Part part, void *ctx) {
    if (n - 1 > (int)size_ || !busy_.try_lock()) return false;
    part_ = part; ctx_ = ctx; n_ = n;
    left_.store((int)size_, std::memory_order_relaxed);  // every worker answers (those past n - 1 idle)
    {
      std::lock_guard<std::mutex> lock(m_);
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
    part(ctx, 0);
    for (int spins = 0; left_.load(std::memory_order_acquire) != 0; spins++) {
      if (spins < SPIN_PAUSES) simd::pause();
      else std::this_thread::yield();
    }
    busy_.unlock();
    return true;
  }

 private:
  enum { SPIN_PAUSES = 2000, SPIN_YIELDS = 2000 };
  explicit Pool(int workers) : size_(std::max(0, workers)), pid_(getpid()) {
    // generation 0 is seen: a worker that starts after the first call was handed out still runs it
    for (unsigned i = 1; i <= size_; i++) std::thread([this, i] { work(i, 0); }).detach();
  }
  void work(unsigned i, uint64_t seen) {
    for (;;) {
      for (int spins = 0; gen_.load(std::memory_order_acquire) == seen; spins++) {
        if (spins < SPIN_PAUSES) simd::pause();
        else if (spins < SPIN_PAUSES + SPIN_YIELDS) std::this_thread::yield();
        else {
          std::unique_lock<std::mutex> lock(m_);
          cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        }
      }
      seen = gen_.load(std::memory_order_acquire);
      if ((int)i < n_) part_(ctx_, (int)i);
      // answered: the caller returns (and a next call may begin) only after every worker did, so
      // no worker reads a later call's task as this one's
      left_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  const unsigned size_;
  const pid_t pid_;
  std::mutex busy_, m_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::atomic<int> left_{0};
  Part part_ = nullptr;
  void *ctx_ = nullptr;
  int n_ = 0;
};
template <class F> static void parallel(int64_t items, F f) {
  int n = threads_for(items);
  if (n == 1) { f(0, items); return; }
  struct Ctx { F *f; int64_t items; int n; } ctx{&f, items, n};
  Pool::Part part = [](void *c, int i) {
    Ctx *x = (Ctx *)c;
    (*x->f)(x->items * i / x->n, x->items * (i + 1) / x->n);
  };
  if (Pool::get()->run(n, part, &ctx)) return;
  std::vector<std::thread> threads;
  for (int i = 1; i < n; i++) threads.emplace_back([=] { f(items * i / n, items * (i + 1) / n); });
  f(0, items / n);
  for (auto &t : threads) t.join();
}
// Register tiles: MR rows by NR = NV vectors of columns, MR x NV accumulators: 6 x 2 x 8 with AVX2
// (12 of its 16 registers), 6 x 2 x 16 with AVX-512; 5 x 4 x 4 with NEON (20 of 32 registers: it
// has no FMA with a memory operand, so more columns per row value loaded; 6 rows spill). An
// element's sum runs in the same order whatever the tile.
enum { NV = W == 4 ? 4 : 2, MR = W == 4 ? 5 : 6, NR = NV * W };
// The loops over a tile's NV vectors, unrolled in full: without it GCC 12 kept the AVX2 tiles'
// accumulators on the stack (attention 1.5x slower, same results).
#define NV_LOOP _Pragma("GCC unroll 16")
// Scores of MR query rows (q: MR rows of Dh, stride qs) against one packed K tile (Dh x NR);
// with mx, also each row's running maximum (W lanes, mx[r * W]) over the tile's NR keys.
// (The unrolled inner loops measured 0.92x the time of plain ones: PROFILE_NOTES section 30.)
static inline void qk_tile(const float *q, int64_t qs, const float *kt, int64_t dh, float *out, int64_t os,
                           float *mx = nullptr) {
  vf a[MR][NV];
  for (int r = 0; r < MR; r++) NV_LOOP for (int j = 0; j < NV; j++) a[r][j] = simd::zero();
#pragma GCC unroll 4
  for (int64_t d = 0; d < dh; d++) {
    vf kv[NV];
    NV_LOOP for (int j = 0; j < NV; j++) kv[j] = simd::load(kt + d * NR + j * W);
    for (int r = 0; r < MR; r++) {
      const vf qb = simd::broadcast(q + r * qs + d);
      NV_LOOP for (int j = 0; j < NV; j++) a[r][j] = simd::fmadd(qb, kv[j], a[r][j]);
    }
  }
  for (int r = 0; r < MR; r++) {
    NV_LOOP for (int j = 0; j < NV; j++) simd::store(out + r * os + j * W, a[r][j]);
    if (mx) {
      vf m = a[r][0];
      NV_LOOP for (int j = 1; j < NV; j++) m = simd::max(m, a[r][j]);
      simd::store(mx + r * W, simd::max(simd::load(mx + r * W), m));
    }
  }
}
// MR rows of P (stride ps, sp columns) times packed V (sp x dh, dh a multiple of NR), added to o
// (MR x dh) when add, else written.
static inline void pv_tile(const float *p, int64_t ps, const float *v, int64_t sp, int64_t dh, float *o, bool add) {
  for (int64_t c = 0; c < dh; c += NR) {
    vf a[MR][NV];
    for (int r = 0; r < MR; r++) NV_LOOP for (int j = 0; j < NV; j++) a[r][j] = add ? simd::load(o + r * dh + c + j * W) : simd::zero();
#pragma GCC unroll 4
    for (int64_t s = 0; s < sp; s++) {
      vf vv[NV];
      NV_LOOP for (int j = 0; j < NV; j++) vv[j] = simd::load(v + s * dh + c + j * W);
      for (int r = 0; r < MR; r++) {
        const vf pb = simd::broadcast(p + r * ps + s);
        NV_LOOP for (int j = 0; j < NV; j++) a[r][j] = simd::fmadd(pb, vv[j], a[r][j]);
      }
    }
    for (int r = 0; r < MR; r++) NV_LOOP for (int j = 0; j < NV; j++) simd::store(o + r * dh + c + j * W, a[r][j]);
  }
}
// softmax(q' k^T) v' per head, without writing the score matrix out: q' = (q + bq) * scale and
// v' = v + bv where bq / bv are given, else q and v. q (B, T, H, Dh); k, v (B, S, H, Dh) ->
// o (B, T, H, Dh). K^T is packed in NR-key tiles and V per head. The work, blocks of QB query
// rows of one head, is taken by the threads from a shared counter. A block's QB x S scores stay
// in a per-thread buffer (in L2), so each packed K tile and V chunk is read once per QB rows;
// each row's maximum is taken as its scores are stored. The arithmetic is the 6-row kernel's of
// before, bit for bit (PROFILE_NOTES section 30: applying 1 / sum to the output row instead of
// the probabilities moved beam scores by up to 1.1e-4 from stock's).
enum { QT = 8, QB = MR * QT, VC = 64 };
static_assert(VC % NR == 0, "P V chunks of whole key tiles");
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
    std::vector<float> sc((size_t)(QB * SP)), qb((size_t)(QB * Dh)), ob((size_t)(QB * DP)), mx((size_t)(QB * W));
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
          qk_tile(&qb[rt * MR * Dh], Dh, K + (s / NR) * Dh * NR, Dh, &sc[rt * MR * SP + s], SP, &mx[rt * MR * W]);
      if (full < SP)  // the last tile: its padded keys do not count in the maximum
        for (int64_t rt = 0; rt < tiles; rt++) qk_tile(&qb[rt * MR * Dh], Dh, K + (full / NR) * Dh * NR, Dh, &sc[rt * MR * SP + full], SP);
      for (int64_t r = 0; r < tiles * MR; r++) {  // exp over the S real keys; the padded ones get 0
        float *row = &sc[r * SP];
        float m = simd::hmax(simd::load(&mx[r * W]));
        for (int64_t s = full; s < S; s++) m = std::fmax(m, row[s]);
        const vf M = simd::set1(m); vf zv = simd::zero(); int64_t s = 0;
        for (; s + W <= S; s += W) { vf e = simd::exp(simd::sub(simd::load(row + s), M)); simd::store(row + s, e); zv = simd::add(zv, e); }
        float z = simd::hsum(zv); for (; s < S; s++) { row[s] = std::exp(row[s] - m); z += row[s]; }
        for (; s < SP; s++) row[s] = 0.f;
        const float iz = 1.0f / z; const vf Z = simd::set1(iz); s = 0;
        for (; s + W <= S; s += W) simd::store(row + s, simd::mul(simd::load(row + s), Z));
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
// to MB rows of x (x stays in L1): NW = 2 w rows at a time, for one row of x or MB = 4.
// The w rows are a forward stream from memory (the projection's 80 MB for tiny.en, a layer's
// matrices after the projection evicted them), so the block PREFETCH_BYTES ahead is prefetched
// while this one is read, its lines spread over the k loop: reading the rows of w in order with
// the prefetch measured ~2x the rate of eight interleaved rows without it, the same over a
// distance of 6-24 KB (benchmarks/PROFILE_NOTES.md section 42). The prefetch changes no result:
// each output is still one accumulator over k in order, then its hsum and the scalar tail.
// Weights as stored: float32, float16 (IEEE half, converted with F16C / FCVTL) or bfloat16 (the upper
// half of a float32). Either conversion to float32 is exact, so a kernel that reads half-precision
// weights computes what it computes on their float32 copy, bit for bit, and reads half the bytes.
// (Half, BHalf and their loads: simd.h.)
enum { PREFETCH_BYTES = 12288 };
template <int NW, int MB, class T> static inline void rows_block(const float *x, const T *w, float *y, int64_t M,
                                                                 int64_t K, int64_t N, int64_t n0) {
  const int64_t KW = K / W * W;
  // prefetch window: the NW rows' bytes, PREFETCH_BYTES ahead, per_step bytes of it each k step
  const char *ahead = (const char *)(w + n0 * K) + PREFETCH_BYTES;
  const int64_t per_step = KW ? (NW * K * (int64_t)sizeof(T) + KW / W - 1) / (KW / W) : 0;
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t mm = std::min<int64_t>(MB, M - m0);
    vf a[MB][NW];
    for (int i = 0; i < MB; i++) for (int j = 0; j < NW; j++) a[i][j] = simd::zero();
    for (int64_t k = 0, step = 0; k < KW; k += W, step++) {
      if (m0 == 0)  // the first pass over these rows streams them; a later one finds them in cache
        for (int64_t off = step * per_step; off < (step + 1) * per_step; off += 64) __builtin_prefetch(ahead + off, 0, 3);
      vf wv[NW];
      for (int j = 0; j < NW; j++) wv[j] = simd::load(w + (n0 + j) * K + k);
      for (int i = 0; i < MB; i++) {
        if (i < mm) {
          const vf xv = simd::load(x + (m0 + i) * K + k);
          for (int j = 0; j < NW; j++) a[i][j] = simd::fmadd(xv, wv[j], a[i][j]);
        }
      }
    }
    for (int64_t i = 0; i < mm; i++) {
      const float *xr = x + (m0 + i) * K;
      for (int j = 0; j < NW; j++) {
        const T *wr = w + (n0 + j) * K; float acc = simd::hsum(a[i][j]);
        for (int64_t k = KW; k < K; k++) acc = std::fma(xr[k], simd::load1(wr + k), acc);  // one rounding, in every instantiation
        y[(m0 + i) * N + n0 + j] = acc;
      }
    }
  }
}
// y[:, n0:n1] = x (R, K) w[n0:n1]^T (+ b), y with row stride N
template <class T> static void rows_part(const float *x, int64_t R, int64_t K, const T *w, int64_t N, const float *b,
                                         float *y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  if (R == 1) for (; n + 2 <= n1; n += 2) rows_block<2, 1>(x, w, y, R, K, N, n);
  for (; n + 2 <= n1; n += 2) rows_block<2, 4>(x, w, y, R, K, N, n);
  for (; n < n1; n++) rows_block<1, 1>(x, w, y, R, K, N, n);
  if (b) for (int64_t r = 0; r < R; r++) for (int64_t j = n0; j < n1; j++) y[r * N + j] += b[j];
}
template <class T> static int rows_matmul(void **params, int64_t **shapes) {
  const float *x = (const float *)params[0]; const T *w = (const T *)params[1]; float *y = (float *)params[2];
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
        if (spins < 4000) simd::pause();
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
// DecoderLayer's arguments, in order: the one list its code indexes (the DL_* constants) and
// ArgNames("DecoderLayer") exports. Python's schema (kernels/weights.py DECODER_LAYER_ARGS and
// DECODER_LAYER_OUTS) must name the same list; runtime/kernel_checks.check_signature compares
// the two before the kernels are used.
#define DECODER_LAYER_ARGS(X)                                                                             \
  X(DL_X, "x") X(DL_LN1_W, "ln1.weight") X(DL_LN1_B, "ln1.bias") X(DL_Q_W, "attn.q_w") X(DL_Q_B, "attn.q_b")   \
  X(DL_K_W, "attn.k_w") X(DL_V_W, "attn.v_w") X(DL_V_B, "attn.v_b") X(DL_O_W, "attn.o_w")                     \
  X(DL_O_B, "attn.o_b") X(DL_K_CACHE, "k_cache") X(DL_V_CACHE, "v_cache") X(DL_POS, "positions")              \
  X(DL_KEY_OK, "key_ok") X(DL_LN2_W, "ln2.weight") X(DL_LN2_B, "ln2.bias") X(DL_CQ_W, "cross.q_w")           \
  X(DL_CQ_B, "cross.q_b") X(DL_CO_W, "cross.o_w") X(DL_CO_B, "cross.o_b") X(DL_KX, "k_x") X(DL_VX, "v_x")    \
  X(DL_LN3_W, "ln3.weight") X(DL_LN3_B, "ln3.bias") X(DL_FC1_W, "fc1_w") X(DL_FC1_B, "fc1_b")                \
  X(DL_FC2_W, "fc2_w") X(DL_FC2_B, "fc2_b") X(DL_SCALING, "scaling")                                        \
  X(DL_X_OUT, "x_out") X(DL_K_NEW, "k_new") X(DL_V_NEW, "v_new")
#define DL_ENUM(id, name) id,
#define DL_NAME(id, name) name ","
enum DecoderLayerArg { DECODER_LAYER_ARGS(DL_ENUM) DL_COUNT };
static const char decoder_layer_names[] = DECODER_LAYER_ARGS(DL_NAME);
// The argument names of a kernel, comma-separated, in order (NULL: a kernel without a list).
extern "C" const char *ArgNames(const char *kernel) {
  static std::string names(decoder_layer_names, sizeof(decoder_layer_names) - 2);  // less the last ","
  return std::string(kernel) == "DecoderLayer" ? names.c_str() : nullptr;
}
static std::atomic<long long> decoder_layer_calls{0};
// How many DecoderLayer calls this process made (tests check that steps take the kernel).
extern "C" long long DecoderLayerCalls() { return decoder_layer_calls.load(); }
// DecoderLayerF16 / DecoderLayerBF16: the same with the eight weight matrices (Wq, Wk, Wv, Wo,
// Wcq, Wco, W1, W2) float16 / bfloat16 as stored; everything else float32.
template <class T> static int decoder_layer(void **params, int64_t **shapes) {
  decoder_layer_calls.fetch_add(1);
  auto P = [&](int i) { return (const float *)params[i]; };
  auto M = [&](int i) { return (const T *)params[i]; };
  const int64_t R = shapes[DL_X][0], D = shapes[DL_X][1], H = shapes[DL_K_CACHE][1], S = shapes[DL_K_CACHE][2];
  const int64_t Dh = shapes[DL_K_CACHE][3], B = shapes[DL_KX][0], Se = shapes[DL_KX][3], F = shapes[DL_FC1_W][0];
  const int64_t KR = shapes[DL_KEY_OK][0];
  if (H * Dh != D || R % B != 0 || (KR != 1 && KR != R) || shapes[DL_KEY_OK][1] != S || shapes[DL_VX][2] != Se) return 1;
  const int64_t beams = R / B, pos0 = ((const int32_t *)params[DL_POS])[0];
  if (pos0 < 0 || pos0 >= S) return 1;
  const float scaling = P(DL_SCALING)[0];
  float *xo = (float *)params[DL_X_OUT], *kn = (float *)params[DL_K_NEW], *vn = (float *)params[DL_V_NEW];
  const int n = threads_for(D / 8);
  std::vector<float> q(R * D), a(R * D), f(R * F), hs(n * R * D), scs(n * std::max(S, Se));
  std::memcpy(xo, P(DL_X), sizeof(float) * R * D);
  SpinBarrier bar(n);
  parallel(n, [&](int64_t i0, int64_t) {
    const int i = (int)i0;
    float *h = hs.data() + i * R * D, *sc = scs.data() + i * std::max(S, Se);
    auto lo = [&](int64_t N) { return N * i / n / 8 * 8; };
    auto hi = [&](int64_t N) { return i == n - 1 ? N : N * (i + 1) / n / 8 * 8; };
    const int64_t p0 = R * H * i / n, p1 = R * H * (i + 1) / n;  // this thread's (row, head) pairs
    auto norm = [&](const float *g, const float *b) { for (int64_t r = 0; r < R; r++) ln_row(xo + r * D, g, b, h + r * D, D, 1e-5f); };
    std::vector<float> t(R * D);
    auto add_into_x = [&](const T *w, const float *b, const float *in, int64_t K) {
      // xo[:, lo:hi] += in (R, K) w[lo:hi]^T + b[lo:hi]
      rows_part(in, R, K, w, D, b, t.data(), lo(D), hi(D));
      for (int64_t r = 0; r < R; r++) for (int64_t j = lo(D); j < hi(D); j++) xo[r * D + j] += t[r * D + j];
    };
    norm(P(DL_LN1_W), P(DL_LN1_B));
    rows_part(h, R, D, M(DL_Q_W), D, P(DL_Q_B), q.data(), lo(D), hi(D));
    rows_part(h, R, D, M(DL_K_W), D, nullptr, kn, lo(D), hi(D));
    rows_part(h, R, D, M(DL_V_W), D, P(DL_V_B), vn, lo(D), hi(D));
    bar.wait();
    const float *kc = P(DL_K_CACHE), *vc = P(DL_V_CACHE), *ok = P(DL_KEY_OK);
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
    add_into_x(M(DL_O_W), P(DL_O_B), a.data(), D);
    bar.wait();
    norm(P(DL_LN2_W), P(DL_LN2_B));
    rows_part(h, R, D, M(DL_CQ_W), D, P(DL_CQ_B), q.data(), lo(D), hi(D));
    bar.wait();
    const float *kx = P(DL_KX), *vx = P(DL_VX);
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
    add_into_x(M(DL_CO_W), P(DL_CO_B), a.data(), D);
    bar.wait();
    norm(P(DL_LN3_W), P(DL_LN3_B));
    rows_part(h, R, D, M(DL_FC1_W), F, P(DL_FC1_B), f.data(), lo(F), hi(F));
    for (int64_t r = 0; r < R; r++) gelu_row(f.data() + r * F + lo(F), nullptr, 0.f, f.data() + r * F + lo(F), hi(F) - lo(F));
    bar.wait();
    add_into_x(M(DL_FC2_W), P(DL_FC2_B), f.data(), F);
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
// add: C += instead of C =. An MR x NR register tile (MR rows x NV vectors): NV B loads and MR broadcasts per k.
static inline void gemm_tile(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, bool add) {
  vf acc[MR][NV];
  for (int r = 0; r < MR; r++) NV_LOOP for (int j = 0; j < NV; j++) acc[r][j] = simd::zero();
  for (int64_t k = 0; k < kc; k++) {
    vf bv[NV];
    NV_LOOP for (int j = 0; j < NV; j++) bv[j] = simd::load(bp + j * W);
    for (int r = 0; r < MR; r++) {
      const vf a = simd::broadcast(ap + r);
      NV_LOOP for (int j = 0; j < NV; j++) acc[r][j] = simd::fmadd(a, bv[j], acc[r][j]);
    }
    ap += MR; bp += NR;
  }
  for (int r = 0; r < MR; r++) {
    float *row = c + r * ldc;
    NV_LOOP for (int j = 0; j < NV; j++) simd::store(row + j * W, add ? simd::add(acc[r][j], simd::load(row + j * W)) : acc[r][j]);
  }
}
// The cross-attention K and V of every decoder layer from the encoder output, in one launch and
// straight into the layouts the step graphs read (no transposes after the MatMuls): what
// graphs.cross_kv computes per layer, k = enc Wk^T, v = enc Wv^T + bv, as K^T (B, H, Dh, S) and
// V (B, H, S, Dh). inputs: 0 enc (B, S, D); then per layer Wk (D, D), Wv (D, D), bv (D).
// outputs, after the inputs: per layer K^T, V. The encoder rows are packed once (MR-row panels,
// k-major); the work items, (layer, K or V, audio, 4 NR output columns), pack their weight columns
// once and run the MR x NR tile over blocks of 16 MR rows (PROFILE_NOTES section 23).
extern "C" int CrossKV(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                       void *extra) {
  if ((nparam - 1) % 5 != 0 || nparam < 6) return 1;
  const int64_t L = (nparam - 1) / 5, B = shapes[0][0], S = shapes[0][1], D = shapes[0][2];
  const int64_t H = shapes[1 + 3 * L][1], Dh = shapes[1 + 3 * L][2];
  if (H * Dh != D) return 1;
  for (int64_t l = 0; l < L; l++)
    if (shapes[1 + 3 * l][0] != D || shapes[1 + 3 * l][1] != D || shapes[2 + 3 * l][0] != D || shapes[3 + 3 * l][0] != D) return 1;
  const float *enc = (const float *)params[0];
  enum { GROUP = 4 * NR, KC = 256, MC = 16 * MR };  // MC: whole row panels (96 rows with AVX2)
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
// bfloat16 matrix products, for the host encoder's linear layers and convolutions when the
// configuration names matmul_precision="bfloat16" (never by default). Built into every x86 variant
// where the CPU has AVX512_BF16 (isa.OPTIONAL defines WHISPER_ACCEL_BF16 there), each function
// compiled for AVX-512 F/BW + BF16 by its own target attribute (BF16_TARGET), whatever the
// variant's flags; HasGemmBF16 says whether this library has them.
//   PackBF16(w (N, K) float32)  -> wp (ceil(N / 32), ceil(K / 2), 64) uint16: w rounded to
//        bfloat16 (nearest even), panels of 32 output columns; per pair of inputs (2p, 2p + 1), the
//        panel's columns 0-15 then 16-31, each as the pair (w[c][2p], w[c][2p + 1]): what one
//        VDPBF16PS multiplies; zeros past N and K.
//   GemmBF16(x (M, K) float32, wp) -> y (M, N) = x w^T with x rounded to bfloat16 (nearest even)
//        as it is read, products summed in float32 (N a multiple of 16).
// So y is the float32 product of the bfloat16-rounded inputs, up to float32 summation order: the
// inputs' rounding (relative 2^-9) is the precision given up. Threads split the rows; a thread
// converts blocks of MC rows x KC inputs of x once and runs 8-row x 32-column register tiles
// (16 accumulators) over every panel.
#if defined(WHISPER_ACCEL_BF16) && defined(__x86_64__)
#include <immintrin.h>
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
extern "C" int HasGemmBF16() { return 1; }
static inline uint16_t bf16_round(float f) {
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN (quiet)
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
extern "C" int PackBF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  const int64_t N = shapes[0][0], K = shapes[0][1], P = (N + 31) / 32, KP = (K + 1) / 2;
  if (nparam != 2 || ndims[1] != 3 || shapes[1][0] != P || shapes[1][1] != KP || shapes[1][2] != 64) return 1;
  const float *w = (const float *)params[0];
  uint16_t *out = (uint16_t *)params[1];
  parallel(P, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; p++)
      for (int64_t kp = 0; kp < KP; kp++) {
        uint16_t *o = out + (p * KP + kp) * 64;
        for (int j = 0; j < 32; j++)
          for (int t = 0; t < 2; t++) {
            const int64_t c = p * 32 + j, k = 2 * kp + t;
            o[(j / 16) * 32 + (j % 16) * 2 + t] = c < N && k < K ? bf16_round(w[c * K + k]) : 0;
          }
      }
  });
  return 0;
}
// c (MR_ rows x NV_ vectors of 16 columns, row stride ldc) = (first ? 0 : c) + a b over kpn input
// pairs; a: MR_ rows of bf16 (row stride lda values), b: the panel at the block's first pair.
template <int MR_, int NV_> BF16_TARGET static inline void bf16_tile(const uint16_t *__restrict a, int64_t lda, const uint16_t *__restrict b,
                                                         int64_t kpn, float *__restrict c, int64_t ldc, bool first) {
  __m512 acc[MR_][NV_];
  for (int i = 0; i < MR_; i++)
    for (int v = 0; v < NV_; v++) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + v * 16);
  const int32_t *ai = (const int32_t *)a;
  const int64_t lda2 = lda / 2;
  for (int64_t kp = 0; kp < kpn; kp++) {
    __m512i bv[NV_];
    for (int v = 0; v < NV_; v++) bv[v] = _mm512_loadu_si512((const void *)(b + kp * 64 + v * 32));
    for (int i = 0; i < MR_; i++) {
      const __m512i av = _mm512_set1_epi32(ai[i * lda2 + kp]);
      for (int v = 0; v < NV_; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], (__m512bh)av, (__m512bh)bv[v]);
    }
  }
  for (int i = 0; i < MR_; i++)
    for (int v = 0; v < NV_; v++) _mm512_storeu_ps(c + i * ldc + v * 16, acc[i][v]);
}
typedef void (*bf16_tile_fn)(const uint16_t *, int64_t, const uint16_t *, int64_t, float *, int64_t, bool);
template <int NV_> struct Bf16Tiles {
  static bf16_tile_fn get(int rows) {
    static const bf16_tile_fn t[9] = {nullptr, bf16_tile<1, NV_>, bf16_tile<2, NV_>, bf16_tile<3, NV_>, bf16_tile<4, NV_>,
                                      bf16_tile<5, NV_>, bf16_tile<6, NV_>, bf16_tile<7, NV_>, bf16_tile<8, NV_>};
    return t[rows];
  }
};
BF16_TARGET static void bf16_rows(const float *x, const uint16_t *wp, float *y, int64_t r0, int64_t r1, int64_t K, int64_t N) {
  enum { MC = 192, KC = 1280 };  // x's block: 192 rows x 1280 inputs in bf16 = 480 KB (L2)
  const int64_t KP = (K + 1) / 2, P = (N + 31) / 32, lda_max = (std::min<int64_t>(KC, K) + 31) / 32 * 32;
  std::vector<uint16_t> block(MC * lda_max + 32);
  uint16_t *abuf = block.data();
  for (int64_t pc = 0; pc < K; pc += KC) {
    const int64_t kc = std::min<int64_t>(KC, K - pc), kpn = (kc + 1) / 2, lda = (kc + 31) / 32 * 32;
    for (int64_t ic = r0; ic < r1; ic += MC) {
      const int64_t mc = std::min<int64_t>(MC, r1 - ic);
      for (int64_t r = 0; r < mc; r++) {  // rows of x in bf16, zeros past kc (the pad of an odd K)
        const float *src = x + (ic + r) * K + pc;
        uint16_t *dst = abuf + r * lda;
        for (int64_t k = 0; k < lda; k += 32) {
          const int64_t rem = kc - k;
          const int r0m = (int)std::max<int64_t>(0, std::min<int64_t>(16, rem)), r1m = (int)std::max<int64_t>(0, std::min<int64_t>(16, rem - 16));
          const __m512 lo = _mm512_maskz_loadu_ps((__mmask16)((1u << r0m) - 1), src + k);
          const __m512 hi = _mm512_maskz_loadu_ps((__mmask16)((1u << r1m) - 1), src + k + 16);
          _mm512_storeu_si512((void *)(dst + k), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
      }
      for (int64_t p = 0; p < P; p++) {
        const uint16_t *bp = wp + (p * KP + pc / 2) * 64;
        const bool full = N - p * 32 >= 32;
        for (int64_t ir = 0; ir < mc; ir += 8) {
          const int rows = (int)std::min<int64_t>(8, mc - ir);
          float *c = y + (ic + ir) * N + p * 32;
          (full ? Bf16Tiles<2>::get(rows) : Bf16Tiles<1>::get(rows))(abuf + ir * lda, lda, bp, kpn, c, N, pc == 0);
        }
      }
    }
  }
}
extern "C" int GemmBF16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream,
                        void *extra) {
  if (nparam != 3 || ndims[0] != 2 || ndims[1] != 3 || ndims[2] != 2) return 1;
  const int64_t M = shapes[0][0], K = shapes[0][1], N = shapes[2][1];
  if (shapes[2][0] != M || N % 16 != 0 || shapes[1][0] != (N + 31) / 32 || shapes[1][1] != (K + 1) / 2 ||
      shapes[1][2] != 64)
    return 1;
  const float *x = (const float *)params[0];
  const uint16_t *wp = (const uint16_t *)params[1];
  float *y = (float *)params[2];
  parallel((M + 7) / 8, [&](int64_t lo, int64_t hi) { bf16_rows(x, wp, y, lo * 8, std::min(M, hi * 8), K, N); });
  return 0;
}
#else
extern "C" int HasGemmBF16() { return 0; }
#endif
