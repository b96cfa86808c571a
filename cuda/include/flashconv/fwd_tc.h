// The fused forward convolution for bfloat16 io on tensor cores (docs/kernels.md):
//
//   y[b,h,t] = g_out * m * act( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),  x = g_in * u
//
// (m, act: the optional fused epilogue, fftconv_fwd.h.)
// One CTA serves one channel h and loops over groups of pp pairs of batch rows (pp = 8192/N for
// N < 8192, else 1, so that every warp has several 256-element groups), each pair packed as
// one complex row z = x_b + i x_{b+1} (tc_core.h: the row, its phases). Per group of pairs:
//   load      u -> staging (cp.async); max |x| per pair                        [barrier]
//   fwd.r     z * 2^-e; X = F_r @ X; X = X * w_N^(i c)                         [barrier]
//   fwd.16    (N >= 4K) X = F16 @ X at stride 256; X = X * w_4096^(k c)      [barrier]
//   b256      per 256-element group, in registers: the spectrum Z (the last two radix-16
//             stages), Z = Z * K (fp16, fragment order), the first two inverse stages
//                                                                              [barrier]
//   inv.16    (N >= 4K) X = X * conj(w_4096); X = conj(F16) @ X             [barrier]
//   inv.r     X = X * conj(w_N); X = conj(F_r) @ X, t < N/2 only;
//             y = g_out m act(conv * 2^(e + gains + k_exp) / N + D x) -> HBM [barrier: OR]
// If a conv value is not finite while its pair's input is (an fp16 overflow), the pairs are
// redone with the input scaled down by a further 2^-6 (at most three times).
// HBM sees u, the gates and y once; K is read from HBM once per CTA (N <= 8K: it stays in
// shared memory) or from L2 once per pair (fp16: half the bytes of fp32).
#pragma once

#include <cstdint>

#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"
#include "flashconv/tc_core.h"

namespace flashconv::tc {

// K stays in shared memory for N up to this (4N bytes).
constexpr int kFwdKInSmemMaxN = 8192;

// log2 of the pairs processed together (N * pp >= 8192).
FC_HOST_DEVICE constexpr int fwd_lgpp(int lgN) { return lgN < 13 ? 13 - lgN : 0; }

// Dynamic shared memory: K (4N, if kept), then pp rows (4N each), then pp stagings (2N each).
FC_HOST_DEVICE constexpr size_t fwd_smem_bytes(int64_t N) {
  return size_t(N <= kFwdKInSmemMaxN ? 4 * N : 0) + (size_t(6 * N) << fwd_lgpp(ilog2(uint32_t(N))));
}

// The epilogue of the forward: each inverse unit's conv values to y. kEpi: the fused epilogue
// (activation, dropout mask, the float32 z output) is compiled in; a separate instantiation,
// so that the plain forward keeps its registers (the epilogue's would spill it at 128).
template <bool kEpi>
struct FwdEpilogue {
  const FwdParams* p;
  const Staged* in;
  const uint32_t* red;
  int64_t pair0;
  float d;
  int gains, shift;
  bool vec_y, vec_go;  // y writable, g_out readable in runs (vectorizable, gate_vectorizable)
  int* bad;  // a non-finite conv value for a finite input

  // What the outputs of pair pi share (EpiloguePair): the output scale, whether the pair's
  // input is finite, how many of its rows exist, and its first row of y (the second is one
  // batch stride on).
  struct PairState {
    int rows;
    float undo;
    bool finite_in;
    bf16_t* y0;
  };

  FC_DEVICE PairState pair_state(int pi) const {
    const float mx = max_of(red, pi);
    const int64_t b0 = 2 * (pair0 + pi);
    PairState q{b0 + 1 < p->B ? 2 : (b0 < p->B ? 1 : 0), ldexpf(1.f, scale_exponent(mx) + shift + gains),
                finite(mx), nullptr};
    if (q.rows && p->y.p) q.y0 = static_cast<bf16_t*>(p->y.p) + b0 * p->y.sb + in->h * p->y.sh;
    return q;
  }

  template <int C>
  FC_DEVICE void emit(int pi, const PairState& s, int64_t t, const float (&re)[C], const float (&im)[C]) const {
    if (t >= p->L) return;
    float probe = 0.f;
    FC_UNROLL
    for (int r = 0; r < 2; ++r) {
      if (r >= s.rows) break;
      const int64_t b = 2 * (pair0 + pi) + r;
      float y[C], x[C];
      if (p->D) in->x<C>(pi, r, t, x);
      FC_UNROLL
      for (int j = 0; j < C; ++j) {
        const float v = r ? im[j] : re[j];
        probe = nan_probe(probe, v);
        y[j] = v * s.undo + (p->D ? d * x[j] : 0.f);
        if (kEpi && t + j < p->L) {
          if (p->z.p) store<float>(p->z, b, in->h, t + j, y[j], "z");
          y[j] = epilogue(y[j], p->act, p->mask, b, in->h, t + j);
        }
      }
      if (p->g_out.p) {
        float go[C];
        row_vals<C>(bf16_row(p->g_out, b, in->h), p->g_out.st, vec_go, t, p->L, "g_out", go);
        FC_UNROLL
        for (int j = 0; j < C; ++j) y[j] *= go[j];
      }
      if (kEpi && !s.y0) continue;  // z only
      bf16_t* dst = s.y0 + r * p->y.sb;
      if (vec_y && t + C <= p->L) {
        Vh<C> v;
        FC_UNROLL
        for (int j = 0; j < C / 2; ++j) v.w[j] = hw::pack_bf162(y[2 * j], y[2 * j + 1]);
        hw::stg(reinterpret_cast<Vh<C>*>(dst + t), v, "y");
      } else {
        FC_UNROLL
        for (int j = 0; j < C; ++j)
          if (t + j < p->L) hw::stg(dst + (t + j) * p->y.st, hw::from_float<bf16_t>(y[j]), "y");
      }
    }
    *bad |= s.finite_in && probe != probe;
  }
};

// b256 of the forward: every group's spectrum times K, back in place.
FC_DEVICE void fwd_groups(const Rows& w, const FragsSmem* frags, const uint16_t* Ks,
                          const uint16_t* Kg) {
  FC_REGION("b256.tw");  // per phase: these registers are free elsewhere
  const Frags f = load_frags(frags);
  const Tw256 tw = make_tw256();
  const GroupAddr a = make_group_addr();
  FC_REGION("b256");
  const int per_row = w.lgN - 8, groups = 1 << (per_row + w.lgpp);
  for (int q = hw::warp_id(); q < groups; q += kWarps) {
    const int pi = q >> per_row, qr = q & ((1 << per_row) - 1);
    uint16_t* Wre = w.re(pi);
    const uint32_t base = swz(uint32_t(qr) << 8);
    const Spec z = group_forward(Wre, w.lgN, base, a, f, tw);
    group_inverse(spec_mul(z, group_k(Ks, Kg, qr), false), Wre, w.lgN, base, a, f, tw);
  }
  hw::sync_block();
}

template <int R, bool kEpi>
FC_DEVICE void fwd_run(const FwdParams& p, const Rows& w, Staged in, const FragsSmem* frags,
                       const uint16_t* Ks, const uint16_t* Kg, uint32_t (*red)[kMaxPairs],
                       int iters) {
  const float d = p.D ? hw::ldg(p.D + in.h, "D") : 0.f;
  const int gains = Gains<cf16>::round_trip_exp(make_plan(int64_t(1) << w.lgN)) - w.lgN +
                    hw::ldg(p.spec.k_exp + in.h, "k_exp");
  const bool vec_y = vectorizable(p.y.p, p.y.sb, p.y.sh, p.y.st, kCols<R>), vec_go = gate_vectorizable(p.g_out);
  int parity = 0;
  for (int it = hw::block_idx_y(); it < iters; it += hw::grid_dim_y(), parity ^= 1) {
    in.pair0 = int64_t(it) << w.lgpp;
    FC_REGION("load");
    in.copy_in();
    hw::cp_async_wait_all();
    in.max_into(red[parity]);
    if (hw::thread_idx() < kMaxPairs) hw::sts(&red[parity ^ 1][hw::thread_idx()], 0u);  // next
    hw::sync_block();
    for (int attempt = 0;; ++attempt) {
      forward_r<R>(w, in, red[parity], kRetryShift * attempt);
      if (w.m) stage16_s256(w, frags, false, false);
      fwd_groups(w, frags, Ks, Kg);
      if (w.m) stage16_s256(w, frags, true, R == 1);
      FC_REGION("inv.r");
      int bad = 0;
      inverse_r<R>(w, false, FwdEpilogue<kEpi>{&p, &in, red[parity], in.pair0, d, gains, kRetryShift * attempt,
                                         vec_y, vec_go, &bad});
      FC_REGION("overflow");
      if (!hw::sync_block_or(bad) || attempt >= kRetries) break;
    }
  }
}

}  // namespace flashconv::tc

namespace flashconv {

// CTAs per SM the forward is compiled for: two on sm_90 (at most 128 registers, 125 used);
// sm_80's code generation needs about 174 for the same code and spilled at 128 (14 stores, 52
// loads), so there it asks for one CTA (8 warps) per SM and no spills. The instantiation with
// the fused epilogue (kEpi) asks for one everywhere: at 128 it spilled 66 bytes on sm_90.
#define FC_FWD_TC_MIN_BLOCKS(kEpi) ((kEpi || FC_ARCH_SM80) ? 1 : 2)

// The fused forward kernel for bfloat16 io (grid (H, CTAs per channel), kThreads threads;
// FC_FWD_TC_MIN_BLOCKS above). A template (T = bf16_t only) so that every translation unit
// including this header may define it; kEpi: with the fused epilogue (FwdEpilogue).
template <class T, bool kEpi>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, FC_FWD_TC_MIN_BLOCKS(kEpi)) fftconv_fwd_tc_kernel(FwdParams p) {
  static_assert(std::is_same_v<T, bf16_t>, "the tensor-core forward serves bfloat16 io");
  using namespace tc;
  FC_SHARED uint32_t red[2][kMaxPairs];  // per pair max |x|, by iteration parity
  FC_SHARED FragsSmem frags;
  FC_REGION("kernel");  // the CTA's setup: K, DFT fragments, maxima
  const int lgN = ilog2(uint32_t(p.N));
  const bool k_smem = p.N <= kFwdKInSmemMaxN;
  uint16_t* smem = hw::dyn_smem<uint16_t>();
  const Rows w{smem + (k_smem ? (size_t(2) << lgN) : 0), lgN, plan_lgr(lgN), plan_m(lgN), fwd_lgpp(lgN)};
  const Staged in{w.W + (size_t(2) << (lgN + w.lgpp)), p.u, p.g_in, "u", "g_in", hw::block_idx_x(),
                  0, p.B, p.L, lgN, w.lgpp, vectorizable(p.u.p, p.u.sb, p.u.sh, p.u.st, 8),
                  gate_vectorizable(p.g_in)};
  if (hw::warp_id() == 0) store_frags(&frags);
  if (k_smem) {
    FC_REGION("k.smem");
    copy_k(smem, p.spec.K16, in.h, lgN);
    hw::cp_async_wait_all();
  }
  if (hw::thread_idx() < kMaxPairs) hw::sts(&red[0][hw::thread_idx()], 0u);
  hw::sync_block();  // K, the fragments and the first iteration's maxima
  const uint16_t* Kg = p.spec.K16 + (size_t(in.h) << (lgN + 1));
  const int iters = int((((p.B + 1) / 2) + (1 << w.lgpp) - 1) >> w.lgpp);
  switch (w.lgr) {
    case 0: tc::fwd_run<1, kEpi>(p, w, in, &frags, k_smem ? smem : nullptr, Kg, red, iters); break;
    case 1: tc::fwd_run<2, kEpi>(p, w, in, &frags, k_smem ? smem : nullptr, Kg, red, iters); break;
    case 2: tc::fwd_run<4, kEpi>(p, w, in, &frags, k_smem ? smem : nullptr, Kg, red, iters); break;
    default: tc::fwd_run<8, kEpi>(p, w, in, &frags, k_smem ? smem : nullptr, Kg, red, iters); break;
  }
}

// Launch on `stream`: grid (H, CTAs per channel) over iterations of pp pairs.
inline hw::Error fftconv_fwd_tc_launch(const FwdParams& p, int num_sms, hw::Stream stream) {
  if (p.N < tc::kMinN || p.N > tc::kMaxN || (p.N & (p.N - 1)) || 2 * p.L > p.N ||
      p.H > 0x7fffffff || p.B > 0x7ffffffe || !p.spec.K16)
    return hw::ErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  const int lgpp = tc::fwd_lgpp(tc::ilog2(uint32_t(p.N)));
  const int64_t iters = ((p.B + 1) / 2 + (int64_t(1) << lgpp) - 1) >> lgpp;
  const hw::Grid grid = channel_grid(p.H, iters, num_sms);
  if (p.act || p.mask.p || p.z.p)
    return hw::launch(fftconv_fwd_tc_kernel<bf16_t, true>, grid, kThreads, tc::fwd_smem_bytes(p.N), stream, p);
  return hw::launch(fftconv_fwd_tc_kernel<bf16_t, false>, grid, kThreads, tc::fwd_smem_bytes(p.N), stream, p);
}

}  // namespace flashconv
