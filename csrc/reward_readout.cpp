// Reward readout CPU reference; see reward_readout.h for the contract and bindings.cpp for the
// Python entry points. The formulas are those of common/readout_math.h, the header the CUDA kernels
// (cuda/reward_readout.cu) compile too, instantiated here with double accumulators: the CPU tests
// check the GPU's math. This file only loops: over the rewards, over a row, over the columns.
#include "reward_readout.h"

#include <cstring>
#include <vector>

#include "common/readout_math.h"

namespace polar {

namespace {

using RowSums = readout::RowSums<double>;

// hidden is contiguous [s, b, h]: strides (b * h, h, 1).
inline const float* gathered_row(const float* hidden, int64_t s, int64_t b, int64_t h,
                                 int64_t flat) {
  return hidden + readout::row_offset(flat, s, b * h, h);
}

inline RowSums row_sums(const float* x, int64_t h, const float* norm_w, const float* head_w) {
  RowSums sums{0.0, 0.0};
  for (int64_t k = 0; k < h; ++k) readout::add_element<double>(sums, x[k], norm_w[k], head_w[k]);
  return sums;
}

}  // namespace

int64_t first_out_of_range(const int64_t* index, int64_t n, int64_t bound) {
  for (int64_t i = 0; i < n; ++i) {
    if (index[i] < 0 || index[i] >= bound) return i;
  }
  return -1;
}

void readout_forward(const float* hidden, int64_t s, int64_t b, int64_t h,
                     const int64_t* reward_index, int64_t n, const float* norm_weight,
                     const float* head_weight, double eps, float* rewards) {
  for (int64_t i = 0; i < n; ++i) {
    const float* x = gathered_row(hidden, s, b, h, reward_index[i]);
    const RowSums sums = row_sums(x, h, norm_weight, head_weight);
    rewards[i] = static_cast<float>(readout::reward(sums, h, eps));
  }
}

void readout_backward(const float* hidden, int64_t s, int64_t b, int64_t h,
                      const int64_t* reward_index, int64_t n, const float* norm_weight,
                      const float* head_weight, double eps, const float* grad_r,
                      float* grad_hidden, float* grad_norm_weight, float* grad_head_weight) {
  std::memset(grad_hidden, 0, static_cast<size_t>(s * b * h) * sizeof(float));
  std::vector<double> column(static_cast<size_t>(h), 0.0);  // S_k = sum_i a_i x_ik
  for (int64_t i = 0; i < n; ++i) {
    const float* x = gathered_row(hidden, s, b, h, reward_index[i]);
    float* gx = grad_hidden + (x - hidden);
    const readout::RowGrad<double> rg =
        readout::row_grad(row_sums(x, h, norm_weight, head_weight), h, eps,
                          static_cast<double>(grad_r[i]));
    for (int64_t k = 0; k < h; ++k) {
      // += so that a repeated index accumulates its rows' gradients.
      gx[k] += static_cast<float>(
          readout::grad_x<double>(rg, x[k], norm_weight[k], head_weight[k]));
      column[static_cast<size_t>(k)] =
          readout::add_to_column<double>(column[static_cast<size_t>(k)], rg.a, x[k]);
    }
  }
  for (int64_t k = 0; k < h; ++k) {
    const double col = column[static_cast<size_t>(k)];
    grad_norm_weight[k] =
        static_cast<float>(readout::grad_norm_weight<double>(head_weight[k], col));
    grad_head_weight[k] =
        static_cast<float>(readout::grad_head_weight<double>(norm_weight[k], col));
  }
}

}  // namespace polar
