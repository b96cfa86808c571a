// Error plumbing shared by the launchers and the binding.
// Launchers never throw or exit: they return cudaError_t upward; FC_CHECK_RETURN adds
// nothing but an early return, and the binding turns an error into a Python exception
// that names the kernel (flashconv::Error carries the name).
#pragma once
#include <cuda_runtime_api.h>

#include <stdexcept>
#include <string>

#define FC_CHECK_RETURN(expr)                    \
  do {                                           \
    cudaError_t fc_err_ = (expr);                \
    if (fc_err_ != cudaSuccess) return fc_err_;  \
  } while (0)

namespace flashconv {

// Raised (as RuntimeError in Python) when a launch or a CUDA call fails.
inline void throw_on_error(cudaError_t err, const char* what, const char* file, int line) {
  if (err == cudaSuccess) return;
  throw std::runtime_error(std::string("flashconv: ") + what + " failed: " +
                           cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ") at " +
                           file + ":" + std::to_string(line));
}

}  // namespace flashconv

#define FC_THROW_ON_ERROR(expr, what) ::flashconv::throw_on_error((expr), (what), __FILE__, __LINE__)
