// Kernel launchers of the fused token-dispatch ops (defined in dispatch_kernels.cu).
// Arguments are checked in dispatch.cpp; launchers assume contiguous CUDA tensors on one device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace smile {

// Copies ranked per CUDA block in dispatch_index (one thread per copy).
constexpr int64_t kIndexBlock = 256;

// expert[i]: expert of kept copy i (-1 dropped, num_experts when out of range); rank[i]: earlier
// same-expert copies in its block; hist[e, b]: copies of expert e in block b (zero-initialised).
void launch_rank_in_block(const at::Tensor& ids, const at::Tensor& keep, at::Tensor& expert, at::Tensor& rank,
                          at::Tensor& hist, int64_t num_experts);

// dest[i] = base[e] + offsets[e, block] + rank[i] (-1 if dropped); src[dest[i]] = i / k.
void launch_write_index(const at::Tensor& expert, const at::Tensor& rank, const at::Tensor& offsets,
                        const at::Tensor& base, at::Tensor& dest, at::Tensor& src, int64_t k);

// out[r] = x[src[r]] (zeros where src[r] < 0: a bounds guard, the dropless layout has none); a byte copy,
// widest aligned vector.
void launch_gather_rows(const at::Tensor& x, const at::Tensor& src, at::Tensor& out);

// out[t] = sum_j w[t, j] * y[dest[t, j]] over dest >= 0, accumulated in at::opmath_type (fp32, fp64 for
// fp64 rows); gates in that type, or undefined for weight 1.
void launch_combine(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& gates, at::Tensor& out);

}  // namespace smile
