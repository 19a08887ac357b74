// Reward readout, CPU reference: final RMSNorm and value head applied only at the reward positions.
//
// Plain C++ with no Python types, like packer.h: bindings.cpp checks every argument (dtypes, shapes,
// index bounds) and calls these with the GIL released. Matches engine/model/readout.py
// torch_reward_readout:
//   row_i = hidden[t, bi, :] with reward_index[i] = bi*s + t
//   r_i   = sum_j row_ij * rsqrt(mean_j(row_ij^2) + eps) * norm_w_j * head_w_j
// Inputs are float32; every sum is accumulated in double. The formulas are those of
// common/readout_math.h, which the CUDA kernels compile too.
#pragma once

#include <cstdint>

namespace polar {

// Index of the first reward_index entry outside [0, s*b), or -1 when all are in range.
int64_t first_out_of_range(const int64_t* index, int64_t n, int64_t bound);

// hidden: contiguous [s, b, h]; reward_index: [n], each in [0, s*b). Writes rewards[0..n).
void readout_forward(const float* hidden, int64_t s, int64_t b, int64_t h,
                     const int64_t* reward_index, int64_t n, const float* norm_weight,
                     const float* head_weight, double eps, float* rewards);

// Gradients of sum_i grad_r[i] * r_i. grad_hidden ([s, b, h], same layout as hidden) is overwritten:
// zero everywhere except the gathered rows, which accumulate when an index repeats.
// grad_norm_weight and grad_head_weight ([h]) are overwritten.
void readout_backward(const float* hidden, int64_t s, int64_t b, int64_t h,
                      const int64_t* reward_index, int64_t n, const float* norm_weight,
                      const float* head_weight, double eps, const float* grad_r,
                      float* grad_hidden, float* grad_norm_weight, float* grad_head_weight);

}  // namespace polar
