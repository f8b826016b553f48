// The Python module of rayrec's native CPU kernels (rayrec/kernels.py builds dot_topk.cpp, list_rank.cpp and this
// file into one extension).

#include <torch/extension.h>

#include <tuple>

namespace rayrec {
std::tuple<torch::Tensor, torch::Tensor> dot_topk(const torch::Tensor& queries, const torch::Tensor& keys_t,
                                                  int64_t k, const c10::optional<torch::Tensor>& exclude_indptr,
                                                  const c10::optional<torch::Tensor>& exclude_indices, bool pad);
std::tuple<torch::Tensor, torch::Tensor> rrd_forward(const torch::Tensor& U, const torch::Tensor& V,
                                                     const torch::Tensor& users, const torch::Tensor& items,
                                                     int64_t K);
std::tuple<torch::Tensor, torch::Tensor> list_dot_backward(const torch::Tensor& w, const torch::Tensor& U,
                                                           const torch::Tensor& V, const torch::Tensor& users,
                                                           const torch::Tensor& items, bool need_u, bool need_v);
torch::Tensor csr_contains(const torch::Tensor& indptr, const torch::Tensor& indices, const torch::Tensor& users,
                           const torch::Tensor& items);
std::tuple<torch::Tensor, torch::Tensor> csr_sample_distinct(const torch::Tensor& indptr, const torch::Tensor& indices,
                                                             const torch::Tensor& users, const torch::Tensor& cand,
                                                             int64_t n, int64_t num_items);
std::tuple<torch::Tensor, torch::Tensor> gumbel_topk_head(const torch::Tensor& u, double T, int64_t K);
torch::Tensor dot_count(const torch::Tensor& queries, const torch::Tensor& keys_t, const torch::Tensor& th);
torch::Tensor dot_pairs(const torch::Tensor& queries, const torch::Tensor& items, const torch::Tensor& rows,
                        const torch::Tensor& cols);
}  // namespace rayrec

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("dot_topk", &rayrec::dot_topk, "top-k of queries @ keys_t per row, fused (CPU, float32)",
        py::arg("queries"), py::arg("keys_t"), py::arg("k"), py::arg("exclude_indptr") = py::none(),
        py::arg("exclude_indices") = py::none(), py::arg("pad") = false);
  m.def("rrd_forward", &rayrec::rrd_forward, "RRD's relaxed ranking NLL per row over gathered dot products, and "
        "its gradient wrt the scores (CPU, float32)", py::arg("U"), py::arg("V"), py::arg("users"), py::arg("items"),
        py::arg("K"));
  m.def("list_dot_backward", &rayrec::list_dot_backward, "gradient of sum(w * scores) of gathered dot products into "
        "the two tables (CPU, float32, deterministic)", py::arg("w"), py::arg("U"), py::arg("V"), py::arg("users"),
        py::arg("items"), py::arg("need_u"), py::arg("need_v"));
  m.def("csr_contains", &rayrec::csr_contains, "membership of (user, item) pairs in a CSR with sorted rows (CPU)",
        py::arg("indptr"), py::arg("indices"), py::arg("users"), py::arg("items"));
  m.def("csr_sample_distinct", &rayrec::csr_sample_distinct, "per row, the first n candidates outside the user's CSR "
        "row and distinct (CPU)", py::arg("indptr"), py::arg("indices"), py::arg("users"), py::arg("cand"),
        py::arg("n"), py::arg("num_items"));
  m.def("gumbel_topk_head", &rayrec::gumbel_topk_head, "per row the top K of -r/T + Gumbel(u_r) as ascending ranks, "
        "and the K-th key (CPU, float32)", py::arg("u"), py::arg("T"), py::arg("K"));
  m.def("dot_count", &rayrec::dot_count, "per row and threshold, the items whose dot-product score is not below it, "
        "fused (CPU, float32)", py::arg("queries"), py::arg("keys_t"), py::arg("th"));
  m.def("dot_pairs", &rayrec::dot_pairs, "dot products of (row, column) pairs, the sums dot_count forms (CPU, "
        "float32)", py::arg("queries"), py::arg("items"), py::arg("rows"), py::arg("cols"));
  m.attr("avx512") = py::bool_(
#if defined(__AVX512F__)
      true
#else
      false
#endif
  );
}
