// The fused block-FFT causal convolution, forward (DESIGN.md section 3):
//
//   y[b,h,t] = g_out * ( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),  x = g_in * u
//
// One CTA serves one channel h and loops over pairs of batch rows (b, b+1), packed as the
// real and imaginary parts of one complex row z = x_b + i x_{b+1} (k is real, so
// FFT(z) * K = FFT(x_b * k) + i FFT(x_{b+1} * k)). Per pair, all on chip:
//   1. m = max |x| over the pair (block reduction); scale = 2^-e with 2^e >= m
//   2. buf[t] = z[t] * scale for t < N/2 (zeros for L <= t < N/2; t >= N/2 is never read)
//   3. forward stages                       // X = F16 @ X; X = X * tw   (block_fft.h)
//   4. buf[p] *= K[h, p]                    // pointwise, Monarch order, no permutation
//   5. inverse stages, last one to HBM      // X = tw* X; X = conj(F16) @ X
//      y = (Re | Im) * 2^(e + k_exp[h] + stage gains) / N + D x, times g_out
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
// 2.3-3.3x their rounding error (same emulation), beyond DESIGN section 6's 2x rule.
// Overflow: an fp16 store above 65504 sets a per-thread flag (OR-reduced per pair) and the
// pair is recomputed with the input scaled down by a further 2^-12 (at most twice);
// non-finite inputs propagate as they would in fp32.
#pragma once

#include <cstdint>
#include <type_traits>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv {

constexpr int kFwdThreads = 256;

// Tensor cores (and fp16 storage between stages) for bf16 io only; see the header comment.
template <class T>
constexpr bool kTensorCores = std::is_same_v<T, bf16_t>;

template <class T>
using StorageFor = std::conditional_t<kTensorCores<T>, cf16, cf32>;

// Largest FFT size the fused kernel serves for io dtype T.
template <class T>
constexpr int64_t kMaxFusedN = kTensorCores<T> ? 32768 : 16384;

template <class T>
constexpr size_t fwd_smem_bytes(int64_t N) {
  return size_t(N) * sizeof(StorageFor<T>);
}

// NaN-propagating max, so a NaN input is seen by the reduction.
FC_DEVICE float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

FC_DEVICE float block_max(float v, float* red) {
  FC_UNROLL
  for (int off = 16; off > 0; off >>= 1) v = max_nan(v, hw::shfl_xor(v, off));
  if (hw::lane_id() == 0) red[hw::warp_id()] = v;
  hw::sync_block();
  const int nwarps = hw::block_dim() / 32;
  float m = 0.f;
  for (int w = 0; w < nwarps; ++w) m = max_nan(m, red[w]);
  hw::sync_block();  // red is reused by the next reduction
  return m;
}

// x = g_in * u at (b, t) of channel h, in fp32.
template <class T>
FC_DEVICE float load_x(const FwdParams& p, int64_t b, int64_t h, int64_t t) {
  float x = hw::to_float(static_cast<const T*>(p.u)[b * p.u_sb + h * p.u_sh + t * p.u_st]);
  if (p.g_in) x *= hw::to_float(static_cast<const T*>(p.g_in)[b * p.gi_sb + h * p.gi_sh + t * p.gi_st]);
  return x;
}

// Epilogue of the last inverse stage: time index n, packed value (re: row b0, im: row b1).
template <class T>
struct StoreOutput {
  const FwdParams* p;
  int64_t h, b0;
  float undo, d;
  FC_DEVICE void operator()(int64_t n, float re, float im) const {
    if (n >= p->L) return;  // the discarded half: t >= L
    write(b0, n, re);
    if (b0 + 1 < p->B) write(b0 + 1, n, im);
  }
  FC_DEVICE void write(int64_t b, int64_t n, float conv) const {
    float y = conv * undo;
    if (p->D) y += d * load_x<T>(*p, b, h, n);
    if (p->g_out)
      y *= hw::to_float(static_cast<const T*>(p->g_out)[b * p->go_sb + h * p->go_sh + n * p->go_st]);
    static_cast<T*>(p->y)[b * p->y_sb + h * p->y_sh + n * p->y_st] = hw::from_float<T>(y);
  }
};

template <class T>
FC_GLOBAL void fftconv_fwd_kernel(FwdParams p) {
  using S = StorageFor<T>;
  S* buf = hw::dyn_smem<S>();  // (N,) complex: the packed pair, Monarch order between passes
  FC_SHARED float red[32];

  const int64_t N = p.N, L = p.L, h = hw::block_idx_x();
  const Plan plan = make_plan(N);
  const int tid = hw::thread_idx(), nthreads = hw::block_dim();
  // Gains undone at the end: 1/4 per tensor-core radix-16 stage, 1/2 for r in {4, 8}.
  const float last_scale = (kTensorCores<T> && plan.r > 2) ? 0.5f : 1.f;
  const int stage_exp = kTensorCores<T> ? 2 * (2 * plan.n16 + (plan.r > 2 ? 1 : 0)) : 0;
  int log2n = 0;
  while ((int64_t(1) << log2n) < N) ++log2n;
  const Dft16Fragments F = kTensorCores<T> ? dft16_fragments() : Dft16Fragments{};
  const float d = p.D ? p.D[h] : 0.f;

  for (int64_t b0 = 2 * int64_t(hw::block_idx_y()); b0 < p.B; b0 += 2 * int64_t(hw::grid_dim_y())) {
    const bool has_b1 = b0 + 1 < p.B;
    // 1. the pair's max |x|
    float m = 0.f;
    for (int64_t t = tid; t < L; t += nthreads) {
      m = max_nan(m, fabsf(load_x<T>(p, b0, h, t)));
      if (has_b1) m = max_nan(m, fabsf(load_x<T>(p, b0 + 1, h, t)));
    }
    m = block_max(m, red);
    int e = 0;
    if (finite(m) && m > 0.f) frexpf(m, &e);  // m < 2^e
    for (int attempt = 0;; ++attempt) {
      const int e_in = e + 12 * attempt;
      const float scale = ldexpf(1.f, -e_in);
      int overflow = 0;  // this thread's fp16 stores that overflowed; OR-reduced at the end
      // 2. load the pair, zero-padded to N/2
      for (int64_t t = tid; t < N / 2; t += nthreads) {
        float re = 0.f, im = 0.f;
        if (t < L) {
          re = load_x<T>(p, b0, h, t) * scale;
          if (has_b1) im = load_x<T>(p, b0 + 1, h, t) * scale;
        }
        store_c(buf[t], re, im, &overflow);
      }
      hw::sync_block();
      // 3. forward stages: X = F16 @ X, X = X * tw (twiddle only where a stage follows)
      for (int s = 0; s < plan.n16; ++s) {
        const int64_t Ss = stage_stride(N, s);
        const bool twiddle = s + 1 < plan.n16 || plan.r > 1;
        stage16(buf, N, Ss, false, s == 0, F, StoreShared<S>{buf, twiddle ? Ss : 0, false, &overflow});
        hw::sync_block();
      }
      if (plan.r > 1) {  // X = F_r @ X on contiguous groups of r
        stage_last(buf, N, plan.r, false, last_scale, StoreShared<S>{buf, 0, false, &overflow});
        hw::sync_block();
      }
      // 4. X = X * K (both in Monarch order)
      const cf32* K = p.K + h * N;
      for (int64_t i = tid; i < N; i += nthreads) {
        float re, im;
        load_c(buf[i], re, im);
        cmul(re, im, K[i].re, K[i].im);
        store_c(buf[i], re, im, &overflow);
      }
      hw::sync_block();
      // 5. inverse stages, in reverse; each epilogue applies the conjugate twiddle that the
      //    next (outer) inverse stage needs, the last writes y.
      if (plan.r > 1) {  // X = conj(F_r) @ X, X = conj(tw of stage n16-1)
        stage_last(buf, N, plan.r, true, last_scale,
                   StoreShared<S>{buf, stage_stride(N, plan.n16 - 1), true, &overflow});
        hw::sync_block();
      }
      for (int s = plan.n16 - 1; s >= 1; --s) {  // X = conj(F16) @ X, X = conj(tw of stage s-1)
        stage16(buf, N, stage_stride(N, s), true, false, F,
                StoreShared<S>{buf, stage_stride(N, s - 1), true, &overflow});
        hw::sync_block();
      }
      const float undo = ldexpf(1.f, e_in + p.k_exp[h] + stage_exp - log2n);
      stage16(buf, N, stage_stride(N, 0), true, false, F, StoreOutput<T>{&p, h, b0, undo, d});
      // (block_max's barriers also free buf for the next pair)
      const bool any_overflow = block_max(float(overflow), red) > 0.f;
      if (!(any_overflow && finite(m) && attempt < 2)) break;
    }
  }
}

// Launch on `stream`: grid (H, pair groups); `num_sms` sizes the grid so every SM is busy
// while each CTA still loops over several pairs (K and the DFT fragments loaded once).
template <class T>
hw::Error fftconv_fwd_launch(const FwdParams& p, int num_sms, hw::Stream stream) {
  if (p.N < 32 || p.N > kMaxFusedN<T> || (p.N & (p.N - 1)) || 2 * p.L > p.N || p.H > 0x7fffffff)
    return static_cast<hw::Error>(1);  // invalid value: Python never asks for this
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  const int64_t pairs = (p.B + 1) / 2;
  const int64_t want = (4 * int64_t(num_sms) + p.H - 1) / p.H;  // CTAs per channel
  hw::Grid grid;
  grid.x = int(p.H);
  grid.y = int(want < 1 ? 1 : (want < pairs ? (want < 65535 ? want : 65535) : pairs));
  return hw::launch(fftconv_fwd_kernel<T>, grid, kFwdThreads, fwd_smem_bytes<T>(p.N), stream, p);
}

}  // namespace flashconv
