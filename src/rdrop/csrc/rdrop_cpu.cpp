// Row kernels of the R-Drop loss on CPU: the symmetric KL of two passes and the
// (label-smoothed) cross-entropy of both, forward and backward, one row at a time.
//
// Per row, with p = softmax(z_a), q = softmax(z_b), lse the log-sum-exp and
// d = log p - log q = (z_a - z_b) - (lse_a - lse_b):
//
//   kl       = 1/2 sum_c (p_c - q_c) d_c      (every term >= 0: no cancellation)
//   kl_pq    = sum_c p_c d_c,  kl_qp = -sum_c q_c d_c
//   ce       = lse - (1 - eps) z_t - eps mean_c z_c
//   d/dz_a   = p (w d + w (1 - kl_pq) + w_a) - w q - w_a ((1 - eps) onehot(t) + eps / C)
//   d/dz_b   = q (w (1 - kl_qp) + w_b - w d) - w p - w_b ((1 - eps) onehot(t) + eps / C)
//
// with w the per-row weight of the KL (half the incoming gradient) and w_a, w_b those of
// the cross-entropies. The forward reads each row three times (max, exp, KL sums) and
// keeps the exponentials in a per-thread row buffer, so it evaluates 2 exponentials per
// class; the backward recomputes p and q from the saved lse (2 more) and writes the
// gradient straight into the output. Everything is computed in float32; bf16 and fp16
// rows are converted on load and the gradient rounded once on store.
//
// A class that is -inf in both passes has p = q = 0 and contributes 0 (d taken as 0).
// Rows whose result is not finite (NaN or +inf logits, a class -inf in one pass only, a
// row all -inf, an infinite cross-entropy) are flagged in the statistics; the Python
// side then recomputes the whole call with the ATen kernel, which defines those cases.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <limits>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using Vec = at::vec::Vectorized<float>;

constexpr int64_t kLanes = Vec::size();
// Vectors summed in float32 lanes before the partial sum moves to a double accumulator:
// keeps the rounding of long rows (128k classes) near that of a short row.
constexpr int64_t kBlockVectors = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Columns of the per-row statistics tensor [R, kStats] (float32).
enum Stat : int64_t {
  kKl = 0,
  kCeA,
  kCeB,
  kLseA,
  kLseB,
  kKlPq,
  kKlQp,
  kBad,
  kStats
};

// Vector i of a row of n floats; the lanes past the end read as -inf, which every sum
// below turns into an exact 0 contribution (exp(-inf) = 0, d masked to 0).
inline Vec load_padded(const float* row, int64_t i, int64_t n) {
  const int64_t left = n - i;
  if (left >= kLanes) {
    return Vec::loadu(row + i);
  }
  return Vec::set(Vec(kNegInf), Vec::loadu(row + i, left), left);
}

inline double hsum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  double total = 0.0;
  for (int64_t l = 0; l < kLanes; ++l) {
    total += lanes[l];
  }
  return total;
}

inline float hmax(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float best = lanes[0];
  for (int64_t l = 1; l < kLanes; ++l) {
    best = std::max(best, lanes[l]);
  }
  return best;
}

// d = (za - zb) - c, with 0 where both logits are -inf (a class impossible in both).
inline Vec log_ratio(const Vec& za, const Vec& zb, const Vec& c) {
  const Vec ninf(kNegInf);
  const Vec both = (za == ninf) & (zb == ninf);
  return Vec::blendv((za - zb) - c, Vec(0.0f), both);
}

// A row of the input as float32: the row itself for float32, else converted into buf.
template <typename scalar_t>
const float* as_float(const scalar_t* row, int64_t n, std::vector<float>& buf) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    at::vec::convert(row, buf.data(), n);
    return buf.data();
  }
}

struct RowMax {
  float a, b;
  double sum_a, sum_b;  // sum_c z_c, for the label smoothing
};

RowMax row_max(const float* za, const float* zb, int64_t n, bool want_sums) {
  Vec ma(kNegInf), mb(kNegInf);
  for (int64_t i = 0; i < n; i += kLanes) {
    ma = at::vec::maximum(ma, load_padded(za, i, n));
    mb = at::vec::maximum(mb, load_padded(zb, i, n));
  }
  RowMax out{hmax(ma), hmax(mb), 0.0, 0.0};
  if (want_sums) {
    for (int64_t i = 0; i < n; ++i) {
      out.sum_a += za[i];
      out.sum_b += zb[i];
    }
  }
  return out;
}

// exp(z - m) of a row into e, and its sum.
double row_exp(const float* z, float m, float* e, int64_t n) {
  const Vec vm(m);
  double total = 0.0;
  int64_t i = 0;
  while (i < n) {
    Vec acc(0.0f);
    const int64_t stop = std::min(n, i + kBlockVectors * kLanes);
    for (; i < stop; i += kLanes) {
      const Vec x = (load_padded(z, i, n) - vm).exp();
      acc = acc + x;
      x.store(e + i, std::min(kLanes, n - i));
    }
    total += hsum(acc);
  }
  return total;
}

struct KlSums {
  double kl, pd, qd;  // sum (p - q) d, sum p d, sum q d
};

KlSums kl_sums(
    const float* za,
    const float* zb,
    const float* ea,
    const float* eb,
    float inv_a,
    float inv_b,
    float c,
    int64_t n) {
  const Vec va(inv_a), vb(inv_b), vc(c);
  KlSums out{0.0, 0.0, 0.0};
  int64_t i = 0;
  while (i < n) {
    Vec kl(0.0f), pd(0.0f), qd(0.0f);
    const int64_t stop = std::min(n, i + kBlockVectors * kLanes);
    for (; i < stop; i += kLanes) {
      const int64_t k = std::min(kLanes, n - i);
      const Vec p = Vec::loadu(ea + i, k) * va;  // lanes past the end read 0
      const Vec q = Vec::loadu(eb + i, k) * vb;
      const Vec d = log_ratio(load_padded(za, i, n), load_padded(zb, i, n), vc);
      kl = at::vec::fmadd(p - q, d, kl);
      pd = at::vec::fmadd(p, d, pd);
      qd = at::vec::fmadd(q, d, qd);
    }
    out.kl += hsum(kl);
    out.pd += hsum(pd);
    out.qd += hsum(qd);
  }
  return out;
}

inline double cross_entropy(double lse, const float* z, int64_t t, double sum_z, int64_t n, double eps) {
  double zt = (1.0 - eps) * z[t];
  if (eps != 0.0) {
    zt += eps * sum_z / static_cast<double>(n);
  }
  return lse - zt;
}

template <typename scalar_t>
void forward_impl(
    const Tensor& a,
    const Tensor& b,
    const std::optional<Tensor>& target,
    const std::optional<Tensor>& live,
    double smoothing,
    Tensor& stats) {
  const int64_t rows = a.size(0), n = a.size(1);
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  const int64_t* pt = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  const bool* pl = live.has_value() ? live->const_data_ptr<bool>() : nullptr;
  float* ps = stats.data_ptr<float>();
  const bool smooth = smoothing != 0.0 && pt != nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> ea(n), eb(n), fa, fb;
    if constexpr (!std::is_same_v<scalar_t, float>) {
      fa.resize(n);
      fb.resize(n);
    }
    for (int64_t r = begin; r < end; ++r) {
      float* s = ps + r * kStats;
      std::fill(s, s + kStats, 0.0f);
      if (pl != nullptr && !pl[r]) {
        continue;
      }
      const float* za = as_float(pa + r * n, n, fa);
      const float* zb = as_float(pb + r * n, n, fb);
      const RowMax m = row_max(za, zb, n, smooth);
      if (!std::isfinite(m.a) || !std::isfinite(m.b)) {
        s[kBad] = 1.0f;
        continue;
      }
      const double sa = row_exp(za, m.a, ea.data(), n);
      const double sb = row_exp(zb, m.b, eb.data(), n);
      const double lse_a = m.a + std::log(sa), lse_b = m.b + std::log(sb);
      const KlSums k = kl_sums(
          za, zb, ea.data(), eb.data(), static_cast<float>(1.0 / sa),
          static_cast<float>(1.0 / sb), static_cast<float>(lse_a - lse_b), n);
      s[kKl] = static_cast<float>(0.5 * k.kl);
      s[kLseA] = static_cast<float>(lse_a);
      s[kLseB] = static_cast<float>(lse_b);
      s[kKlPq] = static_cast<float>(k.pd);
      s[kKlQp] = static_cast<float>(-k.qd);
      bool bad = !std::isfinite(k.kl) || !std::isfinite(lse_a) || !std::isfinite(lse_b);
      if (pt != nullptr && pt[r] >= 0) {
        const double ce_a = cross_entropy(lse_a, za, pt[r], m.sum_a, n, smoothing);
        const double ce_b = cross_entropy(lse_b, zb, pt[r], m.sum_b, n, smoothing);
        s[kCeA] = static_cast<float>(ce_a);
        s[kCeB] = static_cast<float>(ce_b);
        bad = bad || !std::isfinite(ce_a) || !std::isfinite(ce_b);
      }
      s[kBad] = bad ? 1.0f : 0.0f;
    }
  });
}

// Gradient of one row of both passes into ga, gb (float32, may alias the outputs).
void row_grad(
    const float* za,
    const float* zb,
    const float* s,
    float w,
    float wa,
    float wb,
    float* ga,
    float* gb,
    int64_t n) {
  const float lse_a = s[kLseA], lse_b = s[kLseB];
  const float coef_a = (w == 0.0f ? 0.0f : w * (1.0f - s[kKlPq])) + wa;
  const float coef_b = (w == 0.0f ? 0.0f : w * (1.0f - s[kKlQp])) + wb;
  const Vec vla(lse_a), vlb(lse_b), vc(lse_a - lse_b), vw(w), vca(coef_a), vcb(coef_b);
  for (int64_t i = 0; i < n; i += kLanes) {
    const int64_t k = std::min(kLanes, n - i);
    const Vec xa = load_padded(za, i, n), xb = load_padded(zb, i, n);
    const Vec p = (xa - vla).exp(), q = (xb - vlb).exp();
    const Vec wd = vw * log_ratio(xa, xb, vc);
    (p * (wd + vca) - vw * q).store(ga + i, k);
    (q * (vcb - wd) - vw * p).store(gb + i, k);
  }
}

// Subtract the cross-entropy's target part w ((1 - eps) onehot(t) + eps / C) from g.
void ce_target_part(float* g, float w, int64_t t, double eps, int64_t n) {
  if (w == 0.0f) {
    return;
  }
  if (eps != 0.0) {
    const float u = static_cast<float>(w * eps / static_cast<double>(n));
    at::vec::map([u](Vec x) { return x - Vec(u); }, g, g, n);
  }
  g[t] -= static_cast<float>(w * (1.0 - eps));
}

template <typename scalar_t>
void store_row(const float* src, scalar_t* dst, int64_t n) {
  if constexpr (!std::is_same_v<scalar_t, float>) {
    at::vec::convert(src, dst, n);
  }
}

// Fault in the pages of [ptr, ptr + bytes) of a large, not yet touched output with one
// system call before they are written (MADV_POPULATE_WRITE, Linux 5.14+); each thread does
// this for its own rows, so the faults run in parallel. Page by page, the first-touch
// faults of a fresh logits-sized gradient cost almost as much as computing it.
// Transparent huge pages (MADV_HUGEPAGE) would be cheaper still when free ones exist, but
// where memory is fragmented the kernel compacts it first and a call then takes several
// times longer; this is steady. A hint only; errors (older kernels) are ignored.
void prefault(void* ptr, int64_t bytes) {
#if defined(__linux__)
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  constexpr uintptr_t kPage = uintptr_t(1) << 12;
  const auto begin = reinterpret_cast<uintptr_t>(ptr);
  const uintptr_t first = (begin + kPage - 1) & ~(kPage - 1);
  const uintptr_t last = (begin + static_cast<uintptr_t>(bytes)) & ~(kPage - 1);
  if (last > first) {
    madvise(reinterpret_cast<void*>(first), last - first, MADV_POPULATE_WRITE);
  }
#endif
}

// Outputs at least this large are prefaulted (smaller ones: the faults are negligible).
constexpr int64_t kPrefaultBytes = int64_t(1) << 23;

template <typename scalar_t>
void backward_impl(
    const Tensor& a,
    const Tensor& b,
    const Tensor& stats,
    const std::optional<Tensor>& target,
    const Tensor& w_kl,
    const std::optional<Tensor>& w_ce,
    double smoothing,
    const std::optional<Tensor>& grad_a,
    const std::optional<Tensor>& grad_b) {
  const int64_t rows = a.size(0), n = a.size(1);
  const scalar_t* pa = a.const_data_ptr<scalar_t>();
  const scalar_t* pb = b.const_data_ptr<scalar_t>();
  const float* ps = stats.const_data_ptr<float>();
  const int64_t* pt = target.has_value() ? target->const_data_ptr<int64_t>() : nullptr;
  const float* pw = w_kl.const_data_ptr<float>();
  const float* pce = w_ce.has_value() ? w_ce->const_data_ptr<float>() : nullptr;
  scalar_t* oa = grad_a.has_value() ? grad_a->data_ptr<scalar_t>() : nullptr;
  scalar_t* ob = grad_b.has_value() ? grad_b->data_ptr<scalar_t>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool populate = rows * n * static_cast<int64_t>(sizeof(scalar_t)) >= kPrefaultBytes;
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if (populate) {
      const int64_t bytes = (end - begin) * n * static_cast<int64_t>(sizeof(scalar_t));
      if (oa != nullptr) prefault(oa + begin * n, bytes);
      if (ob != nullptr) prefault(ob + begin * n, bytes);
    }
    std::vector<float> fa, fb, ta(n), tb(n);
    if constexpr (!kFloat) {
      fa.resize(n);
      fb.resize(n);
    }
    for (int64_t r = begin; r < end; ++r) {
      const float w = pw[r];
      const float wa = pce != nullptr ? pce[r] : 0.0f;
      const float wb = pce != nullptr ? pce[rows + r] : 0.0f;
      scalar_t* da = oa != nullptr ? oa + r * n : nullptr;
      scalar_t* db = ob != nullptr ? ob + r * n : nullptr;
      if (w == 0.0f && wa == 0.0f && wb == 0.0f) {  // row out of the loss: exactly 0
        if (da != nullptr) std::fill(da, da + n, scalar_t(0));
        if (db != nullptr) std::fill(db, db + n, scalar_t(0));
        continue;
      }
      const float* za = as_float(pa + r * n, n, fa);
      const float* zb = as_float(pb + r * n, n, fb);
      // float32 outputs are written in place; a missing output goes to the scratch row
      float* ga = (kFloat && da != nullptr) ? reinterpret_cast<float*>(da) : ta.data();
      float* gb = (kFloat && db != nullptr) ? reinterpret_cast<float*>(db) : tb.data();
      row_grad(za, zb, ps + r * kStats, w, wa, wb, ga, gb, n);
      const int64_t t = pt != nullptr ? pt[r] : -1;
      if (t >= 0) {
        ce_target_part(ga, wa, t, smoothing, n);
        ce_target_part(gb, wb, t, smoothing, n);
      }
      if (da != nullptr) store_row(ga, da, n);
      if (db != nullptr) store_row(gb, db, n);
    }
  });
}

void check_pair(const Tensor& a, const Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.sizes() == a.sizes(), "rdrop_cpu: a and b must be [R, V]");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous(), "rdrop_cpu: rows must be contiguous");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "rdrop_cpu: a and b differ in dtype");
  TORCH_CHECK(a.device().is_cpu(), "rdrop_cpu: CPU tensors only");
}

// Per-row statistics [R, kStats] of both passes into stats (float32, contiguous).
void rows_forward(
    const Tensor& a,
    const Tensor& b,
    const std::optional<Tensor>& target,
    const std::optional<Tensor>& live,
    double smoothing,
    Tensor stats) {
  check_pair(a, b);
  TORCH_CHECK(stats.is_contiguous() && stats.size(0) == a.size(0), "rdrop_cpu: bad stats");
  switch (a.scalar_type()) {
    case at::kFloat:
      return forward_impl<float>(a, b, target, live, smoothing, stats);
    case at::kBFloat16:
      return forward_impl<c10::BFloat16>(a, b, target, live, smoothing, stats);
    case at::kHalf:
      return forward_impl<c10::Half>(a, b, target, live, smoothing, stats);
    default:
      TORCH_CHECK(false, "rdrop_cpu: float32, bfloat16 or float16 rows only");
  }
}

// Gradients of both passes into grad_a / grad_b (input dtype; either may be absent).
void rows_backward(
    const Tensor& a,
    const Tensor& b,
    const Tensor& stats,
    const std::optional<Tensor>& target,
    const Tensor& w_kl,
    const std::optional<Tensor>& w_ce,
    double smoothing,
    const std::optional<Tensor>& grad_a,
    const std::optional<Tensor>& grad_b) {
  check_pair(a, b);
  switch (a.scalar_type()) {
    case at::kFloat:
      return backward_impl<float>(a, b, stats, target, w_kl, w_ce, smoothing, grad_a, grad_b);
    case at::kBFloat16:
      return backward_impl<c10::BFloat16>(
          a, b, stats, target, w_kl, w_ce, smoothing, grad_a, grad_b);
    case at::kHalf:
      return backward_impl<c10::Half>(a, b, stats, target, w_kl, w_ce, smoothing, grad_a, grad_b);
    default:
      TORCH_CHECK(false, "rdrop_cpu: float32, bfloat16 or float16 rows only");
  }
}

}  // namespace

TORCH_LIBRARY(rdrop_cpu, m) {
  m.def(
      "rows_forward(Tensor a, Tensor b, Tensor? target, Tensor? live, float smoothing, "
      "Tensor(s!) stats) -> ()",
      &rows_forward);
  m.def(
      "rows_backward(Tensor a, Tensor b, Tensor stats, Tensor? target, Tensor w_kl, "
      "Tensor? w_ce, float smoothing, Tensor(ga!)? grad_a, Tensor(gb!)? grad_b) -> ()",
      &rows_backward);
}
