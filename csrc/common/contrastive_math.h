// The math of the contrastive losses, one definition for both implementations that compile C++:
// the CUDA kernels (csrc/cuda/contrastive_loss.cu, Acc = float) and the CPU references
// (csrc/contrastive_loss.cpp, Acc = double, which the CPU tests check against torch). Callers own
// the loops over the pairs, the reductions and the gradient scatter; every formula lives here. Same
// math as engine/kernels/contrastive_loss.py and engine/loss.py (pairwise_sums, infonce_sums),
// stable for rewards of any magnitude.
#pragma once

#include "host_device.h"

namespace polar::contrastive {

// ---- pairwise Bradley-Terry (paper Eq. 7 / 8) ---------------------------------------------------
// One pair with margin m = r_pos - r_neg:
//   loss    = softplus(-m) = max(-m, 0) + log1p(exp(-|m|))
//   correct = 1 if m > 0, 1/2 for a tie, else 0
//   weight  = sigmoid(-m) = d loss / d r_neg = -d loss / d r_pos
template <typename Acc>
struct PairTerms {
  Acc loss;
  Acc correct;
  Acc weight;
};

template <typename Acc>
POLAR_HD PairTerms<Acc> pair_terms(Acc r_pos, Acc r_neg) {
  const Acc m = r_pos - r_neg;
  const Acc e = hd::exp(-hd::abs(m));  // in (0, 1]: neither term below can overflow
  PairTerms<Acc> t;
  t.loss = hd::max(-m, Acc(0)) + hd::log1p(e);
  t.correct = m > Acc(0) ? Acc(1) : (m == Acc(0) ? Acc(0.5) : Acc(0));
  t.weight = m >= Acc(0) ? e / (Acc(1) + e) : Acc(1) / (Acc(1) + e);
  return t;
}

// ---- InfoNCE over pairs ------------------------------------------------------------------------
// For a positive p with pairs q: loss_p = log(1 + sum_q exp(d_pq)), d_pq = r_q - r_p.
// An online logsumexp: merging every d_pq into the state (M, S), M = max d, S = sum exp(d - M),
// starting from (-inf, 0), which also marks a reward that is no positive. The "1 +" term is taken
// in when the state is read: Mc = max(M, 0), denom = S exp(M - Mc) + exp(-Mc) >= 1, and
//   loss_p = Mc + log1p(denom - 1),   weight_pq = exp(d_pq - Mc) / denom
// where weight_pq, the softmax weight of pair q, is d loss_p / d r_q and pair q's share of
// -d loss_p / d r_p. The merge is order-independent up to rounding.
template <typename Acc>
struct LogSumExp {
  Acc max;
  Acc sum;
};

template <typename Acc>
POLAR_HD LogSumExp<Acc> lse_empty() {
  return {-static_cast<Acc>(INFINITY), Acc(0)};
}

template <typename Acc>
POLAR_HD bool lse_is_empty(const LogSumExp<Acc>& st) {
  return st.max == -static_cast<Acc>(INFINITY);
}

template <typename Acc>
POLAR_HD Acc infonce_margin(Acc r_pos, Acc r_neg) {
  return r_neg - r_pos;
}

template <typename Acc>
POLAR_HD LogSumExp<Acc> lse_merge(const LogSumExp<Acc>& st, Acc d) {
  // A NaN margin poisons the state, as it does the torch reference: fmax would drop it, and a
  // state left at max = -inf reads as "no pair", skipping the positive from the loss and the count.
  if (d != d || st.max != st.max) return {d + st.max, d + st.max};
  // A margin of -inf (a negative at -inf, or a positive at +inf) adds exp(-inf) = 0 to the sum but
  // gives its positive a pair. Merged as is it left the state at max = -inf ("no pair", so the
  // positive dropped out of the count) with sum = 0 * exp(-inf + inf) = NaN, which made the loss
  // NaN when a finite margin was merged after it, and only then: on the GPU the merge order is the
  // atomics'. As the lowest finite number its exp is 0 in every read and the state is not empty.
  const Acc dm = d < hd::lowest(d) ? hd::lowest(d) : d;
  const Acc m = hd::max(st.max, dm);
  return {m, st.sum * hd::exp(st.max - m) + hd::exp(dm - m)};
}

// The state read with the "1 +" term: the clamped max Mc, the softmax denominator (>= 1) and its
// excess over 1, formed without rounding 1 + x. Where M <= 0 the excess is the whole sum of exps
// T = S exp(M): log(1 + T) lost T's low bits, and all of T below 6e-8 in float (1e-16 in double),
// so a well-separated group's loss read 0. Where M > 0, S >= 1 (its largest term is exp(0)) and
// S - 1 is exact for S < 2^24. A NaN state fails M > 0 and reads NaN in all three fields.
template <typename Acc>
struct WithOne {
  Acc max;
  Acc denom;
  Acc excess;
};

template <typename Acc>
POLAR_HD WithOne<Acc> with_one(const LogSumExp<Acc>& st) {
  if (st.max > Acc(0)) {
    const Acc e = hd::exp(-st.max);
    return {st.max, st.sum + e, (st.sum - Acc(1)) + e};
  }
  const Acc t = st.sum * hd::exp(st.max);
  return {Acc(0), t + Acc(1), t};
}

template <typename Acc>
POLAR_HD Acc infonce_term(const WithOne<Acc>& w) {
  return w.max + hd::log1p(w.excess);
}

template <typename Acc>
POLAR_HD Acc infonce_weight(const WithOne<Acc>& w, Acc d) {
  return hd::exp(d - w.max) / w.denom;
}

}  // namespace polar::contrastive
