// Fused reward readout on CUDA: gather the reward rows of hidden [s, b, h], RMSNorm them, dot with
// the value head, fp32 math. The formulas (the forward, and the backward folded into one column
// sum) are those of csrc/common/readout_math.h, which the CPU reference compiles too; this file
// holds the loads, the warp and column reductions and the launch schedule.
//
// Forward: one warp per reward row, 16-byte loads. Backward, five steps on one stream:
//   link     chains the rewards that gather the same token row (head[row] -> next[i] -> ...),
//   row_grad one warp per reward: dL/dx_i into an fp32 row buffer (no atomics),
//   col_sum  S over the reward rows (register partials, one atomic per column and block),
//   scatter  writes grad_hidden in full, each gathered row the sum over its chain; this replaces
//            both the zero fill and an fp32 [s, b, h] accumulation buffer.
#include <algorithm>

#include "common.cuh"
#include "common/readout_math.h"

namespace polar::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerBlock = kThreads / kWarp;

using readout::row_offset;
using RowSums = readout::RowSums<float>;

// The sums of one row, reduced over the warp (valid in every lane).
template <typename T, int V>
__device__ __forceinline__ RowSums row_sums(const T* __restrict__ x, int64_t h,
                                            const float* __restrict__ w,
                                            const float* __restrict__ v, int lane) {
  RowSums sums{0.0f, 0.0f};
#pragma unroll 2  // 4 made ptxas spill 8 bytes in the fp32 forward
  for (int64_t k = lane * V; k < h; k += kWarp * V) {
    float xv[V], wv[V], vv[V];
    load_floats<T, V>(x + k, xv);
    load_floats<float, V>(w + k, wv);
    load_floats<float, V>(v + k, vv);
#pragma unroll
    for (int j = 0; j < V; ++j) readout::add_element(sums, xv[j], wv[j], vv[j]);
  }
  sums.sq = warp_sum(sums.sq);
  sums.dot = warp_sum(sums.dot);
  return sums;
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads)
readout_fwd_kernel(const T* __restrict__ hidden, int64_t s, int64_t b, int64_t h, int64_t stride_s,
                   int64_t stride_b, const I* __restrict__ index, int64_t n,
                   const float* __restrict__ w, const float* __restrict__ v, float eps,
                   float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;
  const int64_t idx = static_cast<int64_t>(index[i]);
  if (idx < 0 || idx >= s * b) {
    if (lane == 0) out[i] = __int_as_float(0x7fc00000);  // NaN
    return;
  }
  const T* x = hidden + row_offset(idx, s, stride_s, stride_b);
  const RowSums sums = row_sums<T, V>(x, h, w, v, lane);
  if (lane == 0) out[i] = readout::reward(sums, h, eps);
}

template <typename I>
__global__ void link_kernel(const I* __restrict__ index, int64_t n, int64_t rows,
                            int32_t* __restrict__ head, int32_t* __restrict__ next) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t idx = static_cast<int64_t>(index[i]);
  // head starts at -1 everywhere, so the last reward of a chain points to -1
  next[i] = (idx < 0 || idx >= rows) ? -1 : atomicExch(head + idx, static_cast<int32_t>(i));
}

template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads)
row_grad_kernel(const T* __restrict__ hidden, int64_t s, int64_t b, int64_t h, int64_t stride_s,
                int64_t stride_b, const I* __restrict__ index, int64_t n,
                const float* __restrict__ w, const float* __restrict__ v, float eps,
                const float* __restrict__ grad_rewards, float* __restrict__ row_grad,
                float* __restrict__ row_scale) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (i >= n) return;
  const int64_t idx = static_cast<int64_t>(index[i]);
  if (idx < 0 || idx >= s * b) {  // not linked: its row_grad is never read
    if (lane == 0) row_scale[i] = 0.0f;
    return;
  }
  const T* x = hidden + row_offset(idx, s, stride_s, stride_b);
  const readout::RowGrad<float> rg =
      readout::row_grad(row_sums<T, V>(x, h, w, v, lane), h, eps, grad_rewards[i]);
  if (lane == 0) row_scale[i] = rg.a;
  float* dx = row_grad + i * h;
  // second read of the row: 2-16 KiB per warp, served from L1/L2
#pragma unroll 4
  for (int64_t k = lane * V; k < h; k += kWarp * V) {
    float xv[V], wv[V], vv[V], out[V];
    load_floats<T, V>(x + k, xv);
    load_floats<float, V>(w + k, wv);
    load_floats<float, V>(v + k, vv);
#pragma unroll
    for (int j = 0; j < V; ++j) out[j] = readout::grad_x(rg, xv[j], wv[j], vv[j]);
    store_floats<float, V>(dx + k, out);
  }
}

// Block (column tile, reward chunk): S[k] += sum over its rewards of a_i x_ik.
template <typename T, typename I, int V>
__global__ void __launch_bounds__(kThreads)
col_sum_kernel(const T* __restrict__ hidden, int64_t s, int64_t b, int64_t h, int64_t stride_s,
               int64_t stride_b, const I* __restrict__ index, int64_t n, int64_t rows_per_chunk,
               const float* __restrict__ row_scale, float* __restrict__ col_sum) {
  const int64_t k = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * V;
  if (k >= h) return;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * rows_per_chunk;
  const int64_t end = min(n, begin + rows_per_chunk);
  float acc[V] = {};
  for (int64_t i = begin; i < end; ++i) {
    const int64_t idx = static_cast<int64_t>(index[i]);
    if (idx < 0 || idx >= s * b) continue;
    const float a = row_scale[i];
    float xv[V];
    load_floats<T, V>(hidden + row_offset(idx, s, stride_s, stride_b) + k, xv);
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = readout::add_to_column(acc[j], a, xv[j]);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) atomicAdd(col_sum + k + j, acc[j]);
}

__global__ void weight_grad_kernel(const float* __restrict__ w, const float* __restrict__ v,
                                   const float* __restrict__ col_sum, int64_t h,
                                   float* __restrict__ grad_w, float* __restrict__ grad_v) {
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= h) return;
  grad_w[k] = readout::grad_norm_weight(v[k], col_sum[k]);
  grad_v[k] = readout::grad_head_weight(w[k], col_sum[k]);
}

// Writes every row of the contiguous grad_hidden: zero, or the sum of its chain of reward rows.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
scatter_kernel(int64_t s, int64_t b, int64_t h, const int32_t* __restrict__ head,
               const int32_t* __restrict__ next, const float* __restrict__ row_grad,
               T* __restrict__ grad_hidden) {
  for (int64_t m = blockIdx.x; m < s * b; m += gridDim.x) {
    const int64_t t = m / b, bi = m % b;
    const int32_t first = head[bi * s + t];
    T* out = grad_hidden + m * h;
    for (int64_t k = static_cast<int64_t>(threadIdx.x) * V; k < h; k += kThreads * V) {
      float acc[V] = {};
      for (int32_t i = first; i >= 0; i = next[i]) {
        float g[V];
        load_floats<float, V>(row_grad + static_cast<int64_t>(i) * h + k, g);
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += g[j];
      }
      store_floats<T, V>(out + k, acc);
    }
  }
}

// 16-byte vectors when the row length, both strides and the pointers allow it, else scalars.
template <typename T>
bool can_vectorize(const void* hidden, int64_t h, int64_t stride_s, int64_t stride_b,
                   const float* w, const float* v) {
  constexpr int V = 16 / sizeof(T);
  return h % V == 0 && stride_s % V == 0 && stride_b % V == 0 && aligned(hidden, 16) &&
         aligned(w, 4 * V) && aligned(v, 4 * V);
}

template <typename T, typename I, int V>
cudaError_t forward_impl(const void* hidden, int64_t s, int64_t b, int64_t h, int64_t stride_s,
                         int64_t stride_b, const void* index, int64_t n, const float* w,
                         const float* v, float eps, float* out, cudaStream_t stream) {
  readout_fwd_kernel<T, I, V><<<ceil_div(n, kRowsPerBlock), kThreads, 0, stream>>>(
      static_cast<const T*>(hidden), s, b, h, stride_s, stride_b, static_cast<const I*>(index), n,
      w, v, eps, out);
  return cudaGetLastError();
}

template <typename T, typename I, int V>
cudaError_t backward_impl(const void* hidden_ptr, int64_t s, int64_t b, int64_t h,
                          int64_t stride_s, int64_t stride_b, const void* index_ptr, int64_t n,
                          const float* w, const float* v, float eps, const float* grad_rewards,
                          ReadoutWorkspace ws, void* grad_hidden, float* grad_w, float* grad_v,
                          int num_sms, cudaStream_t stream) {
  const T* hidden = static_cast<const T*>(hidden_ptr);
  const I* index = static_cast<const I*>(index_ptr);
  const int64_t rows = s * b;
  cudaError_t err = cudaMemsetAsync(ws.head, 0xff, rows * sizeof(int32_t), stream);  // all -1
  if (err == cudaSuccess) err = cudaMemsetAsync(ws.col_sum, 0, h * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  if (n > 0 && h > 0) {  // h = 0 (refused by ops.cpp) would divide by zero column blocks below
    link_kernel<I><<<ceil_div(n, kThreads), kThreads, 0, stream>>>(index, n, rows, ws.head,
                                                                     ws.next);
    row_grad_kernel<T, I, V><<<ceil_div(n, kRowsPerBlock), kThreads, 0, stream>>>(
        hidden, s, b, h, stride_s, stride_b, index, n, w, v, eps, grad_rewards, ws.row_grad,
        ws.row_scale);
    // enough (column tile, reward chunk) blocks to fill the GPU about twice
    const int64_t col_blocks = ceil_div(h, static_cast<int64_t>(kThreads) * V);
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(n, 2 * num_sms / col_blocks));
    const int64_t rows_per_chunk = ceil_div(n, chunks);
    col_sum_kernel<T, I, V><<<dim3(col_blocks, ceil_div(n, rows_per_chunk)), kThreads, 0,
                              stream>>>(hidden, s, b, h, stride_s, stride_b, index, n,
                                        rows_per_chunk, ws.row_scale, ws.col_sum);
  }
  if (h > 0) {
    weight_grad_kernel<<<ceil_div(h, kThreads), kThreads, 0, stream>>>(w, v, ws.col_sum, h, grad_w,
                                                                       grad_v);
  }
  if (rows > 0 && h > 0) {
    const int64_t blocks = std::min<int64_t>(rows, static_cast<int64_t>(num_sms) * 16);
    scatter_kernel<T, V><<<blocks, kThreads, 0, stream>>>(s, b, h, ws.head, ws.next, ws.row_grad,
                                                          static_cast<T*>(grad_hidden));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t readout_forward(DType dtype, IndexType itype, const void* hidden, int64_t s, int64_t b,
                            int64_t h, int64_t stride_s, int64_t stride_b, const void* reward_index,
                            int64_t n, const float* norm_w, const float* head_w, float eps,
                            float* rewards, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return dispatch(dtype, itype, [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    constexpr int V = 16 / sizeof(T);
    if (can_vectorize<T>(hidden, h, stride_s, stride_b, norm_w, head_w)) {
      return forward_impl<T, I, V>(hidden, s, b, h, stride_s, stride_b, reward_index, n, norm_w,
                                   head_w, eps, rewards, stream);
    }
    return forward_impl<T, I, 1>(hidden, s, b, h, stride_s, stride_b, reward_index, n, norm_w,
                                 head_w, eps, rewards, stream);
  });
}

cudaError_t readout_backward(DType dtype, IndexType itype, const void* hidden, int64_t s, int64_t b,
                             int64_t h, int64_t stride_s, int64_t stride_b, const void* reward_index,
                             int64_t n, const float* norm_w, const float* head_w, float eps,
                             const float* grad_rewards, ReadoutWorkspace ws, void* grad_hidden,
                             float* grad_norm_w, float* grad_head_w, int num_sms,
                             cudaStream_t stream) {
  return dispatch(dtype, itype, [&](auto t, auto i) {
    using T = decltype(t);
    using I = decltype(i);
    constexpr int V = 16 / sizeof(T);
    // row_grad and grad_hidden are fresh contiguous allocations: aligned whenever h % V == 0
    if (can_vectorize<T>(hidden, h, stride_s, stride_b, norm_w, head_w) &&
        aligned(grad_hidden, 16) && aligned(ws.row_grad, 4 * V)) {
      return backward_impl<T, I, V>(hidden, s, b, h, stride_s, stride_b, reward_index, n, norm_w,
                                    head_w, eps, grad_rewards, ws, grad_hidden, grad_norm_w,
                                    grad_head_w, num_sms, stream);
    }
    return backward_impl<T, I, 1>(hidden, s, b, h, stride_s, stride_b, reward_index, n, norm_w,
                                  head_w, eps, grad_rewards, ws, grad_hidden, grad_norm_w,
                                  grad_head_w, num_sms, stream);
  });
}

}  // namespace polar::cuda
