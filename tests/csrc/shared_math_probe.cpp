// Runs the functions of csrc/common/readout_math.h and contrastive_math.h, compiled by the host C++
// compiler alone, for tests/csrc/test_shared_math.py. Each request on stdin names the accumulator
// type: "float" is the type the CUDA kernels instantiate, "double" the CPU references'. Inputs are
// read as float32 (both implementations take float32 rewards and activations), results printed with
// 17 significant digits, one request per line of output.
//
//   pair <acc> r_pos r_neg                      -> loss correct weight
//   infonce <acc> r_pos k r_neg_1 .. r_neg_k    -> empty loss w_1 .. w_k   (merged in this order)
//   readout <acc> h eps g x_1..x_h w_1..w_h v_1..v_h   (one row, upstream gradient g)
//                                               -> reward dx_1..dx_h dw_1..dw_h dv_1..dv_h
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/contrastive_math.h"
#include "common/readout_math.h"

namespace {

using namespace polar;

// strtod, unlike istream's operator>>, reads "inf", "-inf" and "nan" too.
float read_float() {
  std::string word;
  if (!(std::cin >> word)) throw std::runtime_error("truncated request");
  size_t used = 0;
  const double x = std::stod(word, &used);
  if (used != word.size()) throw std::runtime_error("not a number: " + word);
  return static_cast<float>(x);
}

void print(const std::vector<double>& out) {
  for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %.17g" : "%.17g", out[i]);
  std::printf("\n");
}

template <typename Acc>
std::vector<double> pair() {
  const float rp = read_float(), rn = read_float();
  const auto t = contrastive::pair_terms<Acc>(rp, rn);
  return {t.loss, t.correct, t.weight};
}

template <typename Acc>
std::vector<double> infonce() {
  const float rp = read_float();
  const int k = static_cast<int>(read_float());
  std::vector<float> rn(k);
  for (auto& r : rn) r = read_float();
  auto st = contrastive::lse_empty<Acc>();
  for (float r : rn) st = contrastive::lse_merge(st, contrastive::infonce_margin<Acc>(rp, r));
  if (contrastive::lse_is_empty(st)) return {1.0};
  const auto w = contrastive::with_one(st);
  std::vector<double> out{0.0, contrastive::infonce_term(w)};
  for (float r : rn) {
    out.push_back(contrastive::infonce_weight(w, contrastive::infonce_margin<Acc>(rp, r)));
  }
  return out;
}

template <typename Acc>
std::vector<double> readout_row() {
  const int64_t h = static_cast<int64_t>(read_float());
  const float eps = read_float(), g = read_float();
  std::vector<float> x(h), w(h), v(h);
  for (auto* a : {&x, &w, &v}) for (auto& e : *a) e = read_float();
  readout::RowSums<Acc> sums{Acc(0), Acc(0)};
  for (int64_t k = 0; k < h; ++k) readout::add_element<Acc>(sums, x[k], w[k], v[k]);
  std::vector<double> out{readout::reward<Acc>(sums, h, eps)};
  const auto rg = readout::row_grad<Acc>(sums, h, eps, g);
  for (int64_t k = 0; k < h; ++k) out.push_back(readout::grad_x<Acc>(rg, x[k], w[k], v[k]));
  // one row: the column sum is that row's term alone
  std::vector<Acc> column(h);
  for (int64_t k = 0; k < h; ++k) column[k] = readout::add_to_column<Acc>(Acc(0), rg.a, x[k]);
  for (int64_t k = 0; k < h; ++k) out.push_back(readout::grad_norm_weight<Acc>(v[k], column[k]));
  for (int64_t k = 0; k < h; ++k) out.push_back(readout::grad_head_weight<Acc>(w[k], column[k]));
  return out;
}

template <typename Acc>
std::vector<double> dispatch(const std::string& op) {
  if (op == "pair") return pair<Acc>();
  if (op == "infonce") return infonce<Acc>();
  if (op == "readout") return readout_row<Acc>();
  throw std::runtime_error("unknown request " + op);
}

}  // namespace

int main() {
  std::string op, acc;
  try {
    while (std::cin >> op >> acc) {
      if (acc == "float") print(dispatch<float>(op));
      else if (acc == "double") print(dispatch<double>(op));
      else throw std::runtime_error("unknown accumulator " + acc);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "shared_math_probe: %s\n", e.what());
    return 2;
  }
  return 0;
}
