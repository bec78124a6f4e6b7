// Attention forward and backward, the dense layers' products (large and thin), and decode's attention over the
// KV cache (after the thin products, whose tiles it uses) for XLA:CPU, as XLA FFI handlers
// (meditron_jax/kernels/cpu_native.py).
//
// Why: XLA:CPU splits a batched product's matrices between its threads, never its batch, so the small
// per-head products of causal attention run on one core (docs/performance.md, fifth round). Here the
// (batch, KV head) units are split between threads, each running its products one after another through
// a single-threaded sgemm (numpy's bundled OpenBLAS, loaded by mj_init).
//
// Layouts, float32, row-major: q, o [B, Sq, H, D]; k, v [B, Sk, KVH, D] (the model's token-major layout:
// sgemm reads a head's rows with a stride, so nothing is transposed around the call); lse [B, H, Sq];
// segment ids [B, Sk] int32 (queries use the last Sq). Query i sits at key position Sk - Sq + i (bottom-right causal
// alignment). A query that sees no key outputs zeros, has lse -inf and passes no gradient.
#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Sgemm = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                       int64_t, float, float*, int64_t);
using SetThreads = void (*)(int);
using GetThreads = int (*)();
Sgemm sgemm = nullptr;
SetThreads set_blas_threads = nullptr;
GetThreads get_blas_threads = nullptr;

// OpenBLAS's thread count is process-wide (its "_local" setter is too, in numpy's build). While any handler
// runs, it is one (the handlers split the work between their own threads); the last handler to finish
// puts back what numpy had.
std::mutex blas_mutex;
int blas_users = 0, blas_saved = 1;
struct OneBlasThread {
  OneBlasThread() {
    std::lock_guard<std::mutex> lock(blas_mutex);
    if (blas_users++ == 0) {
      blas_saved = get_blas_threads();
      set_blas_threads(1);
    }
  }
  ~OneBlasThread() {
    std::lock_guard<std::mutex> lock(blas_mutex);
    if (--blas_users == 0) set_blas_threads(blas_saved);
  }
};
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
// Query rows per block: each block's products see only its visible keys. 64 measured best on packed batches
// (docs/kernels.md): smaller blocks skip more of other documents' keys, larger ones make fewer sgemm calls.
constexpr int64_t kBlockQ = 64;

struct Shape {
  int64_t B, H, KVH, Sq, Sk, D;
  bool causal;
  float scale;
  const int32_t* seg;  // nullptr: no segments
  int64_t offset() const { return Sk - Sq; }
  int64_t ldq() const { return H * D; }    // from one query row (or output row) of a head to the next
  int64_t ldk() const { return KVH * D; }  // the same for keys and values
  int64_t blocks() const { return (Sq + kBlockQ - 1) / kBlockQ; }  // query blocks
  // Keys [0, visible_end(r1)) can be seen by some query of rows [r0, r1).
  int64_t visible_end(int64_t r1) const { return causal ? std::min(Sk, std::max<int64_t>(0, offset() + r1)) : Sk; }
};

// The keys [lo, hi) that some query of rows [r0, r1) of batch row b can see: the causal prefix, narrowed with
// segments to the first and last key of any of the rows' segments. Keys outside are masked for every row,
// so the block's products skip them; with packed documents that is most of a long row. lo == hi: none.
struct Window {
  int64_t lo, hi;
};
Window key_window(const Shape& sh, int64_t b, int64_t r0, int64_t r1) {
  int64_t lo = 0, hi = sh.visible_end(r1);
  if (sh.seg == nullptr || hi == 0) return {lo, hi};
  const int32_t* seg = sh.seg + b * sh.Sk;
  std::vector<int32_t> ids;  // the rows' distinct segment ids: usually 1-4 documents
  for (int64_t r = sh.offset() + r0; r < sh.offset() + r1; ++r)
    if (std::find(ids.begin(), ids.end(), seg[r]) == ids.end()) ids.push_back(seg[r]);
  auto mine = [&](int32_t id) { return std::find(ids.begin(), ids.end(), id) != ids.end(); };
  while (lo < hi && !mine(seg[lo])) ++lo;
  while (hi > lo && !mine(seg[hi - 1])) --hi;
  return {lo, hi};
}

// Every block's window, [b * blocks + block]: computed once per call, since all heads of a row share them.
std::vector<Window> key_windows(const Shape& sh) {
  const int64_t blocks = sh.blocks();
  std::vector<Window> all(sh.B * blocks);
  for (int64_t b = 0; b < sh.B; ++b)
    for (int64_t i = 0; i < blocks; ++i)
      all[b * blocks + i] = key_window(sh, b, i * kBlockQ, std::min(sh.Sq, (i + 1) * kBlockQ));
  return all;
}

// Runs fn(unit) for unit in [0, n) on XLA's intra-op thread pool, the calling thread included. Units are
// taken from a shared counter, not split in advance: a pool thread busy with another instruction of the
// program (XLA:CPU runs independent ones side by side) joins when it is free, or finds nothing left, and no
// more threads run than the cores allow. The caller returns once every unit is done; a helper that starts
// later touches only the shared state, which it co-owns.
// Threads that can work at once: the pool's, at most one per core this process may use.
int64_t thread_count(ffi::ThreadPool& pool) {
  cpu_set_t set;
  const int64_t cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  return std::max<int64_t>(1, std::min<int64_t>(cores, pool.num_threads()));
}

template <bool kUsesSgemm = true, typename Fn>
void parallel_units(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mutex;
    std::condition_variable all_done;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, f = &fn] {
    for (int64_t u; (u = state->next.fetch_add(1)) < n;) {
      (*f)(u);
      if (state->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(state->mutex);
        state->all_done.notify_all();
      }
    }
  };
  const int64_t helpers = std::min(thread_count(pool), n) - 1;
  std::optional<OneBlasThread> one;
  if (kUsesSgemm) one.emplace();
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(work)(work));
  work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->all_done.wait(lock, [&] { return state->done.load() == n; });
}

constexpr float kMasked = -1e30f;  // a masked score: no infinities are compared under -ffast-math
constexpr float kExpFloor = -87.f;  // expf(-87) = 1.6e-38, the smallest normal float's order

// s[j] = exp(s[j] - m) for the entries of [0, n) not masked (kMasked), 0 for those; returns their sum.
// expf's argument is kept above kExpFloor: libm's vector expf leaves its fast path for any lane that would
// underflow (every masked entry would), so masked entries are zeroed by the select instead. Masks are read
// from the scores, never from bools: a load of bools kept GCC from vectorizing the loop (decode's scalar
// expf was 18% of its grouped kernel's time at Falcon-7B's shape).
float exp_scores(float* s, int64_t n, float m) {
  float total = 0.f;
  for (int64_t j = 0; j < n; ++j) {
    const float e = expf(std::max(s[j] - m, kExpFloor));
    s[j] = s[j] > kMasked * 0.5f ? e : 0.f;
    total += s[j];
  }
  return total;
}

// Scores of rows [r0, r1) against keys w = [lo, hi) into s (rows of hi - lo), then probabilities in place:
// softmax (forward, lse written) or exp(score - lse) (backward, lse read). Invisible keys get 0.
// Branch-free over keys so that the loops vectorise; no infinities are compared, since the library is built
// with -ffast-math (a masked score is kMasked, and never reaches expf).
void probabilities(const Shape& sh, int64_t b, const float* q, const float* k, int64_t r0, int64_t r1, Window w,
                   float* s, float* lse, bool forward) {
  const int64_t M = r1 - r0, D = sh.D, L = w.hi - w.lo;
  sgemm(kRowMajor, kNoTrans, kTrans, M, L, D, sh.scale, q + r0 * sh.ldq(), sh.ldq(), k + w.lo * sh.ldk(), sh.ldk(), 0.f,
        s, L);
  const int32_t* seg = sh.seg == nullptr ? nullptr : sh.seg + b * sh.Sk;
  for (int64_t i = 0; i < M; ++i) {
    float* row = s + i * L;
    const int64_t qi = r0 + i;
    // This row's keys are [w.lo, end) of the window, stored from row[0].
    const int64_t end = sh.causal ? std::min(w.hi, std::max(w.lo, sh.offset() + qi + 1)) : w.hi;
    const int64_t n = end - w.lo;
    const int64_t own = sh.offset() + qi;  // the query's own key, which it sees when in range
    int64_t seen = n;
    if (seg != nullptr) {
      const int32_t mine = seg[own];
      const int32_t* ids = seg + w.lo;
      for (int64_t j = 0; j < n; ++j) row[j] = ids[j] == mine ? row[j] : kMasked;
      if (own < w.lo || own >= end) seen = std::count(ids, ids + n, mine);
    }
    if (seen == 0) {  // sees no key: zeros, and lse -inf
      std::fill(row, row + L, 0.f);
      if (forward) lse[qi] = -INFINITY;
      continue;
    }
    float m = kMasked;
    if (forward) {
      for (int64_t j = 0; j < n; ++j) m = std::max(m, row[j]);
    } else {
      m = lse[qi];
    }
    const float total = exp_scores(row, n, m);
    std::fill(row + n, row + L, 0.f);
    if (forward) {
      const float inv = 1.f / total;
      for (int64_t j = 0; j < n; ++j) row[j] *= inv;
      lse[qi] = m + logf(total);
    }
  }
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& seg, bool causal,
               bool has_segments, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[2], kd[2], qd[1], kd[1], qd[3], causal, scale, has_segments ? seg.typed_data() : nullptr};
}

// A thread's scratch for the block products, kept between units and calls: growing a std::vector zero-fills
// what sgemm overwrites anyway, which was 7% of a layer's attention in a perf profile (docs/kernels.md).
// Cache-line aligned, so that the thin kernel's 16-float tile rows are one line each.
struct AlignedDelete {
  void operator()(float* p) const { ::operator delete[](p, std::align_val_t(64)); }
};
float* scratch(int slot, int64_t n) {
  thread_local std::unique_ptr<float[], AlignedDelete> buffers[3];
  thread_local int64_t sizes[3] = {0, 0, 0};
  if (sizes[slot] < n) {
    buffers[slot].reset(new (std::align_val_t(64)) float[n]);  // not value-initialised
    sizes[slot] = n;
  }
  return buffers[slot].get();
}

// Zeros rows [r0, r1) of a head whose rows are ld apart.
void zero_rows(float* x, int64_t r0, int64_t r1, int64_t ld, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) std::fill(x + r * ld, x + r * ld + D, 0.f);
}

ffi::Error Forward(ffi::ThreadPool pool, bool causal, bool has_segments, float scale, ffi::Buffer<ffi::F32> q,
                   ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                   ffi::ResultBuffer<ffi::F32> o, ffi::ResultBuffer<ffi::F32> lse) {
  if (sgemm == nullptr) return ffi::Error::Internal("meditron_jax cpu_native: sgemm not loaded (mj_init)");
  const Shape sh = shape_of(q, k, seg, causal, has_segments, scale);
  const int64_t groups = sh.H / sh.KVH, D = sh.D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  const int64_t ldq = sh.ldq(), ldk = sh.ldk(), blocks = sh.blocks();
  const std::vector<Window> windows = key_windows(sh);
  parallel_units(pool, sh.B * sh.H, [&](int64_t unit) {
    const int64_t b = unit / sh.H, h = unit % sh.H, kvh = h / groups;
    const float* kk = kp + b * sh.Sk * ldk + kvh * D;  // row 0 of this head; rows are ldk apart
    const float* vv = vp + b * sh.Sk * ldk + kvh * D;
    const float* qq = qp + b * sh.Sq * ldq + h * D;
    float* oo = op + b * sh.Sq * ldq + h * D;
    float* ll = lp + unit * sh.Sq;
    for (int64_t r0 = 0; r0 < sh.Sq; r0 += kBlockQ) {
      const int64_t r1 = std::min(sh.Sq, r0 + kBlockQ), M = r1 - r0;
      const Window w = windows[b * blocks + r0 / kBlockQ];
      const int64_t L = w.hi - w.lo;
      if (L == 0) {
        zero_rows(oo, r0, r1, ldq, D);
        std::fill(ll + r0, ll + r1, -INFINITY);
        continue;
      }
      float* s = scratch(0, M * L);
      probabilities(sh, b, qq, kk, r0, r1, w, s, ll, /*forward=*/true);
      sgemm(kRowMajor, kNoTrans, kNoTrans, M, D, L, 1.f, s, L, vv + w.lo * ldk, ldk, 0.f, oo + r0 * ldq, ldq);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(ffi::ThreadPool pool, bool causal, bool has_segments, float scale, ffi::Buffer<ffi::F32> q,
                    ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg,
                    ffi::Buffer<ffi::F32> o, ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                    ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (sgemm == nullptr) return ffi::Error::Internal("meditron_jax cpu_native: sgemm not loaded (mj_init)");
  Shape sh = shape_of(q, k, seg, causal, has_segments, scale);
  const int64_t groups = sh.H / sh.KVH, D = sh.D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *dop = dout.typed_data();
  float* lp = const_cast<float*>(lse.typed_data());  // read only: `probabilities` writes it only forward
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // One unit per (batch, KV head): the query heads sharing it add into its dK and dV one after another.
  const int64_t ldq = sh.ldq(), ldk = sh.ldk(), blocks = sh.blocks();
  const std::vector<Window> windows = key_windows(sh);
  parallel_units(pool, sh.B * sh.KVH, [&](int64_t unit) {
    const int64_t b = unit / sh.KVH, kvh = unit % sh.KVH;
    const int64_t kv_at = b * sh.Sk * ldk + kvh * D;  // row 0 of this KV head; rows are ldk apart
    const float *kk = kp + kv_at, *vv = vp + kv_at;
    float *dkk = dkp + kv_at, *dvv = dvp + kv_at;
    zero_rows(dkk, 0, sh.Sk, ldk, D);
    zero_rows(dvv, 0, sh.Sk, ldk, D);
    std::vector<float> delta(sh.Sq);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t h = kvh * groups + g;
      const int64_t q_at = b * sh.Sq * ldq + h * D;
      const float *qq = qp + q_at, *oo = op + q_at, *dd = dop + q_at;
      float* dqq = dqp + q_at;
      float* ll = lp + (b * sh.H + h) * sh.Sq;
      for (int64_t i = 0; i < sh.Sq; ++i) {
        float acc = 0.f;
        for (int64_t c = 0; c < D; ++c) acc += dd[i * ldq + c] * oo[i * ldq + c];
        delta[i] = acc;
      }
      for (int64_t r0 = 0; r0 < sh.Sq; r0 += kBlockQ) {
        const int64_t r1 = std::min(sh.Sq, r0 + kBlockQ), M = r1 - r0;
        const Window w = windows[b * blocks + r0 / kBlockQ];
        const int64_t L = w.hi - w.lo;
        if (L == 0) {
          zero_rows(dqq, r0, r1, ldq, D);
          continue;
        }
        float *p = scratch(0, M * L), *dp = scratch(1, M * L);
        probabilities(sh, b, qq, kk, r0, r1, w, p, ll, /*forward=*/false);
        // Over the window's keys: dV += Pᵀ dO; dP = dO Vᵀ; dS = P (dP - delta); dQ = scale dS K;
        // dK += scale dSᵀ Q.
        const int64_t at = w.lo * ldk, qr = r0 * ldq;
        sgemm(kRowMajor, kTrans, kNoTrans, L, D, M, 1.f, p, L, dd + qr, ldq, 1.f, dvv + at, ldk);
        sgemm(kRowMajor, kNoTrans, kTrans, M, L, D, 1.f, dd + qr, ldq, vv + at, ldk, 0.f, dp, L);
        for (int64_t i = 0; i < M; ++i) {
          float* prow = p + i * L;
          const float* dprow = dp + i * L;
          const float di = delta[r0 + i];
          for (int64_t j = 0; j < L; ++j) prow[j] *= dprow[j] - di;
        }
        sgemm(kRowMajor, kNoTrans, kNoTrans, M, D, L, sh.scale, p, L, kk + at, ldk, 0.f, dqq + qr, ldq);
        sgemm(kRowMajor, kTrans, kNoTrans, L, D, M, sh.scale, p, L, qq + qr, ldq, 1.f, dkk + at, ldk);
      }
    }
  });
  return ffi::Error::Success();
}

// Thin products, C [M, N] = A [M, K] · B [K, N] with 2 to 32 rows (decode's batch): XLA:CPU's dots and sgemm
// run them at a fraction of a large product's rate (docs/performance.md, decode, seventh round). Each unit
// is a chunk of columns (at most kThinCols, at least one chunk per thread); per block of kThinK rows of B, every
// panel of kThinNR columns is swept by each group of kThinMR rows of A, accumulators in registers, reading B
// where it lies (packing it first measured slower: one more pass over data read once). Every group prefetches
// its share of the panel kThinAhead panels on, so that memory stays busy while the others compute.
// MEDITRON_THIN_WIDE builds the AVX-512 shape anywhere (the compiler splits its vectors), so that its tiling
// is tested on machines without AVX-512 too (tests/test_cpu_native.py).
#if defined(__AVX512F__) || defined(MEDITRON_THIN_WIDE)
constexpr int kVec = 16;
constexpr int kThinMR = 12;  // 12 rows × 2 vectors: 24 accumulators of 32 registers
#else
constexpr int kVec = 8;
constexpr int kThinMR = 6;  // 6 rows × 2 vectors: 12 accumulators of 16 registers (AVX2)
#endif
typedef float Vec __attribute__((vector_size(kVec * sizeof(float))));
constexpr int64_t kThinNR = 2 * kVec;  // columns per panel
constexpr int64_t kThinK = 64;         // rows of B per block (128 level, 16, 32 and 256 slower)
constexpr int64_t kThinCols = 2048;    // measured against 256 and 512: best for the output head
constexpr int64_t kThinMaxRows = 32;   // up to here `Matmul` takes this path (kernels/dispatch.py agrees)
constexpr int64_t kThinAhead = 2;      // prefetch distance in panels (1, 3, 4 and 8 measured slower)

inline Vec load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }

// C[r, :cols] (+)= A[r, :kb] · panel for MR rows; the panel is kb rows of kThinNR floats, ldw apart. Also
// prefetches rows [0, pf_rows) of pf, ldw apart, non-temporally: the panel's rows share a few L1 sets at the
// model's widths, and a prefetch that stays in L1 evicts the lines in use (measured 4% slower).
template <int MR>
void thin_tile(const float* a, int64_t lda, const float* panel, int64_t ldw, int64_t kb, const float* pf,
               int64_t pf_rows, float* c, int64_t ldc, int64_t cols, bool add) {
  Vec acc[MR][2] = {};
  for (int64_t k = 0; k < kb; ++k) {
    if (k < pf_rows) __builtin_prefetch(pf + k * ldw, 0, 0);
    const Vec w0 = load(panel + k * ldw), w1 = load(panel + k * ldw + kVec);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float x = a[r * lda + k];
      acc[r][0] += x * w0;
      acc[r][1] += x * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    float* row = c + r * ldc;
    if (cols == kThinNR) {
      store(row, add ? load(row) + acc[r][0] : acc[r][0]);
      store(row + kVec, add ? load(row + kVec) + acc[r][1] : acc[r][1]);
    } else {
      float tmp[kThinNR];
      store(tmp, acc[r][0]);
      store(tmp + kVec, acc[r][1]);
      for (int64_t j = 0; j < cols; ++j) row[j] = add ? row[j] + tmp[j] : tmp[j];
    }
  }
}

// One tile of `rows` (1 to kThinMR) rows: the template instance for that count.
template <int MR = kThinMR>
void thin_tile_of(int64_t rows, const float* a, int64_t lda, const float* panel, int64_t ldw, int64_t kb,
                  const float* pf, int64_t pf_rows, float* c, int64_t ldc, int64_t cols, bool add) {
  if constexpr (MR > 0) {
    if (rows < MR) return thin_tile_of<MR - 1>(rows, a, lda, panel, ldw, kb, pf, pf_rows, c, ldc, cols, add);
    thin_tile<MR>(a, lda, panel, ldw, kb, pf, pf_rows, c, ldc, cols, add);
  }
}

// All M rows against one panel, in groups as even as kThinMR allows (16 rows: 6, 5, 5, not 6, 6, 4): a
// tile of 4 rows has 8 accumulators, too few to hide the FMAs' latency, and measured slower per row. With
// `prefetch`, each group prefetches its share of the panel's rows kThinAhead panels on, `next` floats apart
// (all in the first group: 4% slower).
void thin_rows(int64_t M, const float* a, int64_t lda, const float* panel, int64_t ldw, int64_t kb, float* c,
               int64_t ldc, int64_t cols, bool add, bool prefetch, int64_t next = kThinNR) {
  const int64_t groups = (M + kThinMR - 1) / kThinMR, base = M / groups, extra = M % groups;
  const int64_t share = (kb + groups - 1) / groups;
  for (int64_t g = 0, r = 0; g < groups; ++g) {
    const int64_t rows = base + (g < extra), lo = std::min(g * share, kb);
    const float* pf = panel + kThinAhead * next + lo * ldw;
    const int64_t pf_rows = prefetch ? std::min(share, kb - lo) : 0;
    thin_tile_of(rows, a + r * lda, lda, panel, ldw, kb, pf, pf_rows, c + r * ldc, ldc, cols, add);
    r += rows;
  }
}

// One row against P panels side by side, panel-major B (each panel K rows of kThinNR, `stride` apart): a row
// has too few products to hide the FMA latency panel by panel, and P sequential streams kept the memory busier
// than one (P = 4: level with XLA's dot at batch 1; one panel with four partial sums was 10-15% slower).
template <int P>
void row_panels(int64_t K, const float* a, const float* b, int64_t stride, float* c) {
  Vec acc[P][2] = {};
  for (int64_t k = 0; k < K; ++k, b += kThinNR) {
#pragma GCC unroll 4
    for (int j = 0; j < P; ++j) {
      acc[j][0] += a[k] * load(b + j * stride);
      acc[j][1] += a[k] * load(b + j * stride + kVec);
    }
  }
  for (int j = 0; j < P; ++j) {
    store(c + j * kThinNR, acc[j][0]);
    store(c + j * kThinNR + kVec, acc[j][1]);
  }
}

// Columns [c0, c0 + width) of C (width a multiple of kThinNR) from panel-major B: panel q holds columns
// [q kThinNR, (q + 1) kThinNR) as K contiguous rows. Each panel is one sequential stream, swept block by block
// by every group of rows; no row of B shares an L1 set with another, as the rows of row-major B do when N is a
// multiple of 1024 (the MLP's [768, 2048] products: 20.0 -> 14.5 ms a step, docs/performance.md).
void thin_panels(int64_t M, int64_t K, const float* a, const float* b, float* c, int64_t N, int64_t c0,
                 int64_t width) {
  const int64_t stride = K * kThinNR;  // between panels
  if (M == 1) {
    int64_t p = 0;
    for (; p + 4 * kThinNR <= width; p += 4 * kThinNR) row_panels<4>(K, a, b + (c0 + p) * K, stride, c + c0 + p);
    for (; p < width; p += kThinNR) row_panels<1>(K, a, b + (c0 + p) * K, stride, c + c0 + p);
    return;
  }
  const int64_t blocks = (K + kThinK - 1) / kThinK;
  float* ab = scratch(1, blocks * M * kThinK);  // A as [block][M][kThinK]
  for (int64_t k0 = 0; k0 < K; k0 += kThinK)
    for (int64_t r = 0; r < M; ++r)
      std::copy(a + r * K + k0, a + r * K + std::min(K, k0 + kThinK), ab + k0 * M + r * kThinK);
  float* ct = scratch(2, M * kThinNR);
  for (int64_t p = 0; p < width; p += kThinNR) {
    const float* panel = b + (c0 + p) * K;
    for (int64_t k0 = 0; k0 < K; k0 += kThinK)  // prefetching kThinAhead blocks on, within the stream
      thin_rows(M, ab + k0 * M, kThinK, panel + k0 * kThinNR, kThinNR, std::min(kThinK, K - k0), ct, kThinNR,
                kThinNR, k0 > 0, true, kThinK * kThinNR);
    for (int64_t r = 0; r < M; ++r) std::copy(ct + r * kThinNR, ct + (r + 1) * kThinNR, c + r * N + c0 + p);
  }
}

// Columns [c0, c0 + width) of C from row-major B, K-block by K-block, C's tile rows accumulated kThinNR
// apart in scratch: C's own rows, N apart, share L1 sets with B's (measured 1.7% faster).
void thin_rows_major(int64_t M, int64_t K, const float* a, const float* b, float* c, int64_t N, int64_t c0,
                     int64_t width) {
  const int64_t full = width / kThinNR * kThinNR;
  float* ct = scratch(2, M * full);
  for (int64_t k0 = 0; k0 < K; k0 += kThinK) {
    const int64_t kb = std::min(kThinK, K - k0);
    // A's block, copied kThinK apart: K apart, its rows can share one L1 set (K = 2048: all of them).
    float* ab = scratch(1, M * kThinK);
    for (int64_t r = 0; r < M; ++r) std::copy(a + r * K + k0, a + r * K + k0 + kb, ab + r * kThinK);
    for (int64_t p = 0; p < full; p += kThinNR)
      thin_rows(M, ab, kThinK, b + k0 * N + c0 + p, N, kb, ct + p * M, kThinNR, kThinNR, k0 > 0, true);
    if (full < width) {  // the last, partial panel, copied with zeros after it
      float* packed = scratch(0, kb * kThinNR);
      for (int64_t k = 0; k < kb; ++k)
        for (int64_t j = 0; j < kThinNR; ++j)
          packed[k * kThinNR + j] = full + j < width ? b[(k0 + k) * N + c0 + full + j] : 0.f;
      thin_rows(M, ab, kThinK, packed, kThinNR, kb, c + c0 + full, N, width - full, k0 > 0, false);
    }
  }
  for (int64_t p = 0; p < full; p += kThinNR)
    for (int64_t r = 0; r < M; ++r)
      std::copy(ct + p * M + r * kThinNR, ct + p * M + (r + 1) * kThinNR, c + r * N + c0 + p);
}

// Thin products: chunks of at most kThinCols columns, at least one per thread, whole panels wide; with
// `panels`, B is panel-major and M may exceed kThinMaxRows (blocks of kThinMaxRows rows, each streaming B).
void thin_matmul(ffi::ThreadPool& pool, int64_t M, int64_t K, int64_t N, const float* a, const float* b, float* c,
                 bool panels) {
  const int64_t panels_all = (N + kThinNR - 1) / kThinNR;
  const int64_t chunks = std::max((N + kThinCols - 1) / kThinCols, std::min(thread_count(pool), panels_all));
  const int64_t cols = (panels_all + chunks - 1) / chunks * kThinNR;
  const int64_t units = (N + cols - 1) / cols;
  parallel_units<false>(pool, units, [&](int64_t u) {
    const int64_t c0 = u * cols, width = std::min(cols, N - c0);
    for (int64_t m0 = 0; m0 < M; m0 += kThinMaxRows) {
      const int64_t rows = std::min(kThinMaxRows, M - m0);
      if (panels)
        thin_panels(rows, K, a + m0 * K, b, c + m0 * N, N, c0, width);
      else
        thin_rows_major(rows, K, a + m0 * K, b, c + m0 * N, N, c0, width);
    }
  });
}

// C [M, N] = op(A) · op(B) for larger products: the longer side of C cut into one piece per core, each
// through the single-threaded sgemm. For the MLP's and the output head's shapes that beats XLA:CPU's dots
// (docs/performance.md, ninth round). One piece per core measured best (four: level with XLA).
void sgemm_pieces(ffi::ThreadPool& pool, bool trans_a, bool trans_b, int64_t M, int64_t K, int64_t N,
                  const float* ap, const float* bp, float* cp) {
  const bool by_rows = M >= N;
  const int64_t side = by_rows ? M : N;
  const int64_t pieces = std::max<int64_t>(1, std::min(thread_count(pool), side / 64));
  const int64_t step = ((side + pieces - 1) / pieces + 15) / 16 * 16;  // a multiple of 16 wide
  parallel_units(pool, (side + step - 1) / step, [&](int64_t u) {
    const int64_t lo = u * step, hi = std::min(side, lo + step);
    const int64_t r0 = by_rows ? lo : 0, rows = by_rows ? hi - lo : M;
    const int64_t c0 = by_rows ? 0 : lo, cols = by_rows ? N : hi - lo;
    const float* a0 = trans_a ? ap + r0 : ap + r0 * K;
    const float* b0 = trans_b ? bp + c0 * K : bp + c0;
    sgemm(kRowMajor, trans_a ? kTrans : kNoTrans, trans_b ? kTrans : kNoTrans, rows, cols, K, 1.f, a0,
          trans_a ? M : K, b0, trans_b ? K : N, 0.f, cp + r0 * N + c0, N);
  });
}

// Up to this many rows a product with panel-major B runs the thin kernel (in blocks of kThinMaxRows rows,
// each streaming B again: faster than the sgemm pieces up to here); beyond (prefill), unpanel_sgemm.
constexpr int64_t kPanelThinMaxRows = 128;
constexpr int64_t kUnpanelFloats = int64_t{1} << 22;  // a thread's row-major copy: at most 16 MB

// C = A · B for panel-major B, by pieces of columns: each copies its columns of B row-major into the
// thread's scratch, then one sgemm. A piece per thread at least, each copy at most kUnpanelFloats.
void unpanel_sgemm(ffi::ThreadPool& pool, int64_t M, int64_t K, int64_t N, const float* ap, const float* bp,
                   float* cp) {
  const int64_t panels_all = N / kThinNR;
  const int64_t most = std::max<int64_t>(1, kUnpanelFloats / (K * kThinNR));  // panels per piece
  const int64_t per = std::min(most, (panels_all + thread_count(pool) - 1) / thread_count(pool));
  parallel_units(pool, (panels_all + per - 1) / per, [&](int64_t u) {
    const int64_t q0 = u * per, q1 = std::min(panels_all, q0 + per), cols = (q1 - q0) * kThinNR;
    float* rows = scratch(0, K * cols);
    for (int64_t q = q0; q < q1; ++q)
      for (int64_t k = 0; k < K; ++k)
        std::copy(bp + (q * K + k) * kThinNR, bp + (q * K + k + 1) * kThinNR, rows + k * cols + (q - q0) * kThinNR);
    sgemm(kRowMajor, kNoTrans, kNoTrans, M, cols, K, 1.f, ap, K, rows, cols, 0.f, cp + q0 * kThinNR, N);
  });
}

// The dense layers' product (kernels.matmul): A is [M, K], or [K, M] when trans_a; B is [K, N], or [N, K]
// when trans_b. At most kThinMaxRows rows, neither operand transposed: thin_matmul; otherwise sgemm_pieces.
// `panels` non-zero: B is panel-major with panels that wide (kernels.pack_panels), neither transposed.
ffi::Error Matmul(ffi::ThreadPool pool, bool trans_a, bool trans_b, int64_t panels, ffi::Buffer<ffi::F32> a,
                  ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> c) {
  if (sgemm == nullptr) return ffi::Error::Internal("meditron_jax cpu_native: sgemm not loaded (mj_init)");
  auto ad = a.dimensions(), bd = b.dimensions();
  const int64_t M = trans_a ? ad[1] : ad[0], K = trans_a ? ad[0] : ad[1], N = trans_b ? bd[0] : bd[1];
  const float *ap = a.typed_data(), *bp = b.typed_data();
  float* cp = c->typed_data();
  if (panels != 0 && (panels != kThinNR || trans_a || trans_b || N % kThinNR != 0))
    return ffi::Error::InvalidArgument("meditron_jax cpu_native: panel-major B needs panels of " +
                                       std::to_string(kThinNR) + " columns dividing N = " + std::to_string(N) +
                                       ", untransposed; got panels of " + std::to_string(panels));
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K > 0 && !trans_a && !trans_b && M <= (panels ? kPanelThinMaxRows : kThinMaxRows))
    thin_matmul(pool, M, K, N, ap, bp, cp, panels != 0);
  else if (panels != 0 && K > 0)
    unpanel_sgemm(pool, M, K, N, ap, bp, cp);
  else
    sgemm_pieces(pool, trans_a, trans_b, M, K, N, ap, bp, cp);
  return ffi::Error::Success();
}

// One query against slots [0, end) of one head: scores, softmax and the weighted sum of V into oo. DD > 0
// fixes D at compile time (64: the bench shape's head_dim): the sum's D floats then stay in registers across
// slots, not loaded and stored per slot (decode, seventh round). At 128 (Llama-2 7B) that measured level.
template <int DD>
void decode_query(const float* qq, const float* kk, const float* vv, const bool* seen, int64_t end, int64_t D,
                  float scale, float* s, float* oo) {
  if constexpr (DD > 0) D = DD;
  float m = kMasked;
  for (int64_t j = 0; j < end; ++j) {
    float dot = 0.f;
    for (int64_t c = 0; c < D; ++c) dot += qq[c] * kk[j * D + c];
    for (int64_t c = 0; c < D; c += 16) __builtin_prefetch(vv + j * D + c);  // V's stream beside K's
    s[j] = seen[j] ? dot * scale : kMasked;
    m = std::max(m, s[j]);
  }
  if (m == kMasked) {  // sees no slot: zeros, as head_major_attention gives
    std::fill(oo, oo + D, 0.f);
    return;
  }
  const float total = exp_scores(s, end, m);
  if constexpr (DD > 0) {
    float acc[DD] = {};
    for (int64_t j = 0; j < end; ++j)
      for (int c = 0; c < DD; ++c) acc[c] += s[j] * vv[j * DD + c];
    for (int c = 0; c < DD; ++c) oo[c] = acc[c] / total;
  } else {
    std::fill(oo, oo + D, 0.f);
    for (int64_t j = 0; j < end; ++j)
      for (int64_t c = 0; c < D; ++c) oo[c] += s[j] * vv[j * D + c];
    for (int64_t c = 0; c < D; ++c) oo[c] /= total;
  }
}

// S[i, j] = q_i · k_j for NQ queries × NS slots (rows of D, a multiple of kVec): vector
// accumulators over D, summed across lanes at the end.
template <int NQ, int NS>
void score_tile(const float* q, const float* k, int64_t D, float* s, int64_t lds) {
  Vec acc[NQ][NS] = {};
  for (int64_t c = 0; c < D; c += kVec) {
    Vec kv[NS];
    for (int j = 0; j < NS; ++j) kv[j] = load(k + j * D + c);
    for (int i = 0; i < NQ; ++i) {
      const Vec qv = load(q + i * D + c);
      for (int j = 0; j < NS; ++j) acc[i][j] += qv * kv[j];
    }
  }
  for (int i = 0; i < NQ; ++i)
    for (int j = 0; j < NS; ++j) {
      float t = 0.f;
      for (int l = 0; l < kVec; ++l) t += acc[i][j][l];
      s[i * lds + j] = t;
    }
}

// The n query heads of one KV head's group (rows of D, contiguous: head h uses KV head h / n) against slots
// [0, end), D a multiple of kThinNR. Scores in tiles of 4 queries × 2 slots, slots outer, so each K row is
// read from memory once for the group; then P · V through the thin kernel (thin_rows), each V row read once.
// One query at a time (decode_query) re-read the unit's cache per head and ran its dots one after another:
// 1.5× torch's time at 70B's groups of 8, 2.6× at Falcon-7B's 71 (bench/decode_attention.py); sgemm for
// the two products, 1.2× and 1.7× (its packing costs more than products this thin gain).
void decode_group(int64_t n, const float* qq, const float* kk, const float* vv, const bool* seen, int64_t end,
                  int64_t D, float scale, float* s, float* oo) {
  for (int64_t j = 0; j < end; j += 2) {
    const bool two = j + 1 < end;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
      two ? score_tile<4, 2>(qq + i * D, kk + j * D, D, s + i * end + j, end)
          : score_tile<4, 1>(qq + i * D, kk + j * D, D, s + i * end + j, end);
    for (; i < n; ++i)
      two ? score_tile<1, 2>(qq + i * D, kk + j * D, D, s + i * end + j, end)
          : score_tile<1, 1>(qq + i * D, kk + j * D, D, s + i * end + j, end);
  }
  float *visible = scratch(1, end + n), *inv = visible + end;  // floats, so that the loops below vectorize
  for (int64_t j = 0; j < end; ++j) visible[j] = seen[j] ? 1.f : 0.f;
  for (int64_t i = 0; i < n; ++i) {
    float* si = s + i * end;
    float m = kMasked;
    for (int64_t j = 0; j < end; ++j) {
      si[j] = visible[j] > 0.f ? si[j] * scale : kMasked;
      m = std::max(m, si[j]);
    }
    const float total = m == kMasked ? 0.f : exp_scores(si, end, m);
    inv[i] = total > 0.f ? 1.f / total : 0.f;  // sees no slot: zeros, as head_major_attention gives
  }
  if (end == 0) std::fill(oo, oo + n * D, 0.f);
  for (int64_t k0 = 0; k0 < end; k0 += kThinK) {
    const int64_t kb = std::min(kThinK, end - k0);
    for (int64_t p = 0; p < D; p += kThinNR)
      thin_rows(n, s + k0, end, vv + k0 * D + p, D, kb, oo + p, D, kThinNR, k0 > 0, false);
  }
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c < D; ++c) oo[i * D + c] *= inv[i];
}

// Groups of at least this many query heads per KV head take decode_group (when D is a multiple of kThinNR).
constexpr int64_t kDecodeGroupRows = 2;

// Decode's attention over the head-major KV cache (model/layers.py): q, out [B, Q, H, D] for Q new tokens;
// k, v [B, KVH, T, D], or [KVH, T, D] for one row; valid [B, T]; first = the first new token's slot. Query t
// sees slot j when valid[b, j] and j <= first + t, so only slots [0, first + Q) are read. The (batch, KV
// head) units are split between the cores, which XLA:CPU's batched dots do not do. One query head per KV
// head (Llama-2 7B, the bench shape): vectors of D per query, one row against at most T slots each. Groups
// (GQA, MQA): decode_group.
ffi::Error Decode(ffi::ThreadPool pool, float scale, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                  ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> valid, ffi::Buffer<ffi::S32> first,
                  ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions();
  const int64_t B = qd[0], Q = qd[1], H = qd[2], D = qd[3];
  const int64_t KVH = kd[kd.size() - 3], T = kd[kd.size() - 2], groups = H / KVH;
  const int64_t end_all = std::min<int64_t>(T, std::max<int64_t>(0, first.typed_data()[0] + Q));
  const int64_t from = end_all - Q;  // slot of query 0, as the caller wrote it (first, clamped)
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const bool* ok = valid.typed_data();
  float* op = out->typed_data();
  const bool grouped = groups >= kDecodeGroupRows && D % kThinNR == 0;
  // Fewer (row, KV head) units than threads, as at batch 1 with MQA (Falcon-7B's one KV head): a group's
  // query heads are split into parts of a multiple of 4 (the score tile's height) too, one per thread.
  // Each part reads the unit's K and V again; with that many queries per KV head the scores cost more.
  const int64_t units = B * KVH, threads = thread_count(pool);
  int64_t per = groups;
  if (grouped && units < threads) {
    const int64_t want = (threads + units - 1) / units;
    per = ((groups + want - 1) / want + 3) / 4 * 4;
  }
  const int64_t parts = (groups + per - 1) / per;
  parallel_units(pool, units * parts, [&](int64_t task) {
    const int64_t unit = task / parts, b = unit / KVH, kvh = unit % KVH;
    const float* kk = kp + unit * T * D;
    const float* vv = vp + unit * T * D;
    const bool* seen = ok + b * T;
    float* s = scratch(0, std::max<int64_t>(groups * end_all, 1));
    if (grouped) {
      const int64_t g0 = task % parts * per, n = std::min(groups, g0 + per) - g0;
      for (int64_t t = 0; t < Q; ++t) {
        const int64_t at = ((b * Q + t) * H + kvh * groups + g0) * D;
        decode_group(n, qp + at, kk, vv, seen, std::max<int64_t>(0, from + t + 1), D, scale, s, op + at);
      }
      return;
    }
    for (int64_t g = 0; g < groups; ++g) {
      for (int64_t t = 0; t < Q; ++t) {
        const int64_t h = kvh * groups + g, end = std::max<int64_t>(0, from + t + 1);
        const float* qq = qp + ((b * Q + t) * H + h) * D;
        float* oo = op + ((b * Q + t) * H + h) * D;
        if (D == 64)
          decode_query<64>(qq, kk, vv, seen, end, D, scale, s, oo);
        else
          decode_query<0>(qq, kk, vv, seen, end, D, scale, s, oo);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

// The thin kernel's tile height as built (12: the AVX-512 shape; tests/test_cpu_native.py).
extern "C" int mj_thin_tile_rows() { return kThinMR; }

// The width of the thin kernel's panels (kernels.pack_panels): 16 floats with AVX2, 32 with AVX-512.
extern "C" int mj_thin_panel_cols() { return kThinNR; }

// Loads sgemm and the thread-count functions from the OpenBLAS at `path`.
extern "C" int mj_init(const char* path) {
  void* handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) return 1;
  auto gemm = reinterpret_cast<Sgemm>(dlsym(handle, "scipy_cblas_sgemm64_"));
  auto set = reinterpret_cast<SetThreads>(dlsym(handle, "scipy_openblas_set_num_threads64_"));
  auto get = reinterpret_cast<GetThreads>(dlsym(handle, "scipy_openblas_get_num_threads64_"));
  if (gemm == nullptr || set == nullptr || get == nullptr) return 2;
  set_blas_threads = set;
  get_blas_threads = get;
  sgemm = gemm;
  return 0;
}

namespace {
// What both handlers take first: XLA's intra-op thread pool, the options, then q, k, v and the segment ids.
auto bind_inputs() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Attr<bool>("causal")
      .Attr<bool>("has_segments")
      .Attr<float>("scale")
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S32>>();
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjAttentionForward, Forward,
                              bind_inputs().Ret<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjDecodeAttention, Decode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<float>("scale")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The backward also takes o, lse and dO; it returns dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjAttentionBackward, Backward,
                              bind_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(MjMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Attr<bool>("trans_a")
                                  .Attr<bool>("trans_b")
                                  .Attr<int64_t>("panels")
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
