// Fused contrastive losses on CUDA, fp32 math. The formulas (a pair's softplus, tie count and
// weight; InfoNCE's online logsumexp and its read with the "1 +" term) are those of
// csrc/common/contrastive_math.h, which the CPU references compile too; this file holds the
// reductions, the atomics and the launch schedule.
//
// Pairwise: one pass over the pairs gives the loss, the correct count (block partials, summed in a
// fixed order by one block: the loss does not depend on the scheduling) and d loss / d rewards
// (atomics). Launches: memset of grad, pair pass, final sum.
//
// InfoNCE: each positive's logsumexp state (M, S) comes from ONE pass: packed into 64 bits, it is
// merged with each pair's margin by a compare-and-swap loop. Launches: init, merge pass, gradient
// pass, loss over the rewards (one block).
#include <algorithm>

#include "common.cuh"
#include "common/contrastive_math.h"

namespace polar::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxPartials = 1024;  // pair-pass blocks; the final sum reads them with one block
constexpr int kFinalThreads = 1024;

__device__ __forceinline__ float nan_value() { return __int_as_float(0x7fc00000); }

template <typename I>
__device__ __forceinline__ bool in_range(I i, int64_t n) {
  return static_cast<int64_t>(i) >= 0 && static_cast<int64_t>(i) < n;
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
pairwise_kernel(const T* __restrict__ rewards, int64_t n, const I* __restrict__ pos,
                const I* __restrict__ neg, int64_t num_pairs, float* __restrict__ grad,
                float* __restrict__ partials) {
  __shared__ float smem[32];
  float loss = 0.0f, correct = 0.0f;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; j < num_pairs;
       j += static_cast<int64_t>(gridDim.x) * kThreads) {
    const I p = pos[j], q = neg[j];
    if (!in_range(p, n) || !in_range(q, n)) {
      loss += nan_value();
      continue;
    }
    const auto t = contrastive::pair_terms(to_float(rewards[p]), to_float(rewards[q]));
    loss += t.loss;
    correct += t.correct;
    atomicAdd(grad + p, -t.weight);
    atomicAdd(grad + q, t.weight);
  }
  loss = block_sum(loss, smem);
  correct = block_sum(correct, smem);
  if (threadIdx.x == 0) {
    partials[2 * blockIdx.x] = loss;
    partials[2 * blockIdx.x + 1] = correct;
  }
}

__global__ void __launch_bounds__(kFinalThreads)
sum_partials_kernel(const float* __restrict__ partials, int num_partials, float* __restrict__ loss_sum,
                    float* __restrict__ count) {
  __shared__ float smem[32];
  float loss = 0.0f, cnt = 0.0f;
  for (int i = threadIdx.x; i < num_partials; i += kFinalThreads) {
    loss += partials[2 * i];
    cnt += partials[2 * i + 1];
  }
  loss = block_sum(loss, smem);
  cnt = block_sum(cnt, smem);
  if (threadIdx.x == 0) {
    *loss_sum = loss;
    *count = cnt;
  }
}

using LogSumExp = contrastive::LogSumExp<float>;

// A positive's logsumexp state as one 64-bit word (max in the low half), for atomicCAS.
__device__ __forceinline__ unsigned long long pack(LogSumExp st) {
  return (static_cast<unsigned long long>(__float_as_uint(st.sum)) << 32) |
         __float_as_uint(st.max);
}
__device__ __forceinline__ LogSumExp unpack(unsigned long long x) {
  return {__uint_as_float(static_cast<unsigned>(x & 0xffffffffull)),
          __uint_as_float(static_cast<unsigned>(x >> 32))};
}

__global__ void infonce_init_kernel(int64_t n, unsigned long long* __restrict__ state,
                                    float* __restrict__ grad) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) {
    state[i] = pack(contrastive::lse_empty<float>());
    grad[i] = 0.0f;
  } else if (i == n) {
    state[n] = 0;  // invalid-index flag
  }
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
infonce_merge_kernel(const T* __restrict__ rewards, int64_t n, const I* __restrict__ pos,
                     const I* __restrict__ neg, int64_t num_pairs,
                     unsigned long long* __restrict__ state) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= num_pairs) return;
  const I p = pos[j], q = neg[j];
  if (!in_range(p, n) || !in_range(q, n)) {
    state[n] = 1;
    return;
  }
  const float d = contrastive::infonce_margin(to_float(rewards[p]), to_float(rewards[q]));
  unsigned long long seen = state[p], assumed;
  do {  // a positive has K-1 pairs at most: little contention
    assumed = seen;
    seen = atomicCAS(state + p, assumed, pack(contrastive::lse_merge(unpack(assumed), d)));
  } while (seen != assumed);
}

template <typename T, typename I>
__global__ void __launch_bounds__(kThreads)
infonce_grad_kernel(const T* __restrict__ rewards, int64_t n, const I* __restrict__ pos,
                    const I* __restrict__ neg, int64_t num_pairs,
                    const unsigned long long* __restrict__ state, float* __restrict__ grad) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= num_pairs) return;
  const I p = pos[j], q = neg[j];
  if (!in_range(p, n) || !in_range(q, n)) return;
  const float d = contrastive::infonce_margin(to_float(rewards[p]), to_float(rewards[q]));
  const float wgt = contrastive::infonce_weight(contrastive::with_one(unpack(state[p])), d);
  atomicAdd(grad + q, wgt);
  atomicAdd(grad + p, -wgt);
}

// One block over all rewards: n is the number of candidates in a micro-batch (thousands).
__global__ void __launch_bounds__(kFinalThreads)
infonce_loss_kernel(int64_t n, const unsigned long long* __restrict__ state,
                    float* __restrict__ loss_sum, float* __restrict__ count) {
  __shared__ float smem[32];
  float loss = 0.0f, cnt = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kFinalThreads) {
    const LogSumExp st = unpack(state[i]);
    if (contrastive::lse_is_empty(st)) continue;  // no pair has this reward as its positive
    loss += contrastive::infonce_term(contrastive::with_one(st));
    cnt += 1.0f;
  }
  loss = block_sum(loss, smem);
  cnt = block_sum(cnt, smem);
  if (threadIdx.x == 0) {
    *loss_sum = state[n] ? nan_value() : loss;
    *count = cnt;
  }
}

}  // namespace

int64_t pairwise_workspace_floats(int64_t num_pairs) {
  return 2 * std::max<int64_t>(1, std::min<int64_t>(kMaxPartials, ceil_div(num_pairs, kThreads)));
}

cudaError_t pairwise_loss(DType dtype, IndexType itype, const void* rewards, int64_t n,
                          const void* pair_pos, const void* pair_neg, int64_t num_pairs,
                          float* workspace, float* loss_sum, float* count, float* grad,
                          cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(grad, 0, n * sizeof(float), stream);
  if (err != cudaSuccess) return err;
  const int blocks = static_cast<int>(std::min<int64_t>(kMaxPartials, ceil_div(num_pairs, kThreads)));
  if (blocks > 0) {
    err = dispatch(dtype, itype, [&](auto t, auto i) {
      using T = decltype(t);
      using I = decltype(i);
      pairwise_kernel<T, I><<<blocks, kThreads, 0, stream>>>(
          static_cast<const T*>(rewards), n, static_cast<const I*>(pair_pos),
          static_cast<const I*>(pair_neg), num_pairs, grad, workspace);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  sum_partials_kernel<<<1, kFinalThreads, 0, stream>>>(workspace, blocks, loss_sum, count);
  return cudaGetLastError();
}

cudaError_t infonce_loss(DType dtype, IndexType itype, const void* rewards, int64_t n,
                         const void* pair_pos, const void* pair_neg, int64_t num_pairs,
                         unsigned long long* state, float* loss_sum, float* count, float* grad,
                         cudaStream_t stream) {
  infonce_init_kernel<<<ceil_div(n + 1, kThreads), kThreads, 0, stream>>>(n, state, grad);
  if (num_pairs > 0) {
    const cudaError_t err = dispatch(dtype, itype, [&](auto t, auto i) {
      using T = decltype(t);
      using I = decltype(i);
      const auto* r = static_cast<const T*>(rewards);
      const auto* p = static_cast<const I*>(pair_pos);
      const auto* q = static_cast<const I*>(pair_neg);
      const int64_t blocks = ceil_div(num_pairs, kThreads);
      infonce_merge_kernel<T, I><<<blocks, kThreads, 0, stream>>>(r, n, p, q, num_pairs, state);
      infonce_grad_kernel<T, I><<<blocks, kThreads, 0, stream>>>(r, n, p, q, num_pairs, state, grad);
      return cudaGetLastError();
    });
    if (err != cudaSuccess) return err;
  }
  infonce_loss_kernel<<<1, kFinalThreads, 0, stream>>>(n, state, loss_sum, count);
  return cudaGetLastError();
}

}  // namespace polar::cuda
