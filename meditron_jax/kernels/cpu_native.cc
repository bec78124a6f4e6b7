// Attention forward and backward for XLA:CPU, as XLA FFI handlers (meditron_jax/kernels/cpu_native.py).
//
// Why: XLA:CPU splits a batched product's matrices between its threads, never its batch, so the small
// per-head products of causal attention run on one core (docs/performance.md, fifth round). Here the
// (batch, KV head) units are split between threads, each running its products one after another through
// a single-threaded sgemm (numpy's bundled OpenBLAS, loaded by mj_init).
//
// Layouts, float32, row-major: q, o [B, H, Sq, D]; k, v [B, KVH, Sk, D]; lse [B, H, Sq]; segment ids
// [B, Sk] int32 (queries use the last Sq). Query i sits at key position Sk - Sq + i (bottom-right causal
// alignment). A query that sees no key outputs zeros, has lse -inf and passes no gradient.
#include <dlfcn.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <thread>
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
constexpr int64_t kBlockQ = 128;  // query rows per block: each block's products see only its visible keys

struct Shape {
  int64_t B, H, KVH, Sq, Sk, D;
  bool causal;
  float scale;
  const int32_t* seg;  // nullptr: no segments
  int64_t offset() const { return Sk - Sq; }
  // Keys [0, visible_end(r1)) can be seen by some query of rows [r0, r1).
  int64_t visible_end(int64_t r1) const { return causal ? std::min(Sk, std::max<int64_t>(0, offset() + r1)) : Sk; }
};

// Runs fn(unit) for unit in [0, n) on the cores this process may use.
template <typename Fn>
void parallel_units(int64_t n, Fn fn) {
  cpu_set_t set;
  int64_t cores = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  int64_t threads = std::max<int64_t>(1, std::min(cores, n));
  OneBlasThread one;
  auto run = [&](int64_t t) {
    for (int64_t u = t; u < n; u += threads) fn(u);
  };
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t) pool.emplace_back(run, t);
  run(0);
  for (auto& th : pool) th.join();
}

// Scores of rows [r0, r1) against keys [0, L) into s (rows of L), then probabilities in place:
// softmax (forward, lse written) or exp(score - lse) (backward, lse read). Invisible keys get 0.
// Branch-free over keys so that the loops vectorise; no infinities are compared, since the library is built
// with -ffast-math (a masked score is kMasked, whose exp underflows to 0).
constexpr float kMasked = -1e30f;
void probabilities(const Shape& sh, int64_t b, const float* q, const float* k, int64_t r0, int64_t r1, int64_t L,
                   float* s, float* lse, bool forward) {
  const int64_t M = r1 - r0, D = sh.D;
  sgemm(kRowMajor, kNoTrans, kTrans, M, L, D, sh.scale, q + r0 * D, D, k, D, 0.f, s, L);
  const int32_t* seg = sh.seg == nullptr ? nullptr : sh.seg + b * sh.Sk;
  for (int64_t i = 0; i < M; ++i) {
    float* row = s + i * L;
    const int64_t qi = r0 + i;
    const int64_t end = sh.causal ? std::min(L, std::max<int64_t>(0, sh.offset() + qi + 1)) : L;
    const int64_t own = sh.offset() + qi;  // the query's own key, which it sees when in range
    int64_t seen = end;
    if (seg != nullptr) {
      const int32_t mine = seg[own];
      for (int64_t j = 0; j < end; ++j) row[j] = seg[j] == mine ? row[j] : kMasked;
      if (own < 0 || own >= end) seen = std::count(seg, seg + end, mine);
    }
    if (seen == 0) {  // sees no key: zeros, and lse -inf
      std::fill(row, row + L, 0.f);
      if (forward) lse[qi] = -INFINITY;
      continue;
    }
    float m = kMasked;
    if (forward) {
      for (int64_t j = 0; j < end; ++j) m = std::max(m, row[j]);
    } else {
      m = lse[qi];
    }
    float total = 0.f;
    for (int64_t j = 0; j < end; ++j) {
      row[j] = expf(row[j] - m);
      total += row[j];
    }
    std::fill(row + end, row + L, 0.f);
    if (forward) {
      const float inv = 1.f / total;
      for (int64_t j = 0; j < end; ++j) row[j] *= inv;
      lse[qi] = m + logf(total);
    }
  }
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k, ffi::Buffer<ffi::S32>& seg, bool causal,
               bool has_segments, float scale) {
  auto qd = q.dimensions(), kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], kd[2], qd[3], causal, scale, has_segments ? seg.typed_data() : nullptr};
}

ffi::Error Forward(bool causal, bool has_segments, float scale, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::ResultBuffer<ffi::F32> o,
                   ffi::ResultBuffer<ffi::F32> lse) {
  if (sgemm == nullptr) return ffi::Error::Internal("meditron_jax cpu_native: sgemm not loaded (mj_init)");
  const Shape sh = shape_of(q, k, seg, causal, has_segments, scale);
  const int64_t groups = sh.H / sh.KVH, D = sh.D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = o->typed_data(), *lp = lse->typed_data();
  parallel_units(sh.B * sh.H, [&](int64_t unit) {
    const int64_t b = unit / sh.H, h = unit % sh.H, kvh = h / groups;
    const float* kk = kp + (b * sh.KVH + kvh) * sh.Sk * D;
    const float* vv = vp + (b * sh.KVH + kvh) * sh.Sk * D;
    const float* qq = qp + unit * sh.Sq * D;
    float* oo = op + unit * sh.Sq * D;
    float* ll = lp + unit * sh.Sq;
    std::vector<float> s;
    for (int64_t r0 = 0; r0 < sh.Sq; r0 += kBlockQ) {
      const int64_t r1 = std::min(sh.Sq, r0 + kBlockQ), M = r1 - r0, L = sh.visible_end(r1);
      if (L == 0) {
        std::fill(oo + r0 * D, oo + r1 * D, 0.f);
        std::fill(ll + r0, ll + r1, -INFINITY);
        continue;
      }
      s.resize(M * L);
      probabilities(sh, b, qq, kk, r0, r1, L, s.data(), ll, /*forward=*/true);
      sgemm(kRowMajor, kNoTrans, kNoTrans, M, D, L, 1.f, s.data(), L, vv, D, 0.f, oo + r0 * D, D);
    }
  });
  return ffi::Error::Success();
}

ffi::Error Backward(bool causal, bool has_segments, float scale, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> seg, ffi::Buffer<ffi::F32> o,
                    ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  if (sgemm == nullptr) return ffi::Error::Internal("meditron_jax cpu_native: sgemm not loaded (mj_init)");
  Shape sh = shape_of(q, k, seg, causal, has_segments, scale);
  const int64_t groups = sh.H / sh.KVH, D = sh.D;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *op = o.typed_data(), *dop = dout.typed_data();
  float* lp = const_cast<float*>(lse.typed_data());  // read only: `probabilities` writes it only forward
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  // One unit per (batch, KV head): the query heads sharing it add into its dK and dV one after another.
  parallel_units(sh.B * sh.KVH, [&](int64_t unit) {
    const int64_t b = unit / sh.KVH;
    const float* kk = kp + unit * sh.Sk * D;
    const float* vv = vp + unit * sh.Sk * D;
    float* dkk = dkp + unit * sh.Sk * D;
    float* dvv = dvp + unit * sh.Sk * D;
    std::fill(dkk, dkk + sh.Sk * D, 0.f);
    std::fill(dvv, dvv + sh.Sk * D, 0.f);
    std::vector<float> p, dp, delta(sh.Sq);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t head = unit * groups + g;  // (b, h) with h = kvh * groups + g
      const float* qq = qp + head * sh.Sq * D;
      const float* oo = op + head * sh.Sq * D;
      const float* dd = dop + head * sh.Sq * D;
      float* dqq = dqp + head * sh.Sq * D;
      float* ll = lp + head * sh.Sq;
      for (int64_t i = 0; i < sh.Sq; ++i) {
        float acc = 0.f;
        for (int64_t c = 0; c < D; ++c) acc += dd[i * D + c] * oo[i * D + c];
        delta[i] = acc;
      }
      for (int64_t r0 = 0; r0 < sh.Sq; r0 += kBlockQ) {
        const int64_t r1 = std::min(sh.Sq, r0 + kBlockQ), M = r1 - r0, L = sh.visible_end(r1);
        if (L == 0) {
          std::fill(dqq + r0 * D, dqq + r1 * D, 0.f);
          continue;
        }
        p.resize(M * L);
        dp.resize(M * L);
        probabilities(sh, b, qq, kk, r0, r1, L, p.data(), ll, /*forward=*/false);
        // dV += Pᵀ dO; dP = dO Vᵀ; dS = P (dP - delta); dQ = scale dS K; dK += scale dSᵀ Q.
        sgemm(kRowMajor, kTrans, kNoTrans, L, D, M, 1.f, p.data(), L, dd + r0 * D, D, 1.f, dvv, D);
        sgemm(kRowMajor, kNoTrans, kTrans, M, L, D, 1.f, dd + r0 * D, D, vv, D, 0.f, dp.data(), L);
        for (int64_t i = 0; i < M; ++i) {
          float* prow = p.data() + i * L;
          const float* dprow = dp.data() + i * L;
          const float di = delta[r0 + i];
          for (int64_t j = 0; j < L; ++j) prow[j] *= dprow[j] - di;
        }
        sgemm(kRowMajor, kNoTrans, kNoTrans, M, D, L, sh.scale, p.data(), L, kk, D, 0.f, dqq + r0 * D, D);
        sgemm(kRowMajor, kTrans, kNoTrans, L, D, M, sh.scale, p.data(), L, qq + r0 * D, D, 1.f, dkk, D);
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

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
// What both handlers take first: the options, then q, k, v and the segment ids.
auto bind_inputs() {
  return ffi::Ffi::Bind()
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

// The backward also takes o, lse and dO; it returns dq, dk, dv.
XLA_FFI_DEFINE_HANDLER_SYMBOL(MjAttentionBackward, Backward,
                              bind_inputs()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
