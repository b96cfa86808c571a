// Pieces the fused forward and backward kernels share: tensor access through View3, block
// reductions, the pair scale, and the storage choice per io dtype.
#pragma once

#include <cstdint>
#include <type_traits>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv {

constexpr int kThreads = 256;  // per CTA, both kernels

// Tensor cores (and fp16 storage between stages) for bf16 io only: fp16 tensor-core
// operands would cost fp16 outputs 2.3-3.3x their rounding error (python_ref's emulation),
// beyond the 2x allowed; fp32 io needs fp32 accuracy. Those run fp32 stages.
template <class T>
constexpr bool kTensorCores = std::is_same_v<T, bf16_t>;

template <class T>
using StorageFor = std::conditional_t<kTensorCores<T>, cf16, cf32>;

// Element (b, h, t) of a (B, H, L) tensor named `tensor` (for the counters).
template <class T>
FC_DEVICE float load(const View3& v, int64_t b, int64_t h, int64_t t, const char* tensor,
                     hw::Site at = hw::Site::current()) {
  return hw::to_float(hw::ldg(static_cast<const T*>(v.p) + (b * v.sb + h * v.sh + t * v.st), tensor, at));
}

template <class T>
FC_DEVICE void store(const MutView3& v, int64_t b, int64_t h, int64_t t, float x,
                     const char* tensor, hw::Site at = hw::Site::current()) {
  hw::stg(static_cast<T*>(v.p) + (b * v.sb + h * v.sh + t * v.st), hw::from_float<T>(x), tensor, at);
}

// Element (b, h, t) of a present gate: the io dtype T, or float32 where gate.f32.
template <class T>
FC_DEVICE float gate_at(const View3& gate, int64_t b, int64_t h, int64_t t, const char* tensor,
                        hw::Site at = hw::Site::current()) {
  return gate.f32 ? load<float>(gate, b, h, t, tensor, at) : load<T>(gate, b, h, t, tensor, at);
}

// a * b where b is an optional gate (absent: 1).
template <class T>
FC_DEVICE float gated(float a, const View3& gate, int64_t b, int64_t h, int64_t t,
                      const char* tensor, hw::Site at = hw::Site::current()) {
  return gate.p ? a * gate_at<T>(gate, b, h, t, tensor, at) : a;
}

// The activation of the fused epilogue (fftconv_params.h: Activation), in fp32: GELU in its
// exact form z Phi(z) = z erfc(-z / sqrt 2) / 2 (no cancellation for negative z), SiLU
// z / (1 + e^-z) (a hardware reciprocal: no division routine; 2 ulp, and 0 where e^-z
// overflows, where the exact value is below float's range anyway).
FC_DEVICE float activate(float z, int act) {
  if (act == kActGelu) return 0.5f * z * erfcf(z * -0.707106781186547524f);
#if defined(__CUDACC__)
  if (act == kActSilu) return __fdividef(z, 1.f + expf(-z));
#else
  if (act == kActSilu) return z / (1.f + expf(-z));
#endif
  return z;
}

// The fused epilogue before g_out: y = m * act(z) (m: the optional float32 dropout mask).
FC_DEVICE float epilogue(float z, int act, const View3& mask, int64_t b, int64_t h, int64_t t,
                         hw::Site at = hw::Site::current()) {
  const float a = activate(z, act);
  return mask.p ? a * load<float>(mask, b, h, t, "mask", at) : a;
}

// NaN-propagating max, so a NaN input is seen by the reduction.
FC_DEVICE float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// Block-wide max (NaN-propagating) or sum; `red` is 32 floats of shared memory. Ends with a
// barrier, so red (and anything else the block wrote before) is free afterwards.
template <bool kSum>
FC_DEVICE float block_reduce(float v, float* red) {
  FC_UNROLL
  for (int off = 16; off > 0; off >>= 1) {
    const float o = hw::shfl_xor(v, off);
    v = kSum ? v + o : max_nan(v, o);
  }
  if (hw::lane_id() == 0) hw::sts(red + hw::warp_id(), v);
  hw::sync_block();
  float r = 0.f;
  for (int w = 0; w < hw::block_dim() / 32; ++w) {
    const float o = hw::lds(red + w);
    r = kSum ? r + o : max_nan(r, o);
  }
  hw::sync_block();
  return r;
}

// Exponent e with m < 2^e (0 for m = 0 or non-finite m): rows are scaled by 2^-e on load.
FC_DEVICE int scale_exponent(float m) {
  int e = 0;
  if (finite(m) && m > 0.f) frexpf(m, &e);
  return e;
}

FC_DEVICE int log2_int(int64_t N) {
  int l = 0;
  while ((int64_t(1) << l) < N) ++l;
  return l;
}

// Loads rows b0 and b0+1 (if < B) of f(b, t) * scale, packed as re/im, into buf[0, N/2)
// (zeros for t >= L). f reads global memory.
template <class S, class F>
FC_DEVICE void load_pair(S* buf, int64_t N, int64_t L, int64_t B, int64_t b0, float scale,
                         int* overflow, const F& f) {
  for (int64_t t = hw::thread_idx(); t < N / 2; t += hw::block_dim()) {
    float re = 0.f, im = 0.f;
    if (t < L) {
      re = f(b0, t) * scale;
      if (b0 + 1 < B) im = f(b0 + 1, t) * scale;
    }
    store_c(slot(buf, t), re, im, overflow);
  }
  hw::sync_block();
}

// X = X * K (or * conj(K)) over a row of N in shared memory, both in Monarch order, in
// fp32 registers; then a barrier.
template <class S>
FC_DEVICE void multiply_spectrum(S* buf, const cf32* K, int64_t N, bool conj_k, int* overflow) {
  hw::region("multiply");
  for (int64_t i = hw::thread_idx(); i < N; i += hw::block_dim()) {
    float re, im;
    load_c(slot(buf, i), re, im);
    const cf32 k = hw::ldg(K + i, "K");
    cmul(re, im, k.re, conj_k ? -k.im : k.im);
    store_c(slot(buf, i), re, im, overflow);
  }
  hw::sync_block();
}

// f(b, value) for the packed pair's rows that exist: b0 (re) and b0 + 1 (im) when < B.
template <class F>
FC_DEVICE void each_row(int64_t b0, int64_t B, float re, float im, const F& f) {
  f(b0, re);
  if (b0 + 1 < B) f(b0 + 1, im);
}

// Grid (H, work items per channel): enough CTAs per channel to fill `num_sms` SMs about 4
// times over, each CTA looping over its items (K and the DFT fragments loaded once per CTA).
FC_HOST_DEVICE hw::Grid channel_grid(int64_t H, int64_t items, int num_sms) {
  int64_t want = (4 * int64_t(num_sms) + H - 1) / H;
  if (want > items) want = items;
  if (want > 65535) want = 65535;
  if (want < 1) want = 1;
  hw::Grid g;
  g.x = int(H);
  g.y = int(want);
  return g;
}

// The pair kernels' grid: items are pairs of batch rows.
FC_HOST_DEVICE hw::Grid pair_grid(int64_t B, int64_t H, int num_sms) {
  return channel_grid(H, (B + 1) / 2, num_sms);
}

}  // namespace flashconv
