// Shared-prefix group packing: assigns indivisible groups of tokens to fixed-capacity sequences.
//
// Plain C++ with no Python or torch types, so the algorithms can run with the GIL released and be
// tested or reused outside the extension. All input checking lives in bindings.cpp; these functions
// assume every length is in [1, capacity] (first_invalid_group finds the first one that is not).
#pragma once

#include <cstdint>

namespace polar {

// Index of the first group whose length is <= 0 or > capacity, or -1 when all fit.
int64_t first_invalid_group(const int64_t* lengths, int64_t n, int64_t capacity);

// Best-fit decreasing. Writes the sequence id of each group to bins[0..n); ids are 0..m-1 in the
// order the sequences were opened. Groups are taken longest first (ties: lower index first) and each
// goes into the fullest open sequence that still has room (ties: lower sequence id), so the result
// depends only on the input values and is identical on every machine.
void pack_best_fit(const int64_t* lengths, int64_t n, int64_t capacity, int64_t* bins);

// Order-preserving next-fit: groups stay in input order and a new sequence starts whenever the next
// group does not fit in the current one. Sequence ids are non-decreasing along the input.
void pack_next_fit(const int64_t* lengths, int64_t n, int64_t capacity, int64_t* bins);

}  // namespace polar
