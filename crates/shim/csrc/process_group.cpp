// c10d process groups for data-parallel training (glatrain_shim::process_group): rendezvous
// through a TCPStore, then libtorch's ProcessGroupGloo (CPU tensors) or ProcessGroupNCCL (CUDA
// tensors), both called through the c10d::Backend interface so that the backend only changes how
// the group is made.
//
// Every entry point catches what libtorch throws and returns it as a message (for c10::Error
// without its C++ backtrace).

#include "guarded.h"

#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

using glatrain::guarded;

namespace {

// c10's log level that lets only fatal messages through.
constexpr int kQuietLogLevel = 3;

}  // namespace

// Where a rank meets the others and how long anything may wait (the Rust side's repr(C)
// `RawRendezvous`).
struct GlatrainRendezvous {
  const char* master_host;
  int port;
  int serve_store;
  int rank;
  int world;
  int64_t timeout_ms;
};

// One process's membership in a group: the store it met the others through and the backend
// that runs the collectives.
struct GlatrainProcessGroup {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
};

// A store this process serves for others.
struct GlatrainStore {
  c10::intrusive_ptr<c10d::TCPStore> store;
};

// Averages the gradients of `params` over the group while the backward runs, DDP's reducer
// design: the parameters are grouped into buckets; a hook on each parameter (run by autograd once
// its gradient is accumulated) counts down its bucket, and a complete bucket is flattened and its
// all-reduce started, buckets strictly in order so that every rank issues the same collectives in
// the same sequence. Only an armed backward (the step's last micro-batch) counts; `finish` starts
// what is left (parameters that got no gradient this time), waits, and writes the means back.
struct GlatrainGradReducer {
  c10::intrusive_ptr<c10d::Backend> backend;
  std::vector<at::Tensor> params;
  std::vector<std::vector<size_t>> buckets;
  std::vector<size_t> bucket_of;
  std::mutex mutex;
  bool armed = false;
  std::vector<size_t> waiting;  // per bucket: gradients still to come in this backward
  size_t next = 0;              // the next bucket to start
  std::vector<at::Tensor> flat;  // per started bucket: its gradients, flattened
  std::vector<std::vector<size_t>> members;  // per started bucket: the parameters in `flat`
  std::vector<c10::intrusive_ptr<c10d::Work>> works;

  // Starts bucket `b`'s all-reduce over the gradients its parameters have. Under `mutex`.
  void start(size_t b) {
    std::vector<at::Tensor> parts;
    std::vector<size_t> present;
    for (size_t i : buckets[b]) {
      const at::Tensor& g = params[i].grad();
      if (!g.defined()) continue;
      parts.push_back(g.reshape({-1}));
      present.push_back(i);
    }
    members.push_back(present);
    if (parts.empty()) {
      flat.emplace_back();
      works.emplace_back();
      return;
    }
    std::vector<at::Tensor> one{at::cat(parts)};
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    works.push_back(backend->allreduce(one, opts));
    flat.push_back(one[0]);
  }

  // Parameter `i`'s gradient is accumulated.
  void ready(size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed) return;
    const size_t b = bucket_of[i];
    if (waiting[b] > 0) --waiting[b];
    while (next < buckets.size() && waiting[next] == 0) start(next++);
  }
};

namespace {

struct ReadyHook : torch::autograd::PostAccumulateGradHook {
  GlatrainGradReducer* reducer;
  size_t index;
  ReadyHook(GlatrainGradReducer* r, size_t i) : reducer(r), index(i) {}
  void operator()(const torch::autograd::Variable& /*param*/) override {
    reducer->ready(index);
  }
};

// Meets the other `r.world` processes through the store at `r.master_host`:`r.port`, served by
// this process when `r.serve_store` is nonzero (rank 0), else connected to (retrying until the
// timeout). The group's keys go under "glatrain/", apart from those of whoever else uses the
// store (torchrun's agent).
c10::intrusive_ptr<c10d::Store> rendezvous_store(const GlatrainRendezvous& r) {
  TORCH_CHECK(r.port > 0 && r.port < 65536, "port ", r.port, " is not a TCP port");
  c10d::TCPStoreOptions store_opts;
  store_opts.port = static_cast<std::uint16_t>(r.port);
  store_opts.isServer = r.serve_store != 0;
  store_opts.numWorkers = r.world;
  store_opts.waitWorkers = true;
  store_opts.timeout = std::chrono::milliseconds(r.timeout_ms);
  // Ranks that start before rank 0 serves the store retry until the timeout; libtorch logs
  // every failed try (with a C++ backtrace), and only the outcome matters: quiet it meanwhile.
  const int log_level = FLAGS_caffe2_log_level;
  FLAGS_caffe2_log_level = kQuietLogLevel;
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(std::string(r.master_host), store_opts);
  } catch (...) {
    FLAGS_caffe2_log_level = log_level;
    throw;
  }
  FLAGS_caffe2_log_level = log_level;
  return c10::make_intrusive<c10d::PrefixStore>("glatrain", store);
}

// Runs `collective` on each of the `n` tensors alone, queuing all of them before the first wait.
template <typename Collective>
void each_then_wait(const at::Tensor* const* tensors, size_t n, Collective collective) {
  std::vector<c10::intrusive_ptr<c10d::Work>> pending;
  pending.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> one{*tensors[i]};
    pending.push_back(collective(one));
  }
  for (auto& work : pending) work->wait();
}

}  // namespace

extern "C" {

// Joins the group of `r->world` processes as `r->rank` (see rendezvous_store), then all build a
// Gloo group whose collectives fail after `r->timeout_ms`. Gloo's transport binds to the
// interface `iface` when it is not empty, else to the address of `hostname` when that is not
// empty, else to this machine's hostname (loopback if it does not resolve). Returns the group, or
// null with a message.
GlatrainProcessGroup* glatrain_pg_gloo_new(const GlatrainRendezvous* r, const char* iface,
                                           const char* hostname, char* err, size_t err_len) {
  GlatrainProcessGroup* out = nullptr;
  guarded(err, err_len, [&] {
    auto store = rendezvous_store(*r);
    auto opts =
        c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(r->timeout_ms));
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, r->rank, r->world, opts);
    out = new GlatrainProcessGroup{store, backend};
  });
  return out;
}

// Joins the group of `r->world` processes as `r->rank` (see rendezvous_store), then all build an
// NCCL group on CUDA device `cuda_index` (one device per rank), its communicator made now so that
// a failure shows here rather than in the first collective. A collective not done within
// `r->timeout_ms` is ended by libtorch's NCCL watchdog. Returns the group, or null with a
// message.
GlatrainProcessGroup* glatrain_pg_nccl_new(const GlatrainRendezvous* r, int cuda_index, char* err,
                                           size_t err_len) {
  GlatrainProcessGroup* out = nullptr;
  guarded(err, err_len, [&] {
    const int visible = c10::cuda::device_count();
    TORCH_CHECK(cuda_index >= 0 && cuda_index < visible, "CUDA device ", cuda_index,
                " does not exist (", visible, " visible)");
    auto store = rendezvous_store(*r);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    opts->timeout = std::chrono::milliseconds(r->timeout_ms);
    auto backend = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, r->rank, r->world, opts);
    const at::Device device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_index));
    backend->setBoundDeviceId(device);
    backend->eagerConnectSingleDevice(device);
    out = new GlatrainProcessGroup{store, backend};
  });
  return out;
}

// Shuts the backend down (NCCL's frees its communicators; it warns when destroyed without) and
// frees the group. Nothing is left to report a failure to: it is dropped.
void glatrain_pg_free(GlatrainProcessGroup* pg) {
  try {
    pg->backend->shutdown();
  } catch (...) {
  }
  delete pg;
}

// Serves a TCPStore on `port` of every interface (0: a free port, chosen atomically by the bind)
// for ranks that all connect to it as clients, as torchrun's agent does. Returns the store, or
// null with a message (the port is taken).
GlatrainStore* glatrain_store_serve(int port, int64_t timeout_ms, char* err, size_t err_len) {
  GlatrainStore* out = nullptr;
  guarded(err, err_len, [&] {
    TORCH_CHECK(port >= 0 && port < 65536, "port ", port, " is not a TCP port");
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<std::uint16_t>(port);
    opts.isServer = true;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    out = new GlatrainStore{c10::make_intrusive<c10d::TCPStore>("127.0.0.1", opts)};
  });
  return out;
}

// The port a served store listens on.
int glatrain_store_port(GlatrainStore* store) { return store->store->getPort(); }

void glatrain_store_free(GlatrainStore* store) { delete store; }

// Sums each of the `n` tensors over the group in place (each one contiguous and of the same
// shape on every rank). All reductions are queued before the first wait.
int glatrain_pg_all_reduce_sum(GlatrainProcessGroup* pg, const at::Tensor* const* tensors,
                               size_t n, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::AllreduceOptions opts;
    opts.reduceOp = c10d::ReduceOp::SUM;
    each_then_wait(tensors, n, [&](std::vector<at::Tensor>& one) {
      return pg->backend->allreduce(one, opts);
    });
  });
}

// Copies each of the `n` tensors of rank `root` into the same tensors of every other rank.
int glatrain_pg_broadcast(GlatrainProcessGroup* pg, const at::Tensor* const* tensors, size_t n,
                          int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    each_then_wait(tensors, n, [&](std::vector<at::Tensor>& one) {
      return pg->backend->broadcast(one, opts);
    });
  });
}

// A reducer over the `n` leaf tensors `params` (the same on every rank, in the same order) in
// buckets of about `bucket_bytes`, the last parameters first (the order the backward produces
// their gradients in). Installs its hooks on them; null with a message on failure.
GlatrainGradReducer* glatrain_reducer_new(GlatrainProcessGroup* pg, const at::Tensor* const* params,
                                          size_t n, size_t bucket_bytes, char* err,
                                          size_t err_len) {
  std::unique_ptr<GlatrainGradReducer> r(new GlatrainGradReducer);
  const int rc = guarded(err, err_len, [&] {
    r->backend = pg->backend;
    for (size_t i = 0; i < n; ++i) r->params.push_back(*params[i]);
    r->bucket_of.assign(n, 0);
    size_t held = 0;
    for (size_t k = n; k-- > 0;) {
      const at::Tensor& p = r->params[k];
      TORCH_CHECK(p.is_leaf() && p.requires_grad(), "parameter ", k, " is not a trainable leaf");
      const size_t bytes = p.numel() * p.element_size();
      const bool fits = !r->buckets.empty() && held + bytes <= bucket_bytes &&
                        r->params[r->buckets.back().front()].scalar_type() == p.scalar_type();
      if (!fits) {
        r->buckets.emplace_back();
        held = 0;
      }
      r->buckets.back().push_back(k);
      r->bucket_of[k] = r->buckets.size() - 1;
      held += bytes;
    }
    for (size_t i = 0; i < n; ++i) {
      torch::autograd::impl::set_post_acc_grad_hooks(
          r->params[i], std::make_unique<ReadyHook>(r.get(), i));
    }
  });
  return rc == 0 ? r.release() : nullptr;
}

// Counts the gradients of the next backward (the step's last micro-batch).
void glatrain_reducer_arm(GlatrainGradReducer* r) {
  std::lock_guard<std::mutex> lock(r->mutex);
  r->armed = true;
  r->next = 0;
  r->waiting.clear();
  for (const auto& b : r->buckets) r->waiting.push_back(b.size());
  r->flat.clear();
  r->members.clear();
  r->works.clear();
}

// After the armed backward: starts the buckets not started yet, waits for all, and replaces each
// gradient by its sum over the ranks divided by `divisor`. Returns 0, or 1 with a message.
int glatrain_reducer_finish(GlatrainGradReducer* r, double divisor, char* err, size_t err_len) {
  std::lock_guard<std::mutex> lock(r->mutex);
  r->armed = false;
  return guarded(err, err_len, [&] {
    while (r->next < r->buckets.size()) r->start(r->next++);
    for (auto& work : r->works) {
      if (work) work->wait();
    }
    at::NoGradGuard no_grad;
    for (size_t b = 0; b < r->flat.size(); ++b) {
      if (!r->flat[b].defined()) continue;
      r->flat[b].div_(divisor);
      int64_t offset = 0;
      for (size_t i : r->members[b]) {
        at::Tensor g = r->params[i].grad();
        const int64_t count = g.numel();
        g.copy_(r->flat[b].narrow(0, offset, count).view_as(g));
        offset += count;
      }
    }
    r->flat.clear();
    r->works.clear();
  });
}

// Buckets whose all-reduce has started since the last arm (0 after `finish`).
size_t glatrain_reducer_started(GlatrainGradReducer* r) {
  std::lock_guard<std::mutex> lock(r->mutex);
  return r->works.size();
}

// Removes the hooks and frees the reducer.
void glatrain_reducer_free(GlatrainGradReducer* r) {
  for (const auto& p : r->params) torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  delete r;
}

// Returns once every rank of the group has called it.
int glatrain_pg_barrier(GlatrainProcessGroup* pg, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { pg->backend->barrier()->wait(); });
}

}  // extern "C"
