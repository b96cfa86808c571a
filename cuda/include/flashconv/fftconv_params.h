// Plain-old-data parameters of the fused FFT convolution kernels (no CUDA types, no torch):
// pointers, sizes and strides in elements. The binding fills it from Python integers after
// Python has validated shapes, dtypes and devices.
#pragma once
#include <cstdint>

namespace flashconv {

// Complex values in global and shared memory.
struct cf32 {
  float re, im;
};

// Data type codes shared with Python (flashconv/ops.py: _DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct FwdParams {
  // (B, H, L) tensors of the io dtype; g_in and g_out may be null.
  const void* u;
  const void* g_in;
  const void* g_out;
  void* y;
  // (H, N) kernel spectrum in the plan's Monarch order, scaled per channel by 2^-k_exp[h] so
  // that max |K| <= 1 (the tensor-core path stores fp16 between stages; see fftconv_fwd.h).
  const cf32* K;
  const int32_t* k_exp;  // (H,)
  const float* D;        // (H,) or null
  int64_t B, H, L, N;
  int64_t u_sb, u_sh, u_st;  // strides of u, in elements
  int64_t gi_sb, gi_sh, gi_st;
  int64_t go_sb, go_sh, go_st;
  int64_t y_sb, y_sh, y_st;
};

}  // namespace flashconv
