// Contrastive loss CPU references; see contrastive_loss.h for the contract and bindings.cpp for the
// Python entry points.
#include "contrastive_loss.h"

#include <cmath>
#include <vector>

namespace polar {

namespace {

// log(1 + exp(x)) without overflow for large x or loss of precision for very negative x.
inline double softplus(double x) { return (x > 0.0 ? x : 0.0) + std::log1p(std::exp(-std::fabs(x))); }

// 1 / (1 + exp(-x)), the derivative of softplus, without overflow.
inline double sigmoid(double x) {
  if (x >= 0.0) return 1.0 / (1.0 + std::exp(-x));
  const double e = std::exp(x);
  return e / (1.0 + e);
}

}  // namespace

LossResult pairwise_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                         const int64_t* pair_neg, int64_t p, float* grad) {
  std::vector<double> g(static_cast<size_t>(n), 0.0);
  double loss = 0.0, correct = 0.0;
  for (int64_t k = 0; k < p; ++k) {
    const int64_t ip = pair_pos[k], in = pair_neg[k];
    const float rp = rewards[ip], rn = rewards[in];
    const double x = static_cast<double>(rn) - static_cast<double>(rp);  // exact for float inputs
    loss += softplus(x);
    if (rp > rn) correct += 1.0;
    else if (rp == rn) correct += 0.5;
    const double w = sigmoid(x);
    g[static_cast<size_t>(in)] += w;
    g[static_cast<size_t>(ip)] -= w;
  }
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(g[static_cast<size_t>(i)]);
  return {loss, correct};
}

LossResult infonce_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                        const int64_t* pair_neg, int64_t p, float* grad) {
  // Per positive, an online logsumexp over {0} and its margins d_k = r[neg_k] - r[pos_k]:
  // m = running max (starts at 0, the "1 +" term), s = sum exp(term - m) (starts at exp(0 - 0) = 1).
  std::vector<double> m(static_cast<size_t>(n), 0.0);
  std::vector<double> s(static_cast<size_t>(n), 1.0);
  std::vector<char> has(static_cast<size_t>(n), 0);
  for (int64_t k = 0; k < p; ++k) {
    const size_t ip = static_cast<size_t>(pair_pos[k]);
    const double d = static_cast<double>(rewards[pair_neg[k]]) - static_cast<double>(rewards[ip]);
    has[ip] = 1;
    if (d > m[ip]) {
      s[ip] = s[ip] * std::exp(m[ip] - d) + 1.0;
      m[ip] = d;
    } else {
      s[ip] += std::exp(d - m[ip]);
    }
  }
  double loss = 0.0, count = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    if (!has[static_cast<size_t>(i)]) continue;
    loss += m[static_cast<size_t>(i)] + std::log(s[static_cast<size_t>(i)]);
    count += 1.0;
  }
  // d loss_i / d d_k = softmax weight of term k = exp(d_k - m_i) / s_i.
  std::vector<double> g(static_cast<size_t>(n), 0.0);
  for (int64_t k = 0; k < p; ++k) {
    const size_t ip = static_cast<size_t>(pair_pos[k]);
    const size_t in = static_cast<size_t>(pair_neg[k]);
    const double d = static_cast<double>(rewards[in]) - static_cast<double>(rewards[ip]);
    const double w = std::exp(d - m[ip]) / s[ip];
    g[in] += w;
    g[ip] -= w;
  }
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(g[static_cast<size_t>(i)]);
  return {loss, count};
}

}  // namespace polar
