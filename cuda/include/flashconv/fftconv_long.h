// The forward causal FFT convolution beyond the fused kernel's on-chip size (docs/kernels.md,
// "Beyond one CTA's shared memory"): a two-level block FFT N = N1 * N2, N2 the inner size the on-chip
// stages handle (block_fft.h), N1 the outer factor, one outer stage through HBM.
//
//   y[b,h,t] = g_out * m * act( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),  x = g_in * u
//   (m, act: the optional fused epilogue, as in fftconv_fwd.h)
//
// Pairs of batch rows are packed as one complex row z = x_b + i x_{b+1} (as the fused kernel).
// With n = n1 N2 + n2 and frequency f = k1 + N1 k2:
//   pass A (outer forward, CUDA cores, fp32): per (h, pair, tile of C columns n2), the
//     DFT-N1 along n1 (stride N2) of z, zero-padded (n < L <= N/2, so n1 < N1/2: the upper
//     half of the first stage is never read), times w_N^(k1 n2), written to the workspace
//     ws[pair][h][p1][n2] (complex fp32), where row p1 holds k1 = perm1[p1] (the outer
//     transform runs block_fft.h's plan on columns, so it ends in Monarch order too).
//   pass B (inner, on chip): each workspace row (N2 contiguous values) goes through the
//     forward stages (natural n2 -> Monarch k2), times K[h][p1][p2], the inverse stages
//     (back to natural n2), and is written back in place, unnormalised by 1/N2 only.
//     Storage as the fused kernel: bf16 io -> fp16 storage and tensor cores with a power of
//     two row scale and overflow retry; fp16/fp32 io -> fp32 storage and CUDA cores, also
//     with a power of two row scale (range: the fp32 stages' gain, up to N2 on constant data).
//   pass C (outer inverse, CUDA cores, fp32): per (h, pair, column tile), times
//     conj(w_N^(k1 n2)), the conjugate outer stages (Monarch k1 -> natural n1), then only
//     t < L: y = g_out * m * act(Re | Im * 2^(k_exp[h]) / N1 + D x).
// K (H, N1, N2) complex fp32: K[h][p1][p2] = FFT_N(k)[perm1[p1] + N1 perm2[p2]] * 2^-k_exp[h]
// (flashconv/_long.py: long_spectrum). The workspace (ceil(B/2), H, N) complex fp32 is the
// only intermediate.
// Limits: N1 >= 2, 16 <= N2 <= kMaxFusedN<T> (and the device's shared memory), N = N1 N2 <=
// 2^24 (outer twiddle exponents k1 n2 < 2^24 stay exact in float), 2L <= N. Passes A and C
// compute in fp32 without a row scale: inputs need |x| * N1 (and |y| * N1) inside float range.
#pragma once

#include <cstdint>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_fwd.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv {

struct LongParams {
  View3 u, g_in, g_out;  // gates may be absent
  MutView3 y;
  int act = kActNone;  // the fused epilogue (fftconv_fwd.h): y = g_out * m * act(z)
  View3 mask{};        // float32 dropout mask (st = 0 for a (B, H) mask), or null
  Spectrum spec;   // K: (H, N1, N2) in the two-level order above; k_exp (H,)
  const float* D;  // (H,) or null
  cf32* ws;        // (ceil(B/2), H, N1, N2) workspace
  int64_t B, H, L, N, N1, N2;
  int64_t C;  // columns per outer tile (a power of two dividing N2); 0: the launcher picks
};

// Position p of a block FFT of size n (plan pl) holds frequency monarch_freq(p): the digits of
// p (first stage's radix most significant) reversed into a mixed-radix number: digit k_j of
// stage j weighs R_0 ... R_{j-1}.
FC_HOST_DEVICE int64_t monarch_freq(int64_t p, const Plan& pl, int64_t n) {
  int64_t f = 0;
  int lg_rest = lg2(n);  // log2 of n / (R_{j} ... R_{last}) after stage j's digit
  for (int j = plan_stages(pl) - 1; j >= 0; --j) {
    int R;
    int64_t S;
    plan_stage(pl, n, j, R, S);
    const int lgR = lg2(R);
    lg_rest -= lgR;
    f += (p & (R - 1)) << lg_rest;
    p >>= lgR;
  }
  return f;
}

// w_N^(m) (conjugated if inverse), m < 2^24 exact in float.
FC_DEVICE void twiddle_n(int64_t m, int64_t N, bool inverse, float& wr, float& wi) {
  float s, c;
  sincospi(ldexpf(-float(m), 1 - lg2(N)), &s, &c);  // angle -2 pi m / N, exact scaling
  wr = c;
  wi = inverse ? -s : s;
}

// ---- outer stages: the N1-point block FFT along the rows of a tile[N1][C] in shared memory.
// Each column is a row of block_fft.h's plan with element stride C; fp32 on CUDA cores.

// A stage of radix R and (row) stride S on the tile; pos / C is the row index.
template <int R, class Epi>
FC_DEVICE void outer_stage(cf32* tile, int64_t N1, int64_t C, int64_t S, bool inverse,
                           bool zero_upper, const Epi& epi) {
  stage_simt<R>(tile, N1 * C, S * C, inverse, zero_upper, 1.f, epi);
}

template <class Epi>
FC_DEVICE void outer_stage_r(int r, cf32* tile, int64_t N1, int64_t C, int64_t S, bool inverse,
                             bool zero_upper, const Epi& epi) {
  switch (r) {
    case 2: outer_stage<2>(tile, N1, C, S, inverse, zero_upper, epi); break;
    case 4: outer_stage<4>(tile, N1, C, S, inverse, zero_upper, epi); break;
    case 8: outer_stage<8>(tile, N1, C, S, inverse, zero_upper, epi); break;
    default: outer_stage<16>(tile, N1, C, S, inverse, zero_upper, epi); break;
  }
}

// Stores into the tile with the twiddle of a stage (stride tw_S, block tw_RS) applied to row
// pos / C.
struct StoreTile {
  cf32* tile;
  int64_t C, tw_S, tw_RS;
  bool inverse;
  FC_DEVICE void operator()(int64_t pos, float re, float im) const {
    if (tw_S) {
      float wr, wi;
      stage_twiddle(pos >> lg2(C), tw_S, tw_RS, inverse, wr, wi);
      cmul(re, im, wr, wi);
    }
    store(pos, re, im);
  }
  // stage_simt's vector interface (block_fft.h, VectorEpilogue).
  FC_DEVICE bool twiddled() const { return tw_S != 0; }
  FC_DEVICE int64_t exponent(int64_t pos) const { return twiddle_exponent(pos >> lg2(C), tw_S, tw_RS); }
  FC_DEVICE int lg_block() const { return lg2(tw_RS); }
  FC_DEVICE bool conj() const { return inverse; }
  FC_DEVICE void store(int64_t pos, float re, float im) const { hw::sts(slot(tile, pos), cf32{re, im}); }
};

// Forward: rows [0, N1/2) of the tile hold the input (the rest is zero padding, never read);
// the last stage hands (pos, re, im) to `out` (row pos / C in Monarch order). Barrier at end.
template <class Out>
FC_DEVICE void outer_forward(cf32* tile, int64_t N1, int64_t C, const Plan& pl, const Out& out) {
  const int ns = plan_stages(pl);
  for (int i = 0; i < ns; ++i) {
    int R;
    int64_t S;
    plan_stage(pl, N1, i, R, S);
    if (i + 1 < ns) {
      outer_stage_r(R, tile, N1, C, S, false, i == 0, StoreTile{tile, C, S, R * S, false});
    } else {
      outer_stage_r(R, tile, N1, C, S, false, i == 0, out);
    }
    hw::sync_block();
  }
}

// Inverse from Monarch order (unnormalised: times N1); the last stage hands (pos, re, im) to
// `out` with row pos / C the natural n1. Barrier at end.
template <class Out>
FC_DEVICE void outer_inverse(cf32* tile, int64_t N1, int64_t C, const Plan& pl, const Out& out) {
  for (int i = plan_stages(pl) - 1; i >= 0; --i) {
    int R;
    int64_t S;
    plan_stage(pl, N1, i, R, S);
    if (i > 0) {  // the conjugate twiddle of stage i-1
      int Rp;
      int64_t Sp;
      plan_stage(pl, N1, i - 1, Rp, Sp);
      outer_stage_r(R, tile, N1, C, S, true, false, StoreTile{tile, C, Sp, Rp * Sp, true});
    } else {
      outer_stage_r(R, tile, N1, C, S, true, false, out);
    }
    hw::sync_block();
  }
}

// ---- pass A -------------------------------------------------------------------------------

template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 2) fftconv_long_outer_fwd_kernel(LongParams p) {
  cf32* tile = hw::dyn_smem<cf32>();  // (N1, C)
  const int64_t N = p.N, N1 = p.N1, N2 = p.N2, C = p.C, L = p.L, h = hw::block_idx_x();
  const Plan pl = make_plan(N1);
  // Sizes are powers of two: shifts and masks, no division.
  const int lgC = lg2(C), lg_tiles = lg2(N2) - lgC;
  const int64_t pairs = (p.B + 1) / 2, tiles = int64_t(1) << lg_tiles, items = pairs * tiles;
  auto x_at = [&](int64_t b, int64_t t, hw::Site at = hw::Site::current()) {
    return gated<T>(load<T>(p.u, b, h, t, "u", at), p.g_in, b, h, t, "g_in", at);
  };
  for (int64_t item = hw::block_idx_y(); item < items; item += hw::grid_dim_y()) {
    const int64_t pair = item >> lg_tiles, c0 = (item & (tiles - 1)) << lgC, b0 = 2 * pair;
    hw::region("load");
    for (int64_t i = hw::thread_idx(); i < N1 / 2 * C; i += hw::block_dim()) {
      const int64_t t = ((i >> lgC) * N2) + c0 + (i & (C - 1));
      float re = 0.f, im = 0.f;
      if (t < L) {
        re = x_at(b0, t);
        if (b0 + 1 < p.B) im = x_at(b0 + 1, t);
      }
      hw::sts(slot(tile, i), cf32{re, im});
    }
    hw::sync_block();
    cf32* ws = p.ws + (pair * p.H + h) * N;
    hw::region("outer");
    outer_forward(tile, N1, C, pl, [&](int64_t pos, float re, float im) {
      const int64_t p1 = pos >> lgC, n2 = c0 + (pos & (C - 1));
      float wr, wi;
      twiddle_n(monarch_freq(p1, pl, N1) * n2, N, false, wr, wi);
      cmul(re, im, wr, wi);
      hw::stg(ws + p1 * N2 + n2, cf32{re, im}, "ws");
    });
  }
}

// ---- pass B -------------------------------------------------------------------------------

template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 2) fftconv_long_inner_kernel(LongParams p) {
  using S = StorageFor<T>;
  S* buf = hw::dyn_smem<S>();  // (N2,) one workspace row
  FC_SHARED float red[32];
  const int64_t N1 = p.N1, N2 = p.N2, h = hw::block_idx_x();
  const Plan plan = make_plan(N2);
  const Dft16Fragments F = kTensorCores<T> ? dft16_fragments() : Dft16Fragments{};
  const int undo_exp = Gains<S>::round_trip_exp(plan) - log2_int(N2);
  // Items p1-major: the CTAs resident together work on the same K row (h, p1) for different
  // pairs, so each K row comes from DRAM once per launch (then L2), not once per pair. pairs is
  // not a power of two in general: one 32-bit division per item (inline, no call), outside
  // the transforms (items < 2^31: the launcher's limits).
  const int64_t pairs = (p.B + 1) / 2, items = pairs * N1;
  for (int64_t item = hw::block_idx_y(); item < items; item += hw::grid_dim_y()) {
    const int64_t p1 = uint32_t(item) / uint32_t(pairs), pair = item - p1 * pairs;
    cf32* row = p.ws + ((pair * p.H + h) * N1 + p1) * N2;
    const cf32* K = p.spec.K + (h * N1 + p1) * N2;
    float m = 0.f;  // the row's max |re|, |im|, for the row scale 2^-e
    if (Gains<S>::kScaled) {
      hw::region("max");
      for (int64_t i = hw::thread_idx(); i < N2; i += hw::block_dim()) {
        const cf32 v = hw::ldg(row + i, "ws");
        m = max_nan(m, max_nan(fabsf(v.re), fabsf(v.im)));
      }
      m = block_reduce<false>(m, red);
    }
    for (int attempt = 0;; ++attempt) {
      int e, overflow = 0;
      hw::region("load");
      if (Gains<S>::kScaled) {  // fp16 storage: scale on the way in
        e = scale_exponent(m) + 12 * attempt;
        const float scale = ldexpf(1.f, -e);
        for (int64_t i = hw::thread_idx(); i < N2; i += hw::block_dim()) {
          const cf32 v = hw::ldg(row + i, "ws");
          store_c(slot(buf, i), v.re * scale, v.im * scale, &overflow);
        }
      } else {  // fp32 storage: one read of the row; its max on the way, then scale in place
        for (int64_t i = hw::thread_idx(); i < N2; i += hw::block_dim()) {
          const cf32 v = hw::ldg(row + i, "ws");
          m = max_nan(m, max_nan(fabsf(v.re), fabsf(v.im)));
          store_c(slot(buf, i), v.re, v.im, &overflow);
        }
        e = scale_exponent(block_reduce<false>(m, red));  // (each thread rescales its own i)
        const float scale = ldexpf(1.f, -e);
        for (int64_t i = hw::thread_idx(); i < N2; i += hw::block_dim()) {
          float re, im;
          load_c(slot(buf, i), re, im);
          store_c(slot(buf, i), re * scale, im * scale, &overflow);
        }
      }
      hw::sync_block();
      block_fft_forward(buf, N2, plan, F, &overflow, /*causal=*/false);
      multiply_spectrum(buf, K, N2, false, &overflow);
      block_fft_inverse_but_last(buf, N2, plan, F, &overflow);
      if (Gains<S>::kScaled) {  // an overflowed fp16 store was clamped: redo the row
        hw::region("overflow");
        const bool any_overflow = block_reduce<false>(float(overflow), red) > 0.f;
        if (any_overflow && finite(m) && attempt < 2) continue;
      }
      const float undo = ldexpf(1.f, e + undo_exp);
      block_fft_inverse_last(buf, N2, plan, F, [&](int64_t n, float re, float im) {
        hw::stg(row + n, cf32{re * undo, im * undo}, "ws");
      }, /*full=*/true);
      break;
    }
  }
}

// ---- pass C -------------------------------------------------------------------------------

template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 2) fftconv_long_outer_inv_kernel(LongParams p) {
  cf32* tile = hw::dyn_smem<cf32>();  // (N1, C)
  const int64_t N = p.N, N1 = p.N1, N2 = p.N2, C = p.C, L = p.L, h = hw::block_idx_x();
  const Plan pl = make_plan(N1);
  // Sizes are powers of two: shifts and masks, no division.
  const int lgC = lg2(C), lg_tiles = lg2(N2) - lgC;
  const int64_t pairs = (p.B + 1) / 2, tiles = int64_t(1) << lg_tiles, items = pairs * tiles;
  const float d = p.D ? hw::ldg(p.D + h, "D") : 0.f;
  const float undo = ldexpf(1.f, hw::ldg(p.spec.k_exp + h, "k_exp") - log2_int(N1));
  auto x_at = [&](int64_t b, int64_t t, hw::Site at = hw::Site::current()) {
    return gated<T>(load<T>(p.u, b, h, t, "u", at), p.g_in, b, h, t, "g_in", at);
  };
  for (int64_t item = hw::block_idx_y(); item < items; item += hw::grid_dim_y()) {
    const int64_t pair = item >> lg_tiles, c0 = (item & (tiles - 1)) << lgC, b0 = 2 * pair;
    const cf32* ws = p.ws + (pair * p.H + h) * N;
    hw::region("load");
    for (int64_t i = hw::thread_idx(); i < N1 * C; i += hw::block_dim()) {
      const int64_t p1 = i >> lgC, n2 = c0 + (i & (C - 1));
      const cf32 v = hw::ldg(ws + p1 * N2 + n2, "ws");
      float re = v.re, im = v.im, wr, wi;
      twiddle_n(monarch_freq(p1, pl, N1) * n2, N, true, wr, wi);
      cmul(re, im, wr, wi);
      hw::sts(slot(tile, i), cf32{re, im});
    }
    hw::sync_block();
    hw::region("outer");
    outer_inverse(tile, N1, C, pl, [&](int64_t pos, float re, float im) {
      const int64_t t = (pos >> lgC) * N2 + c0 + (pos & (C - 1));
      if (t >= L) return;  // includes the discarded half n1 >= N1/2
      FC_UNROLL
      for (int j = 0; j < 2; ++j) {
        const int64_t b = b0 + j;
        if (b >= p.B) break;
        float z = (j ? im : re) * undo;
        if (p.D) z += d * x_at(b, t);
        store<T>(p.y, b, h, t, gated<T>(epilogue(z, p.act, p.mask, b, h, t), p.g_out, b, h, t, "g_out"), "y");
      }
    });
  }
}

// ---- launcher ------------------------------------------------------------------------------

FC_HOST_DEVICE bool is_pow2(int64_t n) { return n > 0 && (n & (n - 1)) == 0; }

// Columns per outer tile: a 32 KB tile (N1 * C = 4096 complex), at most N2.
FC_HOST_DEVICE int64_t long_tile_cols(int64_t N1, int64_t N2) {
  int64_t C = N1 >= 4096 ? 1 : 4096 / N1;
  return C > N2 ? N2 : C;
}


// Workspace elements (cf32) the launcher needs: ceil(B/2) * H * N.
FC_HOST_DEVICE int64_t long_workspace_elems(int64_t B, int64_t H, int64_t N) {
  return (B + 1) / 2 * H * N;
}

// Runs passes A, B, C on `stream`. The caller sizes N2 to the device's shared memory
// (N2 * sizeof(StorageFor<T>) bytes for pass B).
template <class T>
hw::Error fftconv_long_launch(LongParams p, int num_sms, hw::Stream stream) {
  if (!is_pow2(p.N1) || !is_pow2(p.N2) || p.N1 < 2 || p.N2 < 16 || p.N2 > kMaxFusedN<T> ||
      p.N != p.N1 * p.N2 || p.N > (int64_t(1) << 24) || 2 * p.L > p.N || p.H > 0x7fffffff ||
      p.L < 0 || p.B < 0 || p.H < 0)
    return hw::ErrorInvalidValue;
  if (p.C == 0) p.C = long_tile_cols(p.N1, p.N2);
  if (!is_pow2(p.C) || p.C > p.N2 || p.N1 * p.C > 8192) return hw::ErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  if (!p.ws || !p.spec.K || !p.spec.k_exp) return hw::ErrorInvalidValue;
  const int64_t pairs = (p.B + 1) / 2;
  const size_t tile_bytes = size_t(p.N1 * p.C) * sizeof(cf32);
  hw::Error e = hw::launch(fftconv_long_outer_fwd_kernel<T>, channel_grid(p.H, pairs * (p.N2 / p.C), num_sms),
                           kThreads, tile_bytes, stream, p);
  if (e != hw::Success) return e;
  e = hw::launch(fftconv_long_inner_kernel<T>, channel_grid(p.H, pairs * p.N1, num_sms), kThreads,
                 size_t(p.N2) * sizeof(StorageFor<T>), stream, p);
  if (e != hw::Success) return e;
  return hw::launch(fftconv_long_outer_inv_kernel<T>, channel_grid(p.H, pairs * (p.N2 / p.C), num_sms),
                    kThreads, tile_bytes, stream, p);
}

}  // namespace flashconv
