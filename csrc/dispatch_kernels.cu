// CUDA kernels of the fused token-dispatch ops; same layout and results as smile.dispatch.TorchBackend.
//
// dispatch_index: per-block ranks + histogram (rank_in_block), scanned on the host side with ATen,
// then one elementwise pass (write_index). gather_rows: one block per output row, a byte copy with
// the widest aligned vector. combine: one block per token, each thread owns a few 16-byte slices of
// the row and reads the token's k rows (4 to 8 loads in flight), accumulating in fp32 (fp64 for fp64
// inputs, as the reference does); no atomics.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "dispatch.h"

namespace smile {
namespace {

constexpr int kMaxThreads = 256;

__global__ void rank_in_block_kernel(const int64_t* __restrict__ ids, const bool* __restrict__ keep,
                                     int32_t* __restrict__ expert_out, int32_t* __restrict__ rank_out,
                                     int32_t* __restrict__ hist, int64_t n, int64_t num_experts,
                                     int64_t num_blocks) {
  __shared__ int32_t experts[kIndexBlock];
  const int lane = threadIdx.x;
  const int64_t i = blockIdx.x * kIndexBlock + lane;
  int32_t e = -1;
  if (i < n && keep[i]) {
    const int64_t id = ids[i];
    e = (id >= 0 && id < num_experts) ? static_cast<int32_t>(id) : static_cast<int32_t>(num_experts);
  }
  experts[lane] = e;
  __syncthreads();
  if (i >= n) return;
  int32_t rank = 0;
  int32_t total = 0;
  if (e >= 0) {
    for (int j = 0; j < kIndexBlock; ++j) {
      if (experts[j] == e) {
        ++total;
        rank += j < lane;
      }
    }
  }
  expert_out[i] = e;
  rank_out[i] = rank;
  if (e >= 0 && rank + 1 == total) hist[e * num_blocks + blockIdx.x] = total;
}

__global__ void write_index_kernel(const int32_t* __restrict__ expert, const int32_t* __restrict__ rank,
                                   const int32_t* __restrict__ offsets, const int64_t* __restrict__ base,
                                   int64_t* __restrict__ dest, int64_t* __restrict__ src, int64_t n, int64_t k,
                                   int64_t num_blocks) {
  const int64_t i = blockIdx.x * kIndexBlock + threadIdx.x;
  if (i >= n) return;
  const int32_t e = expert[i];
  if (e < 0) {
    dest[i] = -1;
    return;
  }
  const int64_t row = base[e] + offsets[e * num_blocks + blockIdx.x] + rank[i];
  dest[i] = row;
  src[row] = i / k;
}

// One block per output row (grid-stride), VecT-wide copies; VecT divides row bytes and both strides.
template <typename VecT>
__global__ void gather_rows_kernel(const char* __restrict__ x, int64_t x_row_bytes, const int64_t* __restrict__ src,
                                   char* __restrict__ out, int64_t num_rows, int64_t row_vecs) {
  for (int64_t r = blockIdx.x; r < num_rows; r += gridDim.x) {
    const int64_t s = src[r];
    VecT* dst = reinterpret_cast<VecT*>(out + r * row_vecs * static_cast<int64_t>(sizeof(VecT)));
    if (s < 0) {
      const VecT zero{};
      for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = zero;
    } else {
      const VecT* in = reinterpret_cast<const VecT*>(x + s * x_row_bytes);
#pragma unroll 4
      for (int64_t v = threadIdx.x; v < row_vecs; v += blockDim.x) dst[v] = in[v];
    }
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// One block per token (grid-stride). The token's k destinations and weights are staged in shared
// memory once; then each thread owns COLS vectors of VEC columns, strided by the block, and loads
// ROWS of the token's rows for all of them before accumulating: ROWS * COLS loads in flight.
template <typename scalar_t, typename acc_t, int VEC, int ROWS, int COLS>
__global__ void combine_kernel(const scalar_t* __restrict__ y, int64_t y_stride, const int64_t* __restrict__ dest,
                               const acc_t* __restrict__ gates, scalar_t* __restrict__ out, int64_t tokens,
                               int64_t k, int64_t hidden) {
  using P = Pack<scalar_t, VEC>;
  extern __shared__ int64_t staged[];  // k destinations, then k weights
  int64_t* dest_t = staged;
  acc_t* weights_t = reinterpret_cast<acc_t*>(staged + k);
  const int64_t vecs = hidden / VEC;
  const int64_t stride = blockDim.x;
  for (int64_t t = blockIdx.x; t < tokens; t += gridDim.x) {
    for (int64_t j = threadIdx.x; j < k; j += stride) {
      dest_t[j] = dest[t * k + j];
      weights_t[j] = gates == nullptr ? acc_t(1) : gates[t * k + j];
    }
    __syncthreads();
    for (int64_t v0 = threadIdx.x; v0 < vecs; v0 += stride * COLS) {
      acc_t acc[COLS][VEC];
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[c][i] = acc_t(0);
      }
      for (int64_t j0 = 0; j0 < k; j0 += ROWS) {
        P rows[ROWS][COLS];
        acc_t w[ROWS];
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
          const int64_t j = j0 + u;
          const int64_t d = j < k ? dest_t[j] : -1;
          w[u] = d < 0 ? acc_t(0) : weights_t[j];
#pragma unroll
          for (int c = 0; c < COLS; ++c) {
            const int64_t v = v0 + c * stride;
            if (d >= 0 && v < vecs) {
              rows[u][c] = *reinterpret_cast<const P*>(y + d * y_stride + v * VEC);
            } else {
#pragma unroll
              for (int i = 0; i < VEC; ++i) rows[u][c].v[i] = scalar_t(0);
            }
          }
        }
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
#pragma unroll
          for (int c = 0; c < COLS; ++c) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[c][i] += w[u] * static_cast<acc_t>(rows[u][c].v[i]);
          }
        }
      }
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        const int64_t v = v0 + c * stride;
        if (v < vecs) {
          P result;
#pragma unroll
          for (int i = 0; i < VEC; ++i) result.v[i] = static_cast<scalar_t>(acc[c][i]);
          *reinterpret_cast<P*>(out + t * hidden + v * VEC) = result;
        }
      }
    }
    __syncthreads();  // the staged rows are rewritten for the next token
  }
}

int64_t blocks_for(int64_t work) {
  // Grid-stride kernels: cap the grid well below the 2^31-1 limit.
  return std::max<int64_t>(1, std::min<int64_t>(work, int64_t{1} << 30));
}

int threads_for(int64_t per_row) {
  const int64_t warps = (per_row + 31) / 32;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, warps * 32)));
}

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// ROWS rows of the token x COLS column vectors per thread: 4 to 8 loads in flight.
template <typename scalar_t, typename acc_t, int VEC>
void launch_combine_vec(const scalar_t* y, int64_t y_stride, const int64_t* dest, const acc_t* gates, scalar_t* out,
                        int64_t tokens, int64_t k, int64_t hidden, int64_t blocks, cudaStream_t stream) {
  const int64_t vecs = hidden / VEC;
  const size_t smem = static_cast<size_t>(k) * (sizeof(int64_t) + sizeof(acc_t));
  if (k >= 8) {
    combine_kernel<scalar_t, acc_t, VEC, 8, 1><<<blocks, threads_for(vecs), smem, stream>>>(
        y, y_stride, dest, gates, out, tokens, k, hidden);
  } else if (k >= 4) {
    combine_kernel<scalar_t, acc_t, VEC, 4, 2><<<blocks, threads_for((vecs + 1) / 2), smem, stream>>>(
        y, y_stride, dest, gates, out, tokens, k, hidden);
  } else if (k >= 2) {
    combine_kernel<scalar_t, acc_t, VEC, 2, 4><<<blocks, threads_for((vecs + 3) / 4), smem, stream>>>(
        y, y_stride, dest, gates, out, tokens, k, hidden);
  } else {
    combine_kernel<scalar_t, acc_t, VEC, 1, 4><<<blocks, threads_for((vecs + 3) / 4), smem, stream>>>(
        y, y_stride, dest, gates, out, tokens, k, hidden);
  }
}

}  // namespace

void launch_rank_in_block(const at::Tensor& ids, const at::Tensor& keep, at::Tensor& expert, at::Tensor& rank,
                          at::Tensor& hist, int64_t num_experts) {
  const int64_t n = ids.numel();
  const int64_t num_blocks = hist.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  rank_in_block_kernel<<<num_blocks, kIndexBlock, 0, stream>>>(
      ids.data_ptr<int64_t>(), keep.data_ptr<bool>(), expert.data_ptr<int32_t>(), rank.data_ptr<int32_t>(),
      hist.data_ptr<int32_t>(), n, num_experts, num_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_write_index(const at::Tensor& expert, const at::Tensor& rank, const at::Tensor& offsets,
                        const at::Tensor& base, at::Tensor& dest, at::Tensor& src, int64_t k) {
  const int64_t n = expert.numel();
  const int64_t num_blocks = offsets.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  write_index_kernel<<<num_blocks, kIndexBlock, 0, stream>>>(
      expert.data_ptr<int32_t>(), rank.data_ptr<int32_t>(), offsets.data_ptr<int32_t>(), base.data_ptr<int64_t>(),
      dest.data_ptr<int64_t>(), src.data_ptr<int64_t>(), n, k, num_blocks);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_gather_rows(const at::Tensor& x, const at::Tensor& src, at::Tensor& out) {
  const int64_t num_rows = out.size(0);
  const int64_t row_bytes = out.size(1) * out.element_size();
  const int64_t x_row_bytes = x.stride(0) * x.element_size();
  const char* x_ptr = static_cast<const char*>(x.data_ptr());
  char* out_ptr = static_cast<char*>(out.data_ptr());
  int64_t width = 16;
  while (width > 1 && !(row_bytes % width == 0 && x_row_bytes % width == 0 && aligned(x_ptr, width) &&
                        aligned(out_ptr, width))) {
    width /= 2;
  }
  const int64_t row_vecs = row_bytes / width;
  const int threads = threads_for(row_vecs);
  const int64_t blocks = blocks_for(num_rows);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t* src_ptr = src.data_ptr<int64_t>();
  switch (width) {
    case 16:
      gather_rows_kernel<uint4><<<blocks, threads, 0, stream>>>(x_ptr, x_row_bytes, src_ptr, out_ptr, num_rows,
                                                                row_vecs);
      break;
    case 8:
      gather_rows_kernel<uint2><<<blocks, threads, 0, stream>>>(x_ptr, x_row_bytes, src_ptr, out_ptr, num_rows,
                                                                row_vecs);
      break;
    case 4:
      gather_rows_kernel<uint32_t><<<blocks, threads, 0, stream>>>(x_ptr, x_row_bytes, src_ptr, out_ptr,
                                                                   num_rows, row_vecs);
      break;
    case 2:
      gather_rows_kernel<uint16_t><<<blocks, threads, 0, stream>>>(x_ptr, x_row_bytes, src_ptr, out_ptr,
                                                                   num_rows, row_vecs);
      break;
    default:
      gather_rows_kernel<uint8_t><<<blocks, threads, 0, stream>>>(x_ptr, x_row_bytes, src_ptr, out_ptr,
                                                                  num_rows, row_vecs);
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_combine(const at::Tensor& y, const at::Tensor& dest, const at::Tensor& gates, at::Tensor& out) {
  const int64_t tokens = dest.size(0);
  const int64_t k = dest.size(1);
  const int64_t hidden = y.size(1);
  const int64_t y_stride = y.stride(0);
  const int64_t blocks = blocks_for(tokens);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "smile_combine", [&] {
    using acc_t = at::opmath_type<scalar_t>;  // fp32 for half types and fp32, fp64 for fp64
    constexpr int kVec = 16 / sizeof(scalar_t);
    const acc_t* gates_ptr = gates.defined() ? gates.data_ptr<acc_t>() : nullptr;
    const scalar_t* y_ptr = y.data_ptr<scalar_t>();
    const int64_t* dest_ptr = dest.data_ptr<int64_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const bool vectorised = hidden % kVec == 0 && y_stride % kVec == 0 && aligned(y_ptr, 16) && aligned(out_ptr, 16);
    if (vectorised) {
      launch_combine_vec<scalar_t, acc_t, kVec>(y_ptr, y_stride, dest_ptr, gates_ptr, out_ptr, tokens, k, hidden,
                                                blocks, stream);
    } else {
      launch_combine_vec<scalar_t, acc_t, 1>(y_ptr, y_stride, dest_ptr, gates_ptr, out_ptr, tokens, k, hidden, blocks,
                                             stream);
    }
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace smile
