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
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
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

#if defined(__AVX512F__)
// s[0:16] = u . V[row[c]] for 16 items, D <= 32 (u in two registers, the second masked to D - 16 lanes). Each item's
// products land in one register; the 16 registers are then summed lane-wise by a transposing tree (unpack, unpack,
// two lane shuffles: 45 instructions for 16 sums), instead of a horizontal reduction per item (~8 dependent
// instructions each). With the row sums vectorised below, 928 lists x 80 items, d=20, one thread: 0.54 -> 0.45 ms.
inline void dots16(__m512 u0, __m512 u1, __mmask16 m0, __mmask16 m1, const float* __restrict V,
                   const int64_t* __restrict row, int64_t D, float* __restrict s) {
  __m512 x[16];
  for (int c = 0; c < 16; ++c) {
    const float* v = V + row[c] * D;
    const __m512 p = _mm512_mul_ps(u0, _mm512_maskz_loadu_ps(m0, v));
    x[c] = m1 ? _mm512_fmadd_ps(u1, _mm512_maskz_loadu_ps(m1, v + 16), p) : p;
  }
  __m512 y[8], z[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of items 2i (a), 2i+1 (b)
    y[i] = _mm512_add_ps(_mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]), _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit lane: that lane's sums of items 4i .. 4i+3 (pairs moved as doubles)
    const __m512d a = _mm512_castps_pd(y[2 * i]), b = _mm512_castps_pd(y[2 * i + 1]);
    z[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  // the four lanes summed: lane j of the result holds items 4j .. 4j+3
  const __m512 w0 = _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 w1 = _mm512_add_ps(_mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(z[2], z[3], _MM_SHUFFLE(3, 1, 3, 1)));
  _mm512_storeu_ps(s, _mm512_add_ps(_mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(w0, w1, _MM_SHUFFLE(3, 1, 3, 1))));
}

// max of x[0:n] (lo = -inf) or min (lo = +inf), 16 at a time; NaN never wins (as std::max/std::min with it second)
inline float reduce_extreme(const float* x, int64_t n, bool want_max) {
  const float fill = want_max ? -std::numeric_limits<float>::infinity() : std::numeric_limits<float>::infinity();
  __m512 acc = _mm512_set1_ps(fill);
  int64_t c = 0;
  for (; c + 16 <= n; c += 16) {
    const __m512 v = _mm512_loadu_ps(x + c);
    acc = want_max ? _mm512_max_ps(v, acc) : _mm512_min_ps(v, acc);
  }
  if (c < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - c)) - 1u);
    const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(fill), k, x + c);
    acc = want_max ? _mm512_max_ps(v, acc) : _mm512_min_ps(v, acc);
  }
  return want_max ? _mm512_reduce_max_ps(acc) : _mm512_reduce_min_ps(acc);
}

// sum of x[0:n] in double, 8 at a time
inline double sum_double(const float* x, int64_t n) {
  __m512d acc = _mm512_setzero_pd();
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_loadu_ps(x + c)));
  if (c < n) {
    const __mmask8 k = static_cast<__mmask8>((1u << (n - c)) - 1u);
    acc = _mm512_add_pd(acc, _mm512_cvtps_pd(_mm256_maskz_loadu_ps(k, x + c)));
  }
  return _mm512_reduce_add_pd(acc);
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
      int64_t c0 = 0;
#if defined(__AVX512F__)
      if (D <= 32) {  // 16 items at a time (dots16); the next block's rows prefetched, one line each (all of
                      // each row: 0.49 ms at 25k items, none: 0.45 ms but 1.1 ms at 250k items, one line: 0.45, 0.9)
        const __mmask16 m0 = static_cast<__mmask16>(D >= 16 ? 0xFFFFu : (1u << D) - 1u);
        const __mmask16 m1 = static_cast<__mmask16>(D <= 16 ? 0u : D == 32 ? 0xFFFFu : (1u << (D - 16)) - 1u);
        const __m512 u0 = _mm512_maskz_loadu_ps(m0, ur), u1 = _mm512_maskz_loadu_ps(m1, ur + 16);
        for (; c0 + 16 <= C; c0 += 16) {
          for (int64_t c = c0 + 16; c < std::min(c0 + 32, C); ++c) __builtin_prefetch(Vp + row[c] * D);
          dots16(u0, u1, m0, m1, Vp, row + c0, D, s.data() + c0);
        }
      }
#endif
      for (int64_t c = c0; c < C; ++c) {
        if (c + kPrefetch < C) prefetch_row(Vp + row[c + kPrefetch] * D, D);
        s[c] = dot(ur, Vp + row[c] * D, D);
      }
      float* g = gp + b * C;
      // the shift m: the row's largest score, so every shifted term is <= 1 and S_1 >= e^{a_1 - m} > 0
#if defined(__AVX512F__)
      const float m = reduce_extreme(s.data(), C, true), amin = reduce_extreme(s.data(), K, false);
#else
      float m = -std::numeric_limits<float>::infinity(), amin = std::numeric_limits<float>::infinity();
      for (int64_t c = 0; c < C; ++c) m = std::max(m, s[c]);
      for (int64_t k = 0; k < K; ++k) amin = std::min(amin, s[k]);
#endif
      // the fast path needs every a_k - m within float's normal range of exp; else (or non-finite scores) exact
      if (!std::isfinite(m) || !(m - amin <= 80.f)) {
        np_[b] = static_cast<float>(exact_row(s.data(), K, L, g));
        continue;
      }
      double sum = 0.0, prod = 1.0, asum = 0.0;
      int64_t twos = 0;  // sum_k log(S_k e^{-m}) = log(prod) + twos log 2: one logarithm per row
      exp_shifted(s.data(), m, e.data(), C);
#if defined(__AVX512F__)
      sum = sum_double(e.data() + K, L);
#else
      for (int64_t j = 0; j < L; ++j) sum += e[K + j];
#endif
      for (int64_t k = K - 1; k >= 0; --k) {
        sum += e[k];  // S_k e^{-m} in [e^{-80}, C]
        inv[k] = sum;
        asum += s[k];
        prod *= sum;
        if (prod < 1e-100 || prod > 1e100) {
          int ex;
          prod = std::frexp(prod, &ex);
          twos += ex;
        }
      }
      int64_t k0 = 0;  // inv[k] = 1 / S_k, 8 divisions at a time (one at a time they were ~15% of the forward)
#if defined(__AVX512F__)
      for (; k0 + 8 <= K; k0 += 8)
        _mm512_storeu_pd(inv.data() + k0, _mm512_div_pd(_mm512_set1_pd(1.0), _mm512_loadu_pd(inv.data() + k0)));
#endif
      for (int64_t k = k0; k < K; ++k) inv[k] = 1.0 / inv[k];
      const double nl = std::log(prod) + static_cast<double>(twos) * 0.69314718055994530942 +
                        static_cast<double>(K) * m - asum;
      double p = 0.0;  // sum_{k <= l} 1 / S_k (shifted)
      for (int64_t l = 0; l < K; ++l) {
        p += inv[l];
        g[l] = static_cast<float>(-1.0 + e[l] * p);
      }
      int64_t j0 = 0;
#if defined(__AVX512F__)
      const __m512d pv = _mm512_set1_pd(p);
      for (; j0 + 8 <= L; j0 += 8)  // e^{b_j - m} p, 8 at a time; the rare tiny e^{b_j - m} redone below
        _mm256_storeu_ps(g + K + j0,
                         _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(e.data() + K + j0)), pv)));
      for (int64_t j = 0; j < j0; ++j)
        if (!(e[K + j] > 1e-30f)) g[K + j] = static_cast<float>(std::exp(static_cast<double>(s[K + j]) - m) * p);
#endif
      for (int64_t j = j0; j < L; ++j) {  // a b_j far below m: its term in double (float's e^{b_j - m} underflows)
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

namespace rayrec {

// csr_sample_distinct(indptr [U + 1], indices [nnz], users [B], cand [B, M], n, num_items) -> (out [B, n], ok [B])
//   Per row, the first n candidates that are neither among the user's ids indices[indptr[u]:indptr[u + 1]] nor kept
//   earlier in the row: uniform draws without replacement from the allowed items (sequential rejection), given
//   uniform candidates. A row whose M candidates give fewer than n ends in -1 with ok = false (the caller redraws
//   it). One stamp per item per thread marks the row's excluded and kept ids: no search, nothing to clear.
std::tuple<torch::Tensor, torch::Tensor> csr_sample_distinct(const torch::Tensor& indptr, const torch::Tensor& indices,
                                                             const torch::Tensor& users, const torch::Tensor& cand,
                                                             int64_t n, int64_t num_items) {
  TORCH_CHECK(indptr.device().is_cpu() && indices.device().is_cpu() && users.device().is_cpu() &&
                  cand.device().is_cpu(), "csr_sample_distinct: CPU tensors only");
  TORCH_CHECK(indptr.scalar_type() == torch::kLong && indices.scalar_type() == torch::kLong &&
                  users.scalar_type() == torch::kLong && cand.scalar_type() == torch::kLong,
              "csr_sample_distinct: int64 tensors");
  TORCH_CHECK(indptr.is_contiguous() && indices.is_contiguous() && users.is_contiguous() && cand.is_contiguous(),
              "csr_sample_distinct: contiguous tensors");
  TORCH_CHECK(cand.dim() == 2 && users.dim() == 1 && cand.size(0) == users.size(0) && n >= 0 && num_items > 0,
              "csr_sample_distinct: users [B], cand [B, M], n >= 0");
  const int64_t U = indptr.numel() - 1, B = cand.size(0), M = cand.size(1);
  const int64_t* ip = indptr.data_ptr<int64_t>();
  const int64_t* ix = indices.data_ptr<int64_t>();
  const int64_t* up = users.data_ptr<int64_t>();
  const int64_t* cp = cand.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(up[b] >= 0 && up[b] < U, "csr_sample_distinct: user id out of range");
  std::atomic<bool> bad{false};  // an id outside [0, num_items): checked where it is read, reported after
  auto out = torch::empty({B, n}, cand.options());
  auto ok = torch::empty({B}, users.options().dtype(torch::kBool));
  int64_t* op = out.data_ptr<int64_t>();
  bool* okp = ok.data_ptr<bool>();
  at::parallel_for(0, B, 256, [&](int64_t b0, int64_t b1) {
    std::vector<int64_t> stamp(num_items, -1);  // stamp[i] == b: item i is excluded or already kept in row b
    for (int64_t b = b0; b < b1; ++b) {
      for (const int64_t* p = ix + ip[up[b]]; p != ix + ip[up[b] + 1]; ++p) {
        if (*p < 0 || *p >= num_items) {
          bad = true;
          continue;
        }
        stamp[*p] = b;
      }
      const int64_t* c = cp + b * M;
      int64_t* o = op + b * n;
      int64_t kept = 0;
      for (int64_t j = 0; j < M && kept < n; ++j) {
        if (c[j] < 0 || c[j] >= num_items) {
          bad = true;
          break;
        }
        if (stamp[c[j]] != b) {
          stamp[c[j]] = b;
          o[kept++] = c[j];
        }
      }
      okp[b] = kept == n;
      for (; kept < n; ++kept) o[kept] = -1;
    }
  });
  TORCH_CHECK(!bad, "csr_sample_distinct: an excluded id or a candidate outside [0, num_items)");
  return {out, ok};
}

// gumbel_topk_head(u [B, R] float32 uniforms, T, K) -> (ranks [B, K] int64 ascending, kth [B] float32)
//   Per row the K largest keys -r/T + Gumbel(u_r), Gumbel(u) = -log(-log(u + 1e-20) + 1e-20) (the same float
//   arithmetic as rayrec.distill.lists), returned as the chosen ranks in ascending order, and the K-th largest key.
//   A selection (nth_element) instead of torch.topk and a sort; the logarithms 16 at a time. The keys are finite
//   (u + 1e-20 > 0, and -log(u + 1e-20) + 1e-20 > 0).
std::tuple<torch::Tensor, torch::Tensor> gumbel_topk_head(const torch::Tensor& u, double T, int64_t K) {
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == torch::kFloat && u.dim() == 2 && u.is_contiguous(),
              "gumbel_topk_head: u [B, R] float32, contiguous, on CPU");
  const int64_t B = u.size(0), R = u.size(1);
  TORCH_CHECK(K >= 1 && K <= R && T > 0, "gumbel_topk_head: need 1 <= K <= R and T > 0");
  auto ranks = torch::empty({B, K}, u.options().dtype(torch::kLong));
  auto kth = torch::empty({B}, u.options());
  const float* uptr = u.data_ptr<float>();
  int64_t* rp = ranks.data_ptr<int64_t>();
  float* kp = kth.data_ptr<float>();
  std::vector<float> logits(R);
  for (int64_t r = 0; r < R; ++r) logits[r] = -static_cast<float>(r) / static_cast<float>(T);
  at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
    std::vector<float> key(R), sel(R);
    for (int64_t b = b0; b < b1; ++b) {
      const float* ur = uptr + b * R;
      int64_t r0 = 0;
#if defined(__AVX512F__)
      const __m512 tiny = _mm512_set1_ps(1e-20f), half = _mm512_set1_ps(0.5f);
      for (; r0 < R; r0 += 16) {  // the last block masked: every key through the same logarithm
        const __mmask16 k = static_cast<__mmask16>(R - r0 >= 16 ? 0xFFFFu : (1u << (R - r0)) - 1u);
        const __m512 inner = Sleef_logf16_u10(_mm512_add_ps(_mm512_mask_loadu_ps(half, k, ur + r0), tiny));
        const __m512 g = _mm512_sub_ps(_mm512_setzero_ps(),
                                       Sleef_logf16_u10(_mm512_add_ps(_mm512_sub_ps(_mm512_setzero_ps(), inner), tiny)));
        _mm512_mask_storeu_ps(key.data() + r0, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, logits.data() + r0), g));
      }
#endif
      for (int64_t r = r0; r < R; ++r) key[r] = logits[r] - std::log(-std::log(ur[r] + 1e-20f) + 1e-20f);
      // the K-th largest key by a selection over the keys themselves, then the ranks above it in ascending order
      // (equal keys: the smaller ranks first), with no sort: 5,220 x 120 keys, top-40, one thread: 7.9 ms through
      // an index selection and a sort of the K chosen, 5.7 ms this way
      std::copy(key.begin(), key.end(), sel.begin());
      std::nth_element(sel.begin(), sel.begin() + (K - 1), sel.end(), std::greater<float>());
      const float thr = sel[K - 1];
      int64_t ties = K;  // how many keys equal to thr are taken: K minus the keys above it
      for (int64_t r = 0; r < R; ++r) ties -= key[r] > thr;
      for (int64_t r = 0, k = 0; r < R && k < K; ++r) {
        if (key[r] > thr || (key[r] == thr && ties-- > 0)) rp[b * K + k++] = r;
      }
      kp[b] = thr;
    }
  });
  return {ranks, kth};
}

}  // namespace rayrec
