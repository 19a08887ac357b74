// Contrastive loss CPU references; see contrastive_loss.h for the contract and bindings.cpp for the
// Python entry points. The formulas are those of common/contrastive_math.h, the header the CUDA
// kernels (cuda/contrastive_loss.cu) compile too, instantiated here with double accumulators: the
// CPU tests check the GPU's math. This file only loops over the pairs and sums.
#include "contrastive_loss.h"

#include <vector>

#include "common/contrastive_math.h"

namespace polar {

LossResult pairwise_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                         const int64_t* pair_neg, int64_t p, float* grad) {
  std::vector<double> g(static_cast<size_t>(n), 0.0);
  double loss = 0.0, correct = 0.0;
  for (int64_t k = 0; k < p; ++k) {
    const size_t ip = static_cast<size_t>(pair_pos[k]), in = static_cast<size_t>(pair_neg[k]);
    // a tie gives a margin of exactly zero, which pair_terms counts 1/2
    const auto t = contrastive::pair_terms<double>(rewards[ip], rewards[in]);
    loss += t.loss;
    correct += t.correct;
    g[ip] -= t.weight;
    g[in] += t.weight;
  }
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(g[static_cast<size_t>(i)]);
  return {loss, correct};
}

LossResult infonce_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                        const int64_t* pair_neg, int64_t p, float* grad) {
  // One pass merges each pair's margin into its positive's logsumexp state.
  std::vector<contrastive::LogSumExp<double>> state(static_cast<size_t>(n),
                                                     contrastive::lse_empty<double>());
  for (int64_t k = 0; k < p; ++k) {
    const size_t ip = static_cast<size_t>(pair_pos[k]);
    const double d = contrastive::infonce_margin<double>(rewards[ip], rewards[pair_neg[k]]);
    state[ip] = contrastive::lse_merge(state[ip], d);
  }
  // Read every positive's state once, with the "1 +" term.
  std::vector<contrastive::WithOne<double>> read(static_cast<size_t>(n));
  double loss = 0.0, count = 0.0;
  for (size_t i = 0; i < static_cast<size_t>(n); ++i) {
    if (contrastive::lse_is_empty(state[i])) continue;  // no pair has this reward as its positive
    read[i] = contrastive::with_one(state[i]);
    loss += contrastive::infonce_term(read[i]);
    count += 1.0;
  }
  // Second pass: each pair's softmax weight.
  std::vector<double> g(static_cast<size_t>(n), 0.0);
  for (int64_t k = 0; k < p; ++k) {
    const size_t ip = static_cast<size_t>(pair_pos[k]), in = static_cast<size_t>(pair_neg[k]);
    const double d = contrastive::infonce_margin<double>(rewards[ip], rewards[in]);
    const double w = contrastive::infonce_weight(read[ip], d);
    g[in] += w;
    g[ip] -= w;
  }
  for (int64_t i = 0; i < n; ++i) grad[i] = static_cast<float>(g[static_cast<size_t>(i)]);
  return {loss, count};
}

}  // namespace polar
