// Packing algorithms; see packer.h for the contract and bindings.cpp for the Python entry points.
#include "packer.h"

#include <algorithm>
#include <numeric>
#include <set>
#include <utility>
#include <vector>

namespace polar {

int64_t first_invalid_group(const int64_t* lengths, int64_t n, int64_t capacity) {
  for (int64_t i = 0; i < n; ++i) {
    if (lengths[i] <= 0 || lengths[i] > capacity) return i;
  }
  return -1;
}

void pack_best_fit(const int64_t* lengths, int64_t n, int64_t capacity, int64_t* bins) {
  // The comparator is a total order (index breaks ties), so std::sort's instability cannot make the
  // result depend on the standard library or the machine.
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  std::sort(order.begin(), order.end(), [lengths](int64_t a, int64_t b) {
    return lengths[a] != lengths[b] ? lengths[a] > lengths[b] : a < b;
  });

  // Open sequences keyed by (remaining capacity, id): lower_bound({len, 0}) is the fullest sequence
  // with room for len tokens, and among equally full ones the oldest. A sequence with no room left
  // can never take another group (lengths are >= 1), so it is dropped instead of reinserted, which
  // keeps the tree small when groups fill sequences exactly.
  std::set<std::pair<int64_t, int64_t>> open;
  int64_t num_bins = 0;
  for (int64_t g : order) {
    const int64_t len = lengths[g];
    auto it = open.lower_bound({len, int64_t{0}});
    int64_t remaining;
    int64_t bin;
    if (it == open.end()) {
      bin = num_bins++;
      remaining = capacity - len;
    } else {
      bin = it->second;
      remaining = it->first - len;
      open.erase(it);
    }
    bins[g] = bin;
    if (remaining > 0) open.emplace(remaining, bin);
  }
}

void pack_next_fit(const int64_t* lengths, int64_t n, int64_t capacity, int64_t* bins) {
  int64_t bin = -1;
  int64_t remaining = 0;
  for (int64_t g = 0; g < n; ++g) {
    if (lengths[g] > remaining) {
      ++bin;
      remaining = capacity;
    }
    remaining -= lengths[g];
    bins[g] = bin;
  }
}

}  // namespace polar
