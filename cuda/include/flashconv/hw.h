// flashconv/hw.h: the only way kernel code reaches the hardware.
//
// Device code lives in headers and is compiled two ways:
//   nvcc (__CUDACC__)  every name below is the real builtin or PTX instruction;
//   g++  (tests/emu)   the same names run a SIMT emulation on the CPU: one host thread per CUDA
//                      thread, blocks one after another. CI (no GPU) thereby runs the kernels
//                      unchanged and checks their indexing, barriers and arithmetic, with
//                      ThreadSanitizer standing in for racecheck and AddressSanitizer for memcheck.
// Keep the layer as small as the kernels need; anything added needs both sides.
//
//   FC_GLOBAL, FC_DEVICE, FC_HOST_DEVICE   __global__, __device__ __forceinline__, both
//   FC_SHARED        static shared memory: __shared__, or on the CPU a function-local static,
//                    which is "one per block" because blocks run one after another
//   FC_UNROLL        #pragma unroll (nothing on the CPU)
//   FC_LAUNCH_BOUNDS(threads, min_blocks)   __launch_bounds__ (nothing on the CPU)
//   half_t, bf16_t   2-byte storage, bit-compatible with __half and __nv_bfloat16
//   to_float(x), from_float<T>(f)   conversions; round to nearest even like __float2half_rn,
//                    NaN becomes the canonical 0x7fff
//   pack2(lo, hi), pack2<T>(flo, fhi)   two 16-bit values in a register, lo in the low half
//   thread_idx() block_dim() block_idx_x() block_idx_y() grid_dim_x() grid_dim_y()
//   lane_id() warp_id()              (1-D blocks)
//   dyn_smem<T>()    the launch's dynamic shared memory
//   sync_block()     __syncthreads()
//   lds(p), sts(p, v)               a shared-memory load / store of one T (any trivially
//                    copyable type of 1-16 bytes: a float, a complex pair, a uint4)
//   ldg(p, tensor), stg(p, v, tensor)   a global-memory load / store; `tensor` names what is
//                    accessed ("u", "y", "K", ...) for the counters
//   atomic_add(p, v[, tensor])      atomicAdd on a float in global memory
//   region(name)     names the code that follows (until the next region call) for the counters;
//                    FC_REGION(literal) does the same and marks the SASS in a lint build
//   Site             where a call is made; every accessor takes one as a defaulted last
//                    argument, and helpers that issue accesses for their caller pass theirs on
//   sync_block_or(pred)   __syncthreads_or: a barrier that returns whether any thread's pred
//                    is nonzero
//   sync_warp(), shfl_xor(v, mask), shfl_idx(v, src)   full-warp (all 32 lanes) collectives,
//                    v float or uint32_t
//   ldmatrix_x4(r, row), ldmatrix_x4_trans(r, row)   ldmatrix.sync.aligned.m8n8.x4[.trans]
//                    .shared.b16: lane L gives the address of row L % 8 of matrix L / 8 (16
//                    bytes, 16-byte aligned, shared memory); r[i] is this lane's fragment of
//                    matrix i: lane (g, t) = (L / 4, L % 4) gets elements (g, 2t), (g, 2t+1),
//                    or with .trans (2t, g), (2t+1, g); lower column or row in the low half
//   movmatrix_trans(a)  movmatrix.sync.aligned.m8n8.trans.b16: the 8x8 matrix of 16-bit
//                    elements held as fragments (lane (g, t): (g, 2t), (g, 2t+1)) transposed
//   cp_async16(dst, src, tensor), cp_async_wait_all()   cp.async.cg of 16 bytes global ->
//                    shared (both 16-byte aligned); wait_all commits and waits for this
//                    thread's copies (other threads see them after a barrier)
//   atomic_max_shared(p, v)   atomicMax on a uint32_t in shared memory
//   float_bits(f), bits_float(u)   the bits of a float and back
//   pack_half2(lo, hi), unpack_half2(v, lo, hi), pack_bf162(lo, hi)   two floats <-> two
//                    16-bit values in one register (round to nearest even), lo in the low half
//   mma_m16n8k16<T>(d, a, b, c)   mma.sync.aligned.m16n8k16.row.col.f32.{f16|bf16}.{..}.f32,
//                    fragments as in the PTX ISA, "Matrix Fragments for mma.m16n8k16 with
//                    floating point type"
//   Error, Success, error_string(e), Stream, Grid
//   launch(kernel, grid, threads, dyn_smem_bytes, stream, args...)   returns Error; sets the
//                    opt-in shared-memory attribute when static + dynamic exceed 48 KB
//
// The emulation (needs C++20; link with -pthread -rdynamic so failures can name the kernel):
//   - sync_block is a counting barrier on a mutex and condition variable, so ThreadSanitizer
//     sees exactly the ordering a barrier gives. Threads that exit, or wait at barriers that
//     can never complete, fail the launch at once (ErrorLaunchFailure) with a message naming
//     the kernel, the block and where each thread is; so do threads reaching sync_block at
//     different places, warp lanes in different collectives, and any barrier wait longer than
//     FC_EMU_TIMEOUT_S seconds (default 60), for spin loops.
//   - Warp collectives exchange values through a per-warp buffer guarded by a per-warp barrier.
//     mma_m16n8k16 gathers the 32 lanes' fragments and computes each lane's d from the full
//     matrices: exact products, fp32 accumulation in k order starting from c. Hardware
//     accumulation order and rounding differ; only a GPU run checks those.
//   - Dynamic shared memory is a fresh heap block of exactly the requested size, filled with
//     0xff bytes (NaN) because the hardware does not clear it. AddressSanitizer builds catch
//     accesses past its end; other builds check a guard zone after each block. A request over
//     the target's limit fails the launch (ErrorInvalidValue): emu::set_target_sm(80 | 86 | 89
//     | 90). Static FC_SHARED arrays are not counted against it, and they start zeroed and keep
//     their contents from block to block, which a GPU does not promise.
//   - Blocks run in sequence, so races between blocks, and kernels that wait for another
//     block, are not emulated. Launches are serialized process-wide.
//   - Counters (emu::config().counters, off by default): every accessor call is recorded with
//     its Site, and the lanes of a warp are grouped into one warp instruction by (site, the
//     block- and warp-barrier rounds the lane has passed, the lane's occurrence count of that
//     site within those rounds), which is how a GPU groups them wherever lanes diverge only in
//     how many iterations they run, or in which sites they reach. Per warp instruction:
//       shared memory: wavefronts under the bank rules (32 banks of 4 bytes; accesses of 8
//         bytes are processed by half-warps, of 16 bytes by quarter-warps; one wavefront per
//         distinct 4-byte word in the busiest bank of each phase; same word = broadcast), next
//         to the ideal (the number of phases with an active lane);
//       global memory: 32-byte sectors touched and bytes used; per launch, sectors read or
//         written for the first time (what reaches DRAM when the launch's working set fits L2)
//         and all sectors (L2 traffic), per tensor;
//       per region: barriers, mma, shuffles, and the dependent global-load rounds of the
//         slowest warp between barriers (a latency chain: a run of global loads issued back to
//         back, with no other access or collective in between, is one round).
//     emu::launches() holds one LaunchStats per launch; emu::write_json() prints them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define FC_GLOBAL __global__
#define FC_DEVICE __device__ __forceinline__
#define FC_HOST_DEVICE __host__ __device__ __forceinline__
#define FC_SHARED __shared__
#define FC_UNROLL _Pragma("unroll")
#define FC_LAUNCH_BOUNDS(threads, min_blocks) __launch_bounds__(threads, min_blocks)
// 1 in sm_80's device compilation (A100), 0 elsewhere: sm_90's code generation fits some
// kernels in 128 registers (two 8-warp CTAs per SM) where sm_80's would spill.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define FC_ARCH_SM80 1
#else
#define FC_ARCH_SM80 0
#endif
#else
#define FC_GLOBAL inline
#define FC_DEVICE inline
#define FC_HOST_DEVICE inline
#define FC_SHARED static
#define FC_UNROLL
#define FC_LAUNCH_BOUNDS(threads, min_blocks)
#define FC_ARCH_SM80 0
#endif

namespace flashconv::hw {

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };
static_assert(sizeof(half_t) == 2 && std::is_trivial_v<half_t>);
static_assert(sizeof(bf16_t) == 2 && std::is_trivial_v<bf16_t>);

struct Grid { int x = 1, y = 1; };

}  // namespace flashconv::hw

#if defined(__CUDACC__)  // ============================================================= GPU

namespace flashconv::hw {

using Error = cudaError_t;
using Stream = cudaStream_t;
constexpr Error Success = cudaSuccess;
constexpr Error ErrorInvalidValue = cudaErrorInvalidValue;  // what launchers return for bad sizes
constexpr Error ErrorInvalidConfiguration = cudaErrorInvalidConfiguration;
constexpr Error ErrorLaunchFailure = cudaErrorLaunchFailure;
inline const char* error_string(Error e) { return cudaGetErrorString(e); }

FC_HOST_DEVICE float to_float(float x) { return x; }
FC_HOST_DEVICE float to_float(half_t x) { return __half2float(__ushort_as_half(x.bits)); }
FC_HOST_DEVICE float to_float(bf16_t x) { return __bfloat162float(__ushort_as_bfloat16(x.bits)); }

template <class T>
FC_HOST_DEVICE T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, half_t>) {
    return half_t{__half_as_ushort(__float2half_rn(f))};
  } else {
    static_assert(std::is_same_v<T, bf16_t>, "from_float: T must be float, half_t or bf16_t");
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(f))};
  }
}

FC_DEVICE int thread_idx() { return threadIdx.x; }
FC_DEVICE int block_dim() { return blockDim.x; }
FC_DEVICE int block_idx_x() { return blockIdx.x; }
FC_DEVICE int block_idx_y() { return blockIdx.y; }
FC_DEVICE int grid_dim_x() { return gridDim.x; }
FC_DEVICE int grid_dim_y() { return gridDim.y; }
FC_DEVICE int lane_id() { return threadIdx.x & 31; }
FC_DEVICE int warp_id() { return threadIdx.x >> 5; }

template <class T>
FC_DEVICE T* dyn_smem() {
  // One declaration type for every instantiation: extern __shared__ arrays must agree.
  extern __shared__ __align__(16) unsigned char fc_dyn_smem[];
  return reinterpret_cast<T*>(fc_dyn_smem);
}

// Where a call is made: empty here; the emulation's Site is the call's source location.
struct Site {
  static FC_HOST_DEVICE constexpr Site current() { return {}; }
};

FC_DEVICE void sync_block() { __syncthreads(); }
FC_DEVICE void sync_warp() { __syncwarp(); }
FC_DEVICE void atomic_add(float* p, float v, const char* = "", Site = Site::current()) {
  atomicAdd(p, v);
}
FC_DEVICE float shfl_xor(float v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FC_DEVICE uint32_t shfl_xor(uint32_t v, int mask) { return __shfl_xor_sync(0xffffffffu, v, mask); }
FC_DEVICE float shfl_idx(float v, int src) { return __shfl_sync(0xffffffffu, v, src); }
FC_DEVICE uint32_t shfl_idx(uint32_t v, int src) { return __shfl_sync(0xffffffffu, v, src); }

// Memory accessors: the plain load or store.
FC_DEVICE void region(const char*) {}
template <class T>
FC_DEVICE T lds(const T* p, Site = Site::current()) { return *p; }
template <class T>
FC_DEVICE void sts(T* p, const T& v, Site = Site::current()) { *p = v; }
template <class T>
FC_DEVICE T ldg(const T* p, const char*, Site = Site::current()) { return *p; }
template <class T>
FC_DEVICE void stg(T* p, const T& v, const char*, Site = Site::current()) { *p = v; }

FC_DEVICE int sync_block_or(int pred) { return __syncthreads_or(pred); }

FC_DEVICE void cp_async16(void* dst, const void* src, const char*, Site = Site::current()) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src) : "memory");
}
FC_DEVICE void cp_async_wait_all() {
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
}
FC_DEVICE void atomic_max_shared(uint32_t* p, uint32_t v, Site = Site::current()) { atomicMax(p, v); }
FC_DEVICE uint32_t float_bits(float f) { return __float_as_uint(f); }
FC_DEVICE float bits_float(uint32_t u) { return __uint_as_float(u); }

FC_DEVICE void ldmatrix_x4(uint32_t (&r)[4], const void* row, Site = Site::current()) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
FC_DEVICE void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, Site = Site::current()) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a)
               : "memory");
}
FC_DEVICE uint32_t movmatrix_trans(uint32_t a) {
  uint32_t d;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(d) : "r"(a));
  return d;
}

FC_DEVICE uint32_t pack_half2(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
FC_DEVICE void unpack_half2(uint32_t v, float& lo, float& hi) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
  lo = f.x;
  hi = f.y;
}
FC_DEVICE uint32_t pack_bf162(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

template <class T>
FC_DEVICE void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2],
                            const float c[4]) {
  if constexpr (std::is_same_v<T, half_t>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  } else {
    static_assert(std::is_same_v<T, bf16_t>, "mma_m16n8k16: T must be half_t or bf16_t");
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
  }
}

template <class... P, class... A>
inline Error launch(void (*kernel)(P...), Grid grid, int threads, size_t dyn_smem_bytes,
                    Stream stream, A&&... args) {
  // A block whose static plus dynamic shared memory exceeds 48 KB must opt in to the larger
  // carve-out before it is launched.
  cudaFuncAttributes attr{};
  if (dyn_smem_bytes > 0) {
    Error e = cudaFuncGetAttributes(&attr, kernel);
    if (e != cudaSuccess) return e;
  }
  if (dyn_smem_bytes + attr.sharedSizeBytes > 48 * 1024) {
    Error e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                   static_cast<int>(dyn_smem_bytes));
    if (e != cudaSuccess) return e;
  }
  kernel<<<dim3(grid.x, grid.y), threads, dyn_smem_bytes, stream>>>(std::forward<A>(args)...);
  return cudaGetLastError();
}

}  // namespace flashconv::hw

#else  // ========================================================================= CPU emulation

#if __cplusplus < 202002L
#error "the CPU emulation in flashconv/hw.h needs C++20 (std::source_location, std::bit_cast)"
#endif

#include <cxxabi.h>
#include <dlfcn.h>

#include <atomic>
#include <bit>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <source_location>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FC_EMU_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FC_EMU_ASAN 1
#endif
#endif

namespace flashconv::hw {

enum Error : int {  // the cudaError_t values of the same names
  Success = 0,
  ErrorInvalidValue = 1,
  ErrorInvalidConfiguration = 9,
  ErrorLaunchFailure = 719,
};
using Stream = void*;

inline const char* error_string(Error e) {
  switch (e) {
    case Success: return "no error";
    case ErrorInvalidValue: return "invalid argument";
    case ErrorInvalidConfiguration: return "invalid configuration argument";
    case ErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

namespace emu {

struct Config {
  size_t max_dyn_smem = 166912;  // sm_80: 163 KB with the opt-in attribute
  double timeout_s = 60;         // longest barrier wait before the launch fails
  bool counters = false;         // record memory traffic into launches() (slower)
};

inline Config& config() {
  static Config c = [] {
    Config d;
    if (const char* s = std::getenv("FC_EMU_TIMEOUT_S")) d.timeout_s = std::atof(s);
    return d;
  }();
  return c;
}

// Per-block shared-memory limit (opt-in) of the emulated target; false if sm is unknown.
inline bool set_target_sm(int sm) {
  switch (sm) {
    case 80: config().max_dyn_smem = 166912; return true;
    case 86:
    case 89: config().max_dyn_smem = 101376; return true;
    case 90: config().max_dyn_smem = 232448; return true;
  }
  return false;
}

// Full text of the last launch failure: kernel, block, and what each thread was doing.
inline std::string& last_message() {
  static std::string m;
  return m;
}

// ---- counters (config().counters): totals over every block of a launch, per region.

struct SmemStats {  // warp-level shared-memory instructions of one kind (loads or stores)
  uint64_t instr = 0, wavefronts = 0, ideal = 0, bytes = 0;
};

struct GlobalStats {  // warp-level global-memory instructions of one kind, for one tensor
  uint64_t requests = 0;  // warp instructions
  uint64_t sectors = 0;   // 32-byte sectors they touch (L2 traffic)
  uint64_t bytes = 0;     // bytes the lanes asked for (distinct within an instruction)
  uint64_t first = 0;     // sectors this launch had not read (loads) or written (stores) yet
};

struct RegionStats {
  SmemStats lds, sts;
  std::map<std::string, GlobalStats> ldg, stg;  // by tensor; atomics count as stores
  uint64_t barriers = 0, mma = 0, shfl = 0, warp_syncs = 0;
  uint64_t entries = 0;  // warps entering the region (hw::region calls, per warp)
  // Latency chain: over blocks and barrier intervals, the slowest warp's dependent global-load
  // rounds, those touching a first-read sector (DRAM) and the others (L2).
  uint64_t ld_rounds_dram = 0, ld_rounds_l2 = 0;
};

struct LaunchStats {
  std::string kernel;
  int grid_x = 1, grid_y = 1, threads = 0;
  size_t smem_bytes = 0;
  std::vector<std::string> order;  // regions in order of first appearance
  std::map<std::string, RegionStats> regions;
  RegionStats& region(const std::string& name) {
    auto it = regions.find(name);
    if (it == regions.end()) {
      order.push_back(name);
      it = regions.emplace(name, RegionStats{}).first;
    }
    return it->second;
  }
};

inline std::vector<LaunchStats>& launches() {
  static std::vector<LaunchStats> v;
  return v;
}

}  // namespace emu

namespace detail {

using Where = std::source_location;
constexpr int kWarp = 32;
constexpr int kSlotWords = 10;  // the most a lane publishes: mma's a[4], b[2], c[4]

inline uint32_t bits_of(float f) { return std::bit_cast<uint32_t>(f); }
inline float float_of(uint32_t u) { return std::bit_cast<float>(u); }

inline uint16_t half_from_float(float f) {
  const uint32_t x = bits_of(f), a = x & 0x7fffffffu;
  const uint16_t sign = (x >> 16) & 0x8000u;
  if (a > 0x7f800000u) return 0x7fffu;         // NaN
  if (a >= 0x477ff000u) return sign | 0x7c00u;  // inf, and >= 65520 (65504 + ulp/2 ties to inf)
  if (a <= 0x33000000u) return sign;            // <= 2^-25: half the smallest subnormal rounds to 0
  const int e = int(a >> 23);
  uint32_t keep, rest, half;
  if (e < 113) {  // below 2^-14: subnormal, value = m * 2^-24 with m = significand >> (126 - e)
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const int shift = 126 - e;
    keep = m >> shift;
    rest = m & ((1u << shift) - 1);
    half = 1u << (shift - 1);
  } else {  // normal: rebias the exponent, keep the top 10 mantissa bits
    keep = ((uint32_t(e) - 112) << 10) | ((a >> 13) & 0x3ffu);
    rest = a & 0x1fffu;
    half = 0x1000u;
  }
  // A carry out of the mantissa correctly moves to the next exponent (or subnormal -> normal).
  if (rest > half || (rest == half && (keep & 1))) ++keep;
  return uint16_t(sign | keep);
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  if (e == 31) return float_of(sign | 0x7f800000u | (m << 13));
  if (e == 0) return float_of(sign | bits_of(std::ldexp(float(m), -24)));
  return float_of(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t bf16_from_float(float f) {
  const uint32_t x = bits_of(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);  // round half to even on bit 16
}

inline float bf16_to_float(uint16_t b) { return float_of(uint32_t(b) << 16); }

}  // namespace detail

inline float to_float(float x) { return x; }
inline float to_float(half_t x) { return detail::half_to_float(x.bits); }
inline float to_float(bf16_t x) { return detail::bf16_to_float(x.bits); }

template <class T>
inline T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) {
    return f;
  } else if constexpr (std::is_same_v<T, half_t>) {
    return half_t{detail::half_from_float(f)};
  } else {
    static_assert(std::is_same_v<T, bf16_t>, "from_float: T must be float, half_t or bf16_t");
    return bf16_t{detail::bf16_from_float(f)};
  }
}

namespace detail {

struct Abort {};  // unwinds the threads of a block that has failed

// A counting barrier; arrivals must match in kind (and for sync_block, in place). Rounds
// alternate between two phases, each with its own lock: a thread that has left round r and
// arrives at r + 1 touches no lock that a slower thread still takes to leave r, so
// ThreadSanitizer sees exactly the ordering a barrier gives and no more.
struct Barrier {
  struct Phase {
    std::mutex m;
    std::condition_variable cv;
    int arrived = 0;
    unsigned gen = 0;
    const char* op = nullptr;  // what the first arrival of this round called, and where
    Where at;
  } phase[2];
};

struct Warp {
  Barrier bar;
  // What each lane published, double-buffered by round parity: a lane cannot start round r+2
  // (overwriting round r's values) before every lane has arrived at r+1, i.e. finished reading r.
  uint32_t slot[2][kWarp][kSlotWords];
};

enum : int { kRunning, kWaiting, kExited };

// One recorded memory access of one thread (counters on).
struct Access {
  enum Kind : uint8_t { kLds, kSts, kLdg, kStg, kEnter };  // kEnter: hw::region
  const void* site;  // the call's source location (one static object per call site)
  unsigned block_round, warp_round;
  unsigned load_run;  // global loads: the thread's run of back-to-back loads it belongs to
  uintptr_t addr;
  uint32_t bytes;
  Kind kind;
  const char* tensor;  // global accesses
  const char* region;
};

struct ThreadInfo {  // what a thread is doing, for the failure message
  std::atomic<int> state{kRunning};
  std::atomic<const char*> op{""};
  std::atomic<const char*> file{""};
  std::atomic<int> line{0};
  unsigned block_round = 0, warp_round = 0;  // barrier rounds passed; the thread's own
  const char* region = "";                    // the counters' region (hw::region)
  unsigned load_run = 0;                      // runs of global loads with nothing in between
  bool in_load_run = false;
  std::vector<Access> accesses;               // recorded since the last block barrier
};

// A launch's counters and the sectors it has read and written so far.
struct LaunchCounting {
  std::mutex m;  // warp collectives of different warps complete concurrently
  emu::LaunchStats stats;
  std::unordered_set<uint64_t> read, written;  // 32-byte sector numbers
};

struct Block {
  std::string kernel;
  int threads = 0, x = 0, y = 0;
  Grid grid;
  unsigned char* smem = nullptr;
  Barrier bar;
  std::unique_ptr<Warp[]> warps;
  std::unique_ptr<ThreadInfo[]> info;
  LaunchCounting* counting = nullptr;  // null: counters off
  int or_slot[2] = {0, 0};             // sync_block_or, by round parity
  // Threads neither exited nor waiting at a barrier. Updated (relaxed, so ThreadSanitizer sees
  // no ordering from it) together with the barrier state, under that barrier's mutex: when it
  // reads 0, every live thread waits at a barrier that cannot complete.
  std::atomic<int> running{0};
  std::atomic<bool> failed{false};
  std::mutex fail_m;
  std::string message;
};

struct ThreadCtx {
  Block* block = nullptr;
  int tid = 0;
};
inline thread_local ThreadCtx tls;

inline ThreadCtx& ctx() {
  if (!tls.block) {
    std::fputs("flashconv::hw: device function called outside an emulated launch\n", stderr);
    std::abort();
  }
  return tls;
}

inline std::string where(const char* file, int line) {
  const char* slash = std::strrchr(file, '/');
  return std::string(slash ? slash + 1 : file) + ":" + std::to_string(line);
}

inline void record_failure(Block& b, const std::string& what) {
  std::lock_guard lk(b.fail_m);
  if (b.failed.load(std::memory_order_relaxed)) return;
  b.message = "kernel " + b.kernel + ", block (" + std::to_string(b.x) + ", " +
              std::to_string(b.y) + "): " + what;
  b.failed.store(true, std::memory_order_release);
}

[[noreturn]] inline void fail(Block& b, const std::string& what) {
  record_failure(b, what);
  throw Abort{};
}

// "threads 0-62 wait at sync_block (kernels.h:57); thread 63 exited"
inline std::string describe(const Block& b) {
  auto text = [&](int t) {
    const ThreadInfo& i = b.info[t];
    constexpr auto relaxed = std::memory_order_relaxed;
    switch (i.state.load(relaxed)) {
      case kExited: return std::string("exited");
      case kWaiting:
        return std::string("wait at ") + i.op.load(relaxed) + " (" +
               where(i.file.load(relaxed), i.line.load(relaxed)) + ")";
    }
    return std::string("running");
  };
  std::string out;
  for (int t = 0; t < b.threads;) {
    const std::string s = text(t);
    int u = t + 1;
    while (u < b.threads && text(u) == s) ++u;
    out += (out.empty() ? "" : "; ") +
           (u - t == 1 ? "thread " + std::to_string(t)
                       : "threads " + std::to_string(t) + "-" + std::to_string(u - 1)) +
           " " + s;
    t = u;
  }
  return out;
}

// ---- counters

inline std::string region_name(const char* r) { return (r && *r) ? r : "kernel"; }

// Wavefronts of one warp-level shared-memory instruction: accesses of `bytes` each, processed
// in phases of 32 (<= 4 bytes), 16 (8 bytes) or 8 (16 bytes) lanes; a phase costs as many
// wavefronts as its busiest bank has distinct 4-byte words.
inline void smem_wavefronts(const std::vector<std::pair<int, uintptr_t>>& lanes, uint32_t bytes,
                            uint64_t& wavefronts, uint64_t& ideal) {
  const int lanes_per_phase = bytes <= 4 ? 32 : bytes <= 8 ? 16 : 8;
  const uint32_t words = bytes <= 4 ? 1 : bytes / 4;
  for (int phase = 0; phase < kWarp / lanes_per_phase; ++phase) {
    std::vector<uintptr_t> bank[32];
    bool active = false;
    for (const auto& [lane, addr] : lanes) {
      if (lane / lanes_per_phase != phase) continue;
      active = true;
      for (uint32_t w = 0; w < words; ++w) {
        const uintptr_t word = addr / 4 + w;
        auto& v = bank[word % 32];
        if (std::find(v.begin(), v.end(), word) == v.end()) v.push_back(word);
      }
    }
    if (!active) continue;
    size_t busiest = 0;
    for (const auto& v : bank) busiest = std::max(busiest, v.size());
    wavefronts += busiest;
    ideal += 1;
  }
}

// Aggregates every thread's recorded accesses into the launch's counters and clears them.
// Runs while no thread of the block can record: at a block barrier (by its last arrival) and
// after the block.
inline void flush_counters(Block& b) {
  LaunchCounting& lc = *b.counting;
  struct Key {
    const void* site;
    unsigned block_round, warp_round, occurrence;
    bool operator==(const Key&) const = default;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      size_t h = std::hash<const void*>()(k.site);
      for (unsigned v : {k.block_round, k.warp_round, k.occurrence}) h = h * 1000003u ^ v;
      return h;
    }
  };
  struct Group {
    const Access* first;  // kind, size, tensor, region of the instruction
    std::vector<std::pair<int, uintptr_t>> lanes;
  };
  // Per region: the slowest warp's load rounds in this interval (DRAM, L2).
  std::map<std::string, std::pair<uint64_t, uint64_t>> slowest;
  for (int w = 0; w * kWarp < b.threads; ++w) {
    std::unordered_map<Key, size_t, KeyHash> index;
    std::vector<Group> groups;
    std::vector<Key> keys;
    for (int lane = 0; lane < kWarp && w * kWarp + lane < b.threads; ++lane) {
      std::unordered_map<Key, unsigned, KeyHash> seen;  // (site, rounds) -> occurrences so far
      for (const Access& a : b.info[w * kWarp + lane].accesses) {
        unsigned& n = seen[Key{a.site, a.block_round, a.warp_round, 0}];
        const Key k{a.site, a.block_round, a.warp_round, n++};
        auto [it, inserted] = index.try_emplace(k, groups.size());
        if (inserted) {
          groups.push_back({&a, {}});
          keys.push_back(k);
        }
        groups[it->second].lanes.emplace_back(lane, a.addr);
      }
    }
    // (rounds, region) -> occurrence -> touched a first-read sector
    std::map<std::tuple<unsigned, unsigned, std::string>, std::map<unsigned, bool>> rounds;
    for (size_t g = 0; g < groups.size(); ++g) {
      const Access& a = *groups[g].first;
      emu::RegionStats& r = lc.stats.region(region_name(a.region));
      if (a.kind == Access::kEnter) {
        r.entries += 1;
        continue;
      }
      if (a.kind == Access::kLds || a.kind == Access::kSts) {
        emu::SmemStats& st = a.kind == Access::kLds ? r.lds : r.sts;
        st.instr += 1;
        st.bytes += uint64_t(a.bytes) * groups[g].lanes.size();
        smem_wavefronts(groups[g].lanes, a.bytes, st.wavefronts, st.ideal);
        continue;
      }
      const bool load = a.kind == Access::kLdg;
      emu::GlobalStats& st = (load ? r.ldg : r.stg)[a.tensor ? a.tensor : "?"];
      st.requests += 1;
      std::vector<std::pair<uintptr_t, uintptr_t>> spans;  // [begin, end) byte ranges
      std::vector<uint64_t> sectors;
      for (const auto& [lane, addr] : groups[g].lanes) {
        spans.emplace_back(addr, addr + a.bytes);
        for (uint64_t sec = addr / 32; sec <= (addr + a.bytes - 1) / 32; ++sec) sectors.push_back(sec);
      }
      std::sort(spans.begin(), spans.end());
      uintptr_t covered = 0;
      for (const auto& [lo, hi] : spans) {  // bytes asked for, each counted once
        if (hi > std::max(lo, covered)) st.bytes += hi - std::max(lo, covered);
        covered = std::max(covered, hi);
      }
      std::sort(sectors.begin(), sectors.end());
      sectors.erase(std::unique(sectors.begin(), sectors.end()), sectors.end());
      st.sectors += sectors.size();
      bool first_read = false;
      for (uint64_t sec : sectors) {
        if (load) {
          if (!lc.written.count(sec) && lc.read.insert(sec).second) {
            st.first += 1;
            first_read = true;
          }
        } else if (lc.written.insert(sec).second) {
          st.first += 1;
        }
      }
      if (load) {
        bool& dram = rounds[{keys[g].block_round, 0u, region_name(a.region)}][a.load_run];
        dram = dram || first_read;
      }
    }
    std::map<std::string, std::pair<uint64_t, uint64_t>> mine;
    for (const auto& [epoch, occ] : rounds) {
      auto& m = mine[std::get<2>(epoch)];
      for (const auto& [n, dram] : occ) (dram ? m.first : m.second) += 1;
    }
    for (const auto& [name, m] : mine) {
      auto& s = slowest[name];
      s.first = std::max(s.first, m.first);
      s.second = std::max(s.second, m.second);
    }
  }
  for (const auto& [name, m] : slowest) {
    emu::RegionStats& r = lc.stats.region(name);
    r.ld_rounds_dram += m.first;
    r.ld_rounds_l2 += m.second;
  }
  for (int t = 0; t < b.threads; ++t) b.info[t].accesses.clear();
}

// Counts a completed collective (by its last arrival) in the caller's region.
inline void count_collective(Block& b, const char* op, const char* region) {
  if (!b.counting) return;
  std::lock_guard lk(b.counting->m);
  if (!std::strcmp(op, "sync_block")) flush_counters(b);  // first: regions in program order
  emu::RegionStats& r = b.counting->stats.region(region_name(region));
  if (!std::strcmp(op, "sync_block")) {
    r.barriers += 1;
  } else if (!std::strcmp(op, "mma_m16n8k16")) {
    r.mma += 1;
  } else if (!std::strcmp(op, "sync_warp")) {
    r.warp_syncs += 1;
  } else if (!std::strncmp(op, "ldmatrix", 8)) {
    // a shared load, recorded by each lane
  } else {
    r.shfl += 1;
  }
}

// Arrives at round `round` of `bar` (expecting `expected` threads), runs publish() under its
// lock, and returns once all have arrived.
template <class Publish>
void arrive(Barrier& bar, unsigned round, int expected, const char* op, bool same_place,
            const Where& at, Publish&& publish) {
  ThreadCtx& c = ctx();
  Block& b = *c.block;
  b.info[c.tid].in_load_run = false;  // a collective uses what was loaded
  Barrier::Phase& p = bar.phase[round & 1];
  std::unique_lock lk(p.m);
  if (b.failed.load(std::memory_order_acquire)) throw Abort{};
  if (p.arrived == 0) {
    p.op = op;
    p.at = at;
  } else if (std::strcmp(p.op, op) ||
             (same_place && (p.at.line() != at.line() ||
                             std::strcmp(p.at.file_name(), at.file_name())))) {
    fail(b, std::string("threads meet at different barriers: ") + p.op + " (" +
                where(p.at.file_name(), p.at.line()) + ") and " + op + " (" +
                where(at.file_name(), at.line()) + ")");
  }
  publish(p.arrived);
  const unsigned gen = p.gen;
  if (++p.arrived == expected) {
    count_collective(b, op, b.info[c.tid].region);
    p.arrived = 0;
    ++p.gen;
    b.running.fetch_add(expected - 1, std::memory_order_relaxed);
    p.cv.notify_all();
    return;
  }
  ThreadInfo& me = b.info[c.tid];
  me.op.store(op, std::memory_order_relaxed);
  me.file.store(at.file_name(), std::memory_order_relaxed);
  me.line.store(int(at.line()), std::memory_order_relaxed);
  me.state.store(kWaiting, std::memory_order_relaxed);
  const char* stuck = "barrier can never complete: ";
  if (b.running.fetch_sub(1, std::memory_order_relaxed) == 1) fail(b, stuck + describe(b));
  const auto start = std::chrono::steady_clock::now();
  const std::chrono::duration<double> timeout(emu::config().timeout_s);
  while (p.gen == gen) {
    p.cv.wait_for(lk, std::chrono::milliseconds(50));
    if (p.gen != gen) break;
    if (b.failed.load(std::memory_order_acquire)) throw Abort{};
    if (b.running.load(std::memory_order_relaxed) == 0) fail(b, stuck + describe(b));
    if (std::chrono::steady_clock::now() - start > timeout)
      fail(b, "barrier wait timed out: " + describe(b));
  }
  me.state.store(kRunning, std::memory_order_relaxed);
}

// Publishes n words of this lane and returns all 32 lanes' words.
inline const uint32_t (*warp_exchange(const uint32_t* words, int n, const char* op,
                                      const Where& at))[kSlotWords] {
  ThreadCtx& c = ctx();
  Block& b = *c.block;
  if (b.threads % kWarp)
    fail(b, std::string(op) + " needs full warps, but block_dim() = " + std::to_string(b.threads));
  Warp& w = b.warps[c.tid / kWarp];
  const int lane = c.tid % kWarp;
  const unsigned round = b.info[c.tid].warp_round++;
  arrive(w.bar, round, kWarp, op, false, at, [&](int) {
    if (n) std::memcpy(w.slot[round & 1][lane], words, sizeof(uint32_t) * n);
  });
  return w.slot[round & 1];
}

// The coordinator's rendezvous with the host threads of a launch, before and after each block.
struct Gate {
  explicit Gate(int parties) : parties(parties) {}
  std::mutex m;
  std::condition_variable cv;
  int parties, arrived = 0;
  unsigned round = 0;

  // `watch`: a block whose threads must finish; if it has failed and a thread still neither
  // exits nor reaches a barrier after the timeout, nothing can stop that thread: abort.
  void wait(Block* watch = nullptr) {
    std::unique_lock lk(m);
    const unsigned r = round;
    if (++arrived == parties) {
      arrived = 0;
      ++round;
      cv.notify_all();
      return;
    }
    auto failed_at = std::chrono::steady_clock::time_point::max();
    const std::chrono::duration<double> timeout(emu::config().timeout_s);
    while (round == r) {
      cv.wait_for(lk, std::chrono::milliseconds(50));
      if (round != r || !watch || !watch->failed.load(std::memory_order_acquire)) continue;
      const auto now = std::chrono::steady_clock::now();
      if (failed_at == std::chrono::steady_clock::time_point::max()) failed_at = now;
      if (now - failed_at > timeout) {
        std::fprintf(stderr, "flashconv emu: %s\nflashconv emu: a thread of the failed block "
                     "neither exits nor reaches a barrier; aborting\n", watch->message.c_str());
        std::abort();
      }
    }
  }
};

inline std::string kernel_name(const void* fn) {
  Dl_info info;
  if (dladdr(fn, &info) && info.dli_sname && info.dli_saddr == fn) {
    int status = 0;
    char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 ? d : info.dli_sname;
    std::free(d);
    return name;
  }
  char buf[64];
  std::snprintf(buf, sizeof buf, "%p (link with -rdynamic to see its name)", fn);
  return buf;
}

inline Error run_grid(const void* fn, Grid grid, int threads, size_t smem_bytes,
                      const std::function<void()>& body) {
  static std::mutex serial;  // FC_SHARED statics belong to one launch at a time
  std::lock_guard one_launch(serial);
  const std::string name = kernel_name(fn);
  auto reject = [&](Error e, const std::string& why) {
    emu::last_message() = "kernel " + name + ": " + why;
    std::fprintf(stderr, "flashconv emu: %s\n", emu::last_message().c_str());
    return e;
  };
  if (threads < 1 || threads > 1024 || grid.x < 1 || grid.y < 1 || grid.y > 65535)
    return reject(ErrorInvalidConfiguration,
                  "grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ") with " +
                      std::to_string(threads) + " threads per block");
  if (smem_bytes > emu::config().max_dyn_smem)
    return reject(ErrorInvalidValue, "asks for " + std::to_string(smem_bytes) +
                                         " bytes of dynamic shared memory; the target allows " +
                                         std::to_string(emu::config().max_dyn_smem));
#ifdef FC_EMU_ASAN
  constexpr size_t guard = 0;  // AddressSanitizer's own redzone does better
#else
  constexpr size_t guard = 64;
#endif
  constexpr unsigned char guard_byte = 0xa5;
  constexpr std::align_val_t kSmemAlign{16};  // as __align__(16) extern __shared__

  Block b;
  b.kernel = name;
  b.threads = threads;
  b.grid = grid;
  std::unique_ptr<LaunchCounting> counting;
  if (emu::config().counters) {
    counting = std::make_unique<LaunchCounting>();
    emu::LaunchStats& st = counting->stats;
    st.kernel = name;
    st.grid_x = grid.x, st.grid_y = grid.y, st.threads = threads, st.smem_bytes = smem_bytes;
    b.counting = counting.get();
  }
  b.warps = std::make_unique<Warp[]>((threads + kWarp - 1) / kWarp);
  b.info = std::make_unique<ThreadInfo[]>(threads);
  // Separate gates before and after a block, for the reason Barrier has two phases.
  Gate start(threads + 1), done(threads + 1);
  bool stop = false;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      tls = {&b, t};
      for (;;) {
        start.wait();
        if (stop) break;
        try {
          body();
        } catch (const Abort&) {
        } catch (const std::exception& e) {
          record_failure(b, std::string("thread ") + std::to_string(t) + " threw: " + e.what());
        }
        b.info[t].state.store(kExited, std::memory_order_relaxed);
        b.running.fetch_sub(1, std::memory_order_relaxed);
        done.wait();
      }
      tls = {};
    });
  }
  Error err = Success;
  for (int y = 0; y < grid.y && err == Success; ++y) {
    for (int x = 0; x < grid.x && err == Success; ++x) {
      b.x = x;
      b.y = y;
      b.smem = static_cast<unsigned char*>(::operator new(smem_bytes + guard, kSmemAlign));
      std::memset(b.smem, 0xff, smem_bytes);
      std::memset(b.smem + smem_bytes, guard_byte, guard);
      b.running.store(threads, std::memory_order_relaxed);
      for (int t = 0; t < threads; ++t) {
        b.info[t].state.store(kRunning, std::memory_order_relaxed);
        b.info[t].block_round = b.info[t].warp_round = 0;
        b.info[t].region = "";
        b.info[t].load_run = 0;
        b.info[t].in_load_run = false;
      }
      start.wait();
      done.wait(&b);  // every thread has left the kernel
      if (b.counting && !b.failed) flush_counters(b);
      for (size_t i = 0; i < guard && !b.failed; ++i)
        if (b.smem[smem_bytes + i] != guard_byte)
          record_failure(b, "wrote past the end of its " + std::to_string(smem_bytes) +
                                " bytes of dynamic shared memory");
      ::operator delete(b.smem, kSmemAlign);
      if (b.failed) {
        emu::last_message() = b.message;
        std::fprintf(stderr, "flashconv emu: %s\n", b.message.c_str());
        err = ErrorLaunchFailure;
      }
    }
  }
  stop = true;
  start.wait();
  for (auto& t : pool) t.join();
  if (counting && err == Success) emu::launches().push_back(std::move(counting->stats));
  return err;
}

}  // namespace detail

inline int thread_idx() { return detail::ctx().tid; }
inline int block_dim() { return detail::ctx().block->threads; }
inline int block_idx_x() { return detail::ctx().block->x; }
inline int block_idx_y() { return detail::ctx().block->y; }
inline int grid_dim_x() { return detail::ctx().block->grid.x; }
inline int grid_dim_y() { return detail::ctx().block->grid.y; }
inline int lane_id() { return thread_idx() & 31; }
inline int warp_id() { return thread_idx() >> 5; }

template <class T>
inline T* dyn_smem() {
  return reinterpret_cast<T*>(detail::ctx().block->smem);
}

// The source location defaults name the caller's line in failure messages.
inline void sync_block(const detail::Where& at = detail::Where::current()) {
  detail::ThreadCtx& c = detail::ctx();
  detail::Block& b = *c.block;
  detail::arrive(b.bar, b.info[c.tid].block_round++, b.threads, "sync_block", true, at, [](int) {});
}

inline void sync_warp(const detail::Where& at = detail::Where::current()) {
  detail::warp_exchange(nullptr, 0, "sync_warp", at);
}

// The first arrival of a round clears its parity's slot: every thread has read that slot's
// previous value (two rounds ago) before it could arrive at the round in between.
inline int sync_block_or(int pred, const detail::Where& at = detail::Where::current()) {
  detail::ThreadCtx& c = detail::ctx();
  detail::Block& b = *c.block;
  const unsigned round = b.info[c.tid].block_round++;
  int& slot = b.or_slot[round & 1];
  detail::arrive(b.bar, round, b.threads, "sync_block", true, at, [&](int arrived) {
    if (arrived == 0) slot = 0;
    slot |= pred != 0;
  });
  return slot;
}

inline uint32_t shfl_xor(uint32_t v, int mask, const detail::Where& at = detail::Where::current()) {
  return detail::warp_exchange(&v, 1, "shfl_xor", at)[(lane_id() ^ mask) & 31][0];
}

inline float shfl_xor(float v, int mask, const detail::Where& at = detail::Where::current()) {
  return detail::float_of(shfl_xor(detail::bits_of(v), mask, at));
}

inline uint32_t shfl_idx(uint32_t v, int src, const detail::Where& at = detail::Where::current()) {
  return detail::warp_exchange(&v, 1, "shfl_idx", at)[src & 31][0];
}

inline float shfl_idx(float v, int src, const detail::Where& at = detail::Where::current()) {
  return detail::float_of(shfl_idx(detail::bits_of(v), src, at));
}

// Where a call is made: its source location (one static object per call site in libstdc++,
// whose address identifies the site).
using Site = std::source_location;
static_assert(sizeof(Site) == sizeof(const void*), "Site: expected libstdc++'s source_location");

namespace detail {
inline void record(const void* p, uint32_t bytes, Access::Kind kind, const char* tensor,
                   const Site& at) {
  if (!emu::config().counters) return;
  ThreadCtx& c = ctx();
  ThreadInfo& me = c.block->info[c.tid];
  // A global load after anything else starts a new run: loads issued back to back are in
  // flight together, and the first other access is taken to use them.
  if (kind == Access::kLdg && !me.in_load_run) ++me.load_run;
  if (kind != Access::kEnter) me.in_load_run = kind == Access::kLdg;
  me.accesses.push_back(Access{std::bit_cast<const void*>(at), me.block_round, me.warp_round,
                               me.load_run, reinterpret_cast<uintptr_t>(p), uint32_t(bytes), kind,
                               tensor, me.region});
}
}  // namespace detail

inline void region(const char* name, Site at = Site::current()) {
  detail::ThreadCtx& c = detail::ctx();
  c.block->info[c.tid].region = name;
  detail::record(nullptr, 0, detail::Access::kEnter, nullptr, at);
}

template <class T>
inline T lds(const T* p, Site at = Site::current()) {
  detail::record(p, sizeof(T), detail::Access::kLds, nullptr, at);
  return *p;
}
template <class T>
inline void sts(T* p, const T& v, Site at = Site::current()) {
  detail::record(p, sizeof(T), detail::Access::kSts, nullptr, at);
  *p = v;
}
template <class T>
inline T ldg(const T* p, const char* tensor, Site at = Site::current()) {
  detail::record(p, sizeof(T), detail::Access::kLdg, tensor, at);
  return *p;
}
template <class T>
inline void stg(T* p, const T& v, const char* tensor, Site at = Site::current()) {
  detail::record(p, sizeof(T), detail::Access::kStg, tensor, at);
  *p = v;
}

// ldmatrix: every lane publishes its row address (and counts a 16-byte shared load: eight rows
// of a matrix are one quarter-warp phase), then reads the rows its fragments come from.
namespace detail {
template <bool kTrans>
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, const Site& at) {
  record(row, 16, Access::kLds, nullptr, at);
  const uint64_t mine = reinterpret_cast<uintptr_t>(row);
  const uint32_t words[2] = {uint32_t(mine), uint32_t(mine >> 32)};
  const uint32_t(*lanes)[kSlotWords] =
      warp_exchange(words, 2, kTrans ? "ldmatrix_x4_trans" : "ldmatrix_x4", at);
  auto addr = [&](int lane) {
    return reinterpret_cast<const unsigned char*>(uintptr_t(lanes[lane][0]) |
                                                  (uintptr_t(lanes[lane][1]) << 32));
  };
  auto half = [](const unsigned char* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return uint32_t(h);
  };
  const int g = lane_id() >> 2, t = lane_id() & 3;
  for (int i = 0; i < 4; ++i) {
    if (kTrans) {  // (2t, g) and (2t+1, g): column g of rows 2t, 2t+1
      r[i] = half(addr(8 * i + 2 * t) + 2 * g) | (half(addr(8 * i + 2 * t + 1) + 2 * g) << 16);
    } else {       // (g, 2t) and (g, 2t+1): one word of row g
      std::memcpy(&r[i], addr(8 * i + g) + 4 * t, 4);
    }
  }
}
}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, Site at = Site::current()) {
  detail::ldmatrix_x4<false>(r, row, at);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row, Site at = Site::current()) {
  detail::ldmatrix_x4<true>(r, row, at);
}

// Lane (g, t) receives (2t, g) and (2t+1, g); element (row, col) is held by lane
// 4 * row + col / 2, in the high half when col is odd.
inline uint32_t movmatrix_trans(uint32_t a, const detail::Where& at = detail::Where::current()) {
  const uint32_t(*lanes)[detail::kSlotWords] = detail::warp_exchange(&a, 1, "movmatrix_trans", at);
  const int g = lane_id() >> 2, t = lane_id() & 3;
  auto element = [&](int row, int col) { return (lanes[4 * row + col / 2][0] >> (16 * (col & 1))) & 0xffffu; };
  return element(2 * t, g) | (element(2 * t + 1, g) << 16);
}

inline uint32_t pack_half2(float lo, float hi) {
#if defined(FLASHCONV_FP16_OVERFLOW_AT)  // tests: fp16 overflows (to inf) at this magnitude
  auto cap = [](float v) { return std::fabs(v) > FLASHCONV_FP16_OVERFLOW_AT ? std::copysign(INFINITY, v) : v; };
  lo = cap(lo), hi = cap(hi);
#endif
  return uint32_t(detail::half_from_float(lo)) | (uint32_t(detail::half_from_float(hi)) << 16);
}
inline void unpack_half2(uint32_t v, float& lo, float& hi) {
  lo = detail::half_to_float(uint16_t(v));
  hi = detail::half_to_float(uint16_t(v >> 16));
}
inline uint32_t pack_bf162(float lo, float hi) {
  return uint32_t(detail::bf16_from_float(lo)) | (uint32_t(detail::bf16_from_float(hi)) << 16);
}

// cp.async: copied at once (a global load and a shared store for the counters; loads issued
// back to back are one latency round, ended by the wait or any other access).
inline void cp_async16(void* dst, const void* src, const char* tensor, Site at = Site::current()) {
  detail::record(src, 16, detail::Access::kLdg, tensor, at);
  detail::ThreadCtx& c = detail::ctx();
  const bool run = c.block->info[c.tid].in_load_run;
  detail::record(dst, 16, detail::Access::kSts, nullptr, at);
  c.block->info[c.tid].in_load_run = run;  // the copy's own store does not use the load
  std::memcpy(dst, src, 16);
}
inline void cp_async_wait_all() {
  detail::ThreadCtx& c = detail::ctx();
  c.block->info[c.tid].in_load_run = false;
}
inline uint32_t float_bits(float f) { return std::bit_cast<uint32_t>(f); }
inline float bits_float(uint32_t u) { return std::bit_cast<float>(u); }

// atomicMax on shared memory: a shared load and store for the counters.
inline void atomic_max_shared(uint32_t* p, uint32_t v, Site at = Site::current()) {
  detail::record(p, 4, detail::Access::kSts, nullptr, at);
  std::atomic_ref<uint32_t> a(*p);
  uint32_t cur = a.load(std::memory_order_relaxed);
  while (cur < v && !a.compare_exchange_weak(cur, v, std::memory_order_relaxed)) {
  }
}

// atomicAdd on global memory (relaxed: the kernel's end is what orders it for the host).
// Counted as a store of 4 bytes.
inline void atomic_add(float* p, float v, const char* tensor = "", Site at = Site::current()) {
  detail::record(p, 4, detail::Access::kStg, tensor, at);
  std::atomic_ref<float>(*p).fetch_add(v, std::memory_order_relaxed);
}

// d = A (16x16, row) * B (16x8, col) + C, over the warp. PTX ISA fragment layout, with
// g = lane >> 2 and t = lane % 4; element e of a fragment sits in register e / 2, low half first:
//   A  a_e: row g + 8 * ((e >> 1) & 1), col 2t + (e & 1) + 8 * (e >> 2)
//   B  b_e: row 2t + (e & 1) + 8 * (e >> 1), col g
//   C  c_e: row g + 8 * (e >> 1),         col 2t + (e & 1)
// so A[r][k] is in lane 4 * (r % 8) + (k % 8) / 2, register r / 8 + 2 * (k / 8), half k % 2,
// and B[k][n] in lane 4 * n + (k % 8) / 2, register k / 8, half k % 2.
template <class T>
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4],
                         const detail::Where& at = detail::Where::current()) {
  static_assert(std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>,
                "mma_m16n8k16: T must be half_t or bf16_t");
  uint32_t mine[detail::kSlotWords];
  for (int i = 0; i < 4; ++i) mine[i] = a[i];
  mine[4] = b[0];
  mine[5] = b[1];
  for (int i = 0; i < 4; ++i) mine[6 + i] = detail::bits_of(c[i]);
  const uint32_t(*lanes)[detail::kSlotWords] =
      detail::warp_exchange(mine, detail::kSlotWords, "mma_m16n8k16", at);
  auto element = [](uint32_t reg, int k) { return to_float(T{uint16_t(reg >> (16 * (k & 1)))}); };
  const int g = lane_id() >> 2, t = lane_id() & 3;
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
    float acc = detail::float_of(mine[6 + e]);
    for (int k = 0; k < 16; ++k) {
      const float ak = element(lanes[4 * (row % 8) + (k % 8) / 2][row / 8 + 2 * (k / 8)], k);
      const float bk = element(lanes[4 * col + (k % 8) / 2][4 + k / 8], k);
      acc += ak * bk;  // exact: 11- (or 8-) bit significands multiply into 24 bits
    }
    d[e] = acc;
  }
}

template <class... P, class... A>
inline Error launch(void (*kernel)(P...), Grid grid, int threads, size_t dyn_smem_bytes,
                    Stream, A&&... args) {
  // Arguments are converted once, as a GPU copies them into the parameter buffer.
  const std::tuple<P...> params(std::forward<A>(args)...);
  return detail::run_grid(reinterpret_cast<const void*>(kernel), grid, threads, dyn_smem_bytes,
                          [&] { std::apply(kernel, params); });
}

}  // namespace flashconv::hw

#endif

namespace flashconv::hw {

// Id (0-15) of a counter region's name: FNV-1a, mod 16. FC_REGION(name) names the code that
// follows (a string literal): hw::region under the emulation; under nvcc nothing, or with
// -DFLASHCONV_REGION_MARKS a `pmevent id` (PMTRIG in SASS), which bench/model.py's lint build
// uses to attribute static instructions to regions.
FC_HOST_DEVICE constexpr uint32_t region_id(const char* s) {
  uint32_t h = 2166136261u;
  while (*s) h = (h ^ uint8_t(*s++)) * 16777619u;
  return h & 15u;
}

// Two 16-bit values in one 32-bit register, lo in the low half (the lower column or row index
// of an mma fragment pair).
template <class T>
FC_HOST_DEVICE uint32_t pack2(T lo, T hi) {
  static_assert(std::is_same_v<T, half_t> || std::is_same_v<T, bf16_t>, "pack2: 16-bit types only");
  return uint32_t(lo.bits) | (uint32_t(hi.bits) << 16);
}

template <class T>
FC_HOST_DEVICE uint32_t pack2(float lo, float hi) {
  return pack2(from_float<T>(lo), from_float<T>(hi));
}

}  // namespace flashconv::hw

#if defined(__CUDACC__) && defined(FLASHCONV_REGION_MARKS)
#define FC_REGION(name) asm volatile("pmevent %0;" ::"n"(::flashconv::hw::region_id(name)))
#elif defined(__CUDACC__)
#define FC_REGION(name) ((void)0)
#else
#define FC_REGION(name) ::flashconv::hw::region(name)
#endif
