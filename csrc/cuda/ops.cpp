// The torch binding of polar's CUDA kernels (module engine._C_cuda, loaded with
// torch.ops.load_library by engine/kernels/cuda_ops.py). Every argument is checked here with a
// message naming the op and the argument; the kernels behind kernels.h assume clean input. Ops live in
// the `polar` namespace next to the Triton ones, with a `_cuda` suffix:
//   polar::reward_readout_cuda_fwd(hidden, reward_index, norm_weight, head_weight, eps) -> rewards fp32
//   polar::reward_readout_cuda_bwd(grad_rewards, hidden, reward_index, norm_weight, head_weight, eps)
//       -> (grad_hidden, grad_norm_weight, grad_head_weight)
//   polar::pairwise_loss_cuda(rewards, pair_pos, pair_neg) -> (loss_sum, correct, grad) fp32
//   polar::infonce_loss_cuda(rewards, pair_pos, pair_neg) -> (loss_sum, positives, grad) fp32
// Index values are not checked (that would need a host sync); kernels.h says what happens instead.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "kernels.h"

namespace {

using polar::cuda::DType;
using polar::cuda::IndexType;

DType dtype_of(const char* op, const char* arg, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kHalf: return DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": ", arg, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  return DType::kFloat32;  // not reached: TORCH_CHECK(false) throws
}

IndexType index_type_of(const char* op, const char* arg, const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 1, op, ": ", arg, " must be 1-d, got shape ", t.sizes());
  if (t.scalar_type() == at::kInt) return IndexType::kInt32;
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", arg, " must be int32 or int64, got ", t.scalar_type());
  return IndexType::kInt64;
}

void check_device(const char* op, const char* arg, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", arg, " must be a CUDA tensor, got ", t.device(),
              " (the CUDA kernels do not run on CPU; use train.kernels=torch there)");
  TORCH_CHECK(t.device() == device, op, ": ", arg, " is on ", t.device(), ", expected ", device);
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

int num_sms(const at::Device& device) {
  int sms = 0;
  check_launch("num_sms", cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return sms;
}

// The readout's inputs as the kernels want them: hidden with unit stride along h, fp32 weights.
struct ReadoutArgs {
  at::Tensor hidden, index, norm_w, head_w;
  int64_t s, b, h, n;
  DType dtype;
  IndexType itype;
};

ReadoutArgs readout_args(const char* op, const at::Tensor& hidden, const at::Tensor& reward_index,
                         const at::Tensor& norm_weight, const at::Tensor& head_weight, double eps) {
  TORCH_CHECK(hidden.dim() == 3, op, ": hidden must be [s, b, h], got shape ", hidden.sizes());
  const auto device = hidden.device();
  check_device(op, "hidden", hidden, device);
  check_device(op, "reward_index", reward_index, device);
  check_device(op, "norm_weight", norm_weight, device);
  check_device(op, "head_weight", head_weight, device);
  ReadoutArgs a;
  a.dtype = dtype_of(op, "hidden", hidden);
  a.itype = index_type_of(op, "reward_index", reward_index);
  a.s = hidden.size(0);
  a.b = hidden.size(1);
  a.h = hidden.size(2);
  a.n = reward_index.numel();
  // as engine._C's readout: with h = 0 the backward's launch geometry divided by zero columns (a
  // SIGFPE that killed the process) and the forward returned NaN
  TORCH_CHECK(a.h >= 1, op, ": hidden has h = 0 (shape ", hidden.sizes(), "); the hidden size must be >= 1");
  TORCH_CHECK(norm_weight.numel() == a.h && head_weight.numel() == a.h, op, ": norm_weight (",
              norm_weight.numel(), ") and head_weight (", head_weight.numel(), ") must have h=", a.h,
              " elements");
  dtype_of(op, "norm_weight", norm_weight);
  dtype_of(op, "head_weight", head_weight);
  // the backward chains rewards with int32 links
  TORCH_CHECK(a.s * a.b < std::numeric_limits<int32_t>::max() && a.n < std::numeric_limits<int32_t>::max(),
              op, ": s*b (", a.s * a.b, ") and n (", a.n, ") must be below 2^31");
  TORCH_CHECK(std::isfinite(eps) && eps >= 0.0, op, ": eps must be a finite number >= 0, got ", eps);
  a.hidden = hidden.stride(2) == 1 ? hidden : hidden.contiguous();
  a.index = reward_index.contiguous();
  a.norm_w = norm_weight.reshape({a.h}).to(at::kFloat).contiguous();
  a.head_w = head_weight.reshape({a.h}).to(at::kFloat).contiguous();
  return a;
}

at::Tensor readout_fwd(const at::Tensor& hidden, const at::Tensor& reward_index,
                       const at::Tensor& norm_weight, const at::Tensor& head_weight, double eps) {
  constexpr const char* op = "polar::reward_readout_cuda_fwd";
  const ReadoutArgs a = readout_args(op, hidden, reward_index, norm_weight, head_weight, eps);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty({a.n}, hidden.options().dtype(at::kFloat));
  check_launch(op, polar::cuda::readout_forward(
      a.dtype, a.itype, a.hidden.data_ptr(), a.s, a.b, a.h, a.hidden.stride(0), a.hidden.stride(1),
      a.index.data_ptr(), a.n, a.norm_w.data_ptr<float>(), a.head_w.data_ptr<float>(),
      static_cast<float>(eps), out.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> readout_bwd(
    const at::Tensor& grad_rewards, const at::Tensor& hidden, const at::Tensor& reward_index,
    const at::Tensor& norm_weight, const at::Tensor& head_weight, double eps) {
  constexpr const char* op = "polar::reward_readout_cuda_bwd";
  const ReadoutArgs a = readout_args(op, hidden, reward_index, norm_weight, head_weight, eps);
  check_device(op, "grad_rewards", grad_rewards, hidden.device());
  TORCH_CHECK(grad_rewards.numel() == a.n, op, ": grad_rewards has ", grad_rewards.numel(),
              " elements, expected n=", a.n);
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor g = grad_rewards.reshape({a.n}).to(at::kFloat).contiguous();
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto i32 = hidden.options().dtype(at::kInt);
  at::Tensor head = at::empty({a.s * a.b}, i32), next = at::empty({a.n}, i32);
  at::Tensor row_grad = at::empty({a.n, a.h}, f32), row_scale = at::empty({a.n}, f32);
  at::Tensor col_sum = at::empty({a.h}, f32);
  at::Tensor grad_hidden = at::empty({a.s, a.b, a.h}, hidden.options());
  at::Tensor grad_w = at::empty({a.h}, f32), grad_v = at::empty({a.h}, f32);
  const polar::cuda::ReadoutWorkspace ws{head.data_ptr<int32_t>(), next.data_ptr<int32_t>(),
                                         row_grad.data_ptr<float>(), row_scale.data_ptr<float>(),
                                         col_sum.data_ptr<float>()};
  check_launch(op, polar::cuda::readout_backward(
      a.dtype, a.itype, a.hidden.data_ptr(), a.s, a.b, a.h, a.hidden.stride(0), a.hidden.stride(1),
      a.index.data_ptr(), a.n, a.norm_w.data_ptr<float>(), a.head_w.data_ptr<float>(),
      static_cast<float>(eps), g.data_ptr<float>(), ws, grad_hidden.data_ptr(),
      grad_w.data_ptr<float>(), grad_v.data_ptr<float>(), num_sms(hidden.device()),
      c10::cuda::getCurrentCUDAStream()));
  return {grad_hidden, grad_w.view(norm_weight.sizes()).to(norm_weight.scalar_type()),
          grad_v.view(head_weight.sizes()).to(head_weight.scalar_type())};
}

struct LossArgs {
  at::Tensor rewards, pos, neg;
  DType dtype;
  IndexType itype;
};

LossArgs loss_args(const char* op, const at::Tensor& rewards, const at::Tensor& pair_pos,
                   const at::Tensor& pair_neg) {
  TORCH_CHECK(rewards.dim() == 1, op, ": rewards must be 1-d, got shape ", rewards.sizes());
  check_device(op, "rewards", rewards, rewards.device());
  check_device(op, "pair_pos", pair_pos, rewards.device());
  check_device(op, "pair_neg", pair_neg, rewards.device());
  LossArgs a;
  a.dtype = dtype_of(op, "rewards", rewards);
  a.itype = index_type_of(op, "pair_pos", pair_pos);
  TORCH_CHECK(index_type_of(op, "pair_neg", pair_neg) == a.itype && pair_pos.numel() == pair_neg.numel(),
              op, ": pair_pos (", pair_pos.sizes(), ", ", pair_pos.scalar_type(), ") and pair_neg (",
              pair_neg.sizes(), ", ", pair_neg.scalar_type(), ") must have the same length and dtype");
  a.rewards = rewards.contiguous();
  a.pos = pair_pos.contiguous();
  a.neg = pair_neg.contiguous();
  return a;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pairwise(const at::Tensor& rewards,
                                                        const at::Tensor& pair_pos,
                                                        const at::Tensor& pair_neg) {
  constexpr const char* op = "polar::pairwise_loss_cuda";
  const LossArgs a = loss_args(op, rewards, pair_pos, pair_neg);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto f32 = rewards.options().dtype(at::kFloat);
  const int64_t n = rewards.numel(), pairs = pair_pos.numel();
  at::Tensor workspace = at::empty({polar::cuda::pairwise_workspace_floats(pairs)}, f32);
  at::Tensor loss = at::empty({}, f32), correct = at::empty({}, f32), grad = at::empty({n}, f32);
  check_launch(op, polar::cuda::pairwise_loss(
      a.dtype, a.itype, a.rewards.data_ptr(), n, a.pos.data_ptr(), a.neg.data_ptr(), pairs,
      workspace.data_ptr<float>(), loss.data_ptr<float>(), correct.data_ptr<float>(),
      grad.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {loss, correct, grad};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce(const at::Tensor& rewards,
                                                       const at::Tensor& pair_pos,
                                                       const at::Tensor& pair_neg) {
  constexpr const char* op = "polar::infonce_loss_cuda";
  const LossArgs a = loss_args(op, rewards, pair_pos, pair_neg);
  const c10::cuda::CUDAGuard guard(rewards.device());
  const auto f32 = rewards.options().dtype(at::kFloat);
  const int64_t n = rewards.numel(), pairs = pair_pos.numel();
  at::Tensor state = at::empty({n + 1}, rewards.options().dtype(at::kLong));
  at::Tensor loss = at::empty({}, f32), count = at::empty({}, f32), grad = at::empty({n}, f32);
  check_launch(op, polar::cuda::infonce_loss(
      a.dtype, a.itype, a.rewards.data_ptr(), n, a.pos.data_ptr(), a.neg.data_ptr(), pairs,
      reinterpret_cast<unsigned long long*>(state.data_ptr<int64_t>()), loss.data_ptr<float>(),
      count.data_ptr<float>(), grad.data_ptr<float>(), c10::cuda::getCurrentCUDAStream()));
  return {loss, count, grad};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(polar, m) {
  m.def("reward_readout_cuda_fwd(Tensor hidden, Tensor reward_index, Tensor norm_weight, "
        "Tensor head_weight, float eps) -> Tensor");
  m.def("reward_readout_cuda_bwd(Tensor grad_rewards, Tensor hidden, Tensor reward_index, "
        "Tensor norm_weight, Tensor head_weight, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("pairwise_loss_cuda(Tensor rewards, Tensor pair_pos, Tensor pair_neg) -> (Tensor, Tensor, Tensor)");
  m.def("infonce_loss_cuda(Tensor rewards, Tensor pair_pos, Tensor pair_neg) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(polar, CUDA, m) {
  m.impl("reward_readout_cuda_fwd", &readout_fwd);
  m.impl("reward_readout_cuda_bwd", &readout_bwd);
  m.impl("pairwise_loss_cuda", &pairwise);
  m.impl("infonce_loss_cuda", &infonce);
}
