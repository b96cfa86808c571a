// The fused backward convolution for bfloat16 io on tensor cores (docs/kernels.md). With
// x = g_in u, z = conv(x, k) + D x, y = g_out z and dz = g_out dy:
//
//   dx[t]   = sum_s k[s] dz[t+s] + D dz[t]     du = g_in dx, dg_in = u dx, dg_out = dy z
//   dk[s]   = sum_b sum_t dz[b,t] x[b,t-s]     (Re IFFT(conj(X) DZ) of each packed pair)
//   dk_rev[s] = sum_b sum_t dz[b,t] x[b,t+s]   (the same IFFT at negative lags)
//   dD      = sum_b sum_t dz[b,t] x[b,t]
//
// The fused epilogue (y = g_out m act(z)): the caller recomputes z with the forward kernel (its
// float32 z output), passes g_out m act'(z) as a float32 g_out (View3::f32), so dz is formed
// in fp32 here, and computes dg_out = dy m act(z) itself.
//
// One CTA per channel loops over groups of pp pairs (pp = 8192/N for N < 8192, else 1; with
// dg_out at N = 4096 only 1, so that the rows fit an A100's 163 KB); the
// phases of tc_core.h on three rows per pair -- X (then the dk product), DZ (then dx) and,
// when dg_out is wanted, Z -- with barriers shared between rows. At N = 16K (without dg_out
// only: bwd_tc_serves) u and dy are not staged: their two rows and the dk accumulators take
// 192 KB, and the phases read u and dy from global memory (HBM once, then the L2).
//   load     u, dy -> stagings (cp.async); max |x|, max |dz| per pair           [barrier]
//   fwd.r    X = F_r(x 2^-ex), DZ = F_r(dz 2^-edz) (+ twiddles)                  [barrier]
//   fwd.16   (N >= 4K) both rows                                                 [barrier]
//   b256     per group: X, DZ spectra; conj(X) DZ -> inverse -> row X;
//            X K -> inverse -> row Z; DZ conj(K) -> inverse -> row DZ              [barrier]
//   inv.16   (N >= 4K) the three rows                                             [barrier]
//   inv.r    dx -> du, dg_in (and dD); z -> dg_out                                [barrier]
//            dk lags -> the DZ row's memory as fp32 (pending)               [barrier: OR]
//            the pending lags added into the CTA's dk accumulator (fp32, shared memory)
// An fp16 overflow (a non-finite output for finite inputs) redoes the pairs at a smaller
// scale before their dk is added. dk, dk_rev and dD go to HBM once per CTA (atomic adds: several
// CTAs may share a channel).
#pragma once

#include <cstdint>

#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"
#include "flashconv/tc_core.h"

namespace flashconv::tc {

// K stays in shared memory for N up to this (4N bytes); u and dy are staged up to this.
constexpr int kBwdKInSmemMaxN = 4096, kBwdStagedMaxN = 8192;

// The sizes the tensor-core backward serves, with (gz) or without dg_out: N <= 8K, and N = 16K
// without dg_out (its Z rows would need 256 KB).
FC_HOST_DEVICE constexpr bool bwd_tc_serves(int64_t N, bool gz) {
  return N <= kBwdStagedMaxN || (N <= 16384 && !gz);
}

// log2 of the pairs processed together: N * pp = 8192 below N = 8192 (as the forward: enough
// 256-element groups per warp to fill the phases between barriers), except with the Z rows
// (gz: dg_out wanted) at N = 4096, where two pairs' 16N bytes each would pass 163 KB.
FC_HOST_DEVICE constexpr int bwd_lgpp(int lgN, bool gz) {
  return lgN >= 13 || (gz && lgN == 12) ? 0 : 13 - lgN;
}

// Dynamic shared memory: K (4N, if kept), the dk and dk_rev accumulators (N/2 floats each:
// 4N), then pp rows X, pp rows DZ (and pp rows Z when gz) (4N each) and, up to
// kBwdStagedMaxN, pp stagings of u, then of dy (2N each).
FC_HOST_DEVICE constexpr size_t bwd_smem_bytes(int64_t N, bool gz) {
  return size_t(N <= kBwdKInSmemMaxN ? 4 * N : 0) + size_t(4 * N) +
         (size_t(((gz ? 12 : 8) + (N <= kBwdStagedMaxN ? 4 : 0)) * N) << bwd_lgpp(ilog2(uint32_t(N)), gz));
}

struct BwdCtx {
  const BwdParams* p;
  Rows wx, wdz, wz;  // wz.W null: no dg_out
  StagedIn<true> x, dz;  // u (gate g_in), dy (gate g_out, maybe float32); not staged above 8K
  const uint32_t *redx, *redz;
  float d;
  int gains, shift;  // gains: the round trip's stage gains, 1/N and k_exp
  int k_exp;
  float* dk_acc;     // (N/2) floats: lags 0 .. N/2 - 1
  float* dkr_acc;    // (N/2) floats: lags 0, -1, ..., -(N/2 - 1) (index s for lag -s)
};

FC_DEVICE float pair_undo(const uint32_t* red, int pi, int extra) {
  return ldexpf(1.f, scale_exponent(max_of(red, pi)) + extra);
}

// What the outputs of a pair share in the backward's epilogues (EpiloguePair): the scale that
// undoes the input scaling and the stage gains, and whether the pair's inputs are finite.
struct PairScale {
  float undo;
  bool finite_in;
};

// y (C values at t of row b of channel h) into a bf16 output: 2C bytes at once where the view
// allows, else element by element.
template <int C>
FC_DEVICE void store_row(const MutView3& v, int64_t b, int64_t h, int64_t t, int64_t L,
                         const float (&y)[C], const char* name) {
  bf16_t* dst = static_cast<bf16_t*>(v.p) + b * v.sb + h * v.sh;
  if (t + C <= L && vectorizable(v.p, v.sb, v.sh, v.st, C)) {
    Vh<C> w;
    FC_UNROLL
    for (int j = 0; j < C / 2; ++j) w.w[j] = hw::pack_bf162(y[2 * j], y[2 * j + 1]);
    hw::stg(reinterpret_cast<Vh<C>*>(dst + t), w, name);
  } else {
    FC_UNROLL
    for (int j = 0; j < C; ++j)
      if (t + j < L) hw::stg(dst + (t + j) * v.st, hw::from_float<bf16_t>(y[j]), name);
  }
}

// dx = conv + D dz -> du = g_in dx, dg_in = u dx; dD += dz x.
struct DxEpilogue {
  const BwdCtx* c;
  float* dD;
  int* bad;
  using PairState = PairScale;
  FC_DEVICE PairState pair_state(int pi) const {
    return {pair_undo(c->redz, pi, c->shift + c->gains), finite(max_of(c->redz, pi))};
  }
  template <int C>
  FC_DEVICE void emit(int pi, const PairState& s, int64_t t, const float (&re)[C], const float (&im)[C]) const {
    const BwdParams& p = *c->p;
    if (t >= p.L) return;
    const float undo = s.undo;
    const bool finite_in = s.finite_in;
    FC_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t b = 2 * (c->x.pair0 + pi) + r;
      if (b >= p.B) continue;
      float dzv[C], u[C], dx[C], g[C];
      c->dz.x<C>(pi, r, t, dzv);
      FC_UNROLL
      for (int j = 0; j < C; ++j) {
        const float v = r ? im[j] : re[j];
        *bad |= !finite(v) && finite_in;
        dx[j] = v * undo + (p.D ? c->d * dzv[j] : 0.f);
      }
      c->x.raw<C>(pi, r, t, u);
      if (p.g_in.p) {
        gate_vals<C, false>(p.g_in, c->x.gvec, b, c->x.h, t, p.L, "g_in", g);
      } else {
        FC_UNROLL
        for (int j = 0; j < C; ++j) g[j] = 1.f;
      }
      FC_UNROLL
      for (int j = 0; j < C; ++j)
        if (t + j < p.L) *dD += dzv[j] * g[j] * u[j];
      if (p.dg_in.p) {
        float dgi[C];
        FC_UNROLL
        for (int j = 0; j < C; ++j) dgi[j] = u[j] * dx[j];
        store_row<C>(p.dg_in, b, c->x.h, t, p.L, dgi, "dg_in");
      }
      FC_UNROLL
      for (int j = 0; j < C; ++j) dx[j] *= g[j];  // du
      store_row<C>(p.du, b, c->x.h, t, p.L, dx, "du");
    }
  }
};

// z = conv + D x -> dg_out = dy z.
struct ZEpilogue {
  const BwdCtx* c;
  int* bad;
  using PairState = PairScale;
  FC_DEVICE PairState pair_state(int pi) const {
    return {pair_undo(c->redx, pi, c->shift + c->gains), finite(max_of(c->redx, pi))};
  }
  template <int C>
  FC_DEVICE void emit(int pi, const PairState& s, int64_t t, const float (&re)[C], const float (&im)[C]) const {
    const BwdParams& p = *c->p;
    if (t >= p.L) return;
    const float undo = s.undo;
    const bool finite_in = s.finite_in;
    FC_UNROLL
    for (int r = 0; r < 2; ++r) {
      const int64_t b = 2 * (c->x.pair0 + pi) + r;
      if (b >= p.B) continue;
      float xv[C], dy[C], g[C];
      c->x.x<C>(pi, r, t, xv);
      c->dz.raw<C>(pi, r, t, dy);
      FC_UNROLL
      for (int j = 0; j < C; ++j) {
        const float v = r ? im[j] : re[j];
        *bad |= !finite(v) && finite_in;
        g[j] = dy[j] * (v * undo + (p.D ? c->d * xv[j] : 0.f));
      }
      store_row<C>(p.dg_out, b, c->x.h, t, p.L, g, "dg_out");
    }
  }
};

// The pair group's dk contributions (real parts) as fp32 into `pending` (N floats: lag s at s,
// negative lag s at N - s): only lags that are kept.
struct DkEpilogue {
  const BwdCtx* c;
  float* pending;
  int* bad;
  using PairState = PairScale;
  FC_DEVICE PairState pair_state(int pi) const {
    const int64_t N = int64_t(1) << c->wx.lgN;
    // two forward transforms feed this inverse: one more transform gain; no K
    const float mx = max_of(c->redx, pi), mz = max_of(c->redz, pi);
    return {ldexpf(1.f, scale_exponent(mx) + scale_exponent(mz) + 2 * c->shift + c->gains - c->k_exp +
                            Gains<cf16>::transform_exp(make_plan(N))),
            finite(mx) && finite(mz)};
  }
  template <int C>
  FC_DEVICE void emit(int pi, const PairState& s, int64_t t, const float (&re)[C], const float (&im)[C]) const {
    const BwdParams& p = *c->p;
    const int64_t N = int64_t(1) << c->wx.lgN;
    const float undo = s.undo;
    float probe = 0.f;
    FC_UNROLL
    for (int j = 0; j < C; ++j) {
      const int64_t s = t + j;
      probe = nan_probe(nan_probe(probe, re[j]), im[j]);
      if (s < p.lk || (p.dk_rev && (s == 0 || N - s < p.lk_rev)))
        hw::sts(pending + (size_t(pi) << c->wx.lgN) + s, re[j] * undo);
    }
    *bad |= s.finite_in && probe != probe;
  }
};

template <int R>
FC_DEVICE void bwd_groups(BwdCtx& c, const FragsSmem* frags, const uint16_t* Ks, const uint16_t* Kg) {
  FC_REGION("b256.tw");
  const Frags f = load_frags(frags);
  const Tw256 tw = make_tw256();
  const GroupAddr a = make_group_addr();
  FC_REGION("b256");
  const int lgN = c.wx.lgN, per_row = lgN - 8, groups = 1 << (per_row + c.wx.lgpp);
  for (int q = hw::warp_id(); q < groups; q += kWarps) {
    const int pi = q >> per_row, qr = q & ((1 << per_row) - 1);
    const uint32_t base = swz(uint32_t(qr) << 8);
    const Spec X = group_forward(c.wx.re(pi), lgN, base, a, f, tw);
    const Spec DZ = group_forward(c.wdz.re(pi), lgN, base, a, f, tw);
    group_inverse(spec_mul(DZ, X, true), c.wx.re(pi), lgN, base, a, f, tw);  // conj(X) DZ
    const Spec K = group_k(Ks, Kg, qr);
    if (c.wz.W) group_inverse(spec_mul(X, K, false), c.wz.re(pi), lgN, base, a, f, tw);
    group_inverse(spec_mul(DZ, K, true), c.wdz.re(pi), lgN, base, a, f, tw);
  }
  hw::sync_block();
}

template <int R>
FC_DEVICE void bwd_run(BwdCtx& c, const FragsSmem* frags, const uint16_t* Ks, const uint16_t* Kg,
                       uint32_t (*red)[2][kMaxPairs], int iters, float& dD) {
  const BwdParams& p = *c.p;
  int parity = 0;
  for (int it = hw::block_idx_y(); it < iters; it += hw::grid_dim_y(), parity ^= 1) {
    c.x.pair0 = c.dz.pair0 = int64_t(it) << c.wx.lgpp;
    c.redx = red[parity][0];
    c.redz = red[parity][1];
    FC_REGION("load");
    c.x.copy_in();
    c.dz.copy_in();
    hw::cp_async_wait_all();
    c.x.max_into(red[parity][0]);
    c.dz.max_into(red[parity][1]);
    if (hw::thread_idx() < 2 * kMaxPairs) hw::sts(&red[parity ^ 1][0][0] + hw::thread_idx(), 0u);
    hw::sync_block();
    for (int attempt = 0;; ++attempt) {
      c.shift = kRetryShift * attempt;
      forward_r<R>(c.wx, c.x, c.redx, c.shift, /*barrier=*/false);
      forward_r<R>(c.wdz, c.dz, c.redz, c.shift);
      if (c.wx.m) {
        stage16_s256(c.wx, frags, false, false, /*barrier=*/false);
        stage16_s256(c.wdz, frags, false, false);
      }
      bwd_groups<R>(c, frags, Ks, Kg);
      if (c.wx.m) {
        stage16_s256(c.wdz, frags, true, R == 1, false);
        if (c.wz.W) stage16_s256(c.wz, frags, true, R == 1, false);
        stage16_s256(c.wx, frags, true, R == 1 && !p.dk_rev);
      }
      FC_REGION("inv.r");
      int bad = 0;
      float dD_pair = 0.f;
      inverse_r<R>(c.wdz, false, DxEpilogue{&c, &dD_pair, &bad});
      if (c.wz.W) inverse_r<R>(c.wz, false, ZEpilogue{&c, &bad});
      hw::sync_block();  // the DZ row's memory is free: the dk lags wait there
      float* pending = reinterpret_cast<float*>(c.wdz.W);
      inverse_r<R>(c.wx, p.dk_rev != nullptr, DkEpilogue{&c, pending, &bad});
      FC_REGION("overflow");
      const bool overflow = hw::sync_block_or(bad) != 0;
      if (overflow && attempt < kRetries) continue;
      dD += dD_pair;
      FC_REGION("dk.acc");  // the group's lags into the CTA's accumulators
      const int64_t N = int64_t(1) << c.wx.lgN;
      for (int64_t s = hw::thread_idx(); s < N / 2; s += kThreads) {
        float a = 0.f, ar = 0.f;
        for (int pi = 0; pi < (1 << c.wx.lgpp); ++pi) {  // (lag -s sits at N - s; lag 0 at 0)
          const float* pend = pending + (size_t(pi) << c.wx.lgN);
          if (s < p.lk) a += hw::lds(pend + s);
          if (p.dk_rev && s < p.lk_rev) ar += hw::lds(pend + (s ? N - s : 0));
        }
        if (s < p.lk) hw::sts(c.dk_acc + s, hw::lds(c.dk_acc + s) + a);
        if (p.dk_rev && s < p.lk_rev) hw::sts(c.dkr_acc + s, hw::lds(c.dkr_acc + s) + ar);
      }
      break;
    }
  }
}

}  // namespace flashconv::tc

namespace flashconv {

// The fused backward kernel for bfloat16 io (grid (H, CTAs per channel), kThreads threads). A
// template (T = bf16_t only) so that every translation unit including this header may define it.
template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 1) fftconv_bwd_tc_kernel(BwdParams p) {
  static_assert(std::is_same_v<T, bf16_t>, "the tensor-core backward serves bfloat16 io");
  using namespace tc;
  FC_SHARED uint32_t red[2][2][kMaxPairs];  // per pair max |x|, max |dz|, by iteration parity
  FC_SHARED FragsSmem frags;
  FC_SHARED float red_dD[kWarps];
  FC_REGION("kernel");  // the CTA's setup: K, DFT fragments, accumulators, maxima
  const bool gz = p.dg_out.p != nullptr;
  const int lgN = ilog2(uint32_t(p.N)), lgpp = bwd_lgpp(lgN, gz);
  const int64_t N = p.N, h = hw::block_idx_x();
  const bool k_smem = N <= kBwdKInSmemMaxN;
  uint16_t* smem = hw::dyn_smem<uint16_t>();
  uint16_t* Ks = k_smem ? smem : nullptr;
  float* dk_acc = reinterpret_cast<float*>(smem + (k_smem ? 2 * N : 0));
  float* dkr_acc = dk_acc + N / 2;
  uint16_t* rows = reinterpret_cast<uint16_t*>(dkr_acc + N / 2);
  const size_t row_block = size_t(2 * N) << lgpp;  // pp rows, in halves
  BwdCtx c;
  c.p = &p;
  c.wx = Rows{rows, lgN, plan_lgr(lgN), plan_m(lgN), lgpp};
  c.wdz = Rows{rows + row_block, lgN, plan_lgr(lgN), plan_m(lgN), lgpp};
  c.wz = Rows{gz ? rows + 2 * row_block : nullptr, lgN, plan_lgr(lgN), plan_m(lgN), lgpp};
  const bool staged = N <= kBwdStagedMaxN;
  uint16_t* stage = staged ? rows + (gz ? 3 : 2) * row_block : nullptr;
  const size_t stage_block = size_t(N) << lgpp;  // pp stagings of two rows of N/2
  c.x = StagedIn<true>{stage, p.u, p.g_in, "u", "g_in", h, 0, p.B, p.L, lgN, lgpp,
                       vectorizable(p.u.p, p.u.sb, p.u.sh, p.u.st, 8), gate_vectorizable(p.g_in)};
  c.dz = StagedIn<true>{staged ? stage + stage_block : nullptr, p.dy, p.g_out, "dy", "g_out", h, 0,
                        p.B, p.L, lgN, lgpp, vectorizable(p.dy.p, p.dy.sb, p.dy.sh, p.dy.st, 8),
                        gate_vectorizable(p.g_out)};
  c.d = p.D ? hw::ldg(p.D + h, "D") : 0.f;
  c.k_exp = hw::ldg(p.spec.k_exp + h, "k_exp");
  c.gains = Gains<cf16>::round_trip_exp(make_plan(N)) - lgN + c.k_exp;
  c.dk_acc = dk_acc;
  c.dkr_acc = dkr_acc;
  if (hw::warp_id() == 0) store_frags(&frags);
  if (k_smem) {
    FC_REGION("k.smem");
    copy_k(Ks, p.spec.K16, h, lgN);
    hw::cp_async_wait_all();
  }
  for (int64_t s = hw::thread_idx(); s < N; s += kThreads) hw::sts(dk_acc + s, 0.f);
  if (hw::thread_idx() < 2 * kMaxPairs) hw::sts(&red[0][0][0] + hw::thread_idx(), 0u);
  hw::sync_block();
  const uint16_t* Kg = p.spec.K16 + (size_t(h) << (lgN + 1));
  const int iters = int((((p.B + 1) / 2) + (1 << lgpp) - 1) >> lgpp);
  float dD = 0.f;
  switch (c.wx.lgr) {
    case 0: tc::bwd_run<1>(c, &frags, Ks, Kg, red, iters, dD); break;
    case 1: tc::bwd_run<2>(c, &frags, Ks, Kg, red, iters, dD); break;
    case 2: tc::bwd_run<4>(c, &frags, Ks, Kg, red, iters, dD); break;
    default: tc::bwd_run<8>(c, &frags, Ks, Kg, red, iters, dD); break;
  }
  FC_REGION("dk.flush");  // the CTA's dk, dk_rev and dD into HBM (other CTAs may share h)
  hw::sync_block();
  for (int64_t s = hw::thread_idx(); s < p.lk; s += kThreads)
    hw::atomic_add(p.dk + h * p.lk + s, hw::lds(dk_acc + s), "dk");
  if (p.dk_rev) {
    for (int64_t s = hw::thread_idx(); s < p.lk_rev; s += kThreads)
      hw::atomic_add(p.dk_rev + h * p.lk_rev + s, hw::lds(dkr_acc + s), "dk_rev");
  }
  if (p.dD) {
    dD = block_reduce<true>(dD, red_dD);
    if (hw::thread_idx() == 0) hw::atomic_add(p.dD + h, dD, "dD");
  }
}

// Launch on `stream`: grid (H, CTAs per channel) over iterations of pp pairs. dk, dD and dk_rev
// must be zeroed by the caller.
inline hw::Error fftconv_bwd_tc_launch(const BwdParams& p, int num_sms, hw::Stream stream) {
  const bool gz = p.dg_out.p != nullptr;
  if (p.N < tc::kMinN || !tc::bwd_tc_serves(p.N, gz) || (p.N & (p.N - 1)) || 2 * p.L > p.N || p.lk > p.L ||
      p.lk_rev > p.L || (p.lk_rev > 0 && !p.dk_rev) || p.H > 0x7fffffff || p.B > 0x7ffffffe ||
      !p.spec.K16)
    return hw::ErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  const int lgpp = tc::bwd_lgpp(tc::ilog2(uint32_t(p.N)), gz);
  const int64_t iters = ((p.B + 1) / 2 + (int64_t(1) << lgpp) - 1) >> lgpp;
  return hw::launch(fftconv_bwd_tc_kernel<bf16_t>, channel_grid(p.H, iters, num_sms), kThreads,
                    tc::bwd_smem_bytes(p.N, gz), stream, p);
}

}  // namespace flashconv
