// Building blocks of the tensor-core kernels for bfloat16 io (fwd_tc.h, bwd_tc.h; docs/kernels.md).
//
// A packed pair of batch rows z = x_b + i x_{b+1}, FFT size N = r * 16^m * 256 (r in {1, 2, 4,
// 8}, m in {0, 1}, 256 <= N <= 32K), lives in shared memory as a planar fp16 row: a real and an
// imaginary plane of N halves whose 16-byte chunks are XOR-swizzled (swz), so that every
// phase's accesses -- 16-byte rows at power-of-two strides -- are free of bank conflicts. The
// transform's stages (radix-r first, then radix 16: block_fft.h's plan) are grouped into
// phases, each one pass over the row between barriers:
//   forward_r    x * 2^-e; X = F_r @ X (stride N/r, fp32 registers); X = X * w_N^(i c)
//   stage16_s256 (m = 1) X = F16 @ X at stride 256 (mma); X = X * w_4096^(k c)  (and inverse)
//   group_*      per 256-element group, in registers: Y = F16 @ X; Y = Y * w_256^(k i2);
//                Z = Y @ F16 (the spectrum, Monarch order), and the inverse of that
//   inverse_r    X = X * conj(w_N^(i c)); X = conj(F_r) @ X -> the caller's epilogue
// Stage gains: F16 is scaled by 1/4 and a radix-4/8 stage by 1/2 (Gains<cf16>), undone with
// the input scale by the caller. An fp16 overflow in between becomes inf and then a non-finite
// output, which the caller detects (finite input, non-finite output) and redoes.
#pragma once

#include <cstdint>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv::tc {

constexpr int kWarps = kThreads / 32;
constexpr int kMaxPairs = 32;  // pairs processed together for the smallest N
constexpr int kMinN = 256, kMaxN = 32768;
// An overflowed pair is redone with its inputs scaled down by a further 2^-kRetryShift, at most
// kRetries times: the data then keeps enough of fp16's range (products of two spectra in the
// backward halve it twice).
constexpr int kRetryShift = 6, kRetries = 3;

// 16 bytes (8 halves) and C halves (C = 2, 4) for vector accesses.
struct alignas(16) V16 {
  uint32_t w[4];
};
template <int C>
struct alignas(2 * C) Vh {
  uint32_t w[C / 2];
};

// Columns per unit of the radix-r phases: 4 (8-byte accesses), 2 for r = 8 (registers).
template <int R>
constexpr int kCols = R == 8 ? 2 : 4;

// Physical position of half n in a plane: 16-byte chunks XOR-swizzled by a fold of the
// 128-byte block index (three 3-bit groups; N <= 32K), so that 8 chunks of a warp access that
// lie in different blocks at a power-of-two stride land in different banks. The fold is linear
// in the bits: for positions a, b with no bits in common swz(a | b) = swz(a) ^ swz(b), so
// addresses are built from precomputed parts.
FC_HOST_DEVICE constexpr uint32_t swz(uint32_t n) {
  const uint32_t b = n >> 6;
  return n ^ (((b ^ (b >> 3) ^ (b >> 6)) & 7u) << 3);
}

FC_HOST_DEVICE constexpr int ilog2(uint32_t n) {
  int l = 0;
  while ((1u << l) < n) ++l;
  return l;
}

// The rows a CTA works on: pp = 2^lgpp packed pairs, each 2N halves (real plane, imaginary
// plane), N = 2^lgN = 2^lgr * 16^m * 256.
struct Rows {
  uint16_t* W;
  int lgN, lgr, m, lgpp;
  FC_DEVICE uint16_t* re(int pi) const { return W + (size_t(pi) << (lgN + 1)); }
};

FC_HOST_DEVICE constexpr int plan_m(int lgN) { return lgN >= 12 ? 1 : 0; }
FC_HOST_DEVICE constexpr int plan_lgr(int lgN) { return lgN - 8 - 4 * plan_m(lgN); }

// sin(pi x), cos(pi x) for |x| <= 1: the hardware approximation (absolute error ~1e-6, far
// below the fp16 storage between stages) under nvcc, libm on the CPU.
FC_DEVICE void fast_sincospi(float x, float& s, float& c) {
#if defined(__CUDACC__)
  __sincosf(3.14159265358979f * x, &s, &c);
#else
  const double a = 3.14159265358979323846 * double(x);
  s = float(std::sin(a));
  c = float(std::cos(a));
#endif
}

// w_{2^lg}^m = exp(-2 pi i m / 2^lg), conjugated if inv; m reduced to a half turn first.
FC_DEVICE void unit_root(uint32_t m, int lg, bool inv, float& wr, float& wi) {
  const uint32_t full = 1u << lg;
  int mm = int(m & (full - 1));
  if (mm > int(full >> 1)) mm -= int(full);
  float s;
  fast_sincospi(-float(mm) * ldexpf(1.f, 1 - lg), s, wr);
  wi = inv ? -s : s;
}

// probe + v * 0: NaN from the first inf or NaN v on (one fma per value where a finiteness test
// per value cost a compare and a predicate); test probe != probe once after the values.
FC_DEVICE float nan_probe(float probe, float v) { return fmaf(v, 0.f, probe); }

FC_DEVICE float bf16_lo(uint32_t w) { return hw::to_float(bf16_t{uint16_t(w)}); }
FC_DEVICE float bf16_hi(uint32_t w) { return hw::to_float(bf16_t{uint16_t(w >> 16)}); }

// ---- DFT-16 fragments and twiddles ---------------------------------------------------------

// The DFT-16 matrix F[k][n] = w_16^(k n) / 4 as mma fragments: A operand (rows k, cols n)
// and, for the right product Y @ F (F symmetric), the B operand of column tiles nt = 0, 1.
struct Frags {
  uint32_t a_re[4], a_im[4], a_nim[4];
  uint32_t b_re[2][2], b_im[2][2], b_nim[2][2];
};

FC_DEVICE Frags make_frags() {
  Frags f;
  const Dft16Fragments a = dft16_fragments();
  FC_UNROLL
  for (int j = 0; j < 4; ++j) f.a_re[j] = a.re[j], f.a_im[j] = a.im[j], f.a_nim[j] = a.neg_im[j];
  const int g = hw::lane_id() >> 2, t = hw::lane_id() & 3;
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int j = 0; j < 2; ++j) {  // B register j: rows k = 2t + 8j, 2t + 8j + 1; column n
      const int k = 2 * t + 8 * j, n = g + 8 * nt;
      const int j0 = (k * n) & 15, j1 = ((k + 1) * n) & 15;
      f.b_re[nt][j] = hw::pack2<half_t>(0.25f * cos16(j0), 0.25f * cos16(j1));
      f.b_im[nt][j] = hw::pack2<half_t>(-0.25f * sin16(j0), -0.25f * sin16(j1));
      f.b_nim[nt][j] = hw::pack2<half_t>(0.25f * sin16(j0), 0.25f * sin16(j1));
    }
  }
  return f;
}

// Frags of every lane, kept in shared memory (computed once per CTA; 3 KB) and loaded per phase
// with 16-byte reads, so that they hold no registers between the phases that use them.
struct FragsSmem {
  V16 v[6][32];  // [word group][lane]
};

FC_DEVICE void store_frags(FragsSmem* fs) {
  const Frags f = make_frags();
  static_assert(sizeof(Frags) == 6 * sizeof(V16), "Frags: 24 words");
  const uint32_t* w = reinterpret_cast<const uint32_t*>(&f);
  FC_UNROLL
  for (int k = 0; k < 6; ++k)
    hw::sts(&fs->v[k][hw::lane_id()], V16{{w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]}});
}

FC_DEVICE Frags load_frags(const FragsSmem* fs) {
  Frags f;
  uint32_t* w = reinterpret_cast<uint32_t*>(&f);
  FC_UNROLL
  for (int k = 0; k < 6; ++k) {
    const V16 v = hw::lds(&fs->v[k][hw::lane_id()]);
    FC_UNROLL
    for (int j = 0; j < 4; ++j) w[4 * k + j] = v.w[j];
  }
  return f;
}

// (F or conj F) @ X for data X as B operand (xr, xi: 2 registers each); d: D layout.
FC_DEVICE void f_times(const Frags& f, bool conj, const uint32_t xr[2], const uint32_t xi[2],
                       float dr[4], float di[4]) {
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  // forward: Re = Fr Xr - Fi Xi, Im = Fr Xi + Fi Xr; conjugate: Re = Fr Xr + Fi Xi, Im = Fr Xi - Fi Xr
  hw::mma_m16n8k16<half_t>(dr, f.a_re, xr, zero);
  hw::mma_m16n8k16<half_t>(dr, conj ? f.a_im : f.a_nim, xi, dr);
  hw::mma_m16n8k16<half_t>(di, f.a_re, xi, zero);
  hw::mma_m16n8k16<half_t>(di, conj ? f.a_nim : f.a_im, xr, di);
}

// Y @ (F or conj F), column tile nt, for data Y as A operand (yr, yi: 4 registers each).
FC_DEVICE void times_f(const Frags& f, bool conj, int nt, const uint32_t yr[4], const uint32_t yi[4],
                       float dr[4], float di[4]) {
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  // forward: Re = Yr Fr - Yi Fi, Im = Yr Fi + Yi Fr; conjugate: Re = Yr Fr + Yi Fi, Im = Yi Fr - Yr Fi
  hw::mma_m16n8k16<half_t>(dr, yr, f.b_re[nt], zero);
  hw::mma_m16n8k16<half_t>(dr, yi, conj ? f.b_im[nt] : f.b_nim[nt], dr);
  hw::mma_m16n8k16<half_t>(di, yi, f.b_re[nt], zero);
  hw::mma_m16n8k16<half_t>(di, yr, conj ? f.b_nim[nt] : f.b_im[nt], di);
}

// D-layout results of the two column tiles (d[nt][e]) as the A operand (rows of D, k = columns).
FC_DEVICE void d_to_a(const float d[2][4], uint32_t a[4]) {
  a[0] = hw::pack_half2(d[0][0], d[0][1]);
  a[1] = hw::pack_half2(d[0][2], d[0][3]);
  a[2] = hw::pack_half2(d[1][0], d[1][1]);
  a[3] = hw::pack_half2(d[1][2], d[1][3]);
}

// Twiddles of the 256-point group (lane constants): w_256^(k1 i2) at this lane's D-layout
// positions, k1 = g + 8 (e >> 1), i2 = 2t + (e & 1) + 8 nt. Five unit roots and products:
// w^(g 2t), w^g, w^(8g), w^(16t), w^8, and w^64 = -i.
struct Tw256 {
  float re[2][4], im[2][4];
};

FC_DEVICE Tw256 make_tw256() {
  Tw256 w;
  const int g = hw::lane_id() >> 2, t = hw::lane_id() & 3;
  float br, bi, gr, gi, hr, hi, qr, qi, er, ei;
  unit_root(uint32_t(2 * g * t), 8, false, br, bi);  // w^(g 2t)
  unit_root(uint32_t(g), 8, false, gr, gi);          // w^g
  unit_root(uint32_t(8 * g), 8, false, hr, hi);      // w^(8 g)
  unit_root(uint32_t(16 * t), 8, false, qr, qi);     // w^(16 t)
  unit_root(8u, 8, false, er, ei);                   // w^8
  w.re[0][0] = br, w.im[0][0] = bi;                  // (g, 2t)
  w.re[0][1] = br, w.im[0][1] = bi;
  cmul(w.re[0][1], w.im[0][1], gr, gi);              // (g, 2t + 1)
  w.re[1][0] = br, w.im[1][0] = bi;
  cmul(w.re[1][0], w.im[1][0], hr, hi);              // (g, 2t + 8)
  w.re[1][1] = w.re[1][0], w.im[1][1] = w.im[1][0];
  cmul(w.re[1][1], w.im[1][1], gr, gi);              // (g, 2t + 9)
  // k1 = g + 8: times w^(8 i2) = w^(16t) (i2 = 2t), w^8 more for 2t + 1, -i more for + 8
  float q1r = qr, q1i = qi;
  cmul(q1r, q1i, er, ei);
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int h = 0; h < 2; ++h) {  // e = 2 + h: i2 = 2t + h + 8 nt
      float mr = h ? q1r : qr, mi = h ? q1i : qi;
      if (nt) {  // times -i
        const float r = mi;
        mi = -mr;
        mr = r;
      }
      w.re[nt][2 + h] = w.re[nt][h], w.im[nt][2 + h] = w.im[nt][h];
      cmul(w.re[nt][2 + h], w.im[nt][2 + h], mr, mi);
    }
  }
  return w;
}

// ---- staged inputs and gates -----------------------------------------------------------------

// View v is readable `elems` elements at a time at 2 * elems-byte alignment: unit stride and
// every row start aligned.
FC_DEVICE bool vectorizable(const void* ptr, int64_t sb, int64_t sh, int64_t st, int elems) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  return ptr && st == 1 && a % (2 * elems) == 0 && sb % elems == 0 && sh % elems == 0;
}

// A gate (bf16, or float32 where g.f32) is readable in runs of up to 8 elements at run-aligned
// t: what vectorizable asks of 8 bf16 (unit stride, a 16-byte aligned start, rows starting at
// multiples of 8 elements) is also enough for float32 runs of at most 4.
FC_DEVICE bool gate_vectorizable(const View3& g) { return vectorizable(g.p, g.sb, g.sh, g.st, 8); }

template <int C>
struct alignas(4 * C) Vf {
  float f[C];
};

// Row (b, h) of a bf16 view: its element 0.
FC_DEVICE const bf16_t* bf16_row(const View3& s, int64_t b, int64_t h) {
  return static_cast<const bf16_t*>(s.p) + b * s.sb + h * s.sh;
}

// Values t .. t+C-1 (t a multiple of C) of a bf16 row (its element 0, stride st) as packed
// halves (V: V16 or Vh<C>), zero beyond L: one load where `vec` (the row is readable C
// elements at a time at run-aligned t) and the run lies inside L, else element by element.
template <int C, class V>
FC_DEVICE V fetch_row(const bf16_t* row, int64_t st, bool vec, int64_t t, int64_t L, const char* name) {
  if (vec && t + C <= L) return hw::ldg(reinterpret_cast<const V*>(row + t), name);
  V v{};
  FC_UNROLL
  for (int j = 0; j < C; ++j)  // (constant indices: the array stays in registers)
    if (t + j < L)
      v.w[j >> 1] |= uint32_t(hw::ldg(row + (t + j) * st, name).bits) << (16 * (j & 1));
  return v;
}

// fetch_row of row (b, h) of a bf16 view (vec: vectorizable, or gate_vectorizable).
template <int C, class V>
FC_DEVICE V fetch_bf16(const View3& s, bool vec, int64_t b, int64_t h, int64_t t, int64_t L,
                       const char* name) {
  return fetch_row<C, V>(bf16_row(s, b, h), s.st, vec, t, L, name);
}

// Element j of packed bf16 words w (two per word, the lower first).
FC_DEVICE float bf16_at(const uint32_t* w, int j) { return (j & 1) ? bf16_hi(w[j >> 1]) : bf16_lo(w[j >> 1]); }

// The bf16 values t .. t+C-1 of a row (element 0, stride) as floats, 0 beyond L (fetch_row).
template <int C>
FC_DEVICE void row_vals(const bf16_t* row, int64_t st, bool vec, int64_t t, int64_t L, const char* name,
                        float (&out)[C]) {
  const Vh<C> v = fetch_row<C, Vh<C>>(row, st, vec, t, L, name);
  FC_UNROLL
  for (int j = 0; j < C; ++j) out[j] = bf16_at(v.w, j);
}

// A present gate's values t .. t+C-1 of row (b, h) as floats (t a multiple of C; C = 2, 4, 8),
// 0 beyond L: one 2C-byte load (bf16) or 4C-byte loads of at most 16 bytes (float32) where
// `vec` (gate_vectorizable) and the run lies inside L, else element by element. kF32: the
// gate may be float32 (g.f32; only the backward's g_out, with the fused epilogue), so that
// the other callers carry no code for it.
template <int C, bool kF32>
FC_DEVICE void gate_vals(const View3& g, bool vec, int64_t b, int64_t h, int64_t t, int64_t L,
                         const char* name, float (&out)[C]) {
  if (kF32 && g.f32) {
    if (vec && t + C <= L) {
      constexpr int Q = C < 4 ? C : 4;
      const float* row = static_cast<const float*>(g.p) + b * g.sb + h * g.sh + t;
      FC_UNROLL
      for (int q = 0; q < C; q += Q) {
        const Vf<Q> v = hw::ldg(reinterpret_cast<const Vf<Q>*>(row + q), name);
        FC_UNROLL
        for (int j = 0; j < Q; ++j) out[q + j] = v.f[j];
      }
    } else {
      FC_UNROLL
      for (int j = 0; j < C; ++j) out[j] = t + j < L ? load<float>(g, b, h, t + j, name) : 0.f;
    }
    return;
  }
  row_vals<C>(bf16_row(g, b, h), g.st, vec, t, L, name, out);
}

// kBwd (the backward's inputs) and U null: not staged -- every read goes to global memory (the
// first from HBM, the rest served by the L2), for the bf16 backward at N = 16K, whose rows
// leave no room for stagings; kBwd also admits a float32 gate. (A template flag, so that the
// forward, always staged with bf16 gates, carries none of that code: it cost its registers a
// spill.)
template <bool kBwd>
struct StagedIn {
  uint16_t* U;
  View3 src, gate;  // src: what is staged; gate.p null: none (bf16, or float32 where gate.f32)
  const char *src_name, *gate_name;
  int64_t h, pair0, B, L;
  int lgN, lgpp;
  bool vec;   // src readable 16 bytes at a time
  bool gvec;  // the gate: gate_vectorizable

  FC_DEVICE bool direct() const { return kBwd && !U; }
  FC_DEVICE uint16_t* row(int pi, int r) const { return U + ((2 * pi + r) << (lgN - 1)); }
  FC_DEVICE const bf16_t* src_row(int64_t b) const { return bf16_row(src, b, h); }

  // The source's values t .. t+C-1 of row b from global memory (zero beyond L and for b >= B).
  template <int C, class V>
  FC_DEVICE V fetch(int64_t b, int64_t t) const {
    return b < B ? fetch_bf16<C, V>(src, vec, b, h, t, L, src_name) : V{};
  }

  // Copies the pp pairs' rows in: cp.async, 16 bytes per thread and unit (a synchronous copy
  // for strided or misaligned sources and the tail); nothing when not staged. The caller
  // waits (hw::cp_async_wait_all).
  FC_DEVICE void copy_in() const {
    if (direct()) return;
    const int lgc = lgN - 4;  // N/16 chunks of 8 per row
    const int units = 1 << (lgN - 3 + lgpp);
    for (int u = hw::thread_idx(); u < units; u += kThreads) {
      const int chunk = u & ((1 << lgc) - 1), r = (u >> lgc) & 1, pi = u >> (lgc + 1);
      const int64_t b = 2 * (pair0 + pi) + r, t0 = int64_t(chunk) * 8;
      V16* dst = reinterpret_cast<V16*>(row(pi, r) + t0);
      if (b < B && vec && t0 + 8 <= L)
        hw::cp_async16(dst, src_row(b) + t0, src_name);
      else
        hw::sts(dst, fetch<8, V16>(b, t0));
    }
  }

  // Per pair max |x| into red[pi] (float bits, atomic max: |x| >= 0 compares as its bits, a
  // NaN's bits exceed every number's), over the units this thread copied in (a warp's units
  // belong to one pair).
  FC_DEVICE void max_into(uint32_t* red) const {
    const int lgc = lgN - 4;
    const int units = 1 << (lgN - 3 + lgpp);
    for (int u = hw::thread_idx(); u < units; u += kThreads) {
      const int chunk = u & ((1 << lgc) - 1), r = (u >> lgc) & 1, pi = u >> (lgc + 1);
      const int64_t b = 2 * (pair0 + pi) + r, t0 = int64_t(chunk) * 8;
      const V16 v = direct() ? fetch<8, V16>(b, t0) : hw::lds(reinterpret_cast<const V16*>(row(pi, r) + t0));
      float m = 0.f;
      if (gate.p && b < B && kBwd && gate.f32) {
        float g[8];
        gate_vals<8, kBwd>(gate, gvec, b, h, t0, L, gate_name, g);
        FC_UNROLL
        for (int j = 0; j < 8; ++j) m = max_nan(m, fabsf(g[j] * bf16_at(v.w, j)));
      } else {  // a bf16 gate, kept packed (fewer live registers); 1 for none
        const V16 gw = gate.p && b < B ? fetch_bf16<8, V16>(gate, gvec, b, h, t0, L, gate_name)
                                       : V16{{0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u}};
        FC_UNROLL
        for (int j = 0; j < 8; ++j) m = max_nan(m, fabsf(bf16_at(v.w, j) * bf16_at(gw.w, j)));
      }
      FC_UNROLL
      for (int off = 16; off > 0; off >>= 1) m = max_nan(m, hw::shfl_xor(m, off));
      if (hw::lane_id() == 0) hw::atomic_max_shared(red + pi, hw::float_bits(m));
    }
  }

  // The staged value (not gated) at t .. t+C-1 of row r of pair pi (0 at t >= N/2).
  template <int C>
  FC_DEVICE void raw(int pi, int r, int64_t t, float (&out)[C]) const {
    Vh<C> w{};
    if (direct())
      w = fetch<C, Vh<C>>(2 * (pair0 + pi) + r, t);
    else if (t < (int64_t(1) << (lgN - 1)))
      w = hw::lds(reinterpret_cast<const Vh<C>*>(row(pi, r) + t));
    FC_UNROLL
    for (int j = 0; j < C; ++j) out[j] = bf16_at(w.w, j);
  }

  // x = gate * staged at t .. t+C-1 of row r of pair pi (0 beyond L or for a missing row).
  template <int C>
  FC_DEVICE void x(int pi, int r, int64_t t, float (&out)[C]) const {
    raw<C>(pi, r, t, out);
    const int64_t b = 2 * (pair0 + pi) + r;
    if (gate.p && b < B) {
      float g[C];
      gate_vals<C, kBwd>(gate, gvec, b, h, t, L, gate_name, g);
      FC_UNROLL
      for (int j = 0; j < C; ++j) out[j] *= g[j];
    }
  }
};

using Staged = StagedIn<false>;  // always staged

FC_DEVICE float max_of(const uint32_t* red, int pi) { return hw::bits_float(hw::lds(red + pi)); }

// ---- radix-r phases ------------------------------------------------------------------------

// Radix-R DFT of R complex values in registers (dft_small for R > 1), times scale.
template <int R>
FC_DEVICE void dft_r(float (&re)[R], float (&im)[R], bool inverse, float scale) {
  if constexpr (R > 1) {
    dft_small<R>(re, im, inverse, scale);
  }
}

// X[j][i] *= w_N^(i (col + j)) (conjugated if inverse) for a unit's C columns: one unit root
// for w_N^col, then products (error ~1e-7, far below the fp16 storage).
template <int R, int C>
FC_DEVICE void twiddle_r(float (&re)[C][R], float (&im)[C][R], uint32_t col, int lgN, bool inverse) {
  if constexpr (R > 1) {
    float cr, ci, w1r, w1i;
    unit_root(col, lgN, inverse, cr, ci);
    unit_root(1, lgN, inverse, w1r, w1i);
    FC_UNROLL
    for (int j = 0; j < C; ++j) {
      float wr = cr, wi = ci;  // w^(i (col + j)) for i = 1, 2, ...
      FC_UNROLL
      for (int i = 1; i < R; ++i) {
        cmul(re[j][i], im[j][i], wr, wi);
        if (i + 1 < R) cmul(wr, wi, cr, ci);
      }
      if (j + 1 < C) cmul(cr, ci, w1r, w1i);
    }
  }
}

// Forward radix-r phase: z = (x_b0 + i x_b1) * 2^-e (e from the pair's max in red, plus
// `shift`), X = F_r @ X, X = X * w_N^(i c), into the rows. Units of C columns, so that the
// staging is read and W written 2C bytes at a time. Ends with a barrier unless told not to
// (a caller transforming several rows shares one).
template <int R, class In>
FC_DEVICE void forward_r(const Rows& w, const In& in, const uint32_t* red, int shift,
                         bool barrier = true) {
  FC_REGION("fwd.r");
  constexpr int C = kCols<R>, lgC = C == 4 ? 2 : 1;
  const int lgN = w.lgN, lgS = lgN - w.lgr;  // S = N / R
  const int units = 1 << (lgS - lgC + w.lgpp);
  const float scale_r = Gains<cf16>::stage_scale(R);
  int last_pi = -1;
  float scale = 0.f;
  for (int u = hw::thread_idx(); u < units; u += kThreads) {
    const int pi = u >> (lgS - lgC), col = C * (u & ((1 << (lgS - lgC)) - 1));
    if (pi != last_pi) {  // the pair's input scale 2^-e
      scale = ldexpf(1.f, -(scale_exponent(max_of(red, pi)) + shift));
      last_pi = pi;
    }
    float re[C][R], im[C][R];  // [column][i]
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      if (R > 1 && i >= R / 2) {  // causal zero padding: never read
        FC_UNROLL
        for (int j = 0; j < C; ++j) re[j][i] = im[j][i] = 0.f;
        continue;
      }
      const int64_t t = (int64_t(i) << lgS) + col;
      float a[C], b[C];
      in.template x<C>(pi, 0, t, a);
      in.template x<C>(pi, 1, t, b);
      FC_UNROLL
      for (int j = 0; j < C; ++j) re[j][i] = a[j] * scale, im[j][i] = b[j] * scale;
    }
    FC_UNROLL
    for (int j = 0; j < C; ++j) dft_r<R>(re[j], im[j], false, scale_r);
    twiddle_r<R, C>(re, im, uint32_t(col), lgN, false);
    uint16_t* Wre = w.re(pi);
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      const uint32_t n = swz(uint32_t((i << lgS) + col));
      Vh<C> vr, vi;
      FC_UNROLL
      for (int j = 0; j < C / 2; ++j) {
        vr.w[j] = hw::pack_half2(re[2 * j][i], re[2 * j + 1][i]);
        vi.w[j] = hw::pack_half2(im[2 * j][i], im[2 * j + 1][i]);
      }
      hw::sts(reinterpret_cast<Vh<C>*>(Wre + n), vr);
      hw::sts(reinterpret_cast<Vh<C>*>(Wre + (1 << lgN) + n), vi);
    }
  }
  if (barrier) hw::sync_block();
}

// The epilogue of an inverse phase for pair pi: what every output of the pair shares
// (out.pair_state(pi): its scale, row pointers, ...) is made once per unit, then each run of
// outputs goes to out.emit(pi, state, t, re, im).
template <class Out>
struct EpiloguePair {
  const Out* out;
  int pi;
  typename Out::PairState s;
  template <int C>
  FC_DEVICE void operator()(int64_t t, const float (&re)[C], const float (&im)[C]) const {
    out->emit(pi, s, t, re, im);
  }
};

// Inverse radix-r phase: X = X * conj(w_N^(i c)); X = conj(F_r) @ X; hands each unit's outputs
// to out (EpiloguePair) for the C time indices t .. t+C-1 < N/2 (< N if
// `full`: negative lags). No barrier at the end (the caller's epilogue decides).
template <int R, class Out>
FC_DEVICE void inverse_r(const Rows& w, bool full, const Out& out) {
  constexpr int C = kCols<R>, lgC = C == 4 ? 2 : 1;
  const int lgN = w.lgN, lgS = lgN - w.lgr;
  const int units = 1 << (lgS - lgC + w.lgpp);
  const float scale_r = Gains<cf16>::stage_scale(R);
  for (int u = hw::thread_idx(); u < units; u += kThreads) {
    const int pi = u >> (lgS - lgC), col = C * (u & ((1 << (lgS - lgC)) - 1));
    const uint16_t* Wre = w.re(pi);
    float re[C][R], im[C][R];
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      const uint32_t n = swz(uint32_t((i << lgS) + col));
      const Vh<C> vr = hw::lds(reinterpret_cast<const Vh<C>*>(Wre + n));
      const Vh<C> vi = hw::lds(reinterpret_cast<const Vh<C>*>(Wre + (1 << lgN) + n));
      FC_UNROLL
      for (int j = 0; j < C / 2; ++j) {
        hw::unpack_half2(vr.w[j], re[2 * j][i], re[2 * j + 1][i]);
        hw::unpack_half2(vi.w[j], im[2 * j][i], im[2 * j + 1][i]);
      }
    }
    twiddle_r<R, C>(re, im, uint32_t(col), lgN, true);
    FC_UNROLL
    for (int j = 0; j < C; ++j) dft_r<R>(re[j], im[j], true, scale_r);
    const EpiloguePair<Out> o{&out, pi, out.pair_state(pi)};
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      if (!full && i >= (R > 1 ? R / 2 : 1)) break;  // the discarded half
      float orr[C], oi[C];
      FC_UNROLL
      for (int j = 0; j < C; ++j) orr[j] = re[j][i], oi[j] = im[j][i];
      o((int64_t(i) << lgS) + col, orr, oi);
    }
  }
}

// ---- the radix-16 phase at stride 256 ------------------------------------------------------

// The radix-16 stage at stride 256 (blocks of 4096; m = 1), forward (X = F16 @ X; X = X *
// w_4096^(k c)) or inverse (X = X * conj(w_4096^(k c)); X = conj(F16) @ X, only rows < 8 kept
// when keep_half). Tiles of 16 rows x 8 columns; each warp walks columns c0 = 8 (warp + 8 j),
// j = 0..3, and for each the blocks of every row, so a tile's twiddles serve them all. Ends
// with a barrier unless told not to.
FC_DEVICE void stage16_s256(const Rows& w, const FragsSmem* frags, bool inverse, bool keep_half,
                            bool barrier = true) {
  const Frags f = load_frags(frags);
  const int lgN = w.lgN, g = hw::lane_id() >> 2, t = hw::lane_id() & 3, lane = hw::lane_id();
  const int blocks = 1 << (w.lgr + w.lgpp);  // 4096-element blocks in all pp rows
  // B operand: rows k (stride 256), columns c0..c0+7; matrices (re k<8, re k>=8, im k<8,
  // im k>=8): this lane's row address, and its two D-layout store positions (rows g, g + 8)
  const int mat = lane >> 3;
  const uint32_t ld_off = swz(256 * ((lane & 7) + 8 * (mat & 1)));
  const uint32_t ld_plane = uint32_t(mat >> 1) << lgN;
  const uint32_t st_off[2] = {swz(256 * g + 2 * t), swz(256 * (g + 8) + 2 * t)};
  if (inverse) {
    FC_REGION("inv.16");
  } else {
    FC_REGION("fwd.16");
  }
  // Twiddle positions of this lane: forward in the D layout (k = g + 8 (e >> 1), c = 2t +
  // (e & 1)); inverse in the B layout (k = 2t + (e & 1) + 8 (e >> 1), c = g).
  for (int j = 0; j < 4; ++j) {
    const int c0 = 8 * (hw::warp_id() + kWarps * j);
    float twr[4], twi[4];
    FC_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int k = inverse ? 2 * t + (e & 1) + 8 * (e >> 1) : g + 8 * (e >> 1);
      const int col = c0 + (inverse ? g : 2 * t + (e & 1));
      unit_root(uint32_t(k * col), 12, inverse, twr[e], twi[e]);
    }
    const uint32_t c0_sw = swz(uint32_t(c0));
    for (int blk = 0; blk < blocks; ++blk) {
      uint16_t* Wre = w.re(blk >> w.lgr);
      const uint32_t base = swz(uint32_t((blk & ((1 << w.lgr) - 1)) << 12)) ^ c0_sw;
      uint32_t x[4];
      hw::ldmatrix_x4_trans(x, Wre + ld_plane + (base ^ ld_off));
      uint32_t xr[2] = {x[0], x[1]}, xi[2] = {x[2], x[3]};
      if (inverse) {  // X = X * conj(w): on the B fragments, element (k = 2t + 8 reg + half, c = g)
        FC_UNROLL
        for (int reg = 0; reg < 2; ++reg) {
          float r0, r1, i0, i1;
          hw::unpack_half2(xr[reg], r0, r1);
          hw::unpack_half2(xi[reg], i0, i1);
          cmul(r0, i0, twr[2 * reg], twi[2 * reg]);
          cmul(r1, i1, twr[2 * reg + 1], twi[2 * reg + 1]);
          xr[reg] = hw::pack_half2(r0, r1);
          xi[reg] = hw::pack_half2(i0, i1);
        }
      }
      float dr[4], di[4];
      f_times(f, inverse, xr, xi, dr, di);
      if (!inverse) {
        FC_UNROLL
        for (int e = 0; e < 4; ++e) cmul(dr[e], di[e], twr[e], twi[e]);
      }
      FC_UNROLL
      for (int h2 = 0; h2 < 2; ++h2) {  // rows g (e = 0, 1) and g + 8 (e = 2, 3)
        if (keep_half && h2 == 1) continue;
        const uint32_t n = base ^ st_off[h2];
        hw::sts(reinterpret_cast<uint32_t*>(Wre + n), hw::pack_half2(dr[2 * h2], dr[2 * h2 + 1]));
        hw::sts(reinterpret_cast<uint32_t*>(Wre + (1 << lgN) + n), hw::pack_half2(di[2 * h2], di[2 * h2 + 1]));
      }
    }
  }
  if (barrier) hw::sync_block();
}

// ---- 256-element groups ----------------------------------------------------------------------

// A group's spectrum (or its product with K) in this lane's D-layout registers: value j = 4 nt
// + e sits at Monarch position 16 k1 + k2, k1 = g + 8 (e >> 1), k2 = 2t + (e & 1) + 8 nt.
struct Spec {
  float r[2][4], i[2][4];
};

// Positions a lane reads and writes in a group (relative, swizzled): its ldmatrix row address
// of X as B operand (matrices (i1<8, i2<8), (i1>=8, i2<8), (i1<8, i2>=8), (i1>=8, i2>=8)) and
// its D-layout stores (rows g + 8 h2, columns 8 nt + 2t).
struct GroupAddr {
  uint32_t ld_off, st_off[2][2];
};

FC_DEVICE GroupAddr make_group_addr() {
  GroupAddr a;
  const int lane = hw::lane_id(), mat = lane >> 3, g = lane >> 2, t = lane & 3;
  a.ld_off = swz(16 * ((lane & 7) + 8 * (mat & 1)) + 8 * (mat >> 1));
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) a.st_off[nt][h2] = swz(16 * (g + 8 * h2) + 8 * nt + 2 * t);
  }
  return a;
}

// The last two forward radix-16 stages of the group at swizzled base `base` (256 q) of the
// row Wre: X as B operand; Y = F16 @ X; Y = Y * w_256^(k1 i2); Z = Y @ F16.
FC_DEVICE Spec group_forward(const uint16_t* Wre, int lgN, uint32_t base, const GroupAddr& a,
                             const Frags& f, const Tw256& tw) {
  uint32_t xr[4], xi[4];
  hw::ldmatrix_x4_trans(xr, Wre + (base ^ a.ld_off));
  hw::ldmatrix_x4_trans(xi, Wre + (1 << lgN) + (base ^ a.ld_off));
  float yr[2][4], yi[2][4];
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    f_times(f, false, xr + 2 * nt, xi + 2 * nt, yr[nt], yi[nt]);
    FC_UNROLL
    for (int e = 0; e < 4; ++e) cmul(yr[nt][e], yi[nt][e], tw.re[nt][e], tw.im[nt][e]);
  }
  uint32_t ar[4], ai[4];
  d_to_a(yr, ar);
  d_to_a(yi, ai);
  Spec z;
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) times_f(f, false, nt, ar, ai, z.r[nt], z.i[nt]);
  return z;
}

// The inverse of group_forward, stored in place: Y = Z @ conj(F16); Y = Y * conj(w_256); Y to
// the B operand (movmatrix transposes each 8x8 block); X = conj(F16) @ Y -> Wre at 16 i1 + i2.
FC_DEVICE void group_inverse(const Spec& z, uint16_t* Wre, int lgN, uint32_t base,
                             const GroupAddr& a, const Frags& f, const Tw256& tw) {
  uint32_t ar[4], ai[4];
  d_to_a(z.r, ar);
  d_to_a(z.i, ai);
  float yr[2][4], yi[2][4];
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    times_f(f, true, nt, ar, ai, yr[nt], yi[nt]);
    FC_UNROLL
    for (int e = 0; e < 4; ++e) cmul(yr[nt][e], yi[nt][e], tw.re[nt][e], -tw.im[nt][e]);
  }
  uint32_t br[2][2], bi[2][2];
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int j = 0; j < 2; ++j) {
      br[nt][j] = hw::movmatrix_trans(hw::pack_half2(yr[nt][2 * j], yr[nt][2 * j + 1]));
      bi[nt][j] = hw::movmatrix_trans(hw::pack_half2(yi[nt][2 * j], yi[nt][2 * j + 1]));
    }
  }
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    float dr[4], di[4];
    f_times(f, true, br[nt], bi[nt], dr, di);
    FC_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) {
      const uint32_t n = base ^ a.st_off[nt][h2];
      hw::sts(reinterpret_cast<uint32_t*>(Wre + n), hw::pack_half2(dr[2 * h2], dr[2 * h2 + 1]));
      hw::sts(reinterpret_cast<uint32_t*>(Wre + (1 << lgN) + n), hw::pack_half2(di[2 * h2], di[2 * h2 + 1]));
    }
  }
}

// The lane's 8 values of K for group qr: fragment order [group][re | im][lane][8] (fp16, 4N
// bytes per channel), from shared memory (Ks) or global memory (Kg).
FC_DEVICE Spec group_k(const uint16_t* Ks, const uint16_t* Kg, int qr) {
  const size_t ko = (size_t(qr) << 9) + size_t(hw::lane_id()) * 8;
  V16 kr, ki;
  if (Ks) {
    kr = hw::lds(reinterpret_cast<const V16*>(Ks + ko));
    ki = hw::lds(reinterpret_cast<const V16*>(Ks + ko + 256));
  } else {
    kr = hw::ldg(reinterpret_cast<const V16*>(Kg + ko), "K");
    ki = hw::ldg(reinterpret_cast<const V16*>(Kg + ko + 256), "K");
  }
  Spec k;
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int e2 = 0; e2 < 2; ++e2) {  // register 2 nt + e2 holds e = 2 e2, 2 e2 + 1
      hw::unpack_half2(kr.w[2 * nt + e2], k.r[nt][2 * e2], k.r[nt][2 * e2 + 1]);
      hw::unpack_half2(ki.w[2 * nt + e2], k.i[nt][2 * e2], k.i[nt][2 * e2 + 1]);
    }
  }
  return k;
}

// a * b (or a * conj(b)), elementwise.
FC_DEVICE Spec spec_mul(const Spec& a, const Spec& b, bool conj_b) {
  Spec c = a;
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int e = 0; e < 4; ++e) cmul(c.r[nt][e], c.i[nt][e], b.r[nt][e], conj_b ? -b.i[nt][e] : b.i[nt][e]);
  }
  return c;
}

// Copies K of channel h (fragment order, 4N bytes) into shared memory with cp.async; the
// caller waits and passes a barrier before use.
FC_DEVICE void copy_k(uint16_t* Ks, const uint16_t* K16, int64_t h, int lgN) {
  const V16* src = reinterpret_cast<const V16*>(K16 + (size_t(h) << (lgN + 1)));
  for (int i = hw::thread_idx(); i < (1 << (lgN - 2)); i += kThreads)
    hw::cp_async16(reinterpret_cast<V16*>(Ks) + i, src + i, "K");
}

}  // namespace flashconv::tc
