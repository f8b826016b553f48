// Per-user lists in training, on CPU: RRD's relaxed ranking loss over gathered dot products, the gradient of any
// per-list dot-product score into the two embedding tables, and the samplers' membership test (csr_contains, at the
// end). Built with dot_topk.cpp and module.cpp into one extension by rayrec/kernels.py.
//
// rrd_forward(U [Nu, D], V [Ni, D], users [B], items [B, C], K)  ->  (nll [B], dnll_ds [B, C])
//   s[b, c] = U[users[b]] . V[items[b, c]]; the first K columns are the interesting items in the teacher's order
//   (a_1..a_K), the other L = C - K the uninteresting ones (b_1..b_L). Per row (DE-RRD, relaxed Plackett-Luce):
//     S_k = sum_{l >= k} e^{a_l} + sum_j e^{b_j},     nll = -sum_k (a_k - log S_k)
//     d nll / d a_l = -1 + e^{a_l} sum_{k <= l} 1 / S_k,     d nll / d b_j = e^{b_j} sum_{k <= K} 1 / S_k
//   All from K + L exponentials and one logarithm per row: every term is shifted by the row's largest score m, the
//   sums run in double. A row whose interesting scores lie more than 80 below m (where float's e^{a - m} leaves its
//   normal range), or with a non-finite score, is redone exactly in log space (double log-add-exp chains).
//   Rows in parallel (at::parallel_for); each row's result does not depend on the thread count.
//
// list_dot_backward(w [B, C], U, V, users, items, need_u, need_v)  ->  (gU [Nu, D], gV [Ni, D])
//   The gradient of sum_{b,c} w[b, c] s[b, c]: gU[users[b]] += sum_c w[b, c] V[items[b, c]] and
//   gV[items[b, c]] += w[b, c] U[users[b]], accumulated in row order on one thread, so the result is the same on
//   every run (ids repeat within and across rows). A table not needed comes back empty.
//
// Why: autograd's version of this (index_select, bmm, the loss, and two index_put_ accumulations) cost ~4.6 ms for
// 830 users x 80 items x d=20 on one thread, most of it in the scatter-adds. Here one pass reads each gathered row
// once forward and once backward.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#include <sleef.h>  // torch's vector math (libtorch_cpu exports Sleef_expf16_u10): exp of 16 floats, within 1 ulp
#endif

namespace {

#if defined(__AVX512F__)
inline float dot(const float* __restrict a, const float* __restrict b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d), acc);
  if (d < D) {  // the tail in one masked load
    const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1u);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#else
inline float dot(const float* __restrict a, const float* __restrict b, int64_t D) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;  // four chains: a vectorisable, latency-hiding reduction
  int64_t d = 0;
  for (; d + 4 <= D; d += 4) {
    s0 += a[d] * b[d];
    s1 += a[d + 1] * b[d + 1];
    s2 += a[d + 2] * b[d + 2];
    s3 += a[d + 3] * b[d + 3];
  }
  for (; d < D; ++d) s0 += a[d] * b[d];
  return (s0 + s1) + (s2 + s3);
}
#endif

// y[0:D] += a * x[0:D]
#if defined(__AVX512F__)
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t D) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t d = 0;
  for (; d + 16 <= D; d += 16)
    _mm512_storeu_ps(y + d, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + d), _mm512_loadu_ps(y + d)));
  if (d < D) {
    const __mmask16 m = static_cast<__mmask16>((1u << (D - d)) - 1u);
    const __m512 yv = _mm512_maskz_loadu_ps(m, y + d);
    _mm512_mask_storeu_ps(y + d, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + d), yv));
  }
}
#else
inline void axpy(float* __restrict y, float a, const float* __restrict x, int64_t D) {
  for (int64_t d = 0; d < D; ++d) y[d] += a * x[d];
}
#endif

// e[0:n] = exp(s[0:n] - m), 16 at a time (830 lists x 80 items, d=20: forward 0.59 ms with scalar expf, 0.48 with this)
#if defined(__AVX512F__)
inline void exp_shifted(const float* __restrict s, float m, float* __restrict e, int64_t n) {
  const __m512 mv = _mm512_set1_ps(m);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) _mm512_storeu_ps(e + c, Sleef_expf16_u10(_mm512_sub_ps(_mm512_loadu_ps(s + c), mv)));
  if (c < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - c)) - 1u);
    _mm512_mask_storeu_ps(e + c, k, Sleef_expf16_u10(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + c), mv)));
  }
}
#else
inline void exp_shifted(const float* __restrict s, float m, float* __restrict e, int64_t n) {
  for (int64_t c = 0; c < n; ++c) e[c] = std::exp(s[c] - m);
}
#endif

// the rows a list will touch kPrefetch items ahead (random rows of tables larger than L2)
constexpr int64_t kPrefetch = 8;
inline void prefetch_row(const float* p, int64_t D) {
  for (int64_t d = 0; d < D; d += 16) __builtin_prefetch(p + d);
  __builtin_prefetch(p + D - 1);
}

inline double log_add_exp(double x, double y) {  // log(e^x + e^y), either may be -inf
  if (x == -std::numeric_limits<double>::infinity()) return y;
  if (y == -std::numeric_limits<double>::infinity()) return x;
  double m = std::max(x, y);
  return m + std::log1p(std::exp(-std::fabs(x - y)));
}

// One row exactly in log space: a [K], b [L] scores -> nll, and dnll/ds into g [K + L].
double exact_row(const float* s, int64_t K, int64_t L, float* g) {
  const double ninf = -std::numeric_limits<double>::infinity();
  double tail = ninf;  // log sum_j e^{b_j}
  for (int64_t j = 0; j < L; ++j) tail = log_add_exp(tail, s[K + j]);
  std::vector<double> logS(K);
  double acc = tail, nll = 0.0;
  for (int64_t k = K - 1; k >= 0; --k) {
    acc = log_add_exp(acc, s[k]);
    logS[k] = acc;
    nll += acc - s[k];
  }
  double lp = ninf;  // log sum_{k <= l} 1 / S_k
  for (int64_t l = 0; l < K; ++l) {
    lp = log_add_exp(lp, -logS[l]);
    g[l] = static_cast<float>(-1.0 + std::exp(s[l] + lp));
  }
  for (int64_t j = 0; j < L; ++j) g[K + j] = static_cast<float>(std::exp(s[K + j] + lp));
  return nll;
}

void check_tables(const torch::Tensor& U, const torch::Tensor& V, const torch::Tensor& users,
                  const torch::Tensor& items) {
  TORCH_CHECK(U.device().is_cpu() && V.device().is_cpu() && users.device().is_cpu() && items.device().is_cpu(),
              "list_rank: CPU tensors only");
  TORCH_CHECK(U.scalar_type() == torch::kFloat && V.scalar_type() == torch::kFloat, "list_rank: float32 tables");
  TORCH_CHECK(users.scalar_type() == torch::kLong && items.scalar_type() == torch::kLong, "list_rank: int64 ids");
  TORCH_CHECK(U.dim() == 2 && V.dim() == 2 && U.size(1) == V.size(1), "list_rank: U [Nu, D] and V [Ni, D]");
  TORCH_CHECK(U.is_contiguous() && V.is_contiguous() && users.is_contiguous() && items.is_contiguous(),
              "list_rank: contiguous inputs");
  TORCH_CHECK(users.dim() == 1 && items.dim() == 2 && items.size(0) == users.size(0),
              "list_rank: users [B] and items [B, C]");
  const int64_t Nu = U.size(0), Ni = V.size(0);
  const int64_t* u = users.data_ptr<int64_t>();
  const int64_t* it = items.data_ptr<int64_t>();
  for (int64_t b = 0; b < users.numel(); ++b) TORCH_CHECK(u[b] >= 0 && u[b] < Nu, "list_rank: user id out of range");
  for (int64_t n = 0; n < items.numel(); ++n) TORCH_CHECK(it[n] >= 0 && it[n] < Ni, "list_rank: item id out of range");
}

}  // namespace

namespace rayrec {

std::tuple<torch::Tensor, torch::Tensor> rrd_forward(const torch::Tensor& U, const torch::Tensor& V,
                                                     const torch::Tensor& users, const torch::Tensor& items,
                                                     int64_t K) {
  check_tables(U, V, users, items);
  const int64_t B = items.size(0), C = items.size(1), D = U.size(1), L = C - K;
  TORCH_CHECK(K >= 1 && K <= C, "rrd_forward: need 1 <= K <= C");
  auto nll = torch::empty({B}, U.options());
  auto grad = torch::empty({B, C}, U.options());
  const float* Up = U.data_ptr<float>();
  const float* Vp = V.data_ptr<float>();
  const int64_t* up = users.data_ptr<int64_t>();
  const int64_t* ip = items.data_ptr<int64_t>();
  float* np_ = nll.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> s(C), e(C);
    std::vector<double> inv(K);
    for (int64_t b = b0; b < b1; ++b) {
      const float* ur = Up + up[b] * D;
      const int64_t* row = ip + b * C;
      for (int64_t c = 0; c < C; ++c) {
        if (c + kPrefetch < C) prefetch_row(Vp + row[c + kPrefetch] * D, D);
        s[c] = dot(ur, Vp + row[c] * D, D);
      }
      float* g = gp + b * C;
      // the shift m: the row's largest score, so every shifted term is <= 1 and S_1 >= e^{a_1 - m} > 0
      float m = -std::numeric_limits<float>::infinity(), amin = std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < C; ++c) m = std::max(m, s[c]);
      for (int64_t k = 0; k < K; ++k) amin = std::min(amin, s[k]);
      // the fast path needs every a_k - m within float's normal range of exp; else (or non-finite scores) exact
      if (!std::isfinite(m) || !(m - amin <= 80.f)) {
        np_[b] = static_cast<float>(exact_row(s.data(), K, L, g));
        continue;
      }
      double sum = 0.0, prod = 1.0, asum = 0.0;
      int64_t twos = 0;  // sum_k log(S_k e^{-m}) = log(prod) + twos log 2: one logarithm per row
      exp_shifted(s.data(), m, e.data(), C);
      for (int64_t j = 0; j < L; ++j) sum += e[K + j];
      for (int64_t k = K - 1; k >= 0; --k) {
        sum += e[k];  // S_k e^{-m} in [e^{-80}, C]
        inv[k] = 1.0 / sum;
        asum += s[k];
        prod *= sum;
        if (prod < 1e-100 || prod > 1e100) {
          int ex;
          prod = std::frexp(prod, &ex);
          twos += ex;
        }
      }
      const double nl = std::log(prod) + static_cast<double>(twos) * 0.69314718055994530942 +
                        static_cast<double>(K) * m - asum;
      double p = 0.0;  // sum_{k <= l} 1 / S_k (shifted)
      for (int64_t l = 0; l < K; ++l) {
        p += inv[l];
        g[l] = static_cast<float>(-1.0 + e[l] * p);
      }
      for (int64_t j = 0; j < L; ++j) {  // a b_j far below m: its term in double (float's e^{b_j - m} underflows)
        double eb = e[K + j] > 1e-30f ? e[K + j] : std::exp(static_cast<double>(s[K + j]) - m);
        g[K + j] = static_cast<float>(eb * p);
      }
      np_[b] = static_cast<float>(nl);
    }
  });
  return {nll, grad};
}

std::tuple<torch::Tensor, torch::Tensor> list_dot_backward(const torch::Tensor& w, const torch::Tensor& U,
                                                           const torch::Tensor& V, const torch::Tensor& users,
                                                           const torch::Tensor& items, bool need_u, bool need_v) {
  check_tables(U, V, users, items);
  TORCH_CHECK(w.scalar_type() == torch::kFloat && w.is_contiguous() && w.sizes() == items.sizes(),
              "list_dot_backward: w [B, C] float32, contiguous");
  const int64_t B = items.size(0), C = items.size(1), D = U.size(1);
  auto gU = need_u ? torch::zeros_like(U) : torch::empty({0}, U.options());
  auto gV = need_v ? torch::zeros_like(V) : torch::empty({0}, V.options());
  const float* Up = U.data_ptr<float>();
  const float* Vp = V.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const int64_t* up = users.data_ptr<int64_t>();
  const int64_t* ip = items.data_ptr<int64_t>();
  float* gUp = need_u ? gU.data_ptr<float>() : nullptr;
  float* gVp = need_v ? gV.data_ptr<float>() : nullptr;
#if defined(__AVX512F__)
  if (D <= 32) {  // a row in two registers: the user's gradient accumulates there, not through memory
    const __mmask16 m0 = static_cast<__mmask16>(D >= 16 ? 0xFFFFu : (1u << D) - 1u);
    const __mmask16 m1 = static_cast<__mmask16>(D <= 16 ? 0u : D == 32 ? 0xFFFFu : (1u << (D - 16)) - 1u);
    for (int64_t b = 0; b < B; ++b) {  // one thread, row order: the same sums on every run
      const float* ur = Up + up[b] * D;
      const float* wr = wp + b * C;
      const int64_t* row = ip + b * C;
      const __m512 u0 = _mm512_maskz_loadu_ps(m0, ur), u1 = _mm512_maskz_loadu_ps(m1, ur + 16);
      __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
      for (int64_t c = 0; c < C; ++c) {
        const __m512 wc = _mm512_set1_ps(wr[c]);
        if (c + kPrefetch < C) {
          if (need_u) prefetch_row(Vp + row[c + kPrefetch] * D, D);
          if (need_v) prefetch_row(gVp + row[c + kPrefetch] * D, D);
        }
        if (need_u) {
          const float* vr = Vp + row[c] * D;
          a0 = _mm512_fmadd_ps(wc, _mm512_maskz_loadu_ps(m0, vr), a0);
          a1 = _mm512_fmadd_ps(wc, _mm512_maskz_loadu_ps(m1, vr + 16), a1);
        }
        if (need_v) {
          float* gv = gVp + row[c] * D;
          _mm512_mask_storeu_ps(gv, m0, _mm512_fmadd_ps(wc, u0, _mm512_maskz_loadu_ps(m0, gv)));
          if (m1) _mm512_mask_storeu_ps(gv + 16, m1, _mm512_fmadd_ps(wc, u1, _mm512_maskz_loadu_ps(m1, gv + 16)));
        }
      }
      if (need_u) {
        float* gu = gUp + up[b] * D;
        _mm512_mask_storeu_ps(gu, m0, _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, gu)));
        if (m1) _mm512_mask_storeu_ps(gu + 16, m1, _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, gu + 16)));
      }
    }
    return {gU, gV};
  }
#endif
  std::vector<float> acc(D);
  for (int64_t b = 0; b < B; ++b) {  // one thread, row order: the same sums on every run
    const float* ur = Up + up[b] * D;
    const float* wr = wp + b * C;
    const int64_t* row = ip + b * C;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t c = 0; c < C; ++c) {
      const float wc = wr[c];
      if (c + kPrefetch < C) {
        if (need_u) prefetch_row(Vp + row[c + kPrefetch] * D, D);
        if (need_v) prefetch_row(gVp + row[c + kPrefetch] * D, D);
      }
      if (need_u) axpy(acc.data(), wc, Vp + row[c] * D, D);
      if (need_v) axpy(gVp + row[c] * D, wc, ur, D);
    }
    if (need_u) axpy(gUp + up[b] * D, 1.f, acc.data(), D);
  }
  return {gU, gV};
}

}  // namespace rayrec

namespace rayrec {

// csr_contains(indptr [U + 1], indices [nnz], users [n], items [n]) -> bool [n]: is items[j] among users[j]'s ids
// indices[indptr[u]:indptr[u + 1]] (each row sorted ascending). A binary search inside the user's own row: a few
// hundred ids that stay in cache, where one search over every user's keys walks a multi-megabyte array.
torch::Tensor csr_contains(const torch::Tensor& indptr, const torch::Tensor& indices, const torch::Tensor& users,
                           const torch::Tensor& items) {
  TORCH_CHECK(indptr.device().is_cpu() && indices.device().is_cpu() && users.device().is_cpu() &&
                  items.device().is_cpu(), "csr_contains: CPU tensors only");
  TORCH_CHECK(indptr.scalar_type() == torch::kLong && indices.scalar_type() == torch::kLong &&
                  users.scalar_type() == torch::kLong && items.scalar_type() == torch::kLong,
              "csr_contains: int64 tensors");
  TORCH_CHECK(indptr.is_contiguous() && indices.is_contiguous() && users.is_contiguous() && items.is_contiguous(),
              "csr_contains: contiguous tensors");
  TORCH_CHECK(users.numel() == items.numel(), "csr_contains: users and items of the same size");
  const int64_t U = indptr.numel() - 1, n = users.numel();
  auto out = torch::empty(items.sizes(), users.options().dtype(torch::kBool));
  const int64_t* ip = indptr.data_ptr<int64_t>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  const int64_t* up = users.data_ptr<int64_t>();
  const int64_t* it = items.data_ptr<int64_t>();
  bool* op = out.data_ptr<bool>();
  for (int64_t j = 0; j < n; ++j) TORCH_CHECK(up[j] >= 0 && up[j] < U, "csr_contains: user id out of range");
  at::parallel_for(0, n, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t* lo = ix + ip[up[j]];
      const int64_t* hi = ix + ip[up[j] + 1];
      const int64_t* p = std::lower_bound(lo, hi, it[j]);
      op[j] = p != hi && *p == it[j];
    }
  });
  return out;
}

}  // namespace rayrec
