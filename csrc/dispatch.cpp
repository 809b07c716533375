// Torch bindings of the fused token-dispatch ops (module smile._C); kernels in dispatch_kernels.cu.
//
// dispatch_index is split in two calls so the host (smile.moe.kernels.cuda) can read the counts once,
// raise Python errors for out-of-range ids, and size the (dropless) src buffer:
//   index_count(expert_ids, keep, num_experts)            -> [expert, rank, offsets, base, counts, stats]
//   index_write(expert, rank, offsets, base, num_rows, k)  -> [dest, src]

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "dispatch.h"

namespace smile {
namespace {

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "smile._C: ", name, " must be a CUDA tensor, got device ", t.device());
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* name_a, const char* name_b) {
  TORCH_CHECK(a.device() == b.device(), "smile._C: ", name_a, " (", a.device(), ") and ", name_b, " (",
              b.device(), ") must be on the same device");
}

// Dropless layout: base[e] = rows of experts before e. stats = [kept total, kept copies with an out-of-range id].
std::vector<at::Tensor> index_count(const at::Tensor& expert_ids, const at::Tensor& keep, int64_t num_experts) {
  check_cuda(expert_ids, "expert_ids");
  check_same_device(expert_ids, keep, "expert_ids", "keep");
  TORCH_CHECK(expert_ids.dim() == 2, "smile._C: expert_ids must be [T, k], got ", expert_ids.sizes());
  TORCH_CHECK(keep.sizes() == expert_ids.sizes() && keep.scalar_type() == at::kBool,
              "smile._C: keep must be a bool tensor shaped like expert_ids");
  TORCH_CHECK(num_experts >= 1, "smile._C: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(expert_ids.numel() < (int64_t{1} << 31), "smile._C: at most 2^31-1 copies (T*k)");
  const c10::cuda::CUDAGuard guard(expert_ids.device());
  const at::Tensor ids = expert_ids.reshape({-1}).to(at::kLong).contiguous();
  const at::Tensor kept = keep.reshape({-1}).contiguous();
  const int64_t n = ids.numel();
  const int64_t num_blocks = (n + kIndexBlock - 1) / kIndexBlock;
  const auto int_opts = ids.options().dtype(at::kInt);
  at::Tensor hist = at::zeros({num_experts + 1, num_blocks}, int_opts);
  at::Tensor expert = at::empty({n}, int_opts);
  at::Tensor rank = at::empty({n}, int_opts);
  if (n > 0) launch_rank_in_block(ids, kept, expert, rank, hist, num_experts);
  // Exclusive scan over blocks, per expert: copies of expert e in blocks before b.
  at::Tensor offsets = (at::cumsum(hist, 1, at::kInt) - hist).contiguous();
  at::Tensor counts_all = hist.sum(1, /*keepdim=*/false, at::kLong);
  at::Tensor counts = counts_all.narrow(0, 0, num_experts).contiguous();
  at::Tensor base = at::cumsum(counts, 0) - counts;
  at::Tensor stats = at::stack({counts.sum(), counts_all[num_experts]});
  return {expert, rank, offsets, base.contiguous(), counts, stats};
}

std::vector<at::Tensor> index_write(const at::Tensor& expert, const at::Tensor& rank, const at::Tensor& offsets,
                                    const at::Tensor& base, int64_t num_rows, int64_t k) {
  check_cuda(expert, "expert");
  TORCH_CHECK(k >= 1, "smile._C: k must be >= 1, got ", k);
  TORCH_CHECK(expert.scalar_type() == at::kInt && rank.scalar_type() == at::kInt &&
                  offsets.scalar_type() == at::kInt && base.scalar_type() == at::kLong,
              "smile._C: index_write takes the tensors returned by index_count");
  TORCH_CHECK(num_rows >= 0, "smile._C: num_rows must be >= 0, got ", num_rows);
  const c10::cuda::CUDAGuard guard(expert.device());
  const auto long_opts = expert.options().dtype(at::kLong);
  at::Tensor dest = at::empty({expert.numel()}, long_opts);
  at::Tensor src = at::empty({num_rows}, long_opts);  // every row gets its kept copy's token
  if (expert.numel() > 0) launch_write_index(expert, rank, offsets, base, dest, src, k);
  return {dest, src};
}

at::Tensor gather_rows(const at::Tensor& x, const at::Tensor& src) {
  check_cuda(x, "x");
  check_same_device(x, src, "x", "src");
  TORCH_CHECK(x.dim() == 2, "smile._C: x must be [N, H], got ", x.sizes());
  TORCH_CHECK(src.dim() == 1, "smile._C: src must be 1-D, got ", src.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
  const at::Tensor idx = src.to(at::kLong).contiguous();
  at::Tensor out = at::empty({idx.numel(), x.size(1)}, x.options());
  if (out.numel() > 0) launch_gather_rows(rows, idx, out);
  return out;
}

at::Tensor combine(const at::Tensor& y, const at::Tensor& dest, const std::optional<at::Tensor>& gates) {
  check_cuda(y, "y");
  check_same_device(y, dest, "y", "dest");
  TORCH_CHECK(y.dim() == 2, "smile._C: y must be [R, H], got ", y.sizes());
  TORCH_CHECK(dest.dim() == 2, "smile._C: dest must be [T, k], got ", dest.sizes());
  TORCH_CHECK(dest.size(1) <= 2048, "smile._C: combine stages k <= 2048 rows per token in shared memory, got k=",
              dest.size(1));
  const c10::cuda::CUDAGuard guard(y.device());
  const at::Tensor rows = y.stride(1) == 1 ? y : y.contiguous();
  const at::Tensor idx = dest.to(at::kLong).contiguous();
  at::Tensor weights;
  if (gates.has_value()) {
    check_same_device(y, *gates, "y", "gates");
    TORCH_CHECK(gates->sizes() == dest.sizes(), "smile._C: gates must be shaped like dest ", dest.sizes(),
                ", got ", gates->sizes());
    // Weights in the accumulation type: fp32, or fp64 for fp64 rows.
    weights = gates->to(y.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
  }
  at::Tensor out = at::empty({dest.size(0), y.size(1)}, y.options());
  if (out.numel() == 0) return out;
  if (dest.size(1) == 0) return out.zero_();
  launch_combine(rows, idx, weights, out);
  return out;
}

}  // namespace
}  // namespace smile

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "smile fused token-dispatch kernels (CUDA)";
  m.def("index_count", &smile::index_count, "per-block ranks, offsets, expert bases, counts and stats",
        py::arg("expert_ids"), py::arg("keep"), py::arg("num_experts"));
  m.def("index_write", &smile::index_write, "dest [T*k] and src [num_rows] from index_count's tensors",
        py::arg("expert"), py::arg("rank"), py::arg("offsets"), py::arg("base"), py::arg("num_rows"),
        py::arg("k"));
  m.def("gather_rows", &smile::gather_rows, "out[r] = x[src[r]], zeros where src[r] == -1", py::arg("x"),
        py::arg("src"));
  m.def("combine", &smile::combine, "out[t] = sum_j gates[t, j] * y[dest[t, j]] (fp32 accumulation)",
        py::arg("y"), py::arg("dest"), py::arg("gates") = py::none());
}
