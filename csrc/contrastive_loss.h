// Contrastive losses over reward pairs, CPU reference of engine/loss.py (pairwise_sums, infonce_sums).
//
// Plain C++ with no Python types, like packer.h: bindings.cpp checks every argument (dtypes, lengths,
// pair indices in [0, n)) and calls these with the GIL released. Rewards are float32; losses and
// gradients are accumulated in double and are numerically stable for rewards of any magnitude. The
// formulas are those of common/contrastive_math.h, which the CUDA kernels compile too.
#pragma once

#include <cstdint>

namespace polar {

struct LossResult {
  double loss_sum;
  double count;  // pairwise: correctly ordered pairs (ties 1/2); infonce: positives with >= 1 pair
};

// Bradley-Terry over pairs: loss_sum = sum_k softplus(r[neg_k] - r[pos_k]),
// count = #(r[pos_k] > r[neg_k]) + 0.5 #(r[pos_k] == r[neg_k]). One pass.
// grad[0..n) is overwritten with d loss_sum / d rewards.
LossResult pairwise_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                         const int64_t* pair_neg, int64_t p, float* grad);

// InfoNCE: for every positive i that appears in pair_pos,
//   loss_i = log(1 + sum_{k: pos_k = i} exp(r[neg_k] - r[i])),
// computed as m_i + log1p(sum exp(d - m_i) + exp(-m_i) - 1) with m_i = max(0, max_k d_k), the
// argument of log1p formed without rounding 1 + x (an online logsumexp: one pass over the pairs for
// the loss, a second for the gradient; common/contrastive_math.h with_one). A well-separated group's
// loss keeps double precision while it is a normal double (largest margin above -708).
// count = number of distinct positives. grad[0..n) is overwritten with d loss_sum / d rewards.
LossResult infonce_loss(const float* rewards, int64_t n, const int64_t* pair_pos,
                        const int64_t* pair_neg, int64_t p, float* grad);

}  // namespace polar
