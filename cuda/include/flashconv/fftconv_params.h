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

// A (B, H, L) tensor of the io dtype: data pointer (null if absent) and strides in elements.
struct View3 {
  const void* p;
  int64_t sb, sh, st;
};
struct MutView3 {
  void* p;
  int64_t sb, sh, st;
};

// The kernel spectrum every pass shares: (H, N) in the plan's Monarch order, scaled per
// channel by 2^-k_exp[h] so that max |K| <= 1.
//   K    complex fp32, Monarch order (the fp32-storage kernels)
//   K16  fp16, the bfloat16 tensor-core forward's fragment order (flashconv/plan.py:
//        fragment_order): per channel and 256-element group, 256 real parts then 256
//        imaginary parts, each lane's 8 values contiguous; null where not used
struct Spectrum {
  const cf32* K;
  const int32_t* k_exp;  // (H,)
  const uint16_t* K16 = nullptr;
};

struct FwdParams {
  View3 u, g_in, g_out;  // gates may be absent
  MutView3 y;
  Spectrum spec;
  const float* D;  // (H,) or null
  int64_t B, H, L, N;
};

// Gradients of y = g_out * (conv(x, k) + D x), x = g_in * u, given dy.
struct BwdParams {
  View3 u, g_in, g_out, dy;
  MutView3 du, dg_in, dg_out;  // dg_in / dg_out null when not wanted (or gate absent)
  Spectrum spec;
  const float* D;  // (H,) or null
  float* dk;       // (H, lk) float32, accumulated (+=): zero it first
  float* dD;       // (H,) float32, accumulated (+=), or null
  // Bidirectional convolution: the anti-causal kernel's gradient (H, lk_rev), accumulated,
  // or null. (Its spectrum is already part of spec: K = FFT(k) + conj(FFT(k_rev)).)
  float* dk_rev;
  int64_t B, H, L, N, lk, lk_rev;
};

}  // namespace flashconv
