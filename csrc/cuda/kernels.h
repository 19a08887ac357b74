// Launchers of polar's CUDA kernels, free of torch types so that the .cu files compile with plain
// nvcc; ops.cpp (the torch binding) checks every argument, allocates outputs and workspaces and
// calls these on the current stream. Every launcher is asynchronous (no host sync) and returns the
// launch status.
//
// Out-of-range indices are never read or written: the kernels cannot raise without a host sync, so
// they poison the result with NaN instead (readout: that reward; losses: the loss sum).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace polar::cuda {

enum class DType { kFloat32, kBFloat16, kFloat16 };
enum class IndexType { kInt32, kInt64 };

// ---- reward readout (reward_readout.cu); math in csrc/common/readout_math.h ----------------------
// hidden [s, b, h] with unit stride on h and strides (stride_s, stride_b) in elements; reward_index
// [n] holds bi*s + t. norm_w and head_w are fp32 [h]. Writes rewards [n] fp32.
cudaError_t readout_forward(DType dtype, IndexType itype, const void* hidden, int64_t s, int64_t b,
                            int64_t h, int64_t stride_s, int64_t stride_b, const void* reward_index,
                            int64_t n, const float* norm_w, const float* head_w, float eps,
                            float* rewards, cudaStream_t stream);

// Workspace of the backward, all uninitialised on entry (the launcher clears what needs clearing).
struct ReadoutWorkspace {
  int32_t* head;      // [s*b]: one reward gathering that token row, or -1
  int32_t* next;      // [n]:   the next reward gathering the same row, or -1
  float* row_grad;    // [n*h]: dL/dx of each reward's row
  float* row_scale;   // [n]:   g_i * rstd_i
  float* col_sum;     // [h]:   sum_i g_i * rstd_i * x_i
};

// grad_hidden: contiguous [s, b, h] in hidden's dtype, written in full (zero away from the gathered
// rows; a row gathered twice receives the sum). grad_norm_w and grad_head_w: fp32 [h].
cudaError_t readout_backward(DType dtype, IndexType itype, const void* hidden, int64_t s, int64_t b,
                             int64_t h, int64_t stride_s, int64_t stride_b, const void* reward_index,
                             int64_t n, const float* norm_w, const float* head_w, float eps,
                             const float* grad_rewards, ReadoutWorkspace ws, void* grad_hidden,
                             float* grad_norm_w, float* grad_head_w, int num_sms,
                             cudaStream_t stream);

// ---- contrastive losses (contrastive_loss.cu); math in csrc/common/contrastive_math.h ------------
// rewards [n]; pair_pos, pair_neg [num_pairs]. Outputs: loss_sum and count (fp32 scalars) and
// grad [n] fp32 = d loss_sum / d rewards.

// Number of float partials the pairwise launcher needs as workspace.
int64_t pairwise_workspace_floats(int64_t num_pairs);

// count = correctly ordered pairs (ties 1/2).
cudaError_t pairwise_loss(DType dtype, IndexType itype, const void* rewards, int64_t n,
                          const void* pair_pos, const void* pair_neg, int64_t num_pairs,
                          float* workspace, float* loss_sum, float* count, float* grad,
                          cudaStream_t stream);

// count = positives with at least one pair. state: workspace of n + 1 uint64 (per-positive running
// max and sum, then an invalid-index flag).
cudaError_t infonce_loss(DType dtype, IndexType itype, const void* rewards, int64_t n,
                         const void* pair_pos, const void* pair_neg, int64_t num_pairs,
                         unsigned long long* state, float* loss_sum, float* count, float* grad,
                         cudaStream_t stream);

}  // namespace polar::cuda
