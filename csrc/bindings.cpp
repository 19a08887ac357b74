// The one place where Python reaches polar's C++ code (module engine._C). Every argument is checked
// here, with a message that names the function, the argument and the fix, so the algorithms behind it
// can assume clean input and run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "packer.h"

namespace py = pybind11;

namespace {

// Checks lengths and returns a private copy: the packers run without the GIL, and a copy means
// another thread writing to the caller's array meanwhile cannot make the result disagree with the
// validation done on it.
std::vector<int64_t> checked_lengths(const char* fn, const py::object& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(fn) + ": lengths must be a numpy array of int64, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!arr.dtype().is(py::dtype::of<int64_t>())) {
    throw py::type_error(std::string(fn) + ": lengths must have dtype int64, got " +
                         std::string(py::str(arr.dtype())) +
                         " (convert with np.asarray(lengths, dtype=np.int64))");
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(fn) + ": lengths must be 1-D (one entry per group), got " +
                          std::to_string(arr.ndim()) + " dimensions");
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(std::string(fn) +
                          ": lengths must be contiguous (use np.ascontiguousarray(lengths))");
  }
  std::vector<int64_t> copy(static_cast<size_t>(arr.shape(0)));
  if (!copy.empty()) std::memcpy(copy.data(), arr.data(), copy.size() * sizeof(int64_t));
  return copy;
}

void check_capacity(const char* fn, int64_t capacity) {
  if (capacity <= 0) {
    throw py::value_error(std::string(fn) + ": capacity (the pack length, data.seq_length) must be "
                          "positive, got " + std::to_string(capacity));
  }
}

[[noreturn]] void throw_invalid_group(const char* fn, int64_t index, int64_t length,
                                      int64_t capacity) {
  if (length <= 0) {
    throw py::value_error(std::string(fn) + ": group " + std::to_string(index) + " has length " +
                          std::to_string(length) +
                          "; every group needs at least one token");
  }
  throw py::value_error(std::string(fn) + ": group " + std::to_string(index) + " has length " +
                        std::to_string(length) + ", more than the pack length (capacity) " +
                        std::to_string(capacity) +
                        "; groups are never split across sequences, so raise data.seq_length to "
                        "at least " + std::to_string(length) + " or shorten the group");
}

using PackFn = void (*)(const int64_t*, int64_t, int64_t, int64_t*);

py::array_t<int64_t> run_packer(const char* fn, PackFn pack, const py::object& lengths_obj,
                                int64_t capacity) {
  check_capacity(fn, capacity);
  std::vector<int64_t> lengths = checked_lengths(fn, lengths_obj);
  const auto n = static_cast<int64_t>(lengths.size());
  py::array_t<int64_t> bins(n);
  int64_t* out = bins.mutable_data();
  int64_t bad;
  {
    py::gil_scoped_release nogil;
    bad = polar::first_invalid_group(lengths.data(), n, capacity);
    if (bad < 0) pack(lengths.data(), n, capacity, out);
  }
  if (bad >= 0) throw_invalid_group(fn, bad, lengths[static_cast<size_t>(bad)], capacity);
  return bins;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "polar's native helpers (CPU). Packing of shared-prefix groups into sequences.";

  m.def(
      "pack_best_fit",
      [](const py::object& lengths, int64_t capacity) {
        return run_packer("pack_best_fit", polar::pack_best_fit, lengths, capacity);
      },
      py::arg("lengths"), py::arg("capacity"),
      R"doc(Best-fit-decreasing packing of groups into sequences of `capacity` tokens.

lengths: int64[n] tokens per group, each in [1, capacity]; a group is never split.
Returns int64[n]: the sequence id of each group, 0..m-1 in the order sequences were opened.
Longest group first (ties: lower index), each into the fullest sequence that still fits it
(ties: lower id). Deterministic. Raises ValueError naming the first group that cannot fit.)doc");

  m.def(
      "pack_first_fit_ordered",
      [](const py::object& lengths, int64_t capacity) {
        return run_packer("pack_first_fit_ordered", polar::pack_next_fit, lengths, capacity);
      },
      py::arg("lengths"), py::arg("capacity"),
      R"doc(Order-preserving (next-fit) packing for streaming and evaluation.

Groups keep their input order; a new sequence starts whenever the next group does not fit in the
current one, so sequence ids never decrease along the input. Same arguments, result and errors
as pack_best_fit.)doc");
}
