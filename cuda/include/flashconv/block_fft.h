// Block (Monarch) FFT stages on a complex row held in shared memory (docs/kernels.md).
//
// Plan: N = r * 16^n16 with r in {1, 2, 4, 8}: (if r > 1) one radix-r stage first, then n16
// radix-16 stages. Stage i (0-based) of radix R_i and stride S_i = N / (R_0 ... R_i) views each
// block of R_i*S_i elements as an R_i x S_i matrix X[n][c] = x[n*S_i + c] and computes
//     X = F_R @ X            (DFT along n: the RxR DFT matrix times the data)
//     X = X * tw             (tw[k][c] = w_{R S_i}^(k c), only if another stage follows)
// in place, so the spectrum ends in Monarch (transposed) order: python_ref.blockfft mirrors
// this plan, and flashconv/plan.py gives the permutation. With the odd radix first, every
// radix-16 stage has a stride of 1 or a multiple of 16. The inverse runs the stages in reverse
// with conjugate DFT matrices; the conjugate twiddle of stage i is applied in the epilogue
// of the inverse of stage i+1, which writes exactly the elements stage i then reads.
//
// Two ways to compute a radix-16 stage, chosen by the storage type:
//   cf16 storage (fp16/bf16 io): tensor cores. A 16x8 complex tile (8 vectors of 16) is
//     F16 @ X as four m16n8k16 mma with fp16 operands and fp32 accumulation:
//       forward  Re = Fr Xr - Fi Xi,  Im = Fr Xi + Fi Xr
//       inverse  Re = Fr Xr + Fi Xi,  Im = Fr Xi - Fi Xr
//     F16 is scaled by 1/4 (exact) so random data keeps its magnitude from stage to stage;
//     values are rounded to fp16 when stored, and any |value| > 65504 raises an overflow flag
//     (the kernel then redoes the row with a smaller input scale: never a silent inf).
//   cf32 storage (fp32 and fp16 io): CUDA cores, one thread per 16-vector, a radix-2 FFT in
//     fp32 registers: float32 accuracy, never tf32/fp16.
#pragma once

#include <cassert>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "flashconv/fftconv_params.h"
#include "flashconv/hw.h"

namespace flashconv {

using hw::bf16_t;
using hw::half_t;

struct cf16 {
  half_t re, im;
};

// Largest |value| an fp16 store accepts: fp16's max. Tests lower it (tests/emu/build.py,
// variant fp16limit8) to run the overflow path on ordinary data.
#ifndef FLASHCONV_FP16_STORE_LIMIT
#define FLASHCONV_FP16_STORE_LIMIT 65504.f
#endif
constexpr float kFp16Max = FLASHCONV_FP16_STORE_LIMIT;

struct Plan {
  int n16;  // radix-16 stages
  int r;    // first radix: 1 (none), 2, 4 or 8
};

FC_HOST_DEVICE Plan make_plan(int64_t N) {
  Plan p{0, 1};
  while (N >= 16) {
    N /= 16;
    ++p.n16;
  }
  p.r = int(N);
  return p;
}

FC_HOST_DEVICE int plan_stages(const Plan& p) { return p.n16 + (p.r > 1 ? 1 : 0); }

// log2 of a power of two. Every size, radix and stride here is one, so quotients and remainders
// are shifts and masks: the GPU has no integer (or exact float) divider, and a division by a
// value the compiler cannot see is a call to a software routine (the lint counts them).
FC_HOST_DEVICE int lg2(int64_t x) {
#if defined(__CUDA_ARCH__)
  return __ffsll(x) - 1;
#else
  return __builtin_ctzll(uint64_t(x));
#endif
}

// Radix R and stride S of stage i (forward order: the radix-r stage, if any, is stage 0).
FC_HOST_DEVICE void plan_stage(const Plan& p, int64_t N, int i, int& R, int64_t& S) {
  if (p.r > 1 && i == 0) {
    R = p.r;
    S = N >> lg2(p.r);
    return;
  }
  R = 16;
  S = (N >> lg2(p.r)) >> (4 * (i - (p.r > 1 ? 1 : 0) + 1));
}

// cos and sin of 2*pi*j/16: the DFT-16 matrix entries and the radix-2/4/8 roots.
FC_HOST_DEVICE float cos16(int j) {
  switch (j & 15) {
    case 0: return 1.f;
    case 1: case 15: return 0.923879532511286756f;
    case 2: case 14: return 0.707106781186547524f;
    case 3: case 13: return 0.382683432365089772f;
    case 4: case 12: return 0.f;
    case 5: case 11: return -0.382683432365089772f;
    case 6: case 10: return -0.707106781186547524f;
    case 7: case 9: return -0.923879532511286756f;
    default: return -1.f;
  }
}
FC_HOST_DEVICE float sin16(int j) { return cos16(j - 4); }  // sin(x) = cos(x - pi/2)

// sin(pi x), cos(pi x) to float accuracy (a math-library call, not a hardware feature).
FC_DEVICE void sincospi(float x, float* s, float* c) {
#if defined(__CUDACC__)
  sincospif(x, s, c);
#else
  const double a = 3.14159265358979323846 * double(x);
  *s = float(std::sin(a));
  *c = float(std::cos(a));
#endif
}

FC_DEVICE bool finite(float x) { return fabsf(x) <= 3.402823466e38f; }  // false for inf and NaN

FC_DEVICE void cmul(float& re, float& im, float br, float bi) {
  const float r = re * br - im * bi;
  im = re * bi + im * br;
  re = r;
}

// The exponent m = k * c of the twiddle w_{R S}^m at `pos` of a stage of radix R and stride
// S (RS = R * S): k = the row within the block, c = the column; m < R S, exact in float.
FC_HOST_DEVICE int64_t twiddle_exponent(int64_t pos, int64_t S, int64_t RS) {
  const int64_t within = pos & (RS - 1);
  return (within >> lg2(S)) * (within & (S - 1));
}

// w_{RS}^m, conjugated if inverse: angle -2 pi m / RS, exact scaling.
FC_DEVICE void twiddle_pow(int64_t m, int lgRS, bool inverse, float& wr, float& wi) {
  float s, c;
  sincospi(ldexpf(-float(m), 1 - lgRS), &s, &c);
  wr = c;
  wi = inverse ? -s : s;
}

// w_{R S}^(k c) for the element at `pos` of a stage of radix R and stride S (RS = R * S),
// conjugated if inverse.
FC_DEVICE void stage_twiddle(int64_t pos, int64_t S, int64_t RS, bool inverse, float& wr, float& wi) {
  twiddle_pow(twiddle_exponent(pos, S, RS), lg2(RS), inverse, wr, wi);
}

// The twiddles of the R outputs of one vector, whose exponents are m0 + k d (k < R): along a
// vector a stage's twiddle exponent is linear in k (the column is fixed in the forward; in the
// inverse the previous stage's row is fixed and its column steps by the stride). w^(m0 + 4a d)
// and q = w^d, q^2 exact (sincospi), q^3 = q^2 q, and w_(4a + b) = w^(m0 + 4a d) q^b: R/4 + 2
// sincospi per vector (6 for R = 16) instead of one per output, and at most two roundings
// beyond the exact values in any twiddle.
template <int R>
FC_DEVICE void twiddle_run(int64_t m0, int64_t d, int lgRS, bool inverse, float (&wr)[R],
                           float (&wi)[R]) {
  float qr[4] = {1.f, 0.f, 0.f, 0.f}, qi[4] = {0.f, 0.f, 0.f, 0.f};
  twiddle_pow(d, lgRS, inverse, qr[1], qi[1]);
  if (R > 2) {
    twiddle_pow(2 * d, lgRS, inverse, qr[2], qi[2]);
    qr[3] = qr[2], qi[3] = qi[2];
    cmul(qr[3], qi[3], qr[1], qi[1]);
  }
  constexpr int kB = R < 4 ? R : 4;
  FC_UNROLL
  for (int a = 0; a < R / kB; ++a) {
    const int64_t m = m0 + 4 * a * d;
    float ar = 1.f, ai = 0.f;
    if (m) twiddle_pow(m, lgRS, inverse, ar, ai);
    FC_UNROLL
    for (int b = 0; b < kB; ++b) {
      wr[kB * a + b] = qr[b], wi[kB * a + b] = qi[b];
      cmul(wr[kB * a + b], wi[kB * a + b], ar, ai);
    }
  }
}

// Where element j of a row lives in shared memory. fp32 rows (8 bytes per complex) XOR the
// element's position within its 16-element group with the group index's low four bits: a
// radix-16 stage at stride 1 reads elements 16 v + i across lanes v, which unswizzled all fall
// in one bank pair (16 half-warp wavefronts instead of 1); swizzled they are 16 distinct pairs,
// and accesses to 16 consecutive elements (any other stride, loads, the product with K) stay a
// permutation of one aligned group. fp16 rows (the old tensor-core stage) are unswizzled.
FC_HOST_DEVICE int64_t swizzle_c32(int64_t j) { return j ^ ((j >> 4) & 15); }
FC_DEVICE cf32* slot(cf32* buf, int64_t j) { return buf + swizzle_c32(j); }
FC_DEVICE cf16* slot(cf16* buf, int64_t j) { return buf + j; }

// Storage of one complex value between stages, in shared memory (the caller's site counts).
FC_DEVICE void load_c(const cf32* p, float& re, float& im, hw::Site at = hw::Site::current()) {
  const cf32 v = hw::lds(p, at);
  re = v.re;
  im = v.im;
}
FC_DEVICE void load_c(const cf16* p, float& re, float& im, hw::Site at = hw::Site::current()) {
  const cf16 v = hw::lds(p, at);
  re = hw::to_float(v.re);
  im = hw::to_float(v.im);
}
FC_DEVICE void store_c(cf32* p, float re, float im, int*, hw::Site at = hw::Site::current()) {
  hw::sts(p, cf32{re, im}, at);
}
FC_DEVICE void store_c(cf16* p, float re, float im, int* overflow, hw::Site at = hw::Site::current()) {
  if (!(fabsf(re) <= kFp16Max && fabsf(im) <= kFp16Max) && finite(re) && finite(im)) {
    *overflow = 1;  // the calling thread's own flag; the row is redone at a smaller scale
    re = fminf(fmaxf(re, -kFp16Max), kFp16Max);
    im = fminf(fmaxf(im, -kFp16Max), kFp16Max);
  }
  hw::sts(p, cf16{hw::from_float<half_t>(re), hw::from_float<half_t>(im)}, at);
}

// Epilogue of an in-place stage: optional twiddle of the stage with stride tw_S and block size
// tw_RS (tw_S = 0: none), then store. tw_inverse conjugates the twiddle.
template <class S>
struct StoreShared {
  S* buf;
  int64_t tw_S, tw_RS;
  bool tw_inverse;
  int* overflow;
  FC_DEVICE void operator()(int64_t pos, float re, float im) const {
    if (tw_S) {
      float wr, wi;
      stage_twiddle(pos, tw_S, tw_RS, tw_inverse, wr, wi);
      cmul(re, im, wr, wi);
    }
    store(pos, re, im);
  }
  // The vector interface of stage_simt (VectorEpilogue): the twiddles come from twiddle_run.
  FC_DEVICE bool twiddled() const { return tw_S != 0; }
  FC_DEVICE int64_t exponent(int64_t pos) const { return twiddle_exponent(pos, tw_S, tw_RS); }
  FC_DEVICE int lg_block() const { return lg2(tw_RS); }
  FC_DEVICE bool conj() const { return tw_inverse; }
  FC_DEVICE void store(int64_t pos, float re, float im) const {
    store_c(slot(buf, pos), re, im, overflow);
  }
};

// Epilogues with the vector interface above: twiddled(), exponent(pos) (linear along a
// vector), lg_block(), conj(), store(pos, re, im) without the twiddle.
template <class E, class = void>
struct VectorEpilogue : std::false_type {};
template <class E>
struct VectorEpilogue<E, std::void_t<decltype(std::declval<const E&>().exponent(int64_t(0)))>>
    : std::true_type {};

template <int kBits>
FC_HOST_DEVICE constexpr int bit_reverse(int i) {
  int j = 0;
  for (int b = 0; b < kBits; ++b) j |= ((i >> b) & 1) << (kBits - 1 - b);
  return j;
}

// DFT of R values in registers (R in {2, 4, 8, 16}), times `scale`: an in-place radix-2
// FFT (decimation in time). R log R / 2 butterflies instead of R^2 products (16 points: 32
// butterflies, 17 of them with a trivial twiddle, against 256 complex products), and the
// rounding error grows like log R. Loops unroll fully, so every index and twiddle is a
// compile-time constant and the trivial twiddles (1, -i) cost no multiply.
template <int R>
FC_DEVICE void dft_small(float (&re)[R], float (&im)[R], bool inverse, float scale) {
  static_assert(R == 2 || R == 4 || R == 8 || R == 16, "dft_small: R must be 2, 4, 8 or 16");
  constexpr int kBits = R == 2 ? 1 : R == 4 ? 2 : R == 8 ? 3 : 4;
  {  // bit-reversed order in (a register renaming once unrolled)
    float r0[R], i0[R];
    FC_UNROLL
    for (int i = 0; i < R; ++i) r0[i] = re[i], i0[i] = im[i];
    FC_UNROLL
    for (int i = 0; i < R; ++i) re[i] = r0[bit_reverse<kBits>(i)], im[i] = i0[bit_reverse<kBits>(i)];
  }
  FC_UNROLL
  for (int level = 0; level < kBits; ++level) {
    // Counted loops with constant trip counts only: anything else is left rolled by nvcc
    // and the register arrays go to local memory (ptxas then reports a stack frame).
    const int len = 2 << level, half = len / 2;
    FC_UNROLL
    for (int bf = 0; bf < R / 2; ++bf) {  // butterfly bf: group bf / half, offset k
      const int k = bf % half, a = (bf / half) * len + k, b = a + half;
      const int j = k * (16 / len);  // w_len^k = w_16^j, j < 8
      float tr, ti;
      if (j == 0) {
        tr = re[b], ti = im[b];
      } else if (j == 4) {  // w = -i (forward) or +i (inverse)
        tr = inverse ? -im[b] : im[b];
        ti = inverse ? re[b] : -re[b];
      } else {
        const float wr = cos16(j), wi = inverse ? sin16(j) : -sin16(j);
        tr = re[b] * wr - im[b] * wi;
        ti = re[b] * wi + im[b] * wr;
      }
      re[b] = re[a] - tr, im[b] = im[a] - ti;
      re[a] += tr, im[a] += ti;
    }
  }
  if (scale != 1.f) {
    FC_UNROLL
    for (int k = 0; k < R; ++k) re[k] *= scale, im[k] *= scale;
  }
}

// A stage on CUDA cores: each thread transforms whole vectors of R elements at stride S
// (block size R*S), in place, in fp32. zero_upper: inputs i >= R/2 are known zeros (the
// causal padding of the first forward stage) and are not read.
template <int R, class Store, class Epi>
FC_DEVICE void stage_simt(Store* buf, int64_t N, int64_t S, bool inverse, bool zero_upper,
                          float scale, const Epi& epi) {
  const int64_t nvec = N / R;
  const int lgS = lg2(S), lgRS = lgS + lg2(R);
  for (int64_t v = hw::thread_idx(); v < nvec; v += hw::block_dim()) {
    const int64_t base = ((v >> lgS) << lgRS) + (v & (S - 1));
    float re[R], im[R];
    FC_UNROLL
    for (int i = 0; i < R; ++i) {
      if (zero_upper && i >= R / 2) {
        re[i] = im[i] = 0.f;
      } else {
        load_c(slot(buf, base + i * S), re[i], im[i]);
      }
    }
    dft_small<R>(re, im, inverse, scale);
    if constexpr (VectorEpilogue<Epi>::value) {
      // Twiddled stores (StoreShared, StoreTile): the vector's twiddles from twiddle_run.
      if (epi.twiddled()) {
        const int64_t m0 = epi.exponent(base), d = epi.exponent(base + S) - m0;
        float wr[R], wi[R];
        twiddle_run<R>(m0, d, epi.lg_block(), epi.conj(), wr, wi);
        FC_UNROLL
        for (int k = 0; k < R; ++k) {
#if !defined(__CUDACC__)
          assert(epi.exponent(base + k * S) == m0 + k * d);  // linear along the vector
#endif
          cmul(re[k], im[k], wr[k], wi[k]);
        }
      }
      FC_UNROLL
      for (int k = 0; k < R; ++k) epi.store(base + k * S, re[k], im[k]);
    } else {
      FC_UNROLL
      for (int k = 0; k < R; ++k) epi(base + k * S, re[k], im[k]);
    }
  }
}

// The DFT-16 matrix as mma A fragments (row-major 16x16, scaled by 1/4): Fr, Fi and -Fi.
struct Dft16Fragments {
  uint32_t re[4], im[4], neg_im[4];
};

FC_DEVICE Dft16Fragments dft16_fragments() {
  Dft16Fragments f;
  const int g = hw::lane_id() >> 2, t = hw::lane_id() & 3;
  FC_UNROLL
  for (int reg = 0; reg < 4; ++reg) {
    // Register reg holds A[row][col], A[row][col + 1] (PTX ISA m16n8k16 A layout).
    const int row = g + 8 * (reg & 1), col = 2 * t + 8 * (reg >> 1);
    const int j0 = (row * col) & 15, j1 = (row * (col + 1)) & 15;
    f.re[reg] = hw::pack2<half_t>(0.25f * cos16(j0), 0.25f * cos16(j1));
    f.im[reg] = hw::pack2<half_t>(-0.25f * sin16(j0), -0.25f * sin16(j1));
    f.neg_im[reg] = hw::pack2<half_t>(0.25f * sin16(j0), 0.25f * sin16(j1));
  }
  return f;
}

// A radix-16 stage on tensor cores over a row of cf16 in shared memory, stride S, in place.
// Each warp takes 16x8 tiles (8 vectors); lanes hold mma fragments:
//   B (data)   lane (g, t): vector g of the tile, elements i = 2t, 2t+1 (reg 0), 2t+8, 2t+9 (reg 1)
//   D (result) lane (g, t): outputs k1 = g (d0, d1), g+8 (d2, d3) of vectors 2t, 2t+1
template <class Epi>
FC_DEVICE void stage_tc16(cf16* buf, int64_t N, int64_t S, bool inverse, bool zero_upper,
                          const Dft16Fragments& F, const Epi& epi) {
  const int lane = hw::lane_id(), g = lane >> 2, t = lane & 3;
  const int nwarps = hw::block_dim() / 32;
  const int64_t nvec = N / 16, ntiles = (nvec + 7) / 8;
  const int lgS = lg2(S);
  // forward: Re = Fr Xr + (-Fi) Xi, Im = Fr Xi + Fi Xr; inverse conjugates F.
  const uint32_t* a_re2 = inverse ? F.im : F.neg_im;
  const uint32_t* a_im2 = inverse ? F.neg_im : F.im;
  for (int64_t tile = hw::warp_id(); tile < ntiles; tile += nwarps) {
    uint32_t br[2] = {0u, 0u}, bi[2] = {0u, 0u};
    const int64_t v = tile * 8 + g;
    if (v < nvec) {
      const int64_t base = ((v >> lgS) << (lgS + 4)) + (v & (S - 1));
      FC_UNROLL
      for (int reg = 0; reg < 2; ++reg) {
        if (zero_upper && reg == 1) continue;  // rows 8..15 read the causal zero padding
        const cf16 x0 = hw::lds(buf + base + (2 * t + 8 * reg) * S);
        const cf16 x1 = hw::lds(buf + base + (2 * t + 1 + 8 * reg) * S);
        br[reg] = hw::pack2(x0.re, x1.re);
        bi[reg] = hw::pack2(x0.im, x1.im);
      }
    }
    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
    float dr[4], di[4];
    hw::mma_m16n8k16<half_t>(dr, F.re, br, zero);  // Re  = Fr Xr
    hw::mma_m16n8k16<half_t>(dr, a_re2, bi, dr);   // Re += -/+ Fi Xi
    hw::mma_m16n8k16<half_t>(di, F.re, bi, zero);  // Im  = Fr Xi
    hw::mma_m16n8k16<half_t>(di, a_im2, br, di);   // Im += +/- Fi Xr
    hw::sync_warp();  // every lane has read its inputs before any lane overwrites them
    FC_UNROLL
    for (int e = 0; e < 4; ++e) {
      const int64_t vo = tile * 8 + 2 * t + (e & 1);
      if (vo >= nvec) continue;
      const int k1 = g + 8 * (e >> 1);
      epi(((vo >> lgS) << (lgS + 4)) + k1 * S + (vo & (S - 1)), dr[e], di[e]);
    }
  }
}

// One radix-16 stage with whichever engine the storage type selects.
template <class Epi>
FC_DEVICE void stage16(cf16* buf, int64_t N, int64_t S, bool inverse, bool zero_upper,
                       const Dft16Fragments& F, const Epi& epi) {
  stage_tc16(buf, N, S, inverse, zero_upper, F, epi);
}
template <class Epi>
FC_DEVICE void stage16(cf32* buf, int64_t N, int64_t S, bool inverse, bool zero_upper,
                       const Dft16Fragments&, const Epi& epi) {
  stage_simt<16>(buf, N, S, inverse, zero_upper, 1.f, epi);
}

// A stage of radix R (2, 4, 8: fp32 on CUDA cores, times `scale`; 16: stage16) and stride S.
template <class Store, class Epi>
FC_DEVICE void stage_any(Store* buf, int64_t N, int R, int64_t S, bool inverse, bool zero_upper,
                         const Dft16Fragments& F, float scale, const Epi& epi) {
  switch (R) {
    case 2: stage_simt<2>(buf, N, S, inverse, zero_upper, scale, epi); break;
    case 4: stage_simt<4>(buf, N, S, inverse, zero_upper, scale, epi); break;
    case 8: stage_simt<8>(buf, N, S, inverse, zero_upper, scale, epi); break;
    default: stage16(buf, N, S, inverse, zero_upper, F, epi); break;
  }
}

// Stage gains of a storage type. cf16 (tensor cores): 1/4 per radix-16 stage (inside F16),
// 1/2 for a last radix of 4 or 8, so random data keeps its magnitude; cf32: none.
template <class S>
struct Gains {
  static constexpr bool kScaled = std::is_same_v<S, cf16>;
  // The scale a CUDA-core stage of radix R applies (the tensor-core radix-16 stage scales
  // inside F16).
  FC_HOST_DEVICE static float stage_scale(int R) { return kScaled && (R == 4 || R == 8) ? 0.5f : 1.f; }
  // log2 of what one forward (or one inverse) transform divides by.
  FC_HOST_DEVICE static int transform_exp(const Plan& p) {
    return kScaled ? 2 * p.n16 + (p.r > 2 ? 1 : 0) : 0;
  }
  // ... and a forward + inverse round trip (undone together with the 1/N).
  FC_HOST_DEVICE static int round_trip_exp(const Plan& p) { return 2 * transform_exp(p); }
};

// Counter regions (hw::region) of stage i, forward and inverse.
FC_DEVICE const char* stage_region(int i, bool inverse) {
  switch (i) {
    case 0: return inverse ? "inv.s0" : "fwd.s0";
    case 1: return inverse ? "inv.s1" : "fwd.s1";
    case 2: return inverse ? "inv.s2" : "fwd.s2";
    case 3: return inverse ? "inv.s3" : "fwd.s3";
    default: return inverse ? "inv.s4" : "fwd.s4";
  }
}

// Forward block FFT, in place, natural -> Monarch order. causal: entries [N/2, N) of buf are
// zero padding and are never read (the first stage reads only its upper half's complement);
// otherwise the whole row is input. Ends with a barrier.
template <class S>
FC_DEVICE void block_fft_forward(S* buf, int64_t N, const Plan& plan, const Dft16Fragments& F,
                                 int* overflow, bool causal = true) {
  const int ns = plan_stages(plan);
  const int first16 = plan.r > 1 ? 1 : 0;
  if (first16) {  // X = F_r @ X; X = X * tw  (the radix-r stage; a radix-16 one follows)
    hw::region(stage_region(0, false));
    const int64_t S0 = N >> lg2(plan.r);
    stage_any(buf, N, plan.r, S0, false, causal, F, Gains<S>::stage_scale(plan.r),
              StoreShared<S>{buf, ns > 1 ? S0 : 0, N, false, overflow});
    hw::sync_block();
  }
  for (int i = first16; i < ns; ++i) {  // X = F16 @ X; X = X * tw (where a stage follows)
    hw::region(stage_region(i, false));
    int R;
    int64_t Si;
    plan_stage(plan, N, i, R, Si);
    stage16(buf, N, Si, false, causal && i == 0, F,
            StoreShared<S>{buf, i + 1 < ns ? Si : 0, 16 * Si, false, overflow});
    hw::sync_block();
  }
}

// Inverse stages but the last (stage 0), from Monarch order; each epilogue applies the
// conjugate twiddle of the stage before it. Ends with a barrier.
template <class S>
FC_DEVICE void block_fft_inverse_but_last(S* buf, int64_t N, const Plan& plan,
                                          const Dft16Fragments& F, int* overflow) {
  for (int i = plan_stages(plan) - 1; i >= 1; --i) {  // X = conj(F_R) @ X; X = conj(tw of i-1)
    hw::region(stage_region(i, true));
    int R;
    int64_t Si;
    plan_stage(plan, N, i, R, Si);
    int Rp;
    int64_t Sp;
    plan_stage(plan, N, i - 1, Rp, Sp);
    stage16(buf, N, Si, true, false, F, StoreShared<S>{buf, Sp, Rp * Sp, true, overflow});
    hw::sync_block();
  }
}

// The last inverse stage (stage 0): hands (time index n, re, im) to `out` for n < N/2 only --
// the discarded half of the causal convolution is never produced -- unless `full` (negative
// lags, n >= N/2, are wanted: the anti-causal kernel's gradient). Ends with a barrier.
// kReadBack (a kernel with several epilogues, so that each is inlined once): a radix-r stage
// stores its outputs in place first (an fp16 overflow sets *overflow) and `out` reads them back.
template <bool kReadBack = false, class S, class Out>
FC_DEVICE void block_fft_inverse_last(S* buf, int64_t N, const Plan& plan, const Dft16Fragments& F,
                                      const Out& out, bool full = false, int* overflow = nullptr) {
  hw::region(stage_region(0, true));  // with the caller's epilogue
  const int64_t limit = full ? N : N / 2;
  if (kReadBack && plan.r > 1) {
    stage_any(buf, N, plan.r, N >> lg2(plan.r), true, false, F, Gains<S>::stage_scale(plan.r),
              StoreShared<S>{buf, 0, 0, true, overflow});
    hw::sync_block();
    for (int64_t n = hw::thread_idx(); n < limit; n += hw::block_dim()) {
      float re, im;
      load_c(slot(buf, n), re, im);
      out(n, re, im);
    }
  } else {
    int R;
    int64_t S0;
    plan_stage(plan, N, 0, R, S0);
    stage_any(buf, N, R, S0, true, false, F, Gains<S>::stage_scale(R),
              [&](int64_t n, float re, float im) {
                if (n < limit) out(n, re, im);
              });
  }
  hw::sync_block();
}

// Inverse block FFT from Monarch order (unnormalised: times N and the stage gains), the last
// stage handing its outputs to `out` as block_fft_inverse_last says. Ends with a barrier.
template <bool kReadBack = false, class S, class Out>
FC_DEVICE void block_fft_inverse(S* buf, int64_t N, const Plan& plan, const Dft16Fragments& F,
                                 int* overflow, const Out& out, bool full = false) {
  block_fft_inverse_but_last(buf, N, plan, F, overflow);
  block_fft_inverse_last<kReadBack>(buf, N, plan, F, out, full, overflow);
}

}  // namespace flashconv
