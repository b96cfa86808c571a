// Runs one kernel on the CPU through the SIMT emulation in flashconv/hw.h.
//
//   driver <case> <dir> [sm=80] [key=value ...]
//
// Reads the case's inputs from <dir>/<name>.npy, runs its launcher, and on success writes its
// outputs as <dir>/<name>.npy. Exit status: 0 ok; 2 bad usage or input; 3 the launch returned
// an error (the emulator has printed why). Sanitizer builds report races and out-of-bounds
// accesses themselves (ThreadSanitizer exits 66, AddressSanitizer 1).
// tests/emu/build.py compiles this file (plain, tsan, asan) and runs it from pytest.
//
// Adding a kernel: put the kernel and its launcher in a header (the launcher returns
// hw::Error; see kernels.h), include it here, and add one entry to `cases`:
//
//   {"fftconv_fwd_f16", [](Io& io) {
//      auto u = io.in<hw::half_t>("u");                 // (B, H, L) float16 .npy
//      auto& y = io.out<hw::half_t>("y", u.shape);
//      return flashconv::fftconv_fwd<hw::half_t>(u.ptr(), ..., y.ptr(), io.param("L"), nullptr);
//    }},
//
// Inputs are exactly the size numpy gave, and outputs exactly their shape, so the ASan build
// catches a kernel reading or writing past either. Then call it from Python with
// tests/emu/build.py: run("fftconv_fwd_f16", {"u": u}, params={"L": 1000}).
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <new>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "flashconv/fftconv_bwd.h"
#include "flashconv/fftconv_fwd.h"
#include "flashconv/fftconv_long.h"
#include "flashconv/hw.h"
#include "kernels.h"

namespace hw = flashconv::hw;

namespace {

// npy dtype of each element type; bf16 travels as its raw bits (numpy has no bfloat16).
template <class T> constexpr const char* npy_descr();
template <> constexpr const char* npy_descr<float>() { return "<f4"; }
template <> constexpr const char* npy_descr<hw::half_t>() { return "<f2"; }
template <> constexpr const char* npy_descr<hw::bf16_t>() { return "<u2"; }
template <> constexpr const char* npy_descr<uint16_t>() { return "<u2"; }
template <> constexpr const char* npy_descr<uint32_t>() { return "<u4"; }
template <> constexpr const char* npy_descr<int32_t>() { return "<i4"; }

using Shape = std::vector<size_t>;

// Device allocations are 256-byte aligned (cudaMalloc; PyTorch's caching allocator gives at
// least 512): so are the driver's arrays, so that the counters see the GPU's sector alignment.
template <class T>
struct Aligned {
  using value_type = T;
  Aligned() = default;
  template <class U>
  Aligned(const Aligned<U>&) {}
  T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{256})); }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t{256}); }
  bool operator==(const Aligned&) const { return true; }
};

template <class T>
struct Array {
  Shape shape;
  std::vector<T, Aligned<T>> data;
  T* ptr() { return data.data(); }
  size_t size() const { return data.size(); }
  int dim(size_t i) const { return int(shape.at(i)); }
};

size_t count(const Shape& s) {
  size_t n = 1;
  for (size_t d : s) n *= d;
  return n;
}

template <class T>
Array<T> load_npy(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6))
    throw std::runtime_error(path + ": not an .npy file");
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint8_t b[2];
    f.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    uint8_t b[4];
    f.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (uint32_t(b[3]) << 24);
  }
  std::string header(header_len, ' ');
  f.read(header.data(), header_len);
  const std::string want = std::string("'descr': '") + npy_descr<T>() + "'";
  if (header.find(want) == std::string::npos)
    throw std::runtime_error(path + ": expected dtype " + npy_descr<T>() + ", header " + header);
  if (header.find("'fortran_order': False") == std::string::npos)
    throw std::runtime_error(path + ": Fortran order is not supported");
  Array<T> a;
  const size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  for (size_t i = open + 1; i < close;) {
    const size_t end = std::min(header.find(',', i), close);
    if (header.find_first_not_of(' ', i) < end)
      a.shape.push_back(std::stoul(header.substr(i, end - i)));
    i = end + 1;
  }
  a.data.resize(count(a.shape));
  f.read(reinterpret_cast<char*>(a.data.data()), a.data.size() * sizeof(T));
  if (!f) throw std::runtime_error(path + ": truncated");
  return a;
}

template <class T>
void save_npy(const std::string& path, const Array<T>& a) {
  std::string shape;
  for (size_t d : a.shape) shape += (shape.empty() ? "" : ", ") + std::to_string(d);
  shape = "(" + shape + (a.shape.size() == 1 ? ",)" : ")");
  std::string header = std::string("{'descr': '") + npy_descr<T>() +
                       "', 'fortran_order': False, 'shape': " + shape + ", }";
  header.append(63 - (10 + header.size()) % 64, ' ');  // data starts 64-byte aligned
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  const uint16_t len = uint16_t(header.size());
  f.write("\x93NUMPY\x01\x00", 8);
  f.put(char(len & 0xff)).put(char(len >> 8));
  f << header;
  f.write(reinterpret_cast<const char*>(a.data.data()), a.data.size() * sizeof(T));
  if (!f) throw std::runtime_error("cannot write " + path);
}

// What a case sees: its inputs, its outputs (written after a successful launch), its scalars.
struct Io {
  std::string dir;
  std::map<std::string, std::string> params;
  std::vector<std::function<void()>> savers;
  std::vector<std::shared_ptr<void>> keep;

  template <class T>
  Array<T> in(const std::string& name) const {
    return load_npy<T>(dir + "/" + name + ".npy");
  }

  // Starts as 0xff bytes (NaN), so elements the kernel never writes stand out.
  template <class T>
  Array<T>& out(const std::string& name, Shape shape) {
    auto a = std::make_shared<Array<T>>();
    a->shape = std::move(shape);
    a->data.resize(count(a->shape));
    std::memset(static_cast<void*>(a->data.data()), 0xff, a->data.size() * sizeof(T));
    keep.push_back(a);
    savers.push_back([this, name, a] { save_npy(dir + "/" + name + ".npy", *a); });
    return *a;
  }

  int param(const std::string& key) const {
    auto it = params.find(key);
    if (it == params.end()) throw std::runtime_error("missing parameter " + key + "=...");
    return std::stoi(it->second);
  }
};

using Case = std::function<hw::Error(Io&)>;

template <class T>
hw::Error mma_tile(Io& io) {
  auto a = io.in<T>("a"), b = io.in<T>("b");  // (16, 16), (16, 8)
  auto c = io.in<float>("c");                 // (16, 8)
  auto& d = io.out<float>("d", {16, 8});
  return proof::launch_mma_tile<T>(a.ptr(), b.ptr(), c.ptr(), d.ptr(), nullptr);
}

template <class T>
hw::Error dft256(Io& io) {
  auto x = io.in<float>("x");  // (rows, 256, 2): complex as (re, im)
  const size_t rows = x.shape.at(0);
  auto& y = io.out<float>("y", {rows, 16, 16, 2});
  auto& z = io.out<float>("z", {rows, 16, 16, 2});
  return proof::launch_dft256<T>(x.ptr(), y.ptr(), z.ptr(), int(rows), nullptr);
}

template <class T>
hw::Error convert(Io& io) {
  auto x = io.in<float>("x");
  auto& y = io.out<T>("y", x.shape);
  auto& back = io.out<float>("back", x.shape);
  return proof::launch_convert<T>(x.ptr(), y.ptr(), back.ptr(), int(x.size()), nullptr);
}

// A case whose only output is `out`: n floats (param n, default 64), which Launch may also take.
template <auto Launch>
hw::Error out_only(Io& io) {
  const int n = io.params.count("n") ? io.param("n") : 64;
  auto& out = io.out<float>("out", {size_t(n)});
  if constexpr (std::is_invocable_v<decltype(Launch), float*, int, hw::Stream>)
    return Launch(out.ptr(), n, nullptr);
  else
    return Launch(out.ptr(), nullptr);
}

int64_t param_or(const Io& io, const std::string& key, int64_t fallback) {
  return io.params.count(key) ? io.param(key) : fallback;
}

// View of a flat buffer as (B, H, L) with the strides given by params <name>_sb/_sh/_st.
flashconv::View3 view3(const Io& io, const void* p, const std::string& name) {
  return {p, io.param(name + "_sb"), io.param(name + "_sh"), io.param(name + "_st")};
}

flashconv::MutView3 dense3(void* p, int64_t H, int64_t L) { return {p, H * L, L, 1}; }

// The optional inputs every fftconv case shares: D (when has_D=1) and the two gates (when
// has_gates=1), which are viewed with u's strides (params u_sb, u_sh, u_st when given,
// else dense (B, H, L)). The arrays live as long as this object.
template <class T>
struct Optional {
  Array<float> D;
  Array<T> gi, go;
  const float* D_ptr = nullptr;
  flashconv::View3 g_in{}, g_out{};
  bool gates = false;

  Optional(const Io& io, int64_t H, int64_t L) {
    if (param_or(io, "has_D", 0)) {
      D = io.in<float>("D");
      D_ptr = D.ptr();
    }
    gates = param_or(io, "has_gates", 0) != 0;
    if (gates) {
      gi = io.in<T>("g_in");
      go = io.in<T>("g_out");
      const bool strided = io.params.count("u_sb") != 0;
      g_in = strided ? view3(io, gi.ptr(), "u") : flashconv::View3{gi.ptr(), H * L, L, 1};
      g_out = strided ? view3(io, go.ptr(), "u") : flashconv::View3{go.ptr(), H * L, L, 1};
    }
  }
};

// The fused epilogue's inputs every forward case shares: param act (0 none, 1 GELU, 2 SiLU) and,
// when has_mask=1, a float32 mask viewed through mask_sb/mask_sh/mask_st (mask_st = 0: a
// (B, H) mask). The array lives as long as this object.
struct EpilogueIn {
  Array<float> mask;
  int act = 0;
  flashconv::View3 view{};

  explicit EpilogueIn(const Io& io) {
    act = int(param_or(io, "act", 0));
    if (param_or(io, "has_mask", 0)) {
      mask = io.in<float>("mask");
      view = view3(io, mask.ptr(), "mask");
      view.f32 = true;
    }
  }
};

// The fused forward kernel. u (and the gates, when has_gates=1, sharing u's strides): flat
// buffers of the io dtype viewed through B, H, L and u_sb/u_sh/u_st; D when has_D=1.
// K: (H, N, 2) float32, k_exp: (H,) int32. Output y: (B, H, L); with want_z=1 only the float32
// pre-activation z (B, H, L) (the backward's recompute). The epilogue: EpilogueIn. num_sms
// sizes the grid like the GPU launcher (CTAs per channel).
template <class T>
hw::Error fftconv_fwd(Io& io) {
  flashconv::FwdParams p{};
  p.B = io.param("B"), p.H = io.param("H"), p.L = io.param("L"), p.N = io.param("N");
  auto u = io.in<T>("u");
  auto K = io.in<float>("K");
  auto k_exp = io.in<int32_t>("k_exp");
  p.u = view3(io, u.ptr(), "u");
  p.spec = {reinterpret_cast<const flashconv::cf32*>(K.ptr()), k_exp.ptr()};
  Array<uint16_t> K16;  // the bfloat16 kernel's fragment-order fp16 K (H, 2N)
  if constexpr (std::is_same_v<T, hw::bf16_t>) {
    K16 = io.in<uint16_t>("K16");
    p.spec.K16 = K16.ptr();
  }
  const Optional<T> opt(io, p.H, p.L);
  p.D = opt.D_ptr, p.g_in = opt.g_in, p.g_out = opt.g_out;
  const EpilogueIn epi(io);
  p.act = epi.act, p.mask = epi.view;
  if (param_or(io, "want_z", 0)) {
    auto& z = io.out<float>("z", {size_t(p.B), size_t(p.H), size_t(p.L)});
    p.z = dense3(z.ptr(), p.H, p.L);
  } else {
    auto& y = io.out<T>("y", {size_t(p.B), size_t(p.H), size_t(p.L)});
    p.y = dense3(y.ptr(), p.H, p.L);
  }
  return flashconv::fftconv_fwd_launch<T>(p, int(param_or(io, "num_sms", 1)), nullptr);
}

// The fused backward kernel: inputs as fftconv_fwd plus dy (dense (B, H, L)) and lk; outputs
// du, dk (H, lk), dD (H,) when has_D, dg_in and dg_out when has_gates, dk_rev (H, lk_rev)
// when lk_rev > 0 (K then holds the bidirectional spectrum); no_dg_out=1: none wanted. With
// gate32=1 (and has_gates=1) g_out is float32 (the fused epilogue's factor g_out m act'(z),
// dense) and no dg_out is made.
template <class T>
hw::Error fftconv_bwd(Io& io) {
  flashconv::BwdParams p{};
  p.B = io.param("B"), p.H = io.param("H"), p.L = io.param("L"), p.N = io.param("N");
  p.lk = io.param("lk");
  const Shape bhl = {size_t(p.B), size_t(p.H), size_t(p.L)};
  auto u = io.in<T>("u");
  auto dy = io.in<T>("dy");
  auto K = io.in<float>("K");
  auto k_exp = io.in<int32_t>("k_exp");
  p.u = view3(io, u.ptr(), "u");
  p.dy = {dy.ptr(), p.H * p.L, p.L, 1};
  p.spec = {reinterpret_cast<const flashconv::cf32*>(K.ptr()), k_exp.ptr()};
  Array<uint16_t> K16;  // the bfloat16 tensor-core kernels' fragment-order fp16 K
  if constexpr (std::is_same_v<T, hw::bf16_t>) {
    K16 = io.in<uint16_t>("K16");
    p.spec.K16 = K16.ptr();
  }
  auto& du = io.out<T>("du", bhl);
  p.du = dense3(du.ptr(), p.H, p.L);
  auto& dk = io.out<float>("dk", {size_t(p.H), size_t(p.lk)});
  std::fill(dk.data.begin(), dk.data.end(), 0.f);  // accumulated into
  p.dk = dk.ptr();
  const Optional<T> opt(io, p.H, p.L);
  p.D = opt.D_ptr, p.g_in = opt.g_in, p.g_out = opt.g_out;
  if (p.D) {
    auto& dD = io.out<float>("dD", {size_t(p.H)});
    std::fill(dD.data.begin(), dD.data.end(), 0.f);
    p.dD = dD.ptr();
  }
  p.lk_rev = param_or(io, "lk_rev", 0);
  if (p.lk_rev) {
    auto& dk_rev = io.out<float>("dk_rev", {size_t(p.H), size_t(p.lk_rev)});
    std::fill(dk_rev.data.begin(), dk_rev.data.end(), 0.f);
    p.dk_rev = dk_rev.ptr();
  }
  Array<float> g32;
  const bool gate32 = param_or(io, "gate32", 0) != 0;
  if (gate32) {
    g32 = io.in<float>("g_out32");
    p.g_out = {g32.ptr(), p.H * p.L, p.L, 1, true};
  }
  if (opt.gates) {
    p.dg_in = dense3(io.out<T>("dg_in", bhl).ptr(), p.H, p.L);
    if (!gate32 && !param_or(io, "no_dg_out", 0)) p.dg_out = dense3(io.out<T>("dg_out", bhl).ptr(), p.H, p.L);
  }
  return flashconv::fftconv_bwd_launch<T>(p, int(param_or(io, "num_sms", 1)), nullptr);
}

// The two-level (long) forward convolution (fftconv_long.h): dense u (B, H, L) of the io
// dtype, K (H, N1, N2, 2) float32 in the two-level order, k_exp (H,) int32, D when has_D=1,
// dense gates when has_gates=1, the epilogue (EpilogueIn); params B H L N1 N2 [C] [num_sms].
// Output y (B, H, L).
template <class T>
hw::Error fftconv_long(Io& io) {
  flashconv::LongParams p{};
  p.B = io.param("B"), p.H = io.param("H"), p.L = io.param("L");
  p.N1 = io.param("N1"), p.N2 = io.param("N2"), p.N = p.N1 * p.N2, p.C = param_or(io, "C", 0);
  auto u = io.in<T>("u");
  auto K = io.in<float>("K");
  auto k_exp = io.in<int32_t>("k_exp");
  p.u = {u.ptr(), p.H * p.L, p.L, 1};
  p.spec = {reinterpret_cast<const flashconv::cf32*>(K.ptr()), k_exp.ptr()};
  const Optional<T> opt(io, p.H, p.L);
  p.D = opt.D_ptr, p.g_in = opt.g_in, p.g_out = opt.g_out;
  const EpilogueIn epi(io);
  p.act = epi.act, p.mask = epi.view;
  // NaN-filled like uninitialised device memory: a value pass A never writes stands out.
  std::vector<flashconv::cf32, Aligned<flashconv::cf32>> ws(size_t(flashconv::long_workspace_elems(p.B, p.H, p.N)),
                                  flashconv::cf32{std::nanf(""), std::nanf("")});
  p.ws = ws.data();
  auto& y = io.out<T>("y", {size_t(p.B), size_t(p.H), size_t(p.L)});
  p.y = dense3(y.ptr(), p.H, p.L);
  return flashconv::fftconv_long_launch<T>(p, int(param_or(io, "num_sms", 1)), nullptr);
}

// The emulator's counters (hw::emu::launches()) as JSON: a list of launches, each with its
// regions in order of first appearance.
void write_counters(const std::string& path) {
  std::ofstream f(path);
  auto smem = [&](const hw::emu::SmemStats& s) {
    f << "{\"instr\": " << s.instr << ", \"wavefronts\": " << s.wavefronts
      << ", \"ideal\": " << s.ideal << ", \"bytes\": " << s.bytes << "}";
  };
  auto global = [&](const std::map<std::string, hw::emu::GlobalStats>& m) {
    f << "{";
    const char* sep = "";
    for (const auto& [tensor, g] : m) {
      f << sep << "\"" << tensor << "\": {\"requests\": " << g.requests << ", \"sectors\": "
        << g.sectors << ", \"bytes\": " << g.bytes << ", \"first\": " << g.first << "}";
      sep = ", ";
    }
    f << "}";
  };
  f << "[";
  const char* lsep = "";
  for (const auto& l : hw::emu::launches()) {
    f << lsep << "\n {\"kernel\": \"" << l.kernel << "\", \"grid\": [" << l.grid_x << ", "
      << l.grid_y << "], \"threads\": " << l.threads << ", \"smem_bytes\": " << l.smem_bytes
      << ", \"regions\": [";
    const char* rsep = "";
    for (const auto& name : l.order) {
      const auto& r = l.regions.at(name);
      f << rsep << "\n  {\"name\": \"" << name << "\", \"lds\": ";
      smem(r.lds);
      f << ", \"sts\": ";
      smem(r.sts);
      f << ", \"ldg\": ";
      global(r.ldg);
      f << ", \"stg\": ";
      global(r.stg);
      f << ", \"barriers\": " << r.barriers << ", \"mma\": " << r.mma << ", \"shfl\": " << r.shfl
        << ", \"warp_syncs\": " << r.warp_syncs << ", \"entries\": " << r.entries
        << ", \"ld_rounds_dram\": " << r.ld_rounds_dram
        << ", \"ld_rounds_l2\": " << r.ld_rounds_l2 << "}";
      rsep = ",";
    }
    f << "]}";
    lsep = ",";
  }
  f << "\n]\n";
  if (!f) throw std::runtime_error("cannot write " + path);
}

const std::map<std::string, Case> cases = {
    {"fftconv_long_f32", fftconv_long<float>},
    {"fftconv_long_f16", fftconv_long<hw::half_t>},
    {"fftconv_long_bf16", fftconv_long<hw::bf16_t>},
    {"fftconv_bwd_f32", fftconv_bwd<float>},
    {"fftconv_bwd_f16", fftconv_bwd<hw::half_t>},
    {"fftconv_bwd_bf16", fftconv_bwd<hw::bf16_t>},
    {"fftconv_fwd_f32", fftconv_fwd<float>},
    {"fftconv_fwd_f16", fftconv_fwd<hw::half_t>},
    {"fftconv_fwd_bf16", fftconv_fwd<hw::bf16_t>},
    {"block_sum",
     [](Io& io) {
       auto x = io.in<float>("x");  // (B, H, n)
       auto& y = io.out<float>("y", {x.shape.at(0), x.shape.at(1)});
       return proof::launch_block_sum(x.ptr(), y.ptr(), x.dim(0), x.dim(1), x.dim(2), nullptr);
     }},
    {"warp_ops",
     [](Io& io) {
       auto x = io.in<float>("x");  // (n,), n a multiple of 128
       auto& total = io.out<float>("total", x.shape);
       auto& gathered = io.out<uint32_t>("gathered", x.shape);
       auto& first = io.out<float>("first", x.shape);
       auto& neighbour = io.out<float>("neighbour", x.shape);
       return proof::launch_warp_ops(x.ptr(), total.ptr(), gathered.ptr(), first.ptr(),
                                     neighbour.ptr(), int(x.size()), nullptr);
     }},
    {"mma_tile_f16", mma_tile<hw::half_t>},
    {"mma_tile_bf16", mma_tile<hw::bf16_t>},
    {"dft256_f16", dft256<hw::half_t>},
    {"dft256_bf16", dft256<hw::bf16_t>},
    {"convert_f16", convert<hw::half_t>},
    {"convert_bf16", convert<hw::bf16_t>},
    {"counters",
     [](Io& io) {
       auto x = io.in<float>("x");  // (2048,)
       auto& y = io.out<float>("y", {64});
       if (x.size() < 2048) throw std::runtime_error("counters: x needs 2048 floats");
       return proof::launch_counters(x.ptr(), y.ptr(), nullptr);
     }},
    {"ldmatrix",
     [](Io& io) {
       auto m = io.in<uint16_t>("m");  // (16, 16) raw 16-bit values
       auto& plain = io.out<uint32_t>("plain", {32, 4});
       auto& trans = io.out<uint32_t>("trans", {32, 4});
       auto& moved = io.out<uint32_t>("moved", {32, 4});
       auto& any = io.out<int32_t>("any", {3});
       if (m.size() != 256) throw std::runtime_error("ldmatrix: m must be (16, 16)");
       return proof::launch_ldmatrix(m.ptr(), plain.ptr(), trans.ptr(), moved.ptr(), any.ptr(), nullptr);
     }},
    {"racy", out_only<proof::launch_racy>},
    {"early_exit", out_only<proof::launch_early_exit>},
    {"deadlock", out_only<proof::launch_deadlock>},
    {"divergent_barrier", out_only<proof::launch_divergent_barrier>},
    {"oob", out_only<proof::launch_oob>},
    {"smem_oob", out_only<proof::launch_smem_oob>},
    {"smem_fill",
     [](Io& io) {
       const int bytes = io.param("bytes");
       auto& out = io.out<float>("out", {size_t(bytes / 4)});
       return proof::launch_smem_fill(out.ptr(), bytes, nullptr);
     }},
};

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3 || !cases.count(argv[1])) {
    std::fprintf(stderr, "usage: %s <case> <dir> [sm=80] [key=value ...]\ncases:", argv[0]);
    for (const auto& [name, _] : cases) std::fprintf(stderr, " %s", name.c_str());
    std::fputc('\n', stderr);
    return 2;
  }
  try {
    Io io;
    io.dir = argv[2];
    for (int i = 3; i < argc; ++i) {
      const char* eq = std::strchr(argv[i], '=');
      if (!eq) throw std::runtime_error(std::string("expected key=value, got ") + argv[i]);
      io.params[std::string(argv[i], size_t(eq - argv[i]))] = eq + 1;
    }
    const int sm = io.params.count("sm") ? io.param("sm") : 80;
    if (!hw::emu::set_target_sm(sm))
      throw std::runtime_error("unknown target sm=" + std::to_string(sm));
    hw::emu::config().counters = io.params.count("counters") && io.param("counters");
    const hw::Error err = cases.at(argv[1])(io);
    if (err != hw::Success) {
      std::fprintf(stderr, "%s: launch failed: %s\n", argv[1], hw::error_string(err));
      return 3;
    }
    for (auto& save : io.savers) save();
    if (hw::emu::config().counters) write_counters(io.dir + "/counters.json");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: %s\n", argv[1], e.what());
    return 2;
  }
  return 0;
}
