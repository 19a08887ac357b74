// Reward readout CPU reference; see reward_readout.h for the contract and bindings.cpp for the
// Python entry points.
//
// Per gathered row x (length h), with u_j = norm_w_j * head_w_j:
//   ms = mean(x^2),  rs = (ms + eps)^-1/2,  A = sum_j x_j u_j,  r = rs * A
//   dr/dx_j      = rs * u_j - A * rs^3 * x_j / h
//   dr/dnorm_w_j = rs * x_j * head_w_j
//   dr/dhead_w_j = rs * x_j * norm_w_j
#include "reward_readout.h"

#include <cmath>
#include <cstring>
#include <vector>

namespace polar {

namespace {

inline const float* row_ptr(const float* hidden, int64_t s, int64_t b, int64_t h, int64_t flat) {
  const int64_t t = flat % s;
  const int64_t bi = flat / s;
  return hidden + (t * b + bi) * h;
}

struct RowStats {
  double rs;  // rsqrt(mean(x^2) + eps)
  double a;   // sum_j x_j * norm_w_j * head_w_j
};

inline RowStats row_stats(const float* x, int64_t h, const float* norm_w, const float* head_w,
                          double eps) {
  double sq = 0.0, a = 0.0;
  for (int64_t j = 0; j < h; ++j) {
    const double xj = x[j];
    sq += xj * xj;
    a += xj * (static_cast<double>(norm_w[j]) * static_cast<double>(head_w[j]));
  }
  return {1.0 / std::sqrt(sq / static_cast<double>(h) + eps), a};
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
    const float* x = row_ptr(hidden, s, b, h, reward_index[i]);
    const RowStats st = row_stats(x, h, norm_weight, head_weight, eps);
    rewards[i] = static_cast<float>(st.rs * st.a);
  }
}

void readout_backward(const float* hidden, int64_t s, int64_t b, int64_t h,
                      const int64_t* reward_index, int64_t n, const float* norm_weight,
                      const float* head_weight, double eps, const float* grad_r,
                      float* grad_hidden, float* grad_norm_weight, float* grad_head_weight) {
  std::memset(grad_hidden, 0, static_cast<size_t>(s * b * h) * sizeof(float));
  std::vector<double> g_norm(static_cast<size_t>(h), 0.0);
  std::vector<double> g_head(static_cast<size_t>(h), 0.0);
  const double inv_h = 1.0 / static_cast<double>(h);
  for (int64_t i = 0; i < n; ++i) {
    const double gr = grad_r[i];
    const int64_t flat = reward_index[i];
    const float* x = row_ptr(hidden, s, b, h, flat);
    float* gx = grad_hidden + (x - hidden);
    const RowStats st = row_stats(x, h, norm_weight, head_weight, eps);
    const double c_u = gr * st.rs;                           // coefficient of u_j
    const double c_x = -gr * st.a * st.rs * st.rs * st.rs * inv_h;  // coefficient of x_j
    for (int64_t j = 0; j < h; ++j) {
      const double xj = x[j];
      const double nw = norm_weight[j];
      const double hw = head_weight[j];
      // += so that a repeated index accumulates its rows' gradients.
      gx[j] += static_cast<float>(c_u * nw * hw + c_x * xj);
      g_norm[j] += c_u * xj * hw;
      g_head[j] += c_u * xj * nw;
    }
  }
  for (int64_t j = 0; j < h; ++j) {
    grad_norm_weight[j] = static_cast<float>(g_norm[j]);
    grad_head_weight[j] = static_cast<float>(g_head[j]);
  }
}

}  // namespace polar
