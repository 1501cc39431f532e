// The C++ side of glatrain-ops: what tch cannot express.
//
// - `glatrain_set_autocast_dtype`: choose the CUDA autocast dtype (tch's autocast is fp16 only).
// - `glatrain_autocast_enter` / `_exit`: a CUDA autocast region through the current API (tch's
//   `autocast` calls deprecated functions that print warnings).
// - `GlaFunction`: a torch::autograd::Function whose forward and backward call back into Rust
//   (the CUDA GLA launchers), so `loss.backward()` from Rust reaches the custom kernels.
// - `glatrain_grad`: gradients from a given output gradient, `o.backward(do)` without the
//   accumulation (tch's backward seeds with ones only).
// - `glatrain_sdp_backends` / `glatrain_set_sdp_backends`: which SDPA backends libtorch may pick
//   (what torch.nn.attention.sdpa_kernel sets; tch has no binding).
// - `glatrain_fused_adamw`, `glatrain_global_norm`, `glatrain_scale_all`, `glatrain_clear_grads`:
//   the optimizer step over all parameters in libtorch's multi-tensor kernels (torch.optim.AdamW
//   with fused=True, the _foreach ops, zero_grad(set_to_none=True)); tch binds none of them, and
//   one kernel per tensor and op costs hundreds of launches per step.
//
// Tensors cross the boundary as `at::Tensor*` (tch's C_tensor). Tensors handed to Rust are
// borrowed for the duration of the call; tensors Rust returns are `new at::Tensor` that this file
// takes ownership of (and vice versa for the outputs of `glatrain_gla_apply`).

#include <ATen/autocast_mode.h>
#include <torch/torch.h>

#include <cstring>
#include <string>

namespace {

// Fills a caller buffer with a NUL-terminated message (truncated to fit).
void write_error(char* buf, size_t len, const char* msg) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

// Rust callbacks: return 0 on success, else non-zero with a message written to `err`.
// Forward: (q, k, v, g, h0 or null, scale, mode, out o, out final state, out saved (left null
// when the schedule keeps nothing for the backward)) -> status.
using GlaForwardFn = int (*)(const at::Tensor*, const at::Tensor*, const at::Tensor*,
                             const at::Tensor*, const at::Tensor*, double, int64_t, at::Tensor**,
                             at::Tensor**, at::Tensor**, char*, size_t);
// Backward: (q, k, v, g, h0 or null, final state, saved or null, do, dht or null, scale, mode,
//            out dq, dk, dv, dg, dh0 (left null when h0 is null)) -> status.
using GlaBackwardFn = int (*)(const at::Tensor*, const at::Tensor*, const at::Tensor*,
                              const at::Tensor*, const at::Tensor*, const at::Tensor*,
                              const at::Tensor*, const at::Tensor*, const at::Tensor*, double,
                              int64_t, at::Tensor**, at::Tensor**, at::Tensor**, at::Tensor**,
                              at::Tensor**, char*, size_t);

constexpr size_t kErrLen = 4096;

// Takes ownership of a tensor that Rust allocated with `new` (through tch); null gives undefined.
at::Tensor take(at::Tensor* t) {
  if (t == nullptr) return at::Tensor();
  at::Tensor out = *t;
  delete t;
  return out;
}

const at::Tensor* opt(const at::Tensor& t) { return t.defined() ? &t : nullptr; }

struct GlaFunction : public torch::autograd::Function<GlaFunction> {
  // `h0` is always a defined tensor (autograd's C++ Function rejects undefined inputs); without
  // an initial state it is an empty placeholder and `has_h0` is false.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& g,
                                                const at::Tensor& h0_or_empty, bool has_h0,
                                                double scale, int64_t mode, int64_t fwd_fn,
                                                int64_t bwd_fn) {
    auto fwd = reinterpret_cast<GlaForwardFn>(fwd_fn);
    const at::Tensor h0 = has_h0 ? h0_or_empty : at::Tensor();
    at::Tensor* o = nullptr;
    at::Tensor* ht = nullptr;
    at::Tensor* saved = nullptr;
    char err[kErrLen] = {0};
    int rc = fwd(&q, &k, &v, &g, opt(h0), scale, mode, &o, &ht, &saved, err, kErrLen);
    at::Tensor o_t = take(o);
    at::Tensor ht_t = take(ht);
    at::Tensor saved_t = take(saved);
    TORCH_CHECK(rc == 0, err);
    // Gradients may be absent (an unused output): backward handles undefined grads itself.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({q, k, v, g, h0, ht_t, saved_t});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["mode"] = mode;
    ctx->saved_data["bwd_fn"] = bwd_fn;
    return {o_t, ht_t};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    const at::Tensor& q = saved[0];
    const at::Tensor& k = saved[1];
    const at::Tensor& v = saved[2];
    const at::Tensor& g = saved[3];
    const at::Tensor& h0 = saved[4];
    const at::Tensor& ht = saved[5];
    const at::Tensor& kept = saved[6];
    double scale = ctx->saved_data["scale"].toDouble();
    int64_t mode = ctx->saved_data["mode"].toInt();
    auto bwd = reinterpret_cast<GlaBackwardFn>(ctx->saved_data["bwd_fn"].toInt());

    at::Tensor d_o = grads[0];
    if (!d_o.defined()) {
      // Only the final state was used: the outputs contribute nothing.
      std::vector<int64_t> shape(q.sizes().begin(), q.sizes().end());
      shape[3] = v.size(3);
      d_o = at::zeros(shape, v.options());
    }
    at::Tensor dht = grads[1];
    at::Tensor *dq = nullptr, *dk = nullptr, *dv = nullptr, *dg = nullptr, *dh0 = nullptr;
    char err[kErrLen] = {0};
    int rc = bwd(&q, &k, &v, &g, opt(h0), &ht, opt(kept), &d_o, opt(dht), scale, mode, &dq, &dk,
                 &dv, &dg, &dh0, err, kErrLen);
    at::Tensor dq_t = take(dq), dk_t = take(dk), dv_t = take(dv), dg_t = take(dg);
    at::Tensor dh0_t = take(dh0);
    TORCH_CHECK(rc == 0, err);
    return {dq_t, dk_t, dv_t, dg_t, dh0_t, at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor()};
  }
};

}  // namespace

extern "C" {

// Sets the dtype CUDA autocast casts to (at::ScalarType as int). Returns 0, or 1 with a message.
int glatrain_set_autocast_dtype(int scalar_type, char* err, size_t err_len) {
  try {
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(scalar_type));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Enters a CUDA autocast region (what torch.autocast's __enter__ does, with the per-device API
// that replaced the deprecated one tch calls). Returns whether autocast was on before, for
// glatrain_autocast_exit.
int glatrain_autocast_enter() {
  const bool previous = at::autocast::is_autocast_enabled(at::kCUDA);
  at::autocast::set_autocast_enabled(at::kCUDA, true);
  at::autocast::increment_nesting();
  return previous ? 1 : 0;
}

// Leaves the region: clears the cast cache when the outermost region ends, restores the state.
void glatrain_autocast_exit(int previous) {
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(at::kCUDA, previous != 0);
}

// The CUDA autocast dtype now in effect (at::ScalarType as int).
int glatrain_get_autocast_dtype() {
  return static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
}

// Runs GLA as an autograd function. `h0` may be null. On success returns 0 and sets `*o` and
// `*ht` to new tensors owned by the caller; else returns 1 with a message in `err`.
int glatrain_gla_apply(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                       const at::Tensor* g, const at::Tensor* h0, double scale, int64_t mode,
                       GlaForwardFn fwd, GlaBackwardFn bwd, at::Tensor** o, at::Tensor** ht,
                       char* err, size_t err_len) {
  try {
    at::Tensor h0_t = h0 != nullptr ? *h0 : at::empty({0}, g->options());
    auto outs = GlaFunction::apply(*q, *k, *v, *g, h0_t, h0 != nullptr, scale, mode,
                                   reinterpret_cast<int64_t>(fwd), reinterpret_cast<int64_t>(bwd));
    *o = new at::Tensor(outs[0]);
    *ht = new at::Tensor(outs[1]);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// The gradients of the `n` tensors `inputs` from `out` with the output gradient `grad` (what
// `out.backward(grad)` computes, nothing accumulated into `.grad`; an input `out` does not depend
// on gets an undefined tensor). On success returns 0 and sets `grads[0..n]` to new tensors owned by
// the caller; else returns 1 with a message in `err`.
int glatrain_grad(const at::Tensor* out, const at::Tensor* grad, const at::Tensor* const* inputs,
                  size_t n, at::Tensor** grads, char* err, size_t err_len) {
  try {
    std::vector<at::Tensor> ins;
    ins.reserve(n);
    for (size_t i = 0; i < n; ++i) ins.push_back(*inputs[i]);
    auto gs = torch::autograd::grad({*out}, ins, {*grad}, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < n; ++i) grads[i] = new at::Tensor(gs[i]);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// The SDPA backends libtorch may choose from, one bit per at::SDPBackend value (math 0, flash 1,
// efficient 2, cuDNN 3).
int glatrain_sdp_backends() {
  const auto& ctx = at::globalContext();
  return (ctx.userEnabledMathSDP() ? 1 << static_cast<int>(at::SDPBackend::math) : 0) |
         (ctx.userEnabledFlashSDP() ? 1 << static_cast<int>(at::SDPBackend::flash_attention) : 0) |
         (ctx.userEnabledMemEfficientSDP()
              ? 1 << static_cast<int>(at::SDPBackend::efficient_attention)
              : 0) |
         (ctx.userEnabledCuDNNSDP() ? 1 << static_cast<int>(at::SDPBackend::cudnn_attention) : 0);
}

// Lets libtorch choose only from the backends in `mask` (bits as in glatrain_sdp_backends).
void glatrain_set_sdp_backends(int mask) {
  auto& ctx = at::globalContext();
  const auto on = [mask](at::SDPBackend b) { return (mask >> static_cast<int>(b) & 1) != 0; };
  ctx.setSDPUseMath(on(at::SDPBackend::math));
  ctx.setSDPUseFlash(on(at::SDPBackend::flash_attention));
  ctx.setSDPUseMemEfficient(on(at::SDPBackend::efficient_attention));
  ctx.setSDPUseCuDNN(on(at::SDPBackend::cudnn_attention));
}

}  // extern "C"

namespace {

// The tensors behind `n` borrowed pointers (shallow copies sharing their storage).
std::vector<at::Tensor> tensors(const at::Tensor* const* xs, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) out.push_back(*xs[i]);
  return out;
}

}  // namespace

extern "C" {

// One AdamW update of `n` parameters (torch.optim.AdamW with fused=True, amsgrad off): params,
// grads and moments of one dtype and device; `step` is the update count after this update, an
// fp32 scalar on that device. Returns 0, or 1 with a message in `err`.
int glatrain_fused_adamw(const at::Tensor* const* params, const at::Tensor* const* grads,
                         const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                         size_t n, const at::Tensor* step, double lr, double beta1, double beta2,
                         double weight_decay, double eps, char* err, size_t err_len) {
  try {
    const std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                      tensors(exp_avg_sqs, n), /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// The L2 norm of all `n` tensors together (the norm of their norms, in fp32, as
// torch.nn.utils.clip_grad_norm_ computes it with foreach). On success returns 0 and sets `*out`
// to a new fp32 scalar owned by the caller; else returns 1 with a message in `err`.
int glatrain_global_norm(const at::Tensor* const* xs, size_t n, at::Tensor** out, char* err,
                         size_t err_len) {
  try {
    const auto norms = at::_foreach_norm(tensors(xs, n), 2, at::kFloat);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Multiplies each of `n` tensors in place by `factor`. Returns 0, or 1 with a message in `err`.
int glatrain_scale_all(const at::Tensor* const* xs, size_t n, double factor, char* err,
                       size_t err_len) {
  try {
    at::_foreach_mul_(tensors(xs, n), factor);
    return 0;
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
    return 1;
  }
}

// Drops the gradients of `n` tensors (zero_grad(set_to_none=True)): the next backward writes
// them afresh instead of adding into zeros.
void glatrain_clear_grads(const at::Tensor* const* xs, size_t n) {
  for (size_t i = 0; i < n; ++i) const_cast<at::Tensor*>(xs[i])->mutable_grad().reset();
}

}  // extern "C"
