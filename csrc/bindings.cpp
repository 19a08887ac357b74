// The one place where Python reaches polar's C++ code (module engine._C). Every argument is checked
// here, with a message that names the function, the argument and the fix, so the algorithms behind it
// can assume clean input and run without the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "contrastive_loss.h"
#include "packer.h"
#include "reward_readout.h"

namespace py = pybind11;

namespace {

// Whether obj is a numpy array whose elements are T's, byte order included. By equivalence, not
// identity of the dtype objects: numpy's longlong ('q') and long ('l') are both int64 on LP64
// platforms but distinct dtypes, and identity refused an np.longlong array as "got int64".
template <typename T>
bool has_dtype(const py::object& obj) {
  return py::isinstance<py::array_t<T>>(obj);
}

// Checks lengths and returns a private copy: the packers run without the GIL, and a copy means
// another thread writing to the caller's array meanwhile cannot make the result disagree with the
// validation done on it.
std::vector<int64_t> checked_lengths(const char* fn, const py::object& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(fn) + ": lengths must be a numpy array of int64, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype<int64_t>(obj)) {
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

// ---- reward readout and contrastive losses -------------------------------------------------------

std::string type_name(const py::object& obj) {
  return std::string(py::str(py::type::of(obj).attr("__name__")));
}

// A float32, C-contiguous numpy array with `ndim` dimensions (a borrowed view, no copy: the data is
// only read, so another thread writing to it can change the values but not make the reads unsafe).
py::array checked_float(const char* fn, const char* name, const py::object& obj, int ndim,
                        const char* layout) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(fn) + ": " + name + " must be a numpy array of float32 " +
                         layout + ", got " + type_name(obj) +
                         " (from torch: tensor.detach().float().contiguous().numpy())");
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype<float>(obj)) {
    throw py::type_error(std::string(fn) + ": " + name + " must have dtype float32, got " +
                         std::string(py::str(arr.dtype())) + " (convert with .astype(np.float32))");
  }
  if (arr.ndim() != ndim) {
    throw py::value_error(std::string(fn) + ": " + name + " must be " + std::to_string(ndim) +
                          "-D " + layout + ", got " + std::to_string(arr.ndim()) + " dimensions");
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(std::string(fn) + ": " + name + " must be C-contiguous (use np.ascontiguousarray(" +
                          name + "))");
  }
  return arr;
}

// A 1-D int64 index array, copied: the kernels run without the GIL and index memory with these
// values, so they are validated on a private copy that nobody else can change afterwards.
std::vector<int64_t> checked_index(const char* fn, const char* name, const py::object& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(fn) + ": " + name + " must be a numpy array of int64, got " +
                         type_name(obj));
  }
  auto arr = py::reinterpret_borrow<py::array>(obj);
  if (!has_dtype<int64_t>(obj)) {
    throw py::type_error(std::string(fn) + ": " + name + " must have dtype int64, got " +
                         std::string(py::str(arr.dtype())) + " (convert with .astype(np.int64))");
  }
  if (arr.ndim() != 1) {
    throw py::value_error(std::string(fn) + ": " + name + " must be 1-D, got " +
                          std::to_string(arr.ndim()) + " dimensions");
  }
  if (!(arr.flags() & py::array::c_style)) {
    throw py::value_error(std::string(fn) + ": " + name + " must be contiguous (use np.ascontiguousarray(" +
                          name + "))");
  }
  std::vector<int64_t> copy(static_cast<size_t>(arr.shape(0)));
  if (!copy.empty()) std::memcpy(copy.data(), arr.data(), copy.size() * sizeof(int64_t));
  return copy;
}

void check_in_range(const char* fn, const char* name, const std::vector<int64_t>& index,
                    int64_t bound, const std::string& bound_desc) {
  const int64_t bad = polar::first_out_of_range(index.data(), static_cast<int64_t>(index.size()), bound);
  if (bad < 0) return;
  throw py::value_error(std::string(fn) + ": " + name + "[" + std::to_string(bad) + "] = " +
                        std::to_string(index[static_cast<size_t>(bad)]) +
                        " is out of range; every entry must be in [0, " + std::to_string(bound) +
                        ") (" + bound_desc + ")");
}

struct ReadoutArgs {
  py::array hidden, norm_weight, head_weight;
  int64_t s, b, h;
  std::vector<int64_t> index;
};

ReadoutArgs checked_readout(const char* fn, const py::object& hidden_obj, const py::object& index_obj,
                            const py::object& norm_obj, const py::object& head_obj, double eps) {
  ReadoutArgs a;
  a.hidden = checked_float(fn, "hidden", hidden_obj, 3, "[s, b, h]");
  a.s = a.hidden.shape(0);
  a.b = a.hidden.shape(1);
  a.h = a.hidden.shape(2);
  if (a.h < 1) throw py::value_error(std::string(fn) + ": hidden has h = 0; the hidden size must be >= 1");
  const std::string hs = std::to_string(a.h);
  a.norm_weight = checked_float(fn, "norm_weight", norm_obj, 1, "[h]");
  a.head_weight = checked_float(fn, "head_weight", head_obj, 1, "[h] (reshape a [1, h] head with .reshape(-1))");
  if (a.norm_weight.shape(0) != a.h) {
    throw py::value_error(std::string(fn) + ": norm_weight has " + std::to_string(a.norm_weight.shape(0)) +
                          " entries but hidden has h = " + hs);
  }
  if (a.head_weight.shape(0) != a.h) {
    throw py::value_error(std::string(fn) + ": head_weight has " + std::to_string(a.head_weight.shape(0)) +
                          " entries but hidden has h = " + hs);
  }
  if (!(std::isfinite(eps) && eps >= 0.0)) {
    throw py::value_error(std::string(fn) + ": eps must be a finite number >= 0, got " + std::to_string(eps));
  }
  a.index = checked_index(fn, "reward_index", index_obj);
  check_in_range(fn, "reward_index", a.index, a.s * a.b,
                 "flat index bi*s + t with s = " + std::to_string(a.s) + ", b = " + std::to_string(a.b));
  return a;
}

struct PairArgs {
  py::array rewards;
  int64_t n;
  std::vector<int64_t> pos, neg;
};

PairArgs checked_pairs(const char* fn, const py::object& rewards_obj, const py::object& pos_obj,
                       const py::object& neg_obj) {
  PairArgs a;
  a.rewards = checked_float(fn, "rewards", rewards_obj, 1, "[n]");
  a.n = a.rewards.shape(0);
  a.pos = checked_index(fn, "pair_pos", pos_obj);
  a.neg = checked_index(fn, "pair_neg", neg_obj);
  if (a.pos.size() != a.neg.size()) {
    throw py::value_error(std::string(fn) + ": pair_pos has " + std::to_string(a.pos.size()) +
                          " entries but pair_neg has " + std::to_string(a.neg.size()) +
                          "; they must have one entry per pair");
  }
  const std::string desc = "indices into rewards, n = " + std::to_string(a.n);
  check_in_range(fn, "pair_pos", a.pos, a.n, desc);
  check_in_range(fn, "pair_neg", a.neg, a.n, desc);
  return a;
}

using LossFn = polar::LossResult (*)(const float*, int64_t, const int64_t*, const int64_t*, int64_t,
                                     float*);

py::tuple run_loss(const char* fn, LossFn loss, const py::object& rewards, const py::object& pos,
                   const py::object& neg) {
  PairArgs a = checked_pairs(fn, rewards, pos, neg);
  py::array_t<float> grad(a.n);
  float* g = grad.mutable_data();
  const float* r = static_cast<const float*>(a.rewards.data());
  polar::LossResult res;
  {
    py::gil_scoped_release nogil;
    res = loss(r, a.n, a.pos.data(), a.neg.data(), static_cast<int64_t>(a.pos.size()), g);
  }
  return py::make_tuple(res.loss_sum, res.count, grad);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "polar's native helpers (CPU). Packing of shared-prefix groups into sequences; CPU "
           "references of the reward readout and the contrastive losses.";

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

  m.def(
      "readout_forward",
      [](const py::object& hidden, const py::object& reward_index, const py::object& norm_weight,
         const py::object& head_weight, double eps) {
        const char* fn = "readout_forward";
        ReadoutArgs a = checked_readout(fn, hidden, reward_index, norm_weight, head_weight, eps);
        const auto n = static_cast<int64_t>(a.index.size());
        py::array_t<float> rewards(n);
        float* out = rewards.mutable_data();
        {
          py::gil_scoped_release nogil;
          polar::readout_forward(static_cast<const float*>(a.hidden.data()), a.s, a.b, a.h,
                                 a.index.data(), n, static_cast<const float*>(a.norm_weight.data()),
                                 static_cast<const float*>(a.head_weight.data()), eps, out);
        }
        return rewards;
      },
      py::arg("hidden"), py::arg("reward_index"), py::arg("norm_weight"), py::arg("head_weight"),
      py::arg("eps"),
      R"doc(CPU reference of the fused reward readout (engine/model/readout.py torch_reward_readout).

hidden: float32[s, b, h] C-contiguous; reward_index: int64[n], flat indices bi*s + t in [0, s*b);
norm_weight, head_weight: float32[h]; eps >= 0.
Returns float32[n]: r_i = sum_j x_j * rsqrt(mean(x^2) + eps) * norm_weight_j * head_weight_j with
x = hidden[t, bi]. Sums in double. Raises ValueError naming an out-of-range reward_index entry.)doc");

  m.def(
      "readout_backward",
      [](const py::object& hidden, const py::object& reward_index, const py::object& norm_weight,
         const py::object& head_weight, double eps, const py::object& grad_rewards) {
        const char* fn = "readout_backward";
        ReadoutArgs a = checked_readout(fn, hidden, reward_index, norm_weight, head_weight, eps);
        const auto n = static_cast<int64_t>(a.index.size());
        py::array gr = checked_float(fn, "grad_rewards", grad_rewards, 1, "[n]");
        if (gr.shape(0) != n) {
          throw py::value_error(std::string(fn) + ": grad_rewards has " + std::to_string(gr.shape(0)) +
                                " entries but reward_index has " + std::to_string(n));
        }
        py::array_t<float> grad_hidden({a.s, a.b, a.h});
        py::array_t<float> grad_norm(a.h), grad_head(a.h);
        float* gh = grad_hidden.mutable_data();
        float* gn = grad_norm.mutable_data();
        float* gw = grad_head.mutable_data();
        {
          py::gil_scoped_release nogil;
          polar::readout_backward(static_cast<const float*>(a.hidden.data()), a.s, a.b, a.h,
                                  a.index.data(), n, static_cast<const float*>(a.norm_weight.data()),
                                  static_cast<const float*>(a.head_weight.data()), eps,
                                  static_cast<const float*>(gr.data()), gh, gn, gw);
        }
        return py::make_tuple(grad_hidden, grad_norm, grad_head);
      },
      py::arg("hidden"), py::arg("reward_index"), py::arg("norm_weight"), py::arg("head_weight"),
      py::arg("eps"), py::arg("grad_rewards"),
      R"doc(Backward of readout_forward for the upstream gradient grad_rewards: float32[n].

Returns (grad_hidden float32[s, b, h], grad_norm_weight float32[h], grad_head_weight float32[h]).
grad_hidden is zero except at the gathered rows; a repeated index accumulates. Same checks as
readout_forward.)doc");

  m.def(
      "pairwise_loss",
      [](const py::object& rewards, const py::object& pair_pos, const py::object& pair_neg) {
        return run_loss("pairwise_loss", polar::pairwise_loss, rewards, pair_pos, pair_neg);
      },
      py::arg("rewards"), py::arg("pair_pos"), py::arg("pair_neg"),
      R"doc(CPU reference of the pairwise Bradley-Terry loss (engine/loss.py pairwise_sums).

rewards: float32[n]; pair_pos, pair_neg: int64[p] indices in [0, n).
Returns (loss_sum, correct, grad): loss_sum = sum softplus(r[neg] - r[pos]) (float, stable for any
magnitude), correct = #(r[pos] > r[neg]) + 0.5 #(==) (float), grad = d loss_sum / d rewards
(float32[n]). Raises ValueError naming an out-of-range pair index.)doc");

  m.def(
      "infonce_loss",
      [](const py::object& rewards, const py::object& pair_pos, const py::object& pair_neg) {
        return run_loss("infonce_loss", polar::infonce_loss, rewards, pair_pos, pair_neg);
      },
      py::arg("rewards"), py::arg("pair_pos"), py::arg("pair_neg"),
      R"doc(CPU reference of the InfoNCE loss over pairs (engine/loss.py infonce_sums).

Same arguments as pairwise_loss. Returns (loss_sum, count, grad): loss_sum = sum over positives i
with at least one pair of log(1 + sum_{pairs (i, k)} exp(r[k] - r[i])) (stabilised logsumexp),
count = number of such positives (float), grad = d loss_sum / d rewards (float32[n]).)doc");
}
