// c10d process groups for data-parallel training (glatrain_shim::process_group): rendezvous
// through a TCPStore, then libtorch's ProcessGroupGloo, called through the c10d::Backend
// interface so that another backend (NCCL) only changes how the group is made.
//
// Every entry point catches what libtorch throws and returns it as a message (for c10::Error
// without its C++ backtrace).

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <chrono>
#include <cstring>
#include <string>
#include <vector>

namespace {

// c10's log level that lets only fatal messages through.
constexpr int kQuietLogLevel = 3;

void write_message(char* buf, size_t len, const char* msg) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

// Runs `body`; returns 0, or 1 with what it threw in `err`.
template <typename F>
int guarded(char* err, size_t err_len, F body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_message(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_message(err, err_len, e.what());
  } catch (...) {
    write_message(err, err_len, "an unknown C++ exception");
  }
  return 1;
}

}  // namespace

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

extern "C" {

// Joins the group of `world` processes as `rank`: the store at `master_host`:`port` is served by
// this process when `serve_store` is non-zero (rank 0), else connected to (retrying until
// `timeout_ms`); then all build a Gloo group, its keys under "glatrain/" in the store, whose
// collectives fail after `timeout_ms`. Gloo's transport binds to the interface `iface` when
// it is not empty, else to the address of `hostname` when that is not empty, else to this
// machine's hostname (loopback if it does not resolve). Returns the group, or null with a message.
GlatrainProcessGroup* glatrain_pg_gloo_new(const char* master_host, int port, int serve_store,
                                           int rank, int world, int64_t timeout_ms,
                                           const char* iface,
                                           const char* hostname, char* err, size_t err_len) {
  GlatrainProcessGroup* out = nullptr;
  guarded(err, err_len, [&] {
    TORCH_CHECK(port > 0 && port < 65536, "port ", port, " is not a TCP port");
    const std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions store_opts;
    store_opts.port = static_cast<std::uint16_t>(port);
    store_opts.isServer = serve_store != 0;
    store_opts.numWorkers = world;
    store_opts.waitWorkers = true;
    store_opts.timeout = timeout;
    // Ranks that start before rank 0 serves the store retry until the timeout; libtorch logs
    // every failed try (with a C++ backtrace), and only the outcome matters: quiet it meanwhile.
    const int log_level = FLAGS_caffe2_log_level;
    FLAGS_caffe2_log_level = kQuietLogLevel;
    c10::intrusive_ptr<c10d::Store> store;
    try {
      store = c10::make_intrusive<c10d::TCPStore>(std::string(master_host), store_opts);
    } catch (...) {
      FLAGS_caffe2_log_level = log_level;
      throw;
    }
    FLAGS_caffe2_log_level = log_level;
    auto opts = c10d::ProcessGroupGloo::Options::create(timeout);
    if (iface != nullptr && iface[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(iface));
    } else if (hostname != nullptr && hostname[0] != '\0') {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname(hostname));
    } else {
      opts->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
    }
    // Apart from the keys of whoever else uses the store (torchrun's agent).
    store = c10::make_intrusive<c10d::PrefixStore>("glatrain", store);
    auto backend = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, opts);
    out = new GlatrainProcessGroup{store, backend};
  });
  return out;
}

void glatrain_pg_free(GlatrainProcessGroup* pg) { delete pg; }

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
    std::vector<c10::intrusive_ptr<c10d::Work>> pending;
    pending.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*tensors[i]};
      pending.push_back(pg->backend->allreduce(one, opts));
    }
    for (auto& work : pending) work->wait();
  });
}

// Copies each of the `n` tensors of rank `root` into the same tensors of every other rank.
int glatrain_pg_broadcast(GlatrainProcessGroup* pg, const at::Tensor* const* tensors, size_t n,
                          int root, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    std::vector<c10::intrusive_ptr<c10d::Work>> pending;
    pending.reserve(n);
    for (size_t i = 0; i < n; ++i) {
      std::vector<at::Tensor> one{*tensors[i]};
      pending.push_back(pg->backend->broadcast(one, opts));
    }
    for (auto& work : pending) work->wait();
  });
}

// Returns once every rank of the group has called it.
int glatrain_pg_barrier(GlatrainProcessGroup* pg, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { pg->backend->barrier()->wait(); });
}

}  // extern "C"
