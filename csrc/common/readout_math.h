// The math of the fused reward readout, one definition for both implementations that compile C++:
// the CUDA kernels (csrc/cuda/reward_readout.cu, Acc = float) and the CPU reference
// (csrc/reward_readout.cpp, Acc = double, which the CPU tests check against torch). Callers own the
// loads, the loops over a row and the reductions; every formula lives here. Same math as
// engine/kernels/reward_readout.py and engine/model/readout.py.
//
// Per gathered row x_i (length h), with norm weight w and value-head weight v:
//   rstd_i = rsqrt(mean_k x_ik^2 + eps),  r_i = rstd_i * sum_k x_ik w_k v_k
// Backward, with g_i = dL/dr_i, a_i = g_i rstd_i and S_k = sum_i a_i x_ik:
//   dL/dx_i = a_i (w v - x_i rstd_i r_i / h)      (the RMSNorm backward, folded with r_i)
//   dL/dw   = v S,   dL/dv = w S                 (one column reduction serves both)
#pragma once

#include "host_device.h"

namespace polar::readout {

// Offset of reward row idx = bi * s + t of hidden [s, b, h] with strides (stride_s, stride_b, 1).
POLAR_HD int64_t row_offset(int64_t idx, int64_t s, int64_t stride_s, int64_t stride_b) {
  return (idx % s) * stride_s + (idx / s) * stride_b;
}

// The two sums over one row: sq = sum_k x_k^2, dot = sum_k x_k w_k v_k.
template <typename Acc>
struct RowSums {
  Acc sq;
  Acc dot;
};

// Adds element k of a row (x_k, w_k, v_k) to its sums.
template <typename Acc>
POLAR_HD void add_element(RowSums<Acc>& sums, Acc x, Acc w, Acc v) {
  sums.sq = hd::madd(x, x, sums.sq);
  sums.dot = hd::madd(x, w * v, sums.dot);
}

template <typename Acc>
POLAR_HD Acc rstd(Acc sq, int64_t h, Acc eps) {
  return hd::rsqrt(sq / static_cast<Acc>(h) + eps);
}

// r_i from its row's sums.
template <typename Acc>
POLAR_HD Acc reward(const RowSums<Acc>& sums, int64_t h, Acc eps) {
  return sums.dot * rstd(sums.sq, h, eps);
}

// Per-row factors of the backward: a = g rstd, c = rstd r / h = rstd^2 dot / h.
template <typename Acc>
struct RowGrad {
  Acc a;
  Acc c;
};

template <typename Acc>
POLAR_HD RowGrad<Acc> row_grad(const RowSums<Acc>& sums, int64_t h, Acc eps, Acc grad_reward) {
  const Acc r = rstd(sums.sq, h, eps);
  return {grad_reward * r, r * r * sums.dot / static_cast<Acc>(h)};
}

// dL/dx_k of one row.
template <typename Acc>
POLAR_HD Acc grad_x(const RowGrad<Acc>& rg, Acc x, Acc w, Acc v) {
  return rg.a * (w * v - x * rg.c);
}

// One row's term of the column sum S_k += a_i x_ik.
template <typename Acc>
POLAR_HD Acc add_to_column(Acc column, Acc a, Acc x) {
  return hd::madd(a, x, column);
}

template <typename Acc>
POLAR_HD Acc grad_norm_weight(Acc head_w, Acc column) {
  return head_w * column;
}

template <typename Acc>
POLAR_HD Acc grad_head_weight(Acc norm_w, Acc column) {
  return norm_w * column;
}

}  // namespace polar::readout
