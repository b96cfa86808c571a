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
// f32: the data are float32 instead (the dropout mask always; g_out in the backward of a call
// with an epilogue, where it carries the float32 factor g_out * mask * act'(z)).
struct View3 {
  const void* p;
  int64_t sb, sh, st;
  bool f32 = false;
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

// The fused epilogue (flashconv/_epilogue.py) between D x and g_out: y = g_out * m * act(z).
enum Activation : int { kActNone = 0, kActGelu = 1, kActSilu = 2 };

struct FwdParams {
  View3 u, g_in, g_out;  // gates may be absent
  MutView3 y;            // null: not written (z only)
  Spectrum spec;
  const float* D;  // (H,) or null
  int64_t B, H, L, N;
  int act = kActNone;  // Activation
  View3 mask{};        // float32 dropout mask, (B, H, L) strides (st = 0 for a (B, H) mask), or null
  MutView3 z{};        // float32 pre-activation z = conv + D x (B, H, L), or null (the backward's recompute)
};

// Gradients of y = g_out * (conv(x, k) + D x), x = g_in * u, given dy. With an epilogue the
// caller passes g_out = g_out * m * act'(z) as float32 (g_out.f32) and computes dg_out itself.
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
