// The C++ side of glatrain-shim: what tch cannot express.
//
// - `glatrain_set_autocast_dtype`: choose the CUDA autocast dtype (tch's autocast is fp16 only).
// - `glatrain_autocast_enter` / `_exit`: a CUDA autocast region through the current API (tch's
//   `autocast` calls deprecated functions that print warnings).
// - `glatrain_custom_op_apply`: a torch::autograd::Function whose forward and backward call back
//   into a Rust object (`glatrain_shim::autograd::CustomOp`), so `loss.backward()` from Rust
//   reaches custom kernels (GLA, the selective scan, fused training ops).
// - `glatrain_grad`: gradients from a given output gradient, `o.backward(do)` without the
//   accumulation (tch's backward seeds with ones only).
// - `glatrain_backward`: `o.backward(do)` itself, accumulating into the leaves; activation
//   checkpointing calls it from inside a backward (a reentrant backward, as PyTorch's
//   `checkpoint(use_reentrant=True)` does).
// - `glatrain_sdp_backends` / `glatrain_set_sdp_backends`: which SDPA backends libtorch may pick
//   (what torch.nn.attention.sdpa_kernel sets; tch has no binding).
// - `glatrain_flash_supports` / `glatrain_flash_varlen_causal`: libtorch's FlashAttention over
//   sequences packed end to end (flash_attn_varlen_func with causal=True), and libtorch's own
//   check of whether its flash backend takes given inputs; tch binds neither.
// - `glatrain_fused_adamw`, `glatrain_global_norm`, `glatrain_scale_all`, `glatrain_clear_grads`:
//   the optimizer step over all parameters in libtorch's multi-tensor kernels (torch.optim.AdamW
//   with fused=True, the _foreach ops, zero_grad(set_to_none=True)); tch binds none of them, and
//   one kernel per tensor and op costs hundreds of launches per step.
// - `glatrain_cuda_memory_stats` / `glatrain_cuda_reset_peak`: the CUDA caching allocator's
//   counters (torch.cuda.memory_stats, reset_peak_memory_stats).
// - `glatrain_profiler_start` / `glatrain_profiler_stop`: libtorch's Kineto profiler
//   (torch.profiler): CPU ops and CUDA kernels, a Chrome trace, and the events for a summary.
//
// Tensors cross the boundary as `at::Tensor*` (tch's C_tensor). Tensors handed to Rust are
// borrowed for the duration of the call; tensors either side returns are `new at::Tensor` that
// the receiver takes ownership of. Entry points that can fail return 0, or 1 with libtorch's
// message (without its C++ backtrace) in a caller buffer (guarded.h).

#include "guarded.h"

#include <ATen/autocast_mode.h>
#include <ATen/native/transformers/cuda/sdp_utils.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <torch/csrc/autograd/profiler_kineto.h>
#include <torch/torch.h>

#include <string>

using glatrain::guarded;

namespace {

// The Rust side of a custom op (glatrain_shim::autograd). Each callback returns 0, or non-zero
// with a NUL-terminated message in `err`.
//
// forward(op, inputs[n_inputs] (null = absent), outputs[kMaxTensors] out, n_outputs out,
//         saved[kMaxTensors] out (null entries allowed), n_saved out, err, err_len)
// backward(op, saved[n_saved] (null = absent), grad_outputs[n_outputs] (null = no gradient),
//          grad_inputs[n_inputs] out (left null where there is none), err, err_len)
// drop(op): frees the Rust object once the autograd graph no longer needs it.
constexpr size_t kMaxTensors = 16;
using CustomForwardFn = int (*)(void*, const at::Tensor* const*, size_t, at::Tensor**, size_t*,
                                at::Tensor**, size_t*, char*, size_t);
using CustomBackwardFn = int (*)(void*, const at::Tensor* const*, size_t, const at::Tensor* const*,
                                 size_t, at::Tensor**, size_t, char*, size_t);
using CustomDropFn = void (*)(void*);

constexpr size_t kErrLen = 4096;

// Takes ownership of a tensor that Rust allocated with `new` (through tch); null gives undefined.
at::Tensor take(at::Tensor* t) {
  if (t == nullptr) return at::Tensor();
  at::Tensor out = *t;
  delete t;
  return out;
}

const at::Tensor* opt(const at::Tensor& t) { return t.defined() ? &t : nullptr; }

// The Rust op object, freed with the autograd node that holds it (or when apply fails).
struct RustOp : torch::CustomClassHolder {
  void* op;
  CustomForwardFn forward;
  CustomBackwardFn backward;
  CustomDropFn drop;
  RustOp(void* op, CustomForwardFn f, CustomBackwardFn b, CustomDropFn d)
      : op(op), forward(f), backward(b), drop(d) {}
  ~RustOp() override { drop(op); }
};

struct CustomFunction : public torch::autograd::Function<CustomFunction> {
  // `inputs` are all defined (autograd's C++ Function rejects undefined inputs): an absent input
  // is an empty placeholder whose `present` bit is clear.
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx,
                                                c10::intrusive_ptr<RustOp> rust,
                                                std::vector<bool> present,
                                                at::TensorList inputs) {
    std::vector<const at::Tensor*> ins(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i) ins[i] = present[i] ? &inputs[i] : nullptr;
    at::Tensor* outs[kMaxTensors] = {nullptr};
    at::Tensor* saved[kMaxTensors] = {nullptr};
    size_t n_outs = 0, n_saved = 0;
    char err[kErrLen] = {0};
    int rc = rust->forward(rust->op, ins.data(), ins.size(), outs, &n_outs, saved, &n_saved, err,
                           kErrLen);
    torch::autograd::variable_list outputs, kept;
    for (size_t i = 0; i < kMaxTensors; ++i) {
      at::Tensor o = take(outs[i]);
      at::Tensor s = take(saved[i]);
      if (i < n_outs) outputs.push_back(o);
      if (i < n_saved) kept.push_back(s);
    }
    if (rc != 0) {
      TORCH_CHECK(false, err[0] != 0 ? err : "a custom op's forward failed without a message");
    }
    // Gradients may be absent (an unused output): the Rust backward handles undefined grads.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(kept);
    ctx->saved_data["op"] = c10::IValue::make_capsule(rust);
    ctx->saved_data["inputs"] = static_cast<int64_t>(inputs.size());
    return outputs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    auto saved = ctx->get_saved_variables();
    auto holder = ctx->saved_data["op"].toCapsule();
    auto* rust = static_cast<RustOp*>(holder.get());
    const auto n_inputs = static_cast<size_t>(ctx->saved_data["inputs"].toInt());
    std::vector<const at::Tensor*> kept(saved.size()), gs(grads.size());
    for (size_t i = 0; i < saved.size(); ++i) kept[i] = opt(saved[i]);
    for (size_t i = 0; i < grads.size(); ++i) gs[i] = opt(grads[i]);
    std::vector<at::Tensor*> dins(n_inputs, nullptr);
    char err[kErrLen] = {0};
    int rc = rust->backward(rust->op, kept.data(), kept.size(), gs.data(), gs.size(), dins.data(),
                            n_inputs, err, kErrLen);
    // One gradient per argument of forward: the op object and the presence mask get none.
    torch::autograd::variable_list out = {at::Tensor(), at::Tensor()};
    for (size_t i = 0; i < n_inputs; ++i) out.push_back(take(dins[i]));
    if (rc != 0) {
      TORCH_CHECK(false, err[0] != 0 ? err : "a custom op's backward failed without a message");
    }
    return out;
  }
};

}  // namespace

extern "C" {

// Sets the dtype CUDA autocast casts to (at::ScalarType as int). Returns 0, or 1 with a message.
int glatrain_set_autocast_dtype(int scalar_type, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    at::autocast::set_autocast_dtype(at::kCUDA, static_cast<at::ScalarType>(scalar_type));
  });
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

// Whether CUDA autocast is on in this thread (1) or not (0).
int glatrain_autocast_is_enabled() { return at::autocast::is_autocast_enabled(at::kCUDA) ? 1 : 0; }

// The CUDA autocast dtype now in effect (at::ScalarType as int).
int glatrain_get_autocast_dtype() {
  return static_cast<int>(at::autocast::get_autocast_dtype(at::kCUDA));
}

// Runs a Rust custom op (`op`, with its callbacks) as an autograd function over `n` inputs (null
// = absent). On success returns 0 and sets `outputs[0..*n_outputs]` to new tensors owned by the
// caller; else returns 1 with a message in `err`. The op object is dropped through `drop` when no
// longer needed, also on failure.
int glatrain_custom_op_apply(void* op, CustomForwardFn fwd, CustomBackwardFn bwd,
                             CustomDropFn drop, const at::Tensor* const* inputs, size_t n,
                             at::Tensor** outputs, size_t* n_outputs, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto rust = c10::make_intrusive<RustOp>(op, fwd, bwd, drop);
    std::vector<bool> present(n);
    std::vector<at::Tensor> ins(n);
    for (size_t i = 0; i < n; ++i) {
      present[i] = inputs[i] != nullptr && inputs[i]->defined();
      ins[i] = present[i] ? *inputs[i] : at::empty({0});
    }
    auto outs = CustomFunction::apply(rust, present, at::TensorList(ins));
    TORCH_CHECK(outs.size() <= kMaxTensors, "a custom op returned more than 16 outputs");
    for (size_t i = 0; i < outs.size(); ++i) outputs[i] = new at::Tensor(outs[i]);
    *n_outputs = outs.size();
  });
}

// The gradients of the `n` tensors `inputs` from `out` with the output gradient `grad` (what
// `out.backward(grad)` computes, nothing accumulated into `.grad`; an input `out` does not depend
// on gets an undefined tensor). On success returns 0 and sets `grads[0..n]` to new tensors owned by
// the caller; else returns 1 with a message in `err`.
int glatrain_grad(const at::Tensor* out, const at::Tensor* grad, const at::Tensor* const* inputs,
                  size_t n, at::Tensor** grads, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> ins;
    ins.reserve(n);
    for (size_t i = 0; i < n; ++i) ins.push_back(*inputs[i]);
    auto gs = torch::autograd::grad({*out}, ins, {*grad}, /*retain_graph=*/false,
                                    /*create_graph=*/false, /*allow_unused=*/true);
    for (size_t i = 0; i < n; ++i) grads[i] = new at::Tensor(gs[i]);
  });
}

// `out.backward(grad)`: accumulates the gradients of the leaves `out` depends on into their
// `.grad`. Callable from inside another backward. Returns 0, or 1 with a message in `err`.
int glatrain_backward(const at::Tensor* out, const at::Tensor* grad, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    torch::autograd::backward({*out}, {*grad});
  });
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

// Whether libtorch's flash backend takes causal attention of `q`, `k`, `v` as SDPA sees them
// ([B, H, T, D]; `gqa` when k and v have fewer heads than q): its build, the GPU's architecture,
// the dtypes, head dims and strides, and the backend being enabled. Returns 0 and sets
// `*supported` to 1 or 0, or returns 1 with a message (without a C++ backtrace).
int glatrain_flash_supports(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, int gqa,
                            int* supported, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    const sdp::sdp_params params{*q, *k, *v, /*attn_mask=*/std::nullopt, /*dropout=*/0.0,
                                 /*is_causal=*/true, /*enable_gqa=*/gqa != 0};
    *supported = sdp::can_use_flash_attention(params, /*debug=*/false) ? 1 : 0;
  });
}

// Causal attention with scale 1/sqrt(D) inside each sequence of `q` [total, H, D], `k` and `v`
// [total, H_kv, D], the sequences laid end to end: sequence i spans rows cu_seqlens[i] ..
// cu_seqlens[i + 1] (`cu_seqlens` int32 on the device, `max_seqlen` the longest). libtorch's
// varlen FlashAttention; autograd records it (its backward is _flash_attention_backward). On
// success returns 0 and sets `*out` to a new [total, H, D] tensor owned by the caller; else
// returns 1 with a message in `err` (without a C++ backtrace).
int glatrain_flash_varlen_causal(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                 const at::Tensor* cu_seqlens, int64_t max_seqlen, at::Tensor** out,
                                 char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto result = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_seqlen,
                                               max_seqlen, /*dropout_p=*/0.0, /*is_causal=*/true,
                                               /*return_debug_mask=*/false);
    *out = new at::Tensor(std::get<0>(result));
  });
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
  return guarded(err, err_len, [&] {
    const std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(tensors(params, n), tensors(grads, n), tensors(exp_avgs, n),
                      tensors(exp_avg_sqs, n), /*max_exp_avg_sqs=*/{}, steps, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false,
                      /*grad_scale=*/std::nullopt, /*found_inf=*/std::nullopt);
  });
}

// The L2 norm of all `n` tensors together (the norm of their norms, in fp32, as
// torch.nn.utils.clip_grad_norm_ computes it with foreach). On success returns 0 and sets `*out`
// to a new fp32 scalar owned by the caller; else returns 1 with a message in `err`.
int glatrain_global_norm(const at::Tensor* const* xs, size_t n, at::Tensor** out, char* err,
                         size_t err_len) {
  return guarded(err, err_len, [&] {
    const auto norms = at::_foreach_norm(tensors(xs, n), 2, at::kFloat);
    *out = new at::Tensor(at::linalg_vector_norm(at::stack(norms), 2));
  });
}

// Multiplies each of `n` tensors in place by `factor`. Returns 0, or 1 with a message in `err`.
int glatrain_scale_all(const at::Tensor* const* xs, size_t n, double factor, char* err,
                       size_t err_len) {
  return guarded(err, err_len, [&] {
    at::_foreach_mul_(tensors(xs, n), factor);
  });
}

// Drops the gradients of `n` tensors (zero_grad(set_to_none=True)): the next backward writes
// them afresh instead of adding into zeros.
void glatrain_clear_grads(const at::Tensor* const* xs, size_t n) {
  for (size_t i = 0; i < n; ++i) const_cast<at::Tensor*>(xs[i])->mutable_grad().reset();
}

}  // extern "C"

extern "C" {

// The CUDA caching allocator's byte counters of `device`, over all pools: out[0] allocated now,
// out[1] its peak, out[2] reserved now, out[3] its peak. Returns 0, or 1 with a message.
int glatrain_cuda_memory_stats(int device, int64_t* out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    const auto stats = c10::getDeviceAllocator(c10::DeviceType::CUDA)
                           ->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    const auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out[0] = stats.allocated_bytes[all].current;
    out[1] = stats.allocated_bytes[all].peak;
    out[2] = stats.reserved_bytes[all].current;
    out[3] = stats.reserved_bytes[all].peak;
  });
}

// Starts the peaks of glatrain_cuda_memory_stats afresh. Returns 0, or 1 with a message.
int glatrain_cuda_reset_peak(int device, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)
        ->resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// Starts libtorch's Kineto profiler on this thread's CPU ops and, with `cuda`, CUDA kernels.
// Returns 0, or 1 with a message.
int glatrain_profiler_start(int cuda, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    using torch::profiler::impl::ActivityType;
    std::set<ActivityType> activities{ActivityType::CPU};
    if (cuda != 0) activities.insert(ActivityType::CUDA);
    const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, activities);
    torch::autograd::profiler::enableProfiler(config, activities);
  });
}

// One recorded event for the Rust side: its name, whether it ran on a GPU, start and duration.
using ProfilerEventFn = void (*)(void* ctx, const char* name, int on_gpu, uint64_t start_ns,
                                 uint64_t duration_ns);

// Stops the profiler, writes its Chrome trace to `trace_path` (when not null) and hands every
// event to `each`. Returns 0, or 1 with a message.
int glatrain_profiler_stop(const char* trace_path, ProfilerEventFn each, void* ctx, char* err,
                           size_t err_len) {
  return guarded(err, err_len, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    TORCH_CHECK(result, "the profiler was not running");
    for (const auto& e : result->events()) {
      const int on_gpu = e.deviceType() == c10::DeviceType::CUDA ? 1 : 0;
      each(ctx, e.name().c_str(), on_gpu, e.startNs(), e.durationNs());
    }
    if (trace_path != nullptr) result->save(trace_path);
  });
}

}  // extern "C"
