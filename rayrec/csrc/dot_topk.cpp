// Fused dot-product top-k on CPU: the k best items of every query row, scored q . v over all items, without
// writing the [B, I] score matrix. Built on first use by rayrec/kernels.py (torch.utils.cpp_extension).
//
// queries [B, D] float32, keys_t [D, I] float32 (items as columns, the layout rayrec.serve.TopK keeps),
// k <= I  ->  values [B, k] float32 best first, ids [B, k] int64; ties go to the lower item id. Optional: a CSR
// (exclude_indptr [B + 1], exclude_indices, each row's ids sorted ascending) of items never returned for a row (a
// user's train items); pad = true lets a row with fewer than k admissible items end in -inf / -1, else that is an
// error.
//
// Why: a narrow product (a d=20 student) costs D multiply-adds per score, so a GEMM + top-k is bound by writing the
// [B, I] scores and reading them back. Here a 6-user x 64-item tile of scores is accumulated in 24 AVX-512 registers
// (each d: 4 key vectors loaded, 6 query values broadcast, 24 FMAs), compared with each user's current k-th best, and
// only the few scores above it are kept. For a wide teacher (d=200) the same tile runs at the machine's GEMM rate
// (measured: 2 threads, 1,024 users x 25k items, 202 GFLOP/s against 195 for a 2,048^2 MKL GEMM), and the top-k is
// nearly free. A 4-user tile (16 registers) reached 120 GFLOP/s; with the accumulators indexed at run time, GCC
// kept them on the stack (48 GFLOP/s).
//
// Layout of the work: threads split the users (or, for fewer than 2 x 6 users per thread, the items, whose lists
// are then merged); a thread takes up to kUserBlock users at a time and walks the items in chunks whose keys
// (D x chunk floats) fit the L2 cache, so the keys are read from memory once per user block.
// Each user keeps its k best: a sorted array for k <= 64 (about k (1 + ln(I / k)) insertions per user), else a buffer
// of 2k packed (value, id) keys cut back to the k best by nth_element when full.
// Scores are sums over d in order 0..D-1 with fused multiply-adds: they may differ from a BLAS GEMM's in the last
// bits, as two BLAS builds do.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int kUsers = 6;         // users per register tile
constexpr int kItems = 64;        // items per register tile (4 x 16 floats)
constexpr int64_t kUserBlock = 256;  // users sharing one pass over the item chunks
constexpr int64_t kL2Bytes = 512 * 1024;  // key bytes per item chunk

constexpr int kBufferFrom = 64;  // k above this (ranking's top-500): a candidate buffer, else a sorted array
constexpr int kBufferTimes = 2;  // the buffer holds kBufferTimes * k candidates before a cut (4: no faster)

// a candidate as one integer that orders like (value, then lower id): the float's bits made monotone in the high
// half, the complement of the id in the low half. Selection then compares integers, ties included.
inline uint64_t pack(float v, int64_t id) {
  v += 0.0f;  // -0 -> +0: equal floats pack equal
  uint32_t b;
  std::memcpy(&b, &v, 4);
  b = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<uint64_t>(b) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(id));
}
inline float value_of(uint64_t key) {
  uint32_t b = static_cast<uint32_t>(key >> 32);
  b = (b & 0x80000000u) ? (b & 0x7FFFFFFFu) : ~b;
  float v;
  std::memcpy(&v, &b, 4);
  return v;
}
inline int64_t id_of(uint64_t key) { return 0xFFFFFFFFu - static_cast<uint32_t>(key); }

struct Best {  // one user's k best so far
  float* v;       // [k] output row (the sorted array itself for small k)
  int64_t* id;    // [k]
  int k;
  uint64_t* buf = nullptr;  // large k: [2k] packed candidates, cut back to the k best whenever full
  const int64_t* ex = nullptr;  // this user's excluded item ids, sorted (never returned)
  int64_t nex = 0;
  int64_t cur = 0;  // ex[cur] is the first excluded id not below the last item asked about
  int n = 0;
  float thr = -std::numeric_limits<float>::infinity();  // the k-th best (as of the last cut): a score must beat it

  bool excluded(int64_t j) {  // items are asked about in increasing id: a cursor walks the sorted list once
    while (cur < nex && ex[cur] < j) ++cur;
    return cur < nex && ex[cur] == j;
  }

  // small k: a sorted array, best first; an insertion moves at most k entries
  void push_sorted(float s, int64_t j) {  // only called with s > thr
    int p = n < k ? n++ : k - 1;
    while (p > 0 && v[p - 1] < s) {  // equal values stay ahead: the lower id wins a tie
      v[p] = v[p - 1];
      id[p] = id[p - 1];
      --p;
    }
    v[p] = s;
    id[p] = j;
    if (n == k) thr = v[k - 1];
  }

  // large k: append; a full buffer of 2k is cut to its k best (nth_element) and thr becomes the k-th. A streaming
  // top-k keeps about k (1 + ln(I / k)) items whatever the structure (2,450 per user at k = 500 over 25k items): an
  // append costs a store where a heap's sift costs ~9 compare-and-swaps. Items come in increasing id, so one equal to
  // thr has a higher id than the kept k-th and loses the tie, as in the sorted array.
  void cut() {
    std::nth_element(buf, buf + k - 1, buf + n, std::greater<uint64_t>());
    n = k;
    thr = value_of(buf[k - 1]);
  }
  void push_buffer(float s, int64_t j) {
    buf[n++] = pack(s, j);
    if (n == kBufferTimes * k) cut();
  }

  void push(float s, int64_t j) {
    if (excluded(j)) return;
    if (buf)
      push_buffer(s, j);
    else
      push_sorted(s, j);
  }

  // best first (value descending, ties by id ascending), padded with -inf / -1 past the entries found
  void finish() {
    if (buf) {
      if (n > k) cut();
      std::sort(buf, buf + n, std::greater<uint64_t>());
      for (int i = 0; i < n; ++i) v[i] = value_of(buf[i]), id[i] = id_of(buf[i]);
    }
    for (int i = n; i < k; ++i) {  // a NaN or -inf score never enters; excluded items neither
      v[i] = -std::numeric_limits<float>::infinity();
      id[i] = -1;
    }
  }
};

// scores of users q[0..kUsers) (rows of length D) x items [j, j + nt) of keys_t (row stride I) -> acc[u][t]
inline void tile_generic(const float* const q[kUsers], const float* kt, int64_t I, int64_t D, int64_t j, int nt,
                         float acc[kUsers][kItems]) {
  for (int u = 0; u < kUsers; ++u)
    for (int t = 0; t < kItems; ++t) acc[u][t] = 0.f;
  for (int64_t d = 0; d < D; ++d) {
    const float* row = kt + d * I + j;
    for (int u = 0; u < kUsers; ++u) {
      const float a = q[u][d];
      for (int t = 0; t < nt; ++t) acc[u][t] = std::fma(a, row[t], acc[u][t]);
    }
  }
}

#if defined(__AVX512F__)
// scores of users q[0..6) x items [j, j + 64) (kt points at column j; row stride I), handed to finish(c, m) as they
// sit in registers (24 zmm; m: the tile's column masks): each d loads 4 key vectors and broadcasts 6 query values
// for 24 FMAs. The loops have constant trip counts and are unrolled, and finish is inlined, so GCC keeps c[][] in
// registers. A short tile (Full = false) loads its nt < 64 columns masked, zeros past them. tile_avx512 stores the
// tile into sc (top-k), tile_count_avx512 compares it in place (counting).
template <bool Full, typename Finish>
__attribute__((always_inline)) inline void tile_avx512_then(const float* const q[kUsers], const float* kt, int64_t I,
                                                            int64_t D, int nt, Finish&& finish) {
  __mmask16 m[4] = {0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
  if (!Full)
    for (int b = 0; b < 4; ++b) {
      const int n = std::max(0, std::min(16, nt - 16 * b));
      m[b] = static_cast<__mmask16>((1u << n) - 1);
    }
  __m512 c[kUsers][4];
#pragma GCC unroll 8
  for (int a = 0; a < kUsers; ++a)
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b) c[a][b] = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; ++d) {
    const float* row = kt + d * I;
    __m512 k[4];
#pragma GCC unroll 4
    for (int b = 0; b < 4; ++b)
      k[b] = Full ? _mm512_loadu_ps(row + 16 * b) : _mm512_maskz_loadu_ps(m[b], row + 16 * b);
#pragma GCC unroll 8
    for (int a = 0; a < kUsers; ++a) {
      const __m512 s = _mm512_set1_ps(q[a][d]);
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) c[a][b] = _mm512_fmadd_ps(s, k[b], c[a][b]);
    }
  }
  finish(c, m);  // the tile, still in its registers (inlined: c[][] never goes through memory)
}

template <bool Full>
inline void tile_avx512(const float* const q[kUsers], const float* kt, int64_t I, int64_t D, int nt,
                        float sc[kUsers][kItems]) {
  tile_avx512_then<Full>(q, kt, I, D, nt, [&](const __m512 (&c)[kUsers][4], const __mmask16*) {
#pragma GCC unroll 8
    for (int a = 0; a < kUsers; ++a)
#pragma GCC unroll 4
      for (int b = 0; b < 4; ++b) _mm512_store_ps(sc[a] + 16 * b, c[a][b]);
  });
}
#endif

// users [u0, u1) against items [i0, i1): each user's k best into out_v / out_i (row u at u * k), best first; a row
// with fewer than k finite scores is padded with -inf and id -1
void rows(const float* Q, const float* kt, int64_t D, int64_t I, int k, int64_t u0, int64_t u1, int64_t i0,
          int64_t i1, const int64_t* ex_ptr, const int64_t* ex_ids, float* out_v, int64_t* out_i) {
  const int64_t chunk = std::max<int64_t>(kItems, (kL2Bytes / (4 * std::max<int64_t>(D, 1))) / kItems * kItems);
  std::vector<Best> best;
  const bool buffered = k > kBufferFrom;
  std::vector<uint64_t> arena(buffered ? static_cast<size_t>(std::min(kUserBlock, u1 - u0)) * kBufferTimes * k : 0);
  for (int64_t ub = u0; ub < u1; ub += kUserBlock) {
    const int64_t ue = std::min(ub + kUserBlock, u1);
    best.clear();
    for (int64_t u = ub; u < ue; ++u) {
      best.push_back(Best{out_v + u * k, out_i + u * k, k});
      if (buffered) best.back().buf = arena.data() + (u - ub) * kBufferTimes * k;
      if (ex_ptr) best.back().ex = ex_ids + ex_ptr[u], best.back().nex = ex_ptr[u + 1] - ex_ptr[u];
    }
    for (int64_t c0 = i0; c0 < i1; c0 += chunk) {
      const int64_t c1 = std::min(c0 + chunk, i1);
      for (int64_t u = ub; u < ue; u += kUsers) {
        const int nu = static_cast<int>(std::min<int64_t>(kUsers, ue - u));
        const float* q[kUsers];
        for (int a = 0; a < kUsers; ++a) q[a] = Q + (u + std::min(a, nu - 1)) * D;  // a short tile repeats a row
        for (int64_t j = c0; j < c1; j += kItems) {
          const int nt = static_cast<int>(std::min<int64_t>(kItems, c1 - j));
#if defined(__AVX512F__)
          alignas(64) float sc[kUsers][kItems];
          if (nt == kItems)
            tile_avx512<true>(q, kt + j, I, D, 0, sc);
          else
            tile_avx512<false>(q, kt + j, I, D, nt, sc);
          for (int a = 0; a < nu; ++a) {
            Best& bst = best[u - ub + a];
            const __m512 thr = _mm512_set1_ps(bst.thr);
            uint64_t hit = 0;
            for (int b = 0; b < 4; ++b)
              hit |= static_cast<uint64_t>(_mm512_cmp_ps_mask(_mm512_load_ps(sc[a] + 16 * b), thr, _CMP_GT_OQ))
                     << (16 * b);
            if (nt < kItems) hit &= (uint64_t{1} << nt) - 1;
            while (hit) {  // in item order; the threshold rises as items enter
              const int t = __builtin_ctzll(hit);
              hit &= hit - 1;
              if (sc[a][t] > bst.thr) bst.push(sc[a][t], j + t);
            }
          }
#else
          float acc[kUsers][kItems];
          tile_generic(q, kt, I, D, j, nt, acc);
          for (int a = 0; a < nu; ++a) {
            Best& bst = best[u - ub + a];
            for (int t = 0; t < nt; ++t)
              if (acc[a][t] > bst.thr) bst.push(acc[a][t], j + t);
          }
#endif
        }
      }
    }
    for (Best& bst : best) bst.finish();
  }
}

// merge T per-range lists of k (best first, ids ascending on ties within a list, lists in item order) into k
void merge(int T, int64_t B, int k, const float* pv, const int64_t* pi, float* out_v, int64_t* out_i) {
  std::vector<int> at(T);
  for (int64_t u = 0; u < B; ++u) {
    std::fill(at.begin(), at.end(), 0);
    for (int r = 0; r < k; ++r) {
      int pick = -1;
      float bv = 0.f;
      for (int t = 0; t < T; ++t) {  // the best head; on a tie the earlier list (lower ids)
        if (at[t] >= k) continue;
        const int64_t o = (t * B + u) * k + at[t];
        if (pi[o] < 0) continue;
        if (pick < 0 || pv[o] > bv) pick = t, bv = pv[o];
      }
      if (pick < 0) {
        out_v[u * k + r] = -std::numeric_limits<float>::infinity();
        out_i[u * k + r] = -1;
        continue;
      }
      const int64_t o = (pick * B + u) * k + at[pick]++;
      out_v[u * k + r] = pv[o];
      out_i[u * k + r] = pi[o];
    }
  }
}

#if defined(__AVX512F__)
// tile_avx512's scores of users q[0..6) x items [j, j + 64), compared in their registers with each user's H
// thresholds th[a * H + h] (a < nu) and counted into out[a * H + h]: "not below", so a NaN score counts. Storing the
// tile and reading it back cost as much as its 24 x D FMAs at d = 20.
template <bool Full>
inline void tile_count_avx512(const float* const q[kUsers], const float* kt, int64_t I, int64_t D, int nt,
                              const float* th, int64_t H, int nu, int64_t* out) {
  tile_avx512_then<Full>(q, kt, I, D, nt, [&](const __m512 (&c)[kUsers][4], const __mmask16* m) {
#pragma GCC unroll 8
    for (int a = 0; a < kUsers; ++a) {
      if (a >= nu) break;
      for (int64_t h = 0; h < H; ++h) {
        const __m512 t = _mm512_set1_ps(th[a * H + h]);
        int64_t n = 0;
#pragma GCC unroll 4
        for (int b = 0; b < 4; ++b)
          n += __builtin_popcount(static_cast<unsigned>(_mm512_mask_cmp_ps_mask(m[b], c[a][b], t, _CMP_NLT_UQ)));
        out[a * H + h] += n;
      }
    }
  });
}
#endif

// users [u0, u1) x all items: out[u * H + h] = how many items i have not (q_u . v_i < th[u * H + h]) (a NaN score
// counts), the scores formed by the same tiles as rows() and never stored beyond one tile
void count_rows(const float* Q, const float* kt, int64_t D, int64_t I, const float* th, int64_t H, int64_t u0,
                int64_t u1, int64_t* out) {
  const int64_t chunk = std::max<int64_t>(kItems, (kL2Bytes / (4 * std::max<int64_t>(D, 1))) / kItems * kItems);
  for (int64_t u = u0; u < u1; ++u)
    for (int64_t h = 0; h < H; ++h) out[u * H + h] = 0;
  for (int64_t ub = u0; ub < u1; ub += kUserBlock) {
    const int64_t ue = std::min(ub + kUserBlock, u1);
    for (int64_t c0 = 0; c0 < I; c0 += chunk) {
      const int64_t c1 = std::min(c0 + chunk, I);
      for (int64_t u = ub; u < ue; u += kUsers) {
        const int nu = static_cast<int>(std::min<int64_t>(kUsers, ue - u));
        const float* q[kUsers];
        for (int a = 0; a < kUsers; ++a) q[a] = Q + (u + std::min(a, nu - 1)) * D;
        for (int64_t j = c0; j < c1; j += kItems) {
          const int nt = static_cast<int>(std::min<int64_t>(kItems, c1 - j));
#if defined(__AVX512F__)
          if (nt == kItems)
            tile_count_avx512<true>(q, kt + j, I, D, 0, th + u * H, H, nu, out + u * H);
          else
            tile_count_avx512<false>(q, kt + j, I, D, nt, th + u * H, H, nu, out + u * H);
#else
          float acc[kUsers][kItems];
          tile_generic(q, kt, I, D, j, nt, acc);
          for (int a = 0; a < nu; ++a)
            for (int64_t h = 0; h < H; ++h)
              for (int t = 0; t < nt; ++t) out[(u + a) * H + h] += !(acc[a][t] < th[(u + a) * H + h]);
#endif
        }
      }
    }
  }
}

}  // namespace

namespace rayrec {

std::tuple<torch::Tensor, torch::Tensor> dot_topk(const torch::Tensor& queries, const torch::Tensor& keys_t,
                                                  int64_t k, const c10::optional<torch::Tensor>& exclude_indptr,
                                                  const c10::optional<torch::Tensor>& exclude_indices, bool pad) {
  TORCH_CHECK(queries.device().is_cpu() && keys_t.device().is_cpu(), "dot_topk: CPU tensors only");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat && keys_t.scalar_type() == torch::kFloat,
              "dot_topk: float32 only");
  TORCH_CHECK(queries.dim() == 2 && keys_t.dim() == 2 && queries.size(1) == keys_t.size(0),
              "dot_topk: queries [B, D] and keys_t [D, I], got ", queries.sizes(), " and ", keys_t.sizes());
  const int64_t B = queries.size(0), D = queries.size(1), I = keys_t.size(1);
  TORCH_CHECK(k >= 1 && k <= I, "dot_topk: k must be in [1, ", I, "], got ", k);
  TORCH_CHECK(I < (int64_t{1} << 31), "dot_topk: at most 2^31 - 1 items, got ", I);
  torch::Tensor EP, EI;
  const int64_t* ex_ptr = nullptr;
  const int64_t* ex_ids = nullptr;
  if (exclude_indptr.has_value()) {
    TORCH_CHECK(exclude_indices.has_value(), "dot_topk: exclude_indptr without exclude_indices");
    EP = exclude_indptr->to(torch::kLong).contiguous();
    EI = exclude_indices->to(torch::kLong).contiguous();
    TORCH_CHECK(EP.dim() == 1 && EP.size(0) == B + 1, "dot_topk: exclude_indptr must be [B + 1]");
    ex_ptr = EP.data_ptr<int64_t>();
    ex_ids = EI.data_ptr<int64_t>();
    TORCH_CHECK(ex_ptr[0] == 0 && ex_ptr[B] == EI.numel(), "dot_topk: exclude_indptr does not span exclude_indices");
  }
  auto Q = queries.contiguous();
  auto KT = keys_t.contiguous();
  auto values = torch::empty({B, k}, queries.options());
  auto ids = torch::empty({B, k}, queries.options().dtype(torch::kLong));
  const float* q = Q.data_ptr<float>();
  const float* kt = KT.data_ptr<float>();
  float* ov = values.data_ptr<float>();
  int64_t* oi = ids.data_ptr<int64_t>();
  const int kk = static_cast<int>(k);
  const int T = at::get_num_threads();
  if (T > 1 && B < 2 * kUsers * T && I >= 4 * kItems * T) {
    // a few users: threads split the items, then their lists are merged (one user would leave a thread idle)
    auto pv = torch::empty({T, B, k}, values.options());
    auto pi = torch::empty({T, B, k}, ids.options());
    float* pvp = pv.data_ptr<float>();
    int64_t* pip = pi.data_ptr<int64_t>();
    const int64_t span = (I / T + kItems - 1) / kItems * kItems;
    at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t)
        rows(q, kt, D, I, kk, 0, B, std::min(I, t * span), t == T - 1 ? I : std::min(I, (t + 1) * span), ex_ptr,
             ex_ids, pvp + t * B * k, pip + t * B * k);
    });
    merge(T, B, kk, pvp, pip, ov, oi);
  } else {
    // threads split the users evenly (grain kUsers): one range per thread
    const int64_t per = std::max<int64_t>(kUsers, (B + T - 1) / T);
    at::parallel_for(0, B, per, [&](int64_t b0, int64_t b1) {
      rows(q, kt, D, I, kk, b0, b1, 0, I, ex_ptr, ex_ids, ov, oi);
    });
  }
  TORCH_CHECK(pad || B == 0 || ids.min().item<int64_t>() >= 0,
              "dot_topk: fewer than k finite scores for a row (non-finite embeddings?)");
  return {values, ids};
}

}  // namespace rayrec

namespace rayrec {

// dot_count(queries [B, D], keys_t [D, I], th [B, H]) -> int64 [B, H]: for each row b and column h, how many items
// i have not (q_b . v_i < th[b, h]) -- a NaN score counts -- with the scores formed as dot_topk forms them (sums over
// d in order with fused multiply-adds) and never written out. The full-ranking evaluation's compare-and-count pass
// (rayrec.eval.metrics.HeldoutRanker.positions_dot) without its [B, I] score block.
torch::Tensor dot_count(const torch::Tensor& queries, const torch::Tensor& keys_t, const torch::Tensor& th) {
  TORCH_CHECK(queries.device().is_cpu() && keys_t.device().is_cpu() && th.device().is_cpu(),
              "dot_count: CPU tensors only");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat && keys_t.scalar_type() == torch::kFloat &&
                  th.scalar_type() == torch::kFloat, "dot_count: float32 only");
  TORCH_CHECK(queries.dim() == 2 && keys_t.dim() == 2 && queries.size(1) == keys_t.size(0) && th.dim() == 2 &&
                  th.size(0) == queries.size(0),
              "dot_count: queries [B, D], keys_t [D, I] and th [B, H], got ", queries.sizes(), ", ", keys_t.sizes(),
              " and ", th.sizes());
  const int64_t B = queries.size(0), D = queries.size(1), I = keys_t.size(1), H = th.size(1);
  auto Q = queries.contiguous();
  auto KT = keys_t.contiguous();
  auto TH = th.contiguous();
  auto out = torch::empty({B, H}, queries.options().dtype(torch::kLong));
  const float* q = Q.data_ptr<float>();
  const float* kt = KT.data_ptr<float>();
  const float* t = TH.data_ptr<float>();
  int64_t* o = out.data_ptr<int64_t>();
  const int T = at::get_num_threads();
  const int64_t per = std::max<int64_t>(kUsers, (B + T - 1) / T);
  at::parallel_for(0, B, per, [&](int64_t b0, int64_t b1) { count_rows(q, kt, D, I, t, H, b0, b1, o); });
  return out;
}

// dot_pairs(queries [B, D], items [I, D], rows [n], cols [n]) -> float [n]: q_rows[j] . items[cols[j]], summed over d
// in order with fused multiply-adds from 0: bit-equal to the scores dot_count and dot_topk form from items' transpose.
torch::Tensor dot_pairs(const torch::Tensor& queries, const torch::Tensor& items, const torch::Tensor& rows,
                        const torch::Tensor& cols) {
  TORCH_CHECK(queries.device().is_cpu() && items.device().is_cpu() && rows.device().is_cpu() &&
                  cols.device().is_cpu(), "dot_pairs: CPU tensors only");
  TORCH_CHECK(queries.scalar_type() == torch::kFloat && items.scalar_type() == torch::kFloat,
              "dot_pairs: float32 only");
  TORCH_CHECK(queries.dim() == 2 && items.dim() == 2 && queries.size(1) == items.size(1) &&
                  rows.numel() == cols.numel(), "dot_pairs: queries [B, D], items [I, D], rows and cols [n]");
  const int64_t B = queries.size(0), D = queries.size(1), I = items.size(0), n = rows.numel();
  auto Q = queries.contiguous();
  auto V = items.contiguous();
  auto R = rows.to(torch::kLong).contiguous();
  auto C = cols.to(torch::kLong).contiguous();
  const float* q = Q.data_ptr<float>();
  const float* v = V.data_ptr<float>();
  const int64_t* r = R.data_ptr<int64_t>();
  const int64_t* c = C.data_ptr<int64_t>();
  for (int64_t j = 0; j < n; ++j)
    TORCH_CHECK(r[j] >= 0 && r[j] < B && c[j] >= 0 && c[j] < I, "dot_pairs: a row or column out of range");
  auto out = torch::empty({n}, queries.options());
  float* o = out.data_ptr<float>();
  at::parallel_for(0, n, 4096, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float* qr = q + r[j] * D;
      const float* vr = v + c[j] * D;
      float acc = 0.f;
      for (int64_t d = 0; d < D; ++d) acc = std::fma(qr[d], vr[d], acc);
      o[j] = acc;
    }
  });
  return out;
}

}  // namespace rayrec
