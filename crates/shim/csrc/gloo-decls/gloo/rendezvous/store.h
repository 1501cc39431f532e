// The gloo names that torch's ProcessGroupGloo.hpp mentions, declared as that header uses them.
//
// The torch wheel ships ProcessGroupGloo.hpp but not gloo's own headers. The shim only
// constructs the process group (its constructor, destructor and collectives live in
// libtorch_cpu) and calls it through c10d::Backend, so it needs gloo's names, never gloo's
// definitions: pointers to `Context`, `transport::Device` and `transport::UnboundBuffer`, the
// `rendezvous::Store` interface that the header's inline `GlooStore` overrides (never
// instantiated here), and `Context::setTimeout`, called by an inline method the shim never calls.
// The other gloo headers ProcessGroupGloo.hpp includes forward to this one.
#pragma once

#include <chrono>
#include <string>
#include <vector>

namespace gloo {

class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};

namespace transport {
class Device;
class UnboundBuffer;
}  // namespace transport

namespace rendezvous {
class Store {
 public:
  virtual ~Store() = default;
  virtual void set(const std::string& key, const std::vector<char>& data) = 0;
  virtual std::vector<char> get(const std::string& key) = 0;
  virtual void wait(const std::vector<std::string>& keys) = 0;
  virtual void wait(const std::vector<std::string>& keys,
                    const std::chrono::milliseconds& timeout) = 0;
};
}  // namespace rendezvous

}  // namespace gloo
