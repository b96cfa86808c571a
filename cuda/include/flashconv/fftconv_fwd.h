// The fused block-FFT causal convolution, forward (docs/kernels.md):
//
//   y[b,h,t] = g_out * m * act( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),  x = g_in * u
//
// m (a float32 dropout mask, (B, H) or (B, H, L)) and act (none, GELU, SiLU) are the optional
// fused epilogue (flashconv/_epilogue.py), applied in fp32 before the one rounding to T.
// One CTA serves one channel h and loops over pairs of batch rows (b, b+1), packed as the
// real and imaginary parts of one complex row z = x_b + i x_{b+1} (k is real, so
// FFT(z) * K = FFT(x_b * k) + i FFT(x_{b+1} * k)). Per pair, all on chip:
//   1. m = max |x| over the pair (block reduction); scale = 2^-e with 2^e >= m
//   2. buf[t] = z[t] * scale for t < N/2 (zeros for L <= t < N/2; t >= N/2 is never read)
//   3. forward stages                       // X = F16 @ X; X = X * tw   (block_fft.h)
//   4. buf[p] *= K[h, p]                    // pointwise, Monarch order, no permutation
//   5. inverse stages, last one to HBM      // X = tw* X; X = conj(F16) @ X
//      z = (Re | Im) * 2^(e + k_exp[h] + stage gains) / N + D x
//      y = g_out * m * act(z)  (the fused epilogue: activation and dropout mask optional;
//      or z itself in float32, the backward's recompute)
// HBM sees u (and gates) and y; K and u's second read come from L2.
//
// Plans (N = smallest power of two >= max(2L, 32); radices, first stage first):
//   N = 32: 16 x 2      64: 16 x 4      128: 16 x 8      256: 16 x 16
//   512: 16 x 16 x 2    1K: x 4         2K: x 8          4K: 16 x 16 x 16
//   8K: 16^3 x 2        16K: 16^3 x 4   32K: 16^3 x 8
// bf16 io: radix-16 stages on tensor cores (fp16 operands, fp32 accumulate), fp16 storage
// in shared memory (4 bytes per complex: N = 32K fits in 128 KB); radix-r stage, twiddles and
// the K product in fp32 registers. python_ref's emulation puts this at 1.03-1.08x the bf16
// output-rounding error. fp32 and fp16 io: every stage in fp32 on CUDA cores with fp32
// storage (8 bytes per complex: N <= 16K): fp16 tensor-core operands would cost fp16 outputs
// 2.3-3.3x their rounding error (same emulation), beyond twice the output rounding error.
// Overflow: an fp16 store above 65504 sets a per-thread flag (OR-reduced per pair) and the
// pair is recomputed with the input scaled down by a further 2^-12 (at most twice);
// non-finite inputs propagate as they would in fp32.
#pragma once

#include <cstdint>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/fwd_tc.h"
#include "flashconv/hw.h"

namespace flashconv {

// Largest FFT size the fused forward kernel serves for io dtype T (one row on chip).
template <class T>
constexpr int64_t kMaxFusedN = kTensorCores<T> ? 32768 : 16384;

// Dynamic shared memory of the forward launch at FFT size N (the smallest N for bfloat16 is
// tc::kMinN: Python rounds N up to it).
template <class T>
constexpr size_t fwd_smem_bytes(int64_t N) {
  if constexpr (kTensorCores<T>) return tc::fwd_smem_bytes(N);
  return size_t(N) * sizeof(StorageFor<T>);
}

// Two CTAs (16 warps) per SM: at most 128 registers. kEpi: the fused epilogue (activation,
// mask, the float32 z output) compiled in; a separate instantiation, so that the plain
// kernel carries none of its code.
template <class T, bool kEpi>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 2) fftconv_fwd_kernel(FwdParams p) {
  using S = StorageFor<T>;
  S* buf = hw::dyn_smem<S>();  // (N,) complex: the packed pair, Monarch order between passes
  FC_SHARED float red[32];

  const int64_t N = p.N, L = p.L, h = hw::block_idx_x();
  const Plan plan = make_plan(N);
  const Dft16Fragments F = kTensorCores<T> ? dft16_fragments() : Dft16Fragments{};
  const float d = p.D ? hw::ldg(p.D + h, "D") : 0.f;
  const int undo_exp = hw::ldg(p.spec.k_exp + h, "k_exp") + Gains<S>::round_trip_exp(plan) - log2_int(N);
  auto x_at = [&](int64_t b, int64_t t, hw::Site at = hw::Site::current()) {
    return gated<T>(load<T>(p.u, b, h, t, "u", at), p.g_in, b, h, t, "g_in", at);
  };

  for (int64_t b0 = 2 * int64_t(hw::block_idx_y()); b0 < p.B; b0 += 2 * int64_t(hw::grid_dim_y())) {
    // 1. the pair's max |x|, for the load scale 2^-e
    hw::region("max");
    float m = 0.f;
    for (int64_t t = hw::thread_idx(); t < L; t += hw::block_dim()) {
      m = max_nan(m, fabsf(x_at(b0, t)));
      if (b0 + 1 < p.B) m = max_nan(m, fabsf(x_at(b0 + 1, t)));
    }
    m = block_reduce<false>(m, red);
    for (int attempt = 0;; ++attempt) {
      const int e = scale_exponent(m) + 12 * attempt;
      int overflow = 0;  // this thread's fp16 stores that overflowed; OR-reduced below
      // 2. z = (x_b0 + i x_b1) * 2^-e, zero-padded to N/2
      hw::region("load");
      load_pair(buf, N, L, p.B, b0, ldexpf(1.f, -e), &overflow, x_at);
      // 3. forward stages: X = F16 @ X; X = X * tw
      block_fft_forward(buf, N, plan, F, &overflow);
      // 4. X = X * K (both in Monarch order)
      multiply_spectrum(buf, p.spec.K + h * N, N, false, &overflow);
      // 5. inverse stages; the last writes y = g_out * (conv + D x) for t < L
      const float undo = ldexpf(1.f, e + undo_exp);
      block_fft_inverse(buf, N, plan, F, &overflow, [&](int64_t t, float re, float im) {
        if (t >= L) return;  // the discarded half
        each_row(b0, p.B, re, im, [&](int64_t b, float conv) {
          float z = conv * undo;
          if (p.D) z += d * x_at(b, t);
          if constexpr (kEpi) {
            if (p.z.p) store<float>(p.z, b, h, t, z, "z");
            if (!p.y.p) return;  // z only
            z = epilogue(z, p.act, p.mask, b, h, t);
          }
          store<T>(p.y, b, h, t, gated<T>(z, p.g_out, b, h, t, "g_out"), "y");
        });
      });
      // An overflowed fp16 store was clamped: redo the pair at a smaller scale.
      hw::region("overflow");
      const bool any_overflow = block_reduce<false>(float(overflow), red) > 0.f;
      if (!(any_overflow && finite(m) && attempt < 2)) break;
    }
  }
}

// Launch on `stream` (grid: pair_grid). Python never asks for an unsupported size. bfloat16
// goes to the tensor-core kernel of fwd_tc.h.
template <class T>
hw::Error fftconv_fwd_launch(const FwdParams& p, int num_sms, hw::Stream stream) {
  if constexpr (kTensorCores<T>) {
    return fftconv_fwd_tc_launch(p, num_sms, stream);
  } else {
    if (p.N < 32 || p.N > kMaxFusedN<T> || (p.N & (p.N - 1)) || 2 * p.L > p.N || p.H > 0x7fffffff)
      return hw::ErrorInvalidValue;
    if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
    const hw::Grid grid = pair_grid(p.B, p.H, num_sms);
    if (p.act || p.mask.p || p.z.p)
      return hw::launch(fftconv_fwd_kernel<T, true>, grid, kThreads, fwd_smem_bytes<T>(p.N), stream, p);
    return hw::launch(fftconv_fwd_kernel<T, false>, grid, kThreads, fwd_smem_bytes<T>(p.N), stream, p);
  }
}

}  // namespace flashconv
