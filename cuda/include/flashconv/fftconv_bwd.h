// The fused block-FFT causal convolution, backward. With x = g_in u, z = conv(x, k) + D x,
// y = g_out z and dz = g_out dy:
//
//   dx[t]   = sum_s k[s] dz[t+s] + D dz[t]        (a causal correlation: DZ * conj(K))
//   du      = g_in dx,  dg_in = u dx,  dg_out = dy z
//   dk[s]   = sum_b sum_t dz[b,t] x[b,t-s]         (Re IFFT(conj(X) DZ), summed over pairs)
//   dD      = sum_b sum_t dz[b,t] x[b,t]
//   dk_rev[s] = sum_b sum_t dz[b,t] x[b,t+s]        (the same IFFT at negative lags N - s)
// (Bidirectional convolution needs nothing else: K already holds FFT(k) + conj(FFT(k_rev)).)
// The fused epilogue (y = g_out m act(z)): the caller recomputes z with the forward kernel (its
// float32 z output), passes g_out m act'(z) as a float32 g_out (View3::f32), so dz is formed
// in fp32 here, and computes dg_out = dy m act(z) itself.
//
// One CTA per channel h loops over pairs of batch rows packed as one complex row, like the
// forward (fftconv_fwd.h). With packed X = X1 + i X2 and DZ = DZ1 + i DZ2 (spectra of real
// rows), conj(X) DZ = conj(X1) DZ1 + conj(X2) DZ2 + i (conj(X1) DZ2 - conj(X2) DZ1); both
// brackets are spectra of real signals, so Re IFFT(conj(X) DZ) is exactly the pair's dk
// contribution: no unpacking. Per pair, two rows of shared memory A and B:
//   1. max |x|, max |dz| (scales 2^-ex, 2^-edz) and the pair's sum dz x (-> dD)
//   2. A = FFT(dz * 2^-edz), B = FFT(x * 2^-ex)        // forward stages, as the forward
//   3. B = conj(B) * A;  A = A * conj(K)                  // pointwise, Monarch order
//   4. A = IFFT(A) -> dx -> du, dg_in (HBM)
//   5. if dg_out is wanted: A = FFT(x), A = A * K, IFFT -> z -> dg_out = dy z (HBM)
//   6. B = IFFT(B) -> Re, t < lk, kept in B as floats; after the overflow check, dk += (HBM)
// An fp16 overflow (bf16 path) redoes the pair at a smaller scale before anything is added
// to dk; outputs written to HBM are simply rewritten. dk and dD are accumulated with atomic
// adds in fp32 (their summation order, and so their last bits, vary from run to run).
// Shared memory is two rows: bf16 N <= 16K (2 x 64 KB), fp32/fp16 N <= 8K (2 x 64 KB).
#pragma once

#include <cstdint>

#include "flashconv/block_fft.h"
#include "flashconv/bwd_tc.h"
#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv {

template <class T>
constexpr int64_t kMaxFusedBwdN = kTensorCores<T> ? 16384 : 8192;

// The bfloat16 backward runs on tensor cores (bwd_tc.h) where tc::bwd_tc_serves says so (N <=
// 8K; N = 16K without dg_out), the fp32-stage kernel below elsewhere (its two rows fit where
// bwd_tc.h's three do not).
template <class T>
constexpr bool bwd_on_tc(int64_t N, bool gz) {
  return kTensorCores<T> && tc::bwd_tc_serves(N, gz);
}

// Dynamic shared memory of the backward launch at FFT size N: the larger of the sizes with and
// without dg_out (the bfloat16 ones batch different numbers of pairs, or change kernels).
template <class T>
constexpr size_t bwd_smem_bytes(int64_t N) {
  const size_t plain = 2 * size_t(N) * sizeof(StorageFor<T>);
  const size_t without = bwd_on_tc<T>(N, false) ? tc::bwd_smem_bytes(N, false) : plain;
  const size_t with_z = bwd_on_tc<T>(N, true) ? tc::bwd_smem_bytes(N, true) : plain;
  return with_z > without ? with_z : without;
}

// A float kept in the storage slot of element n (the first 4 bytes of slot n): an inverse
// stage writes element n's slot only after its warp (or thread) has read it.
template <class S>
FC_DEVICE float* slot_float(S* buf, int64_t n) {
  return reinterpret_cast<float*>(slot(buf, n));
}

// fp16/fp32 on sm_90: two CTAs (16 warps) per SM, at most 128 registers. One on sm_80 (128
// spilled there) and for bfloat16 (only N = 16K with dg_out here: 240 registers, fp16 rows read back
// rather than spilled).
template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, (kTensorCores<T> || FC_ARCH_SM80) ? 1 : 2)
    fftconv_bwd_kernel(BwdParams p) {
  using S = StorageFor<T>;
  S* A = hw::dyn_smem<S>();  // (N,) complex each: dz's spectrum, then x's
  S* Bf = A + p.N;           // (N,) complex: x's spectrum, then the dk product
  FC_SHARED float red[32];

  const int64_t N = p.N, L = p.L, h = hw::block_idx_x();
  const Plan plan = make_plan(N);
  const Dft16Fragments F = kTensorCores<T> ? dft16_fragments() : Dft16Fragments{};
  const float d = p.D ? hw::ldg(p.D + h, "D") : 0.f;
  const int kexp = hw::ldg(p.spec.k_exp + h, "k_exp");
  const int trip = Gains<S>::round_trip_exp(plan) - log2_int(N);
  const cf32* K = p.spec.K + h * N;
  auto x_at = [&](int64_t b, int64_t t, hw::Site at = hw::Site::current()) {
    return gated<T>(load<T>(p.u, b, h, t, "u", at), p.g_in, b, h, t, "g_in", at);
  };
  auto dz_at = [&](int64_t b, int64_t t, hw::Site at = hw::Site::current()) {
    return gated<T>(load<T>(p.dy, b, h, t, "dy", at), p.g_out, b, h, t, "g_out", at);
  };
  float dD_acc = 0.f;  // this thread's share of sum dz x over its CTA's pairs

  for (int64_t b0 = 2 * int64_t(hw::block_idx_y()); b0 < p.B; b0 += 2 * int64_t(hw::grid_dim_y())) {
    // 1. scales and dD
    hw::region("max");
    float mx = 0.f, mdz = 0.f;
    for (int64_t t = hw::thread_idx(); t < L; t += hw::block_dim()) {
      for (int64_t b = b0; b < b0 + 2 && b < p.B; ++b) {
        const float x = x_at(b, t), dz = dz_at(b, t);
        mx = max_nan(mx, fabsf(x));
        mdz = max_nan(mdz, fabsf(dz));
        dD_acc += dz * x;
      }
    }
    mx = block_reduce<false>(mx, red);
    mdz = block_reduce<false>(mdz, red);
    const bool finite_in = finite(mx) && finite(mdz);
    for (int attempt = 0;; ++attempt) {
      const int ex = scale_exponent(mx) + 12 * attempt, edz = scale_exponent(mdz) + 12 * attempt;
      int overflow = 0;
      // 2. A = FFT(dz), B = FFT(x)
      hw::region("load");
      load_pair(A, N, L, p.B, b0, ldexpf(1.f, -edz), &overflow, dz_at);
      block_fft_forward(A, N, plan, F, &overflow);
      hw::region("load");
      load_pair(Bf, N, L, p.B, b0, ldexpf(1.f, -ex), &overflow, x_at);
      block_fft_forward(Bf, N, plan, F, &overflow);
      // 3. B = conj(X) DZ (dk), A = DZ conj(K) (dx)
      hw::region("multiply");
      for (int64_t i = hw::thread_idx(); i < N; i += hw::block_dim()) {
        float ar, ai, xr, xi;
        load_c(slot(A, i), ar, ai);
        load_c(slot(Bf, i), xr, xi);
        float pr = ar, pi = ai;
        cmul(pr, pi, xr, -xi);
        store_c(slot(Bf, i), pr, pi, &overflow);
        const cf32 k = hw::ldg(K + i, "K");
        cmul(ar, ai, k.re, -k.im);
        store_c(slot(A, i), ar, ai, &overflow);
      }
      hw::sync_block();
      // 4. dx = IFFT(A) + D dz -> du = g_in dx, dg_in = u dx
      const float undo_dx = ldexpf(1.f, edz + kexp + trip);
      block_fft_inverse<kTensorCores<T>>(A, N, plan, F, &overflow, [&](int64_t t, float re, float im) {
        if (t >= L) return;
        each_row(b0, p.B, re, im, [&](int64_t b, float v) {
          const float dx = v * undo_dx + (p.D ? d * dz_at(b, t) : 0.f);
          store<T>(p.du, b, h, t, gated<T>(dx, p.g_in, b, h, t, "g_in"), "du");
          if (p.dg_in.p) store<T>(p.dg_in, b, h, t, dx * load<T>(p.u, b, h, t, "u"), "dg_in");
        });
      });
      // 5. dg_out = dy z, z = IFFT(FFT(x) K) + D x  (A is free again)
      if (p.dg_out.p) {
        hw::region("load");
        load_pair(A, N, L, p.B, b0, ldexpf(1.f, -ex), &overflow, x_at);
        block_fft_forward(A, N, plan, F, &overflow);
        multiply_spectrum(A, K, N, false, &overflow);
        const float undo_z = ldexpf(1.f, ex + kexp + trip);
        block_fft_inverse<kTensorCores<T>>(A, N, plan, F, &overflow, [&](int64_t t, float re, float im) {
          if (t >= L) return;
          each_row(b0, p.B, re, im, [&](int64_t b, float v) {
            const float z = v * undo_z + (p.D ? d * x_at(b, t) : 0.f);
            store<T>(p.dg_out, b, h, t, z * load<T>(p.dy, b, h, t, "dy"), "dg_out");
          });
        });
      }
      // 6. the pair's dk (and dk_rev) contribution, kept as floats in B's slots until
      //    overflow is ruled out: lag s at slot s, lag -s at slot N - s. (Two forward
      //    transforms, X and DZ, feed this one inverse: one more transform gain to undo.)
      const float undo_dk = ldexpf(1.f, ex + edz + trip + Gains<S>::transform_exp(plan));
      const bool rev = p.dk_rev != nullptr;
      block_fft_inverse<kTensorCores<T>>(Bf, N, plan, F, &overflow, [&](int64_t t, float re, float) {
        if (t < p.lk || (rev && N - t < p.lk_rev)) hw::sts(slot_float(Bf, t), re * undo_dk);
      }, rev);
      // An overflowed fp16 store was clamped: redo the pair at a smaller scale (outputs are
      // rewritten; nothing has been added to dk yet).
      hw::region("overflow");
      const bool any_overflow = block_reduce<false>(float(overflow), red) > 0.f;
      if (any_overflow && finite_in && attempt < 2) continue;
      hw::region("dk");
      for (int64_t t = hw::thread_idx(); t < p.lk; t += hw::block_dim())
        hw::atomic_add(p.dk + h * p.lk + t, hw::lds(slot_float(Bf, t)), "dk");
      if (rev) {
        for (int64_t s = hw::thread_idx(); s < p.lk_rev; s += hw::block_dim())
          hw::atomic_add(p.dk_rev + h * p.lk_rev + s, hw::lds(slot_float(Bf, s ? N - s : 0)), "dk_rev");
      }
      hw::sync_block();  // B is rewritten by the next pair
      break;
    }
  }
  if (p.dD) {
    dD_acc = block_reduce<true>(dD_acc, red);
    if (hw::thread_idx() == 0) hw::atomic_add(p.dD + h, dD_acc, "dD");
  }
}

// Launch on `stream` (grid: pair_grid). dk and dD must be zeroed by the caller.
template <class T>
hw::Error fftconv_bwd_launch(const BwdParams& p, int num_sms, hw::Stream stream) {
  if (bwd_on_tc<T>(p.N, p.dg_out.p != nullptr)) return fftconv_bwd_tc_launch(p, num_sms, stream);
  if (p.N < 32 || p.N > kMaxFusedBwdN<T> || (p.N & (p.N - 1)) || 2 * p.L > p.N || p.lk > p.L ||
      p.lk_rev > p.L || (p.lk_rev > 0 && !p.dk_rev) || p.H > 0x7fffffff)
    return hw::ErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  return hw::launch(fftconv_bwd_kernel<T>, pair_grid(p.B, p.H, num_sms), kThreads,
                    2 * size_t(p.N) * sizeof(StorageFor<T>), stream, p);
}

}  // namespace flashconv
