// How the shim's entry points report failures: a NUL-terminated message in a caller buffer.

#pragma once

#include <c10/util/Exception.h>

#include <cstddef>
#include <cstring>
#include <exception>

namespace glatrain {

// Fills a caller buffer with a NUL-terminated message (truncated to fit).
inline void write_error(char* buf, size_t len, const char* msg) {
  if (buf == nullptr || len == 0) return;
  std::strncpy(buf, msg, len - 1);
  buf[len - 1] = '\0';
}

// Runs `body`; returns 0, or 1 with what it threw in `err` (a c10::Error without its C++
// backtrace).
template <typename F>
int guarded(char* err, size_t err_len, F body) {
  try {
    body();
    return 0;
  } catch (const c10::Error& e) {
    write_error(err, err_len, e.what_without_backtrace());
  } catch (const std::exception& e) {
    write_error(err, err_len, e.what());
  } catch (...) {
    write_error(err, err_len, "an unknown C++ exception");
  }
  return 1;
}

}  // namespace glatrain
