// Proof kernels for the SIMT emulation harness: ordinary CUDA-style device code that reaches
// the hardware only through flashconv/hw.h, each with a launcher written once for the GPU and
// CPU builds. The first five must compute what numpy computes; the rest are broken on purpose
// and the harness must say so (tests/test_emu.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "flashconv/hw.h"

namespace proof {

namespace hw = flashconv::hw;

// ---------------------------------------------------------------- block reduction
// y[b, h] = sum_i x[b, h, i], one block per row on a (H, B) grid.
template <int Threads>
FC_GLOBAL void block_sum_kernel(const float* __restrict__ x, float* __restrict__ y, int n) {
  static_assert((Threads & (Threads - 1)) == 0, "the tree needs a power-of-two block");
  FC_SHARED float partial[Threads];
  const int t = hw::thread_idx();
  const int row = hw::block_idx_y() * hw::grid_dim_x() + hw::block_idx_x();
  float s = 0.f;
  for (int i = t; i < n; i += hw::block_dim()) s += x[size_t(row) * n + i];
  partial[t] = s;
  hw::sync_block();
  // Each level halves the active threads; thread t reads what t + stride wrote a level earlier.
  for (int stride = Threads / 2; stride > 0; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    hw::sync_block();
  }
  if (t == 0) y[row] = partial[0];
}

inline hw::Error launch_block_sum(const float* x, float* y, int batch, int heads, int n,
                                  hw::Stream stream) {
  constexpr int kThreads = 128;
  return hw::launch(block_sum_kernel<kThreads>, {heads, batch}, kThreads, 0, stream, x, y, n);
}

// ---------------------------------------------------------------- warp collectives
// Per thread i (lane l of warp w): total[i] = sum of the warp's x (xor butterfly, every lane
// ends with it); gathered[i] = key of lane (7l + 3) % 32, key(j) = j * 2654435761 (shfl_idx on
// raw bits); first[i] = x of lane w % 32 (shfl_idx broadcast); neighbour[i] = x of lane l ^ 1
// through shared memory, ordered by sync_warp.
FC_GLOBAL void warp_ops_kernel(const float* __restrict__ x, float* __restrict__ total,
                               uint32_t* __restrict__ gathered, float* __restrict__ first,
                               float* __restrict__ neighbour) {
  constexpr int kThreads = 128;
  FC_SHARED float stage[kThreads];
  const int t = hw::thread_idx(), lane = hw::lane_id();
  const int i = hw::block_idx_x() * hw::block_dim() + t;
  const float v = x[i];
  float s = v;
  for (int mask = 16; mask > 0; mask /= 2) s += hw::shfl_xor(s, mask);
  total[i] = s;
  gathered[i] = hw::shfl_idx(uint32_t(i) * 2654435761u, (7 * lane + 3) % 32);
  first[i] = hw::shfl_idx(v, hw::warp_id() % 32);
  stage[t] = v;
  hw::sync_warp();  // the lanes of this warp only read what this warp wrote
  neighbour[i] = stage[hw::warp_id() * 32 + (lane ^ 1)];
}

inline hw::Error launch_warp_ops(const float* x, float* total, uint32_t* gathered, float* first,
                                 float* neighbour, int n, hw::Stream stream) {
  if (n % 128) return hw::ErrorInvalidValue;
  return hw::launch(warp_ops_kernel, {n / 128, 1}, 128, 0, stream, x, total, gathered, first,
                    neighbour);
}

// ---------------------------------------------------------------- one tensor-core tile
// d = a @ b + c for a (16, 16) and b (16, 8) in T, c and d (16, 8) float, all row-major,
// by one warp. Fragments are read straight from global memory in the PTX ISA layout
// (g = lane / 4, t = lane % 4):
//   A register j: row g + 8 (j % 2), columns 2t, 2t + 1 (+ 8 for j >= 2)
//   B register j: rows 2t, 2t + 1 (+ 8 for j = 1), column g
//   C element  e: row g + 8 (e / 2), column 2t + e % 2
template <class T>
FC_GLOBAL void mma_tile_kernel(const T* __restrict__ a, const T* __restrict__ b,
                               const float* __restrict__ c, float* __restrict__ d) {
  const int g = hw::lane_id() / 4, t = hw::lane_id() % 4;
  uint32_t fa[4], fb[2];
  float fc[4], fd[4];
  for (int j = 0; j < 4; ++j) {
    const int r = g + 8 * (j % 2), k = 2 * t + 8 * (j / 2);
    fa[j] = hw::pack2(a[r * 16 + k], a[r * 16 + k + 1]);
  }
  for (int j = 0; j < 2; ++j) {
    const int k = 2 * t + 8 * j;
    fb[j] = hw::pack2(b[k * 8 + g], b[(k + 1) * 8 + g]);
  }
  for (int e = 0; e < 4; ++e) fc[e] = c[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2];
  hw::mma_m16n8k16<T>(fd, fa, fb, fc);
  for (int e = 0; e < 4; ++e) d[(g + 8 * (e / 2)) * 8 + 2 * t + e % 2] = fd[e];
}

template <class T>
hw::Error launch_mma_tile(const T* a, const T* b, const float* c, float* d, hw::Stream stream) {
  return hw::launch(mma_tile_kernel<T>, {1, 1}, 32, 0, stream, a, b, c, d);
}

// ---------------------------------------------------------------- 256-point DFT on tensor cores
// The block FFT of docs/kernels.md with N1 = N2 = 16, one warp per complex row:
//   X[n1][n2] = x[16 n1 + n2];  Y = F16 @ X;  Y *= w256^(k1 n2);  Z = Y @ F16
// leaves Z[k1][k2] = xhat[k1 + 16 k2] (Monarch order). Complex products are 4 real mma.
// It uses every fragment role the FFT kernels need: the DFT matrix as A and as B, data as B,
// the accumulator twiddled in registers (C layout) and fed back as the A operand.
// x: (rows, 256, 2) float; y (stage 1) and z: (rows, 16, 16, 2) float, [k1][n2] and [k1][k2].
template <class T>
FC_GLOBAL void dft256_kernel(const float* __restrict__ x, float* __restrict__ y,
                             float* __restrict__ z) {
  constexpr int kWarps = 2;
  constexpr float kTwoPi = 6.283185307179586f;
  FC_SHARED float f_re[16][16], f_im[16][16];  // F16[j][k] = exp(-2 pi i jk / 16)
  T* xs = hw::dyn_smem<T>() + hw::warp_id() * 512;  // this warp's X: 256 re, then 256 im
  const int lane = hw::lane_id(), g = lane / 4, t = lane % 4;
  const size_t row = size_t(hw::block_idx_x()) * kWarps + hw::warp_id();

  for (int i = hw::thread_idx(); i < 256; i += hw::block_dim()) {
    const float angle = kTwoPi * float((i / 16) * (i % 16) % 16) / 16.f;
    f_re[i / 16][i % 16] = cosf(angle);
    f_im[i / 16][i % 16] = -sinf(angle);
  }
  for (int i = lane; i < 256; i += 32) {
    xs[i] = hw::from_float<T>(x[(row * 256 + i) * 2]);
    xs[256 + i] = hw::from_float<T>(x[(row * 256 + i) * 2 + 1]);
  }
  hw::sync_block();  // F from the whole block, X from this warp

  // F as A (rows k1, columns n1): register j holds (k1 = g + 8 (j % 2), n1 = 2t (+8 for j >= 2)).
  uint32_t a_re[4], a_im[4], a_nim[4];
  for (int j = 0; j < 4; ++j) {
    const int r = g + 8 * (j % 2), k = 2 * t + 8 * (j / 2);
    a_re[j] = hw::pack2<T>(f_re[r][k], f_re[r][k + 1]);
    a_im[j] = hw::pack2<T>(f_im[r][k], f_im[r][k + 1]);
    a_nim[j] = hw::pack2<T>(-f_im[r][k], -f_im[r][k + 1]);
  }
  // Y = F @ X, in two column tiles of 8: Yr = Fr Xr - Fi Xi, Yi = Fr Xi + Fi Xr.
  const float zero[4] = {0.f, 0.f, 0.f, 0.f};
  float yr[2][4], yi[2][4];
  for (int nt = 0; nt < 2; ++nt) {
    // X as B: register j holds (n1 = 2t, 2t + 1 (+8 for j = 1), n2 = g + 8 nt).
    uint32_t b_re[2], b_im[2];
    for (int j = 0; j < 2; ++j) {
      const int k = 2 * t + 8 * j, col = g + 8 * nt;
      b_re[j] = hw::pack2(xs[k * 16 + col], xs[(k + 1) * 16 + col]);
      b_im[j] = hw::pack2(xs[256 + k * 16 + col], xs[256 + (k + 1) * 16 + col]);
    }
    hw::mma_m16n8k16<T>(yr[nt], a_re, b_re, zero);
    hw::mma_m16n8k16<T>(yr[nt], a_nim, b_im, yr[nt]);
    hw::mma_m16n8k16<T>(yi[nt], a_re, b_im, zero);
    hw::mma_m16n8k16<T>(yi[nt], a_im, b_re, yi[nt]);
  }

  // Accumulator element e of tile nt holds (k1 = g + 8 (e / 2), n2 = 2t + e % 2 + 8 nt).
  for (int nt = 0; nt < 2; ++nt) {
    for (int e = 0; e < 4; ++e) {
      const int k1 = g + 8 * (e / 2), n2 = 2 * t + e % 2 + 8 * nt;
      float* out = y + ((row * 16 + k1) * 16 + n2) * 2;
      out[0] = yr[nt][e];
      out[1] = yi[nt][e];
      // Y *= w256^(k1 n2), in registers.
      const float angle = kTwoPi * float(k1 * n2 % 256) / 256.f;
      const float c = cosf(angle), s = sinf(angle);
      const float re = yr[nt][e], im = yi[nt][e];
      yr[nt][e] = re * c + im * s;
      yi[nt][e] = im * c - re * s;
    }
  }

  // Y as A (rows k1, columns n2): A register j = (k1 = g + 8 (j % 2), n2 = 2t (+8 for j >= 2)),
  // which is accumulator tile j / 2, elements 2 (j % 2) and 2 (j % 2) + 1: no data movement.
  uint32_t y_re[4], y_im[4];
  for (int j = 0; j < 4; ++j) {
    const int nt = j / 2, e = 2 * (j % 2);
    y_re[j] = hw::pack2<T>(yr[nt][e], yr[nt][e + 1]);
    y_im[j] = hw::pack2<T>(yi[nt][e], yi[nt][e + 1]);
  }
  // Z = Y @ F: Zr = Yr Fr - Yi Fi, Zi = Yr Fi + Yi Fr, F as B (rows n2, columns k2).
  for (int nt = 0; nt < 2; ++nt) {
    uint32_t f_b_re[2], f_b_im[2], f_b_nim[2];
    for (int j = 0; j < 2; ++j) {
      const int k = 2 * t + 8 * j, col = g + 8 * nt;
      f_b_re[j] = hw::pack2<T>(f_re[k][col], f_re[k + 1][col]);
      f_b_im[j] = hw::pack2<T>(f_im[k][col], f_im[k + 1][col]);
      f_b_nim[j] = hw::pack2<T>(-f_im[k][col], -f_im[k + 1][col]);
    }
    float zr[4], zi[4];
    hw::mma_m16n8k16<T>(zr, y_re, f_b_re, zero);
    hw::mma_m16n8k16<T>(zr, y_im, f_b_nim, zr);
    hw::mma_m16n8k16<T>(zi, y_re, f_b_im, zero);
    hw::mma_m16n8k16<T>(zi, y_im, f_b_re, zi);
    for (int e = 0; e < 4; ++e) {
      const int k1 = g + 8 * (e / 2), k2 = 2 * t + e % 2 + 8 * nt;
      float* out = z + ((row * 16 + k1) * 16 + k2) * 2;
      out[0] = zr[e];
      out[1] = zi[e];
    }
  }
}

template <class T>
hw::Error launch_dft256(const float* x, float* y, float* z, int rows, hw::Stream stream) {
  if (rows % 2) return hw::ErrorInvalidValue;  // two warps, two rows per block
  return hw::launch(dft256_kernel<T>, {rows / 2, 1}, 64, 2 * 512 * sizeof(T), stream, x, y, z);
}

// ---------------------------------------------------------------- conversions
// y = T(x) rounded to nearest even, back = float(y); a grid-stride loop over n.
template <class T>
FC_GLOBAL void convert_kernel(const float* __restrict__ x, T* __restrict__ y,
                              float* __restrict__ back, int n) {
  for (int i = hw::block_idx_x() * hw::block_dim() + hw::thread_idx(); i < n;
       i += hw::grid_dim_x() * hw::block_dim()) {
    const T h = hw::from_float<T>(x[i]);
    y[i] = h;
    back[i] = hw::to_float(h);
  }
}

template <class T>
hw::Error launch_convert(const float* x, T* y, float* back, int n, hw::Stream stream) {
  return hw::launch(convert_kernel<T>, {4, 1}, 128, 0, stream, x, y, back, n);
}

// ---------------------------------------------------------------- ldmatrix, movmatrix, sync_block_or
// One warp: m (16 x 16 16-bit values, row-major) into shared memory; lane L gives the address of
// row L % 8 of matrix L / 8 for matrices (rows 0-7, cols 0-7), (rows 8-15, cols 0-7), (rows 0-7,
// cols 8-15), (rows 8-15, cols 8-15) -- the mma A-operand order. Out (32 lanes x 4 registers):
// plain[L][i], trans[L][i] (ldmatrix_x4 / _trans), moved[L][i] = movmatrix_trans(plain[L][i]).
// any[j] = sync_block_or(thread_idx() == who[j]) for who = {-1, 5, 31} (a 32-thread block).
FC_GLOBAL void ldmatrix_kernel(const uint16_t* __restrict__ m, uint32_t* __restrict__ plain,
                               uint32_t* __restrict__ trans, uint32_t* __restrict__ moved,
                               int* __restrict__ any) {
  alignas(16) FC_SHARED uint16_t tile[16 * 16];
  const int lane = hw::lane_id();
  for (int i = lane; i < 256; i += 32) hw::sts(tile + i, m[i]);
  hw::sync_block();
  const int mat = lane / 8, row = (lane % 8) + 8 * (mat & 1), col = 8 * (mat >> 1);
  uint32_t r[4], q[4];
  hw::ldmatrix_x4(r, tile + row * 16 + col);
  hw::ldmatrix_x4_trans(q, tile + row * 16 + col);
  for (int i = 0; i < 4; ++i) {
    plain[lane * 4 + i] = r[i];
    trans[lane * 4 + i] = q[i];
    moved[lane * 4 + i] = hw::movmatrix_trans(r[i]);
  }
  const int who[3] = {-1, 5, 31};
  for (int j = 0; j < 3; ++j) {
    const int v = hw::sync_block_or(hw::thread_idx() == who[j]);
    if (lane == 0) any[j] = v;
  }
}

inline hw::Error launch_ldmatrix(const uint16_t* m, uint32_t* plain, uint32_t* trans,
                                 uint32_t* moved, int* any, hw::Stream stream) {
  return hw::launch(ldmatrix_kernel, {1, 1}, 32, 0, stream, m, plain, trans, moved, any);
}

// ---------------------------------------------------------------- counters
// Access patterns with hand-computed costs, one region each (tests/test_emu_counters.py holds
// the expected counts). 64 threads (two warps), x: 2048 floats of input, y: 2048 floats out.
// Shared memory: 32 x 33 floats (a padded 32 x 32 matrix) then 512 words for wide accesses.
struct alignas(8) u32x2 {
  uint32_t a, b;
};
struct alignas(16) u32x4 {
  uint32_t a, b, c, d;
};

FC_GLOBAL void counters_kernel(const float* __restrict__ x, float* __restrict__ y) {
  alignas(128) FC_SHARED float s[32 * 33 + 512];
  float* wide = s + 32 * 33 + 32;  // 128-byte aligned: 32 * 33 + 32 = 1088 = 34 * 32 words
  const int t = hw::thread_idx(), lane = hw::lane_id();
  float acc = 0.f;
  for (int i = t; i < 32 * 33 + 512; i += hw::block_dim()) hw::sts(s + i, float(i));
  hw::sync_block();
  if (hw::warp_id() == 0) {
    hw::region("coalesced");  // 128 bytes in 4 sectors
    acc += hw::ldg(x + lane, "x");
    hw::region("strided");  // 32 floats 128 bytes apart: 32 sectors, 4 bytes used in each
    acc += hw::ldg(x + 32 * lane, "x");
    hw::region("half");  // 2-byte loads: 64 bytes in 2 sectors
    acc += float(hw::ldg(reinterpret_cast<const uint16_t*>(x) + lane, "x"));
    hw::region("row");  // s[lane]: every bank once, 1 wavefront
    acc += hw::lds(s + lane);
    hw::region("broadcast");  // one word for all lanes: 1 wavefront
    acc += hw::lds(s + 5);
    hw::region("column");  // stride 32 words: one bank, 32 wavefronts
    acc += hw::lds(s + 32 * lane);
    hw::region("padded");  // stride 33 words: 32 banks, 1 wavefront
    acc += hw::lds(s + 33 * lane);
    hw::region("swizzled");  // row lane, column 7 ^ lane of a 32-word-row matrix: 1 wavefront
    acc += hw::lds(s + 32 * lane + (7 ^ lane));
    hw::region("wide64");  // 8 bytes per lane, contiguous: 2 half-warp wavefronts
    const u32x2 w2 = hw::lds(reinterpret_cast<const u32x2*>(wide) + lane);
    acc += float(w2.a ^ w2.b);
    hw::region("wide64_stride2");  // 8 bytes at stride 16: 2-way within each half-warp -> 4
    const u32x2 w2s = hw::lds(reinterpret_cast<const u32x2*>(wide) + 2 * lane);
    acc += float(w2s.a ^ w2s.b);
    hw::region("wide128");  // 16 bytes per lane, contiguous: 4 quarter-warp wavefronts
    const u32x4 w4 = hw::lds(reinterpret_cast<const u32x4*>(wide) + lane);
    acc += float(w4.a ^ w4.b ^ w4.c ^ w4.d);
    hw::region("diverged");  // odd lanes a row (1), even lanes a column (16): 2 instr, 17
    if (lane & 1) {
      acc += hw::lds(s + lane);
    } else {
      acc += hw::lds(s + 32 * lane);
    }
    hw::region("tail");  // 40 elements over 32 lanes: 2 instructions (32 + 8 lanes), 1 each
    for (int i = lane; i < 40; i += 32) acc += hw::lds(s + i);
    hw::region("rounds");  // 3 iterations of 2 loads, each used (stored) before the next: 3 rounds
    for (int i = 0; i < 3; ++i) {
      acc += hw::ldg(x + 1024 + 64 * i + lane, "x") + hw::ldg(x + 1024 + 64 * i + 32 + lane, "x");
      hw::sts(s + lane, acc);
    }
    hw::region("rounds_again");  // the same sectors again: 3 rounds, none a first read
    for (int i = 0; i < 3; ++i) {
      acc += hw::ldg(x + 1024 + 64 * i + lane, "x") + hw::ldg(x + 1024 + 64 * i + 32 + lane, "x");
      hw::sts(s + lane, acc);
    }
    hw::region("batched");  // 4 loads issued back to back, then used: 1 round
    float v[4];
    for (int i = 0; i < 4; ++i) v[i] = hw::ldg(x + 1536 + 128 * i + lane, "x");
    for (int i = 0; i < 4; ++i) hw::sts(s + lane, acc += v[i]);
  }
  hw::region("store");  // both warps: 64 floats = 8 sectors, all first writes
  hw::stg(y + t, acc, "y");
  hw::sync_block();  // counted in region "store"
}

inline hw::Error launch_counters(const float* x, float* y, hw::Stream stream) {
  return hw::launch(counters_kernel, {1, 1}, 64, 0, stream, x, y);
}

// ---------------------------------------------------------------- broken on purpose

// Reuses a shared buffer without a second barrier: after the barrier, thread t reads slot t + 1
// while thread t + 1 overwrites it. The ThreadSanitizer build must report the race. 64 threads.
FC_GLOBAL void racy_kernel(float* out) {
  FC_SHARED float buf[64];
  const int t = hw::thread_idx();
  buf[t] = float(t);
  hw::sync_block();
  out[t] = buf[(t + 1) % 64];
  buf[t] = 0.f;  // a hw::sync_block() belongs before this line
}

// Thread 63 returns before the barrier the others wait at. 64 threads.
FC_GLOBAL void early_exit_kernel(float* out) {
  FC_SHARED float buf[64];
  const int t = hw::thread_idx();
  if (t == 63) return;
  buf[t] = float(t);
  hw::sync_block();
  out[t] = buf[(t + 1) % 63];
}

// Lanes 0-15 wait at the block barrier for lanes 16-31, which wait at a warp barrier for
// lanes 0-15. 32 threads.
FC_GLOBAL void deadlock_kernel(float* out) {
  if (hw::lane_id() < 16) hw::sync_block();
  hw::sync_warp();
  out[hw::thread_idx()] = 1.f;
}

// The two warps reach __syncthreads at different places, undefined in CUDA. 64 threads.
FC_GLOBAL void divergent_barrier_kernel(float* out) {
  if (hw::warp_id() == 0) {
    hw::sync_block();
  } else {
    hw::sync_block();
  }
  out[hw::thread_idx()] = 1.f;
}

// Writes one float past the end of out, which holds block_dim() floats.
FC_GLOBAL void oob_kernel(float* out) { out[hw::thread_idx() + 1] = 1.f; }

// Writes one float past the end of its block_dim() floats of dynamic shared memory.
FC_GLOBAL void smem_oob_kernel(float* out) {
  float* s = hw::dyn_smem<float>();
  s[hw::thread_idx() + 1] = 1.f;
  hw::sync_block();
  out[hw::thread_idx()] = s[0];
}

// Fills `bytes` of dynamic shared memory and reads it back reversed: out[i] = bytes / 4 - 1 - i.
FC_GLOBAL void smem_fill_kernel(float* out, int bytes) {
  float* s = hw::dyn_smem<float>();
  const int n = bytes / 4;
  for (int i = hw::thread_idx(); i < n; i += hw::block_dim()) s[i] = float(i);
  hw::sync_block();
  for (int i = hw::thread_idx(); i < n; i += hw::block_dim()) out[i] = s[n - 1 - i];
}

inline hw::Error launch_racy(float* out, hw::Stream stream) {
  return hw::launch(racy_kernel, {1, 1}, 64, 0, stream, out);
}
inline hw::Error launch_early_exit(float* out, hw::Stream stream) {
  return hw::launch(early_exit_kernel, {1, 1}, 64, 0, stream, out);
}
inline hw::Error launch_deadlock(float* out, hw::Stream stream) {
  return hw::launch(deadlock_kernel, {1, 1}, 32, 0, stream, out);
}
inline hw::Error launch_divergent_barrier(float* out, hw::Stream stream) {
  return hw::launch(divergent_barrier_kernel, {1, 1}, 64, 0, stream, out);
}
inline hw::Error launch_oob(float* out, int n, hw::Stream stream) {
  return hw::launch(oob_kernel, {1, 1}, n, 0, stream, out);
}
inline hw::Error launch_smem_oob(float* out, int n, hw::Stream stream) {
  return hw::launch(smem_oob_kernel, {1, 1}, n, n * sizeof(float), stream, out);
}
inline hw::Error launch_smem_fill(float* out, int bytes, hw::Stream stream) {
  return hw::launch(smem_fill_kernel, {1, 1}, 256, size_t(bytes), stream, out, bytes);
}

}  // namespace proof
