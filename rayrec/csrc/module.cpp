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
  m.attr("avx512") = py::bool_(
#if defined(__AVX512F__)
      true
#else
      false
#endif
  );
}
