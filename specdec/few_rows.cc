// Few-row float32 matrix products for CPU decoding: y[m, n] = x[m, k] . W for a few rows m.
//
// XLA's CPU backend streams a weight matrix once for a one-row product but hands two or more rows
// to a general matrix product that costs about one more weight stream per row on a two-core
// machine. These kernels read each weight once for all m rows, vectorise over the weight's
// contiguous dimension and split the output columns over a small pool of helper threads.
//
// Every output element is accumulated in one order whatever m, the thread count or the column
// split: fused multiply-adds over the contraction index in ascending order (layout "in_out"), or
// 16 fixed lanes combined in a fixed tree (layout "out_in"). So a row's result does not depend on
// how many rows share the call.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <unistd.h>
#include <vector>

#include "xla/ffi/api/ffi.h"

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

constexpr int64_t kRowBlock = 16;   // weight rows per pass over y (layout in_out)
constexpr int64_t kColBlock = 256;                // columns per pass, so y and W stay in L1

// y[:, c0:c1] for W laid out [k, n] (contraction index outer): W streamed kRowBlock rows at a
// time, each y[j, c] = sum_i x[j, i] W[i, c] as fused multiply-adds in ascending i.
void InOut(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t c0,
           int64_t c1) {
  for (int64_t j = 0; j < m; ++j) std::fill(y + j * n + c0, y + j * n + c1, 0.0f);
  for (int64_t i0 = 0; i0 < k; i0 += kRowBlock) {
    const int64_t rows = std::min(kRowBlock, k - i0);
    for (int64_t b0 = c0; b0 < c1; b0 += kColBlock) {
      const int64_t b1 = std::min(c1, b0 + kColBlock);
      for (int64_t j = 0; j < m; ++j) {
        const float* xj = x + j * k + i0;
        float* yj = y + j * n;
        if (rows == kRowBlock) {
          float a[kRowBlock];
          for (int64_t r = 0; r < kRowBlock; ++r) a[r] = xj[r];
#pragma GCC ivdep
          for (int64_t c = b0; c < b1; ++c) {
            float s = yj[c];
#pragma GCC unroll 16
            for (int64_t r = 0; r < kRowBlock; ++r) s = std::fma(a[r], w[(i0 + r) * n + c], s);
            yj[c] = s;
          }
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            const float ar = xj[r];
            const float* wr = w + (i0 + r) * n;
#pragma GCC ivdep
            for (int64_t c = b0; c < b1; ++c) yj[c] = std::fma(ar, wr[c], yj[c]);
          }
        }
      }
    }
  }
}

// Sum of the 16 lanes in a fixed tree.
inline float Reduce(Vec v) {
  float l[kLanes];
  Store(l, v);
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t i = 0; i < width; ++i) l[i] += l[i + width];
  return l[0];
}

// y[:, c0:c1] for W laid out [n, k] (each output's weights contiguous, as a tied LM head): four
// outputs at a time, 16 lanes over the contraction index, the k % 16 tail in lane order.
void OutIn(const float* x, const float* w, float* y, int64_t m, int64_t k, int64_t n, int64_t c0,
           int64_t c1) {
  const int64_t kb = k - k % kLanes;
  auto one = [&](const float* xj, const float* wc) {
    Vec acc{};
    for (int64_t i = 0; i < kb; i += kLanes) acc += Load(xj + i) * Load(wc + i);
    float tail[kLanes] = {};
    for (int64_t i = kb; i < k; ++i) tail[i - kb] = xj[i] * wc[i];
    return Reduce(acc + Load(tail));
  };
  int64_t c = c0;
  for (; c + 4 <= c1; c += 4) {
    const float* w0 = w + c * k;
    for (int64_t j = 0; j < m; ++j) {
      const float* xj = x + j * k;
      Vec a0{}, a1{}, a2{}, a3{};
      for (int64_t i = 0; i < kb; i += kLanes) {
        const Vec xv = Load(xj + i);
        a0 += xv * Load(w0 + i);
        a1 += xv * Load(w0 + k + i);
        a2 += xv * Load(w0 + 2 * k + i);
        a3 += xv * Load(w0 + 3 * k + i);
      }
      float t0[kLanes] = {}, t1[kLanes] = {}, t2[kLanes] = {}, t3[kLanes] = {};
      for (int64_t i = kb; i < k; ++i) {
        t0[i - kb] = xj[i] * w0[i];
        t1[i - kb] = xj[i] * w0[k + i];
        t2[i - kb] = xj[i] * w0[2 * k + i];
        t3[i - kb] = xj[i] * w0[3 * k + i];
      }
      y[j * n + c] = Reduce(a0 + Load(t0));
      y[j * n + c + 1] = Reduce(a1 + Load(t1));
      y[j * n + c + 2] = Reduce(a2 + Load(t2));
      y[j * n + c + 3] = Reduce(a3 + Load(t3));
    }
  }
  for (; c < c1; ++c)
    for (int64_t j = 0; j < m; ++j) y[j * n + c] = one(x + j * k, w + c * k);
}

// A persistent pool of helper threads: one call at a time (callers queue on a mutex), split in
// pieces, piece 0 on the calling thread. Helpers spin briefly between calls, then sleep.
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
    pieces = std::min(pieces, size());
    std::function<void(int)> job = [&](int p) { part(p, pieces); };
    job_ = &job;
    pieces_ = pieces;
    done_.store(0, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    generation_.notify_all();
    part(0, pieces);
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
      if (index < pieces_) (*job_)(index);
      done_.fetch_add(1, std::memory_order_release);
    }
  }

  std::mutex mutex_;
  std::vector<std::thread> threads_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> done_{0};
  std::atomic<bool> stop_{false};
  std::function<void(int)>* job_ = nullptr;
  int pieces_ = 1;
};

Pool& SharedPool() {
  static Pool pool(std::max(1u, std::thread::hardware_concurrency()) - 1);
  return pool;
}

// The pool's threads do not survive fork(): a forked child computes on its own thread.
const pid_t kPoolPid = getpid();

// Runs part(c0, c1) over [0, n) in `threads` pieces whose bounds are multiples of `align`.
template <typename Part>
void Split(int64_t n, int64_t align, int64_t threads, const Part& part) {
  const int64_t units = (n + align - 1) / align;
  const int pieces = static_cast<int>(std::max<int64_t>(1, std::min(threads, units)));
  if (pieces == 1 || getpid() != kPoolPid) return part(0, n);
  SharedPool().Run(pieces, [&](int p, int of) {
    const int64_t lo = std::min(n, units * p / of * align), hi = std::min(n, units * (p + 1) / of * align);
    if (lo < hi) part(lo, hi);
  });
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
  if (out_in)
    Split(n, 4, threads, [&](int64_t c0, int64_t c1) { OutIn(xp, wp, yp, m, k, n, c0, c1); });
  else
    Split(n, kLanes, threads, [&](int64_t c0, int64_t c1) { InOut(xp, wp, yp, m, k, n, c0, c1); });
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
