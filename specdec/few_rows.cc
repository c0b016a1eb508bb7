// Few-row float32 matrix products for CPU decoding: y[m, n] = x[m, k] . W for a few rows m.
//
// XLA's CPU backend streams a weight matrix once for a one-row product but hands two or more rows
// to a general matrix product that costs about one more weight stream per row on a two-core
// machine. These kernels read each weight once for all m rows: register tiles of rows times
// columns, weights streamed in address order by each thread and prefetched a few blocks ahead into
// L2, the work shared with a small pool of helper threads.
//
// Every output element is accumulated in one order whatever m, the thread count or the split of
// the work: per half of the contraction, fused multiply-adds in ascending order, then the halves
// added (layout "in_out"); or 16 fixed lanes of fused multiply-adds combined in a fixed tree
// (layout "out_in"). So a row's result does not depend on how many rows share the call.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <utility>
#include <unistd.h>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float Vec __attribute__((vector_size(64)));  // 16 lanes
constexpr int64_t kLanes = 16;

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { __builtin_memcpy(p, &v, sizeof(v)); }

// Exact fused multiply-add in every lane.
inline Vec Fma(Vec a, Vec b, Vec c) {
#ifdef __AVX512F__
  return _mm512_fmadd_ps(a, b, c);
#else
  Vec r;
  for (int64_t l = 0; l < kLanes; ++l) r[l] = std::fma(a[l], b[l], c[l]);
  return r;
#endif
}
inline Vec Splat(float s) { return Vec{s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }

// Layout in_out (W is [k, n], the contraction index outer). y[j, c] = sum_i x[j, i] W[i, c] as
// fused multiply-adds in ascending i within each half of the contraction, then the two halves
// added. A tile holds up to kGroup rows of y times kPanel vectors of columns in registers while
// a block of weight rows streams through it (a longer block for more rows: fewer loads and stores
// of the tile per product); the weight rows a prefetch distance further down are prefetched into
// L2 meanwhile, so they arrive while this block is multiplied. Where the blocks end does not
// change any sum (an accumulator stored and reloaded is the same float); where the halves meet
// does, so that is fixed at a multiple of kHalfUnit rows.
constexpr int64_t kPanel = 2;     // column vectors per tile (32 columns)
constexpr int kGroup = 8;         // rows of x per tile
constexpr int64_t kHalfUnit = 8;  // the halves meet at a multiple of this

struct Blocking {
  int64_t rows;   // weight rows per block
  int64_t ahead;  // prefetch distance in weight rows
};
inline Blocking BlockingFor(int64_t m) { return m <= 4 ? Blocking{8, 16} : Blocking{24, 24}; }

// y[0:M, c:c+16V] = (first ? 0 : y) + x[0:M, i0:i1] . W[i0:i1, c:c+16V].
template <int M, int V>
void Tile(const float* x, int64_t k, const float* w, int64_t n, float* y, int64_t c, int64_t i0,
          int64_t i1, bool first) {
  Vec acc[M][V];
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < V; ++v) acc[j][v] = first ? Vec{} : Load(y + j * n + c + v * kLanes);
#pragma GCC unroll 4  // 2-7% faster at 1-16 rows than not unrolled (8: slower above 4 rows)
  for (int64_t i = i0; i < i1; ++i) {
    Vec wv[V];
    for (int v = 0; v < V; ++v) wv[v] = Load(w + i * n + c + v * kLanes);
    for (int j = 0; j < M; ++j) {
      const Vec xb = Splat(x[j * k + i]);
      for (int v = 0; v < V; ++v) acc[j][v] = Fma(xb, wv[v], acc[j][v]);
    }
  }
  for (int j = 0; j < M; ++j)
    for (int v = 0; v < V; ++v) Store(y + j * n + c + v * kLanes, acc[j][v]);
}

// Columns [c0, c1) of M rows for weight rows [i0, i1): full tiles, single vectors, then scalars.
// Meanwhile the same columns of `rows` weight rows from `ahead` on (when not null) are prefetched
// into L2 in address order, an equal share before each tile.
template <int M>
void Group(const float* x, int64_t k, const float* w, int64_t n, float* y, int64_t c0, int64_t c1,
           int64_t i0, int64_t i1, bool first, const float* ahead, int64_t rows) {
  const int64_t per_row = (c1 - c0 + kLanes - 1) / kLanes;  // cache lines per row
  const int64_t tiles = (c1 - c0) / (kPanel * kLanes) + (c1 - c0) % (kPanel * kLanes) / kLanes + 1;
  const int64_t share = ahead ? (rows * per_row + tiles - 1) / tiles : 0;  // lines per tile
  int64_t row = 0, line = 0;  // the next line to prefetch: row of `ahead`, line within the row
  auto prefetch = [&]() {  // (no division per line: a divide costs more than the line's products)
    for (int64_t l = 0; l < share && row < rows; ++l) {
      __builtin_prefetch(ahead + row * n + c0 + line * kLanes, 0, 2);
      if (++line == per_row) line = 0, ++row;
    }
  };
  int64_t c = c0;
  for (; c + kPanel * kLanes <= c1; c += kPanel * kLanes) {
    prefetch();
    Tile<M, kPanel>(x, k, w, n, y, c, i0, i1, first);
  }
  for (; c + kLanes <= c1; c += kLanes) {
    prefetch();
    Tile<M, 1>(x, k, w, n, y, c, i0, i1, first);
  }
  prefetch();
  for (; c < c1; ++c)
    for (int j = 0; j < M; ++j) {
      float s = first ? 0.0f : y[j * n + c];
      for (int64_t i = i0; i < i1; ++i) s = std::fma(x[j * k + i], w[i * n + c], s);
      y[j * n + c] = s;
    }
}

using GroupFn = decltype(&Group<1>);
constexpr GroupFn kGroups[kGroup] = {Group<1>, Group<2>, Group<3>, Group<4>,
                                     Group<5>, Group<6>, Group<7>, Group<8>};

// y[:, c0:c1] = x[:, r0:r1] . W[r0:r1, c0:c1] for all m rows.
void InOut(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t r0,
           int64_t r1, int64_t c0, int64_t c1) {
  const Blocking b = BlockingFor(m);
  for (int64_t i0 = r0; i0 < r1; i0 += b.rows) {
    const int64_t i1 = std::min(r1, i0 + b.rows);
    const int64_t a = std::min(r1, i0 + b.ahead), rows = std::min(r1 - a, b.rows);
    for (int64_t j0 = 0; j0 < m; j0 += kGroup) {
      const int64_t g = std::min<int64_t>(kGroup, m - j0);
      kGroups[g - 1](x + j0 * k, k, w, n, y + j0 * n, c0, c1, i0, i1, i0 == r0,
                     j0 == 0 && rows > 0 ? w + a * n : nullptr, rows);
    }
  }
}

// 16-lane sum in a fixed tree: lanes i and i + 8, then i and i + 4, i + 2, i + 1.
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec4 __attribute__((vector_size(16)));
inline float Reduce(Vec v) {
  const Vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// Layout out_in (W is [n, k], each output's weights contiguous, as a tied LM head): y[j, c] is 16
// lanes of fused multiply-adds over the contraction index, the k % 16 tail's products in lane
// order, summed by Reduce.
// Four outputs times M rows per pass, each weight vector loaded once for the M rows.
// Meanwhile `lines` cache lines from `ahead` on are prefetched into L2, a share per four outputs.
template <int M>
void OutInGroup(const float* x, const float* w, float* y, int64_t k, int64_t n, int64_t c0,
                int64_t c1, const float* ahead, int64_t lines) {
  const int64_t kb = k - k % kLanes;
  const int64_t steps = (c1 - c0 + 3) / 4;
  const int64_t share = (lines + steps - 1) / steps;  // lines per four outputs
  int64_t done = 0;
  auto finish = [&](Vec acc, const float* xj, const float* wc) {
    if (kb == k) return Reduce(acc);
    float tail[kLanes] = {};
    for (int64_t i = kb; i < k; ++i) tail[i - kb] = xj[i] * wc[i];
    return Reduce(acc + Load(tail));
  };
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    for (const int64_t upto = std::min(lines, done + share); done < upto; ++done)
      __builtin_prefetch(ahead + done * kLanes, 0, 2);
    Vec acc[4][M] = {};
    for (int64_t i = 0; i < kb; i += kLanes) {
      Vec wv[4];
      for (int o = 0; o < 4; ++o) wv[o] = Load(w + (c + o) * k + i);
      for (int j = 0; j < M; ++j) {
        const Vec xv = Load(x + j * k + i);
        for (int o = 0; o < 4; ++o) acc[o][j] = Fma(xv, wv[o], acc[o][j]);
      }
    }
    for (int o = 0; o < 4; ++o)
      for (int j = 0; j < M; ++j) y[j * n + c + o] = finish(acc[o][j], x + j * k, w + (c + o) * k);
  }
  for (; c < c1; ++c)
    for (int j = 0; j < M; ++j) {
      Vec acc{};
      for (int64_t i = 0; i < kb; i += kLanes) acc = Fma(Load(x + j * k + i), Load(w + c * k + i), acc);
      y[j * n + c] = finish(acc, x + j * k, w + c * k);
    }
}

using OutInFn = decltype(&OutInGroup<1>);
constexpr OutInFn kOutInGroups[4] = {OutInGroup<1>, OutInGroup<2>, OutInGroup<3>, OutInGroup<4>};

// Outputs [c0, c1) for all m rows, kOutBlock outputs at a time (their weights stay in L2 while
// the groups of rows pass over them), the block two blocks further on prefetched meanwhile.
constexpr int64_t kOutBlock = 32;
void OutIn(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t c0,
           int64_t c1) {
  for (int64_t b = c0; b < c1; b += kOutBlock) {
    const int64_t a = std::min(c1, b + 2 * kOutBlock), outputs = std::min(c1 - a, kOutBlock);
    for (int64_t j0 = 0; j0 < m; j0 += 4)
      kOutInGroups[std::min<int64_t>(4, m - j0) - 1](
          x + j0 * k, w, y + j0 * n, k, n, b, std::min(c1, b + kOutBlock), w + a * k,
          j0 == 0 ? (outputs * k + kLanes - 1) / kLanes : 0);
  }
}

// A persistent pool of helper threads: one call at a time (callers queue on a mutex), split in
// pieces; thread t of the pool (t = 0 the caller) runs pieces t, t + size(), ... Helpers spin
// briefly between calls, then sleep.
class Pool {
 public:
  explicit Pool(int helpers) {
    for (int h = 0; h < helpers; ++h) threads_.emplace_back([this, h] { Loop(h + 1); });
  }
  ~Pool() {
    stop_.store(true);
    generation_.fetch_add(1);
    generation_.notify_all();
    for (auto& t : threads_) t.join();
  }
  int size() const { return static_cast<int>(threads_.size()) + 1; }

  template <typename Part>
  void Run(int pieces, const Part& part) {
    std::lock_guard<std::mutex> lock(mutex_);
    std::function<void(int)> job = [&](int t) {
      for (int p = t; p < pieces; p += size()) part(p);
    };
    job_ = &job;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    job(0);
    while (done_.load(std::memory_order_acquire) < size() - 1) std::this_thread::yield();
  }

 private:
  void Loop(int index) {
    uint64_t seen = 0;
    while (true) {
      uint64_t now = generation_.load(std::memory_order_acquire);
      for (int spin = 0; now == seen && spin < 2000; ++spin) {
        std::this_thread::yield();
        now = generation_.load(std::memory_order_acquire);
      }
      if (now == seen) {
        generation_.wait(seen, std::memory_order_acquire);
        continue;
      }
      seen = now;
      if (stop_.load()) return;
      (*job_)(index);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  std::mutex mutex_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  std::function<void(int)>* job_ = nullptr;
};

Pool& SharedPool() {
  static Pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  return pool;
}

const pid_t kPoolPid = getpid();

// Runs part(p) for p in [0, pieces): on the pool when threads > 1, else (or in a forked child,
// which the pool's threads do not survive) in order on this thread.
template <typename Part>
void Parallel(int pieces, int64_t threads, const Part& part) {
  if (pieces == 1 || threads <= 1 || getpid() != kPoolPid) {
    for (int p = 0; p < pieces; ++p) part(p);
    return;
  }
  SharedPool().Run(pieces, part);
}

// Bounds of piece p of `pieces` over [0, n), multiples of `align`.
inline std::pair<int64_t, int64_t> Bounds(int64_t n, int64_t align, int p, int pieces) {
  const int64_t units = (n + align - 1) / align;
  return {std::min(n, units * p / pieces * align), std::min(n, units * (p + 1) / pieces * align)};
}

// in_out: the contraction is always cut in two halves at a block boundary (so a row's result is
// the same whatever the thread count); each half's columns are split over threads / 2 pieces.
// Half 0 accumulates into y, half 1 into a scratch buffer added to y afterwards: each thread reads
// contiguous weight rows.
void InOutParallel(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n,
                   int64_t threads) {
  const int64_t units = (k + kHalfUnit - 1) / kHalfUnit;
  const int64_t half = std::min(k, (units + 1) / 2 * kHalfUnit);
  thread_local std::vector<float> scratch;  // the caller's: helpers write through `rest`
  if (half < k) scratch.resize(m * n);
  float* rest = scratch.data();
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min(threads / 2, (n + kLanes - 1) / kLanes)));
  Parallel(half < k ? 2 * chunks : chunks, threads, [&](int p) {
    const auto [c0, c1] = Bounds(n, kLanes, p % chunks, chunks);
    if (c0 >= c1) return;
    if (p < chunks) InOut(x, w, y, m, k, n, 0, half, c0, c1);
    else InOut(x, w, rest, m, k, n, half, k, c0, c1);
  });
  if (half < k)
    for (int64_t e = 0; e < m * n; ++e) y[e] += rest[e];
}

ffi::Error FewRows(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t out_in, int64_t threads) {
  const auto xd = x.dimensions();
  const auto wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("few_rows: x and w must be matrices");
  const int64_t m = xd[0], k = xd[1];
  const int64_t n = out_in ? wd[0] : wd[1];
  if ((out_in ? wd[1] : wd[0]) != k)
    return ffi::Error::InvalidArgument("few_rows: contraction sizes differ");
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  if (!out_in) {
    InOutParallel(xp, wp, yp, m, k, n, threads);
  } else {
    const int pieces = static_cast<int>(std::max<int64_t>(1, std::min(threads, (n + 3) / 4)));
    Parallel(pieces, threads, [&](int p) {
      const auto [c0, c1] = Bounds(n, 4, p, pieces);
      if (c0 < c1) OutIn(xp, wp, yp, m, k, n, c0, c1);
    });
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpecdecFewRows, FewRows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("out_in")
                                  .Attr<int64_t>("threads"));
