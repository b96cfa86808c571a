// The fused forward convolution for bfloat16 io on tensor cores (docs/kernels.md):
//
//   y[b,h,t] = g_out * ( sum_{s<=t} k[h,s] x[b,h,t-s] + D[h] x[b,h,t] ),  x = g_in * u
//
// One CTA serves one channel h and loops over groups of `pp` pairs of batch rows (pp = 8192/N
// for N < 8192, else 1, so that every warp has several groups of P4), each pair packed as one complex row
// z = x_b + i x_{b+1} of FFT size N = r * 16^m * 256 (r in {1, 2, 4, 8}, m in {0, 1},
// 256 <= N <= 32K). The row lives in shared memory as planar fp16 (a real and an imaginary
// plane of N halves) whose 16-byte chunks are XOR-swizzled (swz), so that every phase's
// accesses -- rows of 16 bytes at power-of-two strides -- are free of bank conflicts. Per pair:
//   P1 load    u (16-byte loads) -> U staging (bf16); max |x| per pair       [barrier]
//   P2 fwd.r   z * 2^-e; X = F_r @ X (radix r, stride N/r, fp32); X = X * w_N^(i c) -> W
//                                                                             [barrier]
//   P3 fwd.16  (m = 1) X = F16 @ X at stride 256 (mma); X = X * w_4096^(k c)  [barrier]
//   P4 b256    per 256-element group, all in registers:
//                Y = F16 @ X; Y = Y * w_256^(k i2); Z = Y @ F16     (the last two radix-16
//                stages: the spectrum in Monarch order)
//                Z = Z * K                                         (K: fp16, fragment order)
//                Y = Z @ conj(F16); Y = Y * conj(w_256); X = conj(F16) @ Y  (movmatrix turns
//                Y into the B operand)                                        [barrier]
//   P5 inv.16  (m = 1) X = X * conj(w_4096); X = conj(F16) @ X               [barrier]
//   P6 inv.r   X = X * conj(w_N); X = conj(F_r) @ X, outputs t < N/2 only;
//              y = (conv * 2^(e + gains + k_exp) / N + D x) * g_out -> HBM   [barrier: OR]
// If a conv value is not finite while the pair's input is (an fp16 overflow in P2-P5), the
// pairs are redone with the input scaled down by a further 2^-12 (at most twice).
// HBM sees u, the gates and y once; K is read from HBM once per CTA (N <= 8K: it stays in
// shared memory) or from L2 once per pair (fp16: half the bytes of fp32).
#pragma once

#include <cstdint>

#include "flashconv/block_fft.h"
#include "flashconv/fftconv_common.h"
#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv::tc {

constexpr int kWarps = kThreads / 32;
constexpr int kMaxPairs = 32;  // pp for the smallest N
constexpr int kMinN = 256, kMaxN = 32768;
// K stays in shared memory for N up to this (4N bytes).
constexpr int kKInSmemMaxN = 8192;

// 16 bytes (8 halves) for vector accesses.
struct alignas(16) V16 {
  uint32_t w[4];
};

// Physical position of half n in a plane: 16-byte chunks XOR-swizzled by a fold of the
// 128-byte block index (three 3-bit groups; N <= 32K), so that 8 chunks of a warp access that
// lie in different blocks at a power-of-two stride land in different banks.
FC_HOST_DEVICE constexpr uint32_t swz(uint32_t n) {
  const uint32_t b = n >> 6;
  return n ^ (((b ^ (b >> 3) ^ (b >> 6)) & 7u) << 3);
}
// The fold is linear in the bits, so for positions a, b with no bits in common
// swz(a | b) = swz(a) ^ swz(b): addresses are built from precomputed parts.

FC_HOST_DEVICE constexpr int ilog2(uint32_t n) {
  int l = 0;
  while ((1u << l) < n) ++l;
  return l;
}

// The shape of one launch, from N alone.
struct Shape {
  int lgN, lgr, m;  // N = 2^lgN = r * 16^m * 256
  int lgpp;         // pp = 2^lgpp pairs per iteration (N * pp >= 2048)
  bool k_smem;      // K copied to shared memory once per CTA
};

FC_HOST_DEVICE constexpr Shape make_shape(int64_t N) {
  Shape s{};
  s.lgN = ilog2(uint32_t(N));
  s.m = s.lgN >= 12 ? 1 : 0;
  s.lgr = s.lgN - 8 - 4 * s.m;
  s.lgpp = s.lgN < 13 ? 13 - s.lgN : 0;
  s.k_smem = N <= kKInSmemMaxN;
  return s;
}

// Dynamic shared memory: K (4N, if kept), then pp rows W (4N each), then pp U stagings (2N).
FC_HOST_DEVICE constexpr size_t smem_bytes(int64_t N) {
  const Shape s = make_shape(N);
  return size_t(s.k_smem ? 4 * N : 0) + (size_t(6 * N) << s.lgpp);
}

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
  for (int k = 0; k < 6; ++k) hw::sts(&fs->v[k][hw::lane_id()], V16{{w[4 * k], w[4 * k + 1], w[4 * k + 2], w[4 * k + 3]}});
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

FC_DEVICE void cmulw(float& re, float& im, float wr, float wi) { cmul(re, im, wr, wi); }

// D-layout results of the two column tiles (d[nt][e]) as the A operand (rows of D, k = columns).
FC_DEVICE void d_to_a(const float d[2][4], uint32_t a[4]) {
  a[0] = hw::pack_half2(d[0][0], d[0][1]);
  a[1] = hw::pack_half2(d[0][2], d[0][3]);
  a[2] = hw::pack_half2(d[1][0], d[1][1]);
  a[3] = hw::pack_half2(d[1][2], d[1][3]);
}

// Twiddles of the 256-point group (lane constants): w_256^(k1 i2) at this lane's D-layout
// positions, k1 = g + 8 (e >> 1), i2 = 2t + (e & 1) + 8 nt. Four unit roots and products:
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
  // k1 = g + 8: times w^(8 i2) = w^(16t) (i2 = 2t), then w^8 more for 2t + 1, -i for + 8
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

// ---- the kernel ---------------------------------------------------------------------------

struct Ctx {
  const FwdParams* p;
  Shape s;
  int64_t h;
  uint16_t* K16s;  // K in shared memory (or null)
  uint16_t* W;     // pp rows, 2N halves each (re plane, im plane)
  uint16_t* U;     // pp stagings, 2 rows of N/2 bf16 each
  uint32_t* red;       // per pair: max |x| (float bits), this iteration
  uint32_t* red_next;  // ... the next iteration (zeroed during this one)
  const FragsSmem* frags;  // the DFT-16 fragments of every lane
  bool vec_u, vec_y;  // 16-byte loads of u, 8-byte stores of y
};

// View v is readable 8 (or 2) elements at a time at 16- (4-) byte alignment: unit stride and
// every row start aligned.
FC_DEVICE bool vectorizable(const void* ptr, int64_t sb, int64_t sh, int64_t st, int elems) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(ptr);
  return ptr && st == 1 && a % (2 * elems) == 0 && sb % elems == 0 && sh % elems == 0;
}

// C halves (C = 2, 4) for vector accesses.
template <int C>
struct alignas(2 * C) Vh {
  uint32_t w[C / 2];
};
using V8 = Vh<4>;

// Columns per unit of the radix-r phases: 4 (8-byte accesses), 2 for r = 8 (registers).
template <int R>
constexpr int kCols = R == 8 ? 2 : 4;

FC_DEVICE float bf16_lo(uint32_t w) { return hw::to_float(bf16_t{uint16_t(w)}); }
FC_DEVICE float bf16_hi(uint32_t w) { return hw::to_float(bf16_t{uint16_t(w >> 16)}); }

// P1: u rows of the pp pairs starting at pair0 into the U stagings: cp.async, 16 bytes per
// thread and unit (a synchronous copy for strided or misaligned u and the tail); then each
// thread reads its units back for the pairs' max |g_in u| (warp max, shared atomic max).
FC_DEVICE void load_pairs(const Ctx& c, int64_t pair0) {
  FC_REGION("load");
  const FwdParams& p = *c.p;
  const int lgN = c.s.lgN, lgc = lgN - 4;  // N/16 chunks of 8 per row
  const int units = 1 << (lgN - 3 + c.s.lgpp);
  for (int u = hw::thread_idx(); u < units; u += kThreads) {
    const int chunk = u & ((1 << lgc) - 1), row = (u >> lgc) & 1, pi = u >> (lgc + 1);
    const int64_t b = 2 * (pair0 + pi) + row, t0 = int64_t(chunk) * 8;
    V16* dst = reinterpret_cast<V16*>(c.U + ((2 * pi + row) << (lgN - 1)) + t0);
    const bf16_t* src = static_cast<const bf16_t*>(p.u.p) + b * p.u.sb + c.h * p.u.sh;
    if (b < p.B && c.vec_u && t0 + 8 <= p.L) {
      hw::cp_async16(dst, src + t0, "u");
    } else {
      V16 v{{0u, 0u, 0u, 0u}};
      FC_UNROLL
      for (int j = 0; j < 8; ++j)  // (constant indices: the array stays in registers)
        if (b < p.B && t0 + j < p.L)
          v.w[j >> 1] |= uint32_t(hw::ldg(src + (t0 + j) * p.u.st, "u").bits) << (16 * (j & 1));
      hw::sts(dst, v);
    }
  }
  hw::cp_async_wait_all();
  for (int u = hw::thread_idx(); u < units; u += kThreads) {  // a warp's units share a pair
    const int chunk = u & ((1 << lgc) - 1), row = (u >> lgc) & 1, pi = u >> (lgc + 1);
    const int64_t b = 2 * (pair0 + pi) + row, t0 = int64_t(chunk) * 8;
    const V16 v = hw::lds(reinterpret_cast<const V16*>(c.U + ((2 * pi + row) << (lgN - 1)) + t0));
    float m = 0.f;
    FC_UNROLL
    for (int j = 0; j < 8; ++j) {
      float x = (j & 1) ? bf16_hi(v.w[j >> 1]) : bf16_lo(v.w[j >> 1]);
      if (p.g_in.p && b < p.B && t0 + j < p.L) x *= load<bf16_t>(p.g_in, b, c.h, t0 + j, "g_in");
      m = max_nan(m, fabsf(x));
    }
    FC_UNROLL
    for (int off = 16; off > 0; off >>= 1) m = max_nan(m, hw::shfl_xor(m, off));
    // |x| >= 0 compares as its bits; a NaN's bits exceed every number's
    if (hw::lane_id() == 0) hw::atomic_max_shared(c.red + pi, hw::float_bits(m));
  }
  hw::sync_block();
}

// Max |x| of pair pi.
FC_DEVICE float pair_max(const Ctx& c, int pi) {
  return hw::bits_float(hw::lds(c.red + pi));
}

// x = g_in * u at t .. t+C-1 of row `row` of pair pi (0 at t >= N/2, beyond L or for a
// missing row b): 2C bytes of the staging, and global g_in when gated.
template <int C>
FC_DEVICE void x_cols(const Ctx& c, int pi, int row, int64_t b, int64_t t, float (&x)[C]) {
  const FwdParams& p = *c.p;
  Vh<C> w{};
  if (t < (int64_t(1) << (c.s.lgN - 1)))
    w = hw::lds(reinterpret_cast<const Vh<C>*>(c.U + ((2 * pi + row) << (c.s.lgN - 1)) + t));
  FC_UNROLL
  for (int j = 0; j < C; ++j) x[j] = (j & 1) ? bf16_hi(w.w[j >> 1]) : bf16_lo(w.w[j >> 1]);
  if (p.g_in.p) {
    FC_UNROLL
    for (int j = 0; j < C; ++j)
      x[j] = (b < p.B && t + j < p.L) ? x[j] * load<bf16_t>(p.g_in, b, c.h, t + j, "g_in") : 0.f;
  }
}

// Radix-R DFT of R complex values in registers (dft_small for R > 1), times scale.
template <int R>
FC_DEVICE void dft_r(float (&re)[R], float (&im)[R], bool inverse, float scale) {
  if constexpr (R > 1) {
    dft_small<R>(re, im, inverse, scale);
  }
}

// X[j][i] *= w_N^(i (col + j)) (conjugated if inverse) for the unit's C columns: one unit root
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

// P2: x * 2^-e -> X = F_r @ X -> X * w_N^(i c) -> W (planar fp16). Units of C columns c, so
// that the staging is read and W written 2C bytes at a time.
template <int R>
FC_DEVICE void forward_r(const Ctx& c, int64_t pair0, int attempt) {
  FC_REGION("fwd.r");
  constexpr int C = kCols<R>, lgC = C == 4 ? 2 : 1;
  const int lgN = c.s.lgN, lgS = lgN - c.s.lgr;  // S = N / R
  const int units = 1 << (lgS - lgC + c.s.lgpp);
  const float scale_r = Gains<cf16>::stage_scale(R);
  int last_pi = -1;
  float scale = 0.f;
  if (hw::thread_idx() < (1 << c.s.lgpp)) hw::sts(c.red_next + hw::thread_idx(), 0u);
  for (int u = hw::thread_idx(); u < units; u += kThreads) {
    const int pi = u >> (lgS - lgC), col = C * (u & ((1 << (lgS - lgC)) - 1));
    if (pi != last_pi) {  // the pair's input scale 2^-e
      scale = ldexpf(1.f, -(scale_exponent(pair_max(c, pi)) + 12 * attempt));
      last_pi = pi;
    }
    const int64_t b0 = 2 * (pair0 + pi);
    float re[C][R], im[C][R];  // [column][i]
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      if (R > 1 && i >= R / 2) {  // causal zero padding: never read
        FC_UNROLL
        for (int j = 0; j < C; ++j) re[j][i] = im[j][i] = 0.f;
        continue;
      }
      const int64_t t = (int64_t(i) << lgS) + col;
      float a[C], bq[C];
      x_cols<C>(c, pi, 0, b0, t, a);
      x_cols<C>(c, pi, 1, b0 + 1, t, bq);
      FC_UNROLL
      for (int j = 0; j < C; ++j) re[j][i] = a[j] * scale, im[j][i] = bq[j] * scale;
    }
    FC_UNROLL
    for (int j = 0; j < C; ++j) dft_r<R>(re[j], im[j], false, scale_r);
    twiddle_r<R, C>(re, im, uint32_t(col), lgN, false);
    uint16_t* Wre = c.W + (size_t(pi) << (lgN + 1));
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
  hw::sync_block();
}

// P3 / P5: the radix-16 stage at stride 256 (blocks of 4096), forward (X = F16 @ X; X = X *
// w_4096^(k c)) or inverse (X = X * conj(w_4096^(k c)); X = conj(F16) @ X, only rows < 8 kept
// when keep_half). Tiles of 16 rows x 8 columns; each warp walks columns c0 = 8 (warp + 8 j),
// j = 0..3, and for each the R blocks of every pair, so a tile's twiddles serve R * pp tiles.
FC_DEVICE void stage16_s256(const Ctx& c, bool inverse, bool keep_half) {
  const Frags f = load_frags(c.frags);
  const int lgN = c.s.lgN, g = hw::lane_id() >> 2, t = hw::lane_id() & 3, lane = hw::lane_id();
  const int blocks = 1 << (c.s.lgr + c.s.lgpp);  // 4096-element blocks in all pp rows
  // B operand: rows k (stride 256), columns c0..c0+7; matrices (re k<8, re k>=8, im k<8,
  // im k>=8): this lane's row address, and its two D-layout store positions (rows g, g + 8)
  const int mat = lane >> 3;
  const uint32_t ld_off = swz(256 * ((lane & 7) + 8 * (mat & 1))) + (uint32_t(mat >> 1) << lgN);
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
      const int pi = blk >> c.s.lgr;
      uint16_t* Wre = c.W + (size_t(pi) << (lgN + 1));
      const uint32_t base = swz(uint32_t((blk & ((1 << c.s.lgr) - 1)) << 12)) ^ c0_sw;
      uint32_t x[4];
      hw::ldmatrix_x4_trans(x, Wre + (base ^ (ld_off & ((1u << lgN) - 1))) + (ld_off & (1u << lgN)));
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
  hw::sync_block();
}

// P4: every 256-element group: the last two forward radix-16 stages, the product with K and
// the first two inverse stages, in registers.
FC_DEVICE void group256(const Ctx& c) {
  FC_REGION("b256.tw");  // per phase: the registers are free elsewhere
  const Frags f = load_frags(c.frags);
  const Tw256 tw = make_tw256();
  const int lgN = c.s.lgN, lane = hw::lane_id();
  const int groups = 1 << (lgN - 8 + c.s.lgpp), per_row = lgN - 8;
  const uint16_t* Kg = static_cast<const uint16_t*>(c.p->spec.K16) + (size_t(c.h) << (lgN + 1));
  // X as B operand (rows i1, columns i2): matrices (i1<8, i2<8), (i1>=8, i2<8), (i1<8, i2>=8),
  // (i1>=8, i2>=8) -> registers b[nt = 0][0..1], b[nt = 1][0..1]: this lane's row address;
  // and its D-layout store positions (rows g + 8 h2, columns 8 nt + 2t)
  const int mat = lane >> 3, g = lane >> 2, t = lane & 3;
  const uint32_t ld_off = swz(16 * ((lane & 7) + 8 * (mat & 1)) + 8 * (mat >> 1));
  uint32_t st_off[2][2];
  FC_UNROLL
  for (int nt = 0; nt < 2; ++nt) {
    FC_UNROLL
    for (int h2 = 0; h2 < 2; ++h2) st_off[nt][h2] = swz(16 * (g + 8 * h2) + 8 * nt + 2 * t);
  }
  FC_REGION("b256");
  for (int q = hw::warp_id(); q < groups; q += kWarps) {
    const int pi = q >> per_row, qr = q & ((1 << per_row) - 1);
    uint16_t* Wre = c.W + (size_t(pi) << (lgN + 1));
    const uint32_t base = swz(uint32_t(qr) << 8);
    uint32_t xr[4], xi[4];
    hw::ldmatrix_x4_trans(xr, Wre + (base ^ ld_off));
    hw::ldmatrix_x4_trans(xi, Wre + (1 << lgN) + (base ^ ld_off));
    // Y = F16 @ X; Y = Y * w_256^(k1 i2)
    float yr[2][4], yi[2][4];
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      f_times(f, false, xr + 2 * nt, xi + 2 * nt, yr[nt], yi[nt]);
      FC_UNROLL
      for (int e = 0; e < 4; ++e) cmul(yr[nt][e], yi[nt][e], tw.re[nt][e], tw.im[nt][e]);
    }
    // Z = Y @ F16 (Monarch order: Z[k1][k2] at 16 k1 + k2)
    uint32_t ar[4], ai[4];
    d_to_a(yr, ar);
    d_to_a(yi, ai);
    float zr[2][4], zi[2][4];
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) times_f(f, false, nt, ar, ai, zr[nt], zi[nt]);
    // Z = Z * K: this lane's 8 values, K16 fragment order [group][re | im][lane][8]
    const size_t ko = (size_t(qr) << 9) + size_t(lane) * 8;
    V16 kr, ki;
    if (c.K16s) {
      kr = hw::lds(reinterpret_cast<const V16*>(c.K16s + ko));
      ki = hw::lds(reinterpret_cast<const V16*>(c.K16s + ko + 256));
    } else {
      kr = hw::ldg(reinterpret_cast<const V16*>(Kg + ko), "K");
      ki = hw::ldg(reinterpret_cast<const V16*>(Kg + ko + 256), "K");
    }
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      FC_UNROLL
      for (int e2 = 0; e2 < 2; ++e2) {  // values j = 4 nt + e: register 2 nt + e2 holds e = 2 e2, 2 e2 + 1
        float kr0, kr1, ki0, ki1;
        hw::unpack_half2(kr.w[2 * nt + e2], kr0, kr1);
        hw::unpack_half2(ki.w[2 * nt + e2], ki0, ki1);
        cmul(zr[nt][2 * e2], zi[nt][2 * e2], kr0, ki0);
        cmul(zr[nt][2 * e2 + 1], zi[nt][2 * e2 + 1], kr1, ki1);
      }
    }
    // Y = Z @ conj(F16); Y = Y * conj(w_256)
    d_to_a(zr, ar);
    d_to_a(zi, ai);
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      times_f(f, true, nt, ar, ai, yr[nt], yi[nt]);
      FC_UNROLL
      for (int e = 0; e < 4; ++e) cmul(yr[nt][e], yi[nt][e], tw.re[nt][e], -tw.im[nt][e]);
    }
    // Y as B operand (rows k1, columns i2): transpose each 8x8 block of the D layout
    uint32_t br[2][2], bi[2][2];
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      FC_UNROLL
      for (int j = 0; j < 2; ++j) {
        br[nt][j] = hw::movmatrix_trans(hw::pack_half2(yr[nt][2 * j], yr[nt][2 * j + 1]));
        bi[nt][j] = hw::movmatrix_trans(hw::pack_half2(yi[nt][2 * j], yi[nt][2 * j + 1]));
      }
    }
    // X = conj(F16) @ Y, back in place at 16 i1 + i2
    FC_UNROLL
    for (int nt = 0; nt < 2; ++nt) {
      float dr[4], di[4];
      f_times(f, true, br[nt], bi[nt], dr, di);
      FC_UNROLL
      for (int h2 = 0; h2 < 2; ++h2) {
        const uint32_t n = base ^ st_off[nt][h2];
        hw::sts(reinterpret_cast<uint32_t*>(Wre + n), hw::pack_half2(dr[2 * h2], dr[2 * h2 + 1]));
        hw::sts(reinterpret_cast<uint32_t*>(Wre + (1 << lgN) + n), hw::pack_half2(di[2 * h2], di[2 * h2 + 1]));
      }
    }
  }
  hw::sync_block();
}

// P6: X = X * conj(w_N^(i c)); X = conj(F_r) @ X (outputs i < R/2: t < N/2); y to HBM. Units of
// C columns (2C-byte reads of W and stores of y). Returns (via the block OR) whether a conv
// value was not finite while its pair's input was (an fp16 overflow).
template <int R>
FC_DEVICE bool epilogue(const Ctx& c, int64_t pair0, int attempt) {
  FC_REGION("inv.r");
  constexpr int C = kCols<R>, lgC = C == 4 ? 2 : 1;
  const FwdParams& p = *c.p;
  const int lgN = c.s.lgN, lgS = lgN - c.s.lgr;
  const int units = 1 << (lgS - lgC + c.s.lgpp);
  const float scale_r = Gains<cf16>::stage_scale(R);
  const float d = p.D ? hw::ldg(p.D + c.h, "D") : 0.f;
  const int gains = Gains<cf16>::round_trip_exp(make_plan(int64_t(1) << lgN)) - lgN +
                    hw::ldg(p.spec.k_exp + c.h, "k_exp");
  int bad = 0, last_pi = -1;
  float undo = 0.f;
  bool finite_in = true;
  for (int u = hw::thread_idx(); u < units; u += kThreads) {
    const int pi = u >> (lgS - lgC), col = C * (u & ((1 << (lgS - lgC)) - 1));
    if (pi != last_pi) {
      const float mx = pair_max(c, pi);
      undo = ldexpf(1.f, scale_exponent(mx) + 12 * attempt + gains);
      finite_in = finite(mx);
      last_pi = pi;
    }
    const int64_t b0 = 2 * (pair0 + pi);
    const uint16_t* Wre = c.W + (size_t(pi) << (lgN + 1));
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
    FC_UNROLL
    for (int i = 0; i < (R > 1 ? R / 2 : 1); ++i) {
      const int64_t t = (int64_t(i) << lgS) + col;
      if (t >= p.L) continue;
      FC_UNROLL
      for (int row = 0; row < 2; ++row) {
        const int64_t b = b0 + row;
        if (b >= p.B) continue;
        float y[C], x[C];
        if (p.D) x_cols<C>(c, pi, row, b, t, x);
        FC_UNROLL
        for (int j = 0; j < C; ++j) {
          const float v = row ? im[j][i] : re[j][i];
          bad |= !finite(v) && finite_in;
          y[j] = v * undo + (p.D ? d * x[j] : 0.f);
          if (p.g_out.p && t + j < p.L) y[j] *= load<bf16_t>(p.g_out, b, c.h, t + j, "g_out");
        }
        bf16_t* dst = static_cast<bf16_t*>(p.y.p) + b * p.y.sb + c.h * p.y.sh;
        if (c.vec_y && t + C <= p.L) {
          Vh<C> v;
          FC_UNROLL
          for (int j = 0; j < C / 2; ++j) v.w[j] = hw::pack_bf162(y[2 * j], y[2 * j + 1]);
          hw::stg(reinterpret_cast<Vh<C>*>(dst + t), v, "y");
        } else {
          FC_UNROLL
          for (int j = 0; j < C; ++j)
            if (t + j < p.L) hw::stg(dst + (t + j) * p.y.st, hw::from_float<bf16_t>(y[j]), "y");
        }
      }
    }
  }
  FC_REGION("overflow");
  return hw::sync_block_or(bad) != 0;
}

template <int R>
FC_DEVICE void run(Ctx& c, int iters, uint32_t (*red)[kMaxPairs]) {
  int parity = 0;
  for (int it = hw::block_idx_y(); it < iters; it += hw::grid_dim_y(), parity ^= 1) {
    const int64_t pair0 = int64_t(it) << c.s.lgpp;
    c.red = red[parity];
    c.red_next = red[parity ^ 1];
    load_pairs(c, pair0);
    for (int attempt = 0;; ++attempt) {
      forward_r<R>(c, pair0, attempt);
      if (c.s.m) stage16_s256(c, false, false);
      group256(c);
      if (c.s.m) stage16_s256(c, true, R == 1);
      const bool overflow = epilogue<R>(c, pair0, attempt);
      if (!overflow || attempt >= 2) break;
    }
  }
}

}  // namespace flashconv::tc

namespace flashconv {

// The fused forward kernel for bfloat16 io (grid (H, CTAs per channel), kThreads threads; at
// most 128 registers so that two CTAs fit an SM). A template (T = bf16_t only) so that every
// translation unit including this header may define it.
template <class T>
FC_GLOBAL void FC_LAUNCH_BOUNDS(kThreads, 2) fftconv_fwd_tc_kernel(FwdParams p) {
  static_assert(std::is_same_v<T, bf16_t>, "the tensor-core forward serves bfloat16 io");
  using namespace tc;
  FC_SHARED uint32_t red[2][kMaxPairs];  // per pair max |x|, by iteration parity
  FC_SHARED FragsSmem frags;
  FC_REGION("kernel");  // the CTA's setup: K, DFT fragments, maxima
  if (hw::warp_id() == 0) store_frags(&frags);
  Ctx c;
  c.frags = &frags;
  c.p = &p;
  c.s = make_shape(p.N);
  c.h = hw::block_idx_x();
  const int lgN = c.s.lgN;
  uint16_t* smem = hw::dyn_smem<uint16_t>();
  c.K16s = c.s.k_smem ? smem : nullptr;
  c.W = smem + (c.s.k_smem ? (size_t(2) << lgN) : 0);
  c.U = c.W + (size_t(2) << (lgN + c.s.lgpp));
  c.vec_u = vectorizable(p.u.p, p.u.sb, p.u.sh, p.u.st, 8);
  c.vec_y = vectorizable(p.y.p, p.y.sb, p.y.sh, p.y.st, 4);
  if (c.K16s) {  // K of this channel, 4N bytes, copied once
    FC_REGION("k.smem");
    const V16* src = reinterpret_cast<const V16*>(static_cast<const uint16_t*>(p.spec.K16) +
                                                  (size_t(c.h) << (lgN + 1)));
    for (int i = hw::thread_idx(); i < (1 << (lgN - 2)); i += kThreads)
      hw::cp_async16(reinterpret_cast<V16*>(c.K16s) + i, src + i, "K");
    hw::cp_async_wait_all();
  }
  if (hw::thread_idx() < kMaxPairs) hw::sts(&red[0][hw::thread_idx()], 0u);
  hw::sync_block();  // K, the fragments and the first iteration's maxima
  const int iters = int((((p.B + 1) / 2) + (1 << c.s.lgpp) - 1) >> c.s.lgpp);
  switch (c.s.lgr) {
    case 0: run<1>(c, iters, red); break;
    case 1: run<2>(c, iters, red); break;
    case 2: run<4>(c, iters, red); break;
    default: run<8>(c, iters, red); break;
  }
}

// Launch on `stream`: grid (H, CTAs per channel) over iterations of pp pairs.
inline hw::Error fftconv_fwd_tc_launch(const FwdParams& p, int num_sms, hw::Stream stream) {
  if (p.N < tc::kMinN || p.N > tc::kMaxN || (p.N & (p.N - 1)) || 2 * p.L > p.N ||
      p.H > 0x7fffffff || p.B > 0x7ffffffe || !p.spec.K16)
    return hw::ErrorInvalidValue;
  if (p.B == 0 || p.H == 0 || p.L == 0) return hw::Success;
  const tc::Shape s = tc::make_shape(p.N);
  const int64_t iters = ((p.B + 1) / 2 + (int64_t(1) << s.lgpp) - 1) >> s.lgpp;
  return hw::launch(fftconv_fwd_tc_kernel<bf16_t>, channel_grid(p.H, iters, num_sms), kThreads,
                    tc::smem_bytes(p.N), stream, p);
}

}  // namespace flashconv
