// Device helpers shared by the .cu files: dtype conversion, vector loads/stores, reductions and the
// dtype/index dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace polar::cuda {

constexpr int kWarp = 32;

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// V consecutive elements as one aligned struct, so the compiler issues 16-byte (or wider, split)
// loads and stores; callers guarantee the alignment (checked on the host).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[V]) {
  Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(p) = pk;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); the result is valid in thread 0.
__device__ __forceinline__ float block_sum(float x, float* smem /* [32] */) {
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  x = warp_sum(x);
  if (lane == 0) smem[warp] = x;
  __syncthreads();
  const int warps = blockDim.x / kWarp;
  x = threadIdx.x < warps ? smem[threadIdx.x] : 0.0f;
  if (warp == 0) x = warp_sum(x);
  __syncthreads();  // smem may be reused by the caller's next reduction
  return x;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes) == 0;
}

// Calls fn(T{}, I{}) with the element and index types named at run time.
template <typename Fn>
cudaError_t dispatch(DType dtype, IndexType itype, Fn&& fn) {
  auto with_index = [&](auto t) -> cudaError_t {
    if (itype == IndexType::kInt32) return fn(t, int32_t{});
    return fn(t, int64_t{});
  };
  switch (dtype) {
    case DType::kFloat32: return with_index(float{});
    case DType::kBFloat16: return with_index(__nv_bfloat16{});
    case DType::kFloat16: return with_index(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace polar::cuda
