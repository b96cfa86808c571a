// pybind11 module flashconv._C: a thin layer. Python validates shapes and dtypes and
// allocates outputs; this file receives plain integers (pointers, sizes, strides, dtype
// codes, stream handles), calls the launchers and turns CUDA errors into exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime_api.h>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "flashconv/check.h"
#include "flashconv/fftconv_params.h"

namespace py = pybind11;

namespace flashconv {
cudaError_t probe_launch(int* out, int n, cudaStream_t stream);
cudaError_t fftconv_fwd(const FwdParams& p, int dtype, int num_sms, cudaStream_t stream);
int64_t fftconv_fwd_max_n(int dtype);
int64_t fftconv_fwd_smem(int dtype, int64_t N);
cudaError_t fftconv_bwd(const BwdParams& p, int dtype, int num_sms, cudaStream_t stream);
int64_t fftconv_bwd_max_n(int dtype);
int64_t fftconv_bwd_smem(int dtype, int64_t N);
cudaError_t fftconv_long_fwd(const FwdParams& p, cf32* ws, int64_t N1, int64_t N2, int dtype,
                             int num_sms, cudaStream_t stream);
}

namespace {

std::string version_string(int v) {
  // CUDA encodes versions as 1000 * major + 10 * minor.
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// Number of visible devices, or 0 with the reason when there is no driver or device.
py::tuple device_count() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return py::make_tuple(0, std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(n, std::string());
}

py::dict info() {
  py::dict d;
  d["version"] = FLASHCONV_VERSION;
  d["cuda_archs"] = FLASHCONV_CUDA_ARCHS;
  int rt = 0;
  cudaRuntimeGetVersion(&rt);
  d["cuda_runtime"] = version_string(rt);
  int drv = 0;
  cudaError_t err = cudaDriverGetVersion(&drv);
  d["cuda_driver"] = (err == cudaSuccess && drv > 0) ? py::object(py::str(version_string(drv)))
                                                     : py::object(py::none());
  py::tuple dc = device_count();
  d["device_count"] = dc[0];
  d["device_error"] = dc[1];
  return d;
}

// Makes `device` the calling thread's current device for its scope and restores the caller's
// device when the scope ends (also when an exception leaves it), so a call into this module
// never changes the device the caller's later CUDA work goes to. Cheap when the device is
// already current: one cudaGetDevice, no cudaSetDevice.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FC_THROW_ON_ERROR(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) {
      FC_THROW_ON_ERROR(cudaSetDevice(device), "cudaSetDevice");
      switched_ = true;
    }
  }
  ~DeviceGuard() {
    if (switched_) cudaSetDevice(previous_);  // a destructor must not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool switched_ = false;
};

// Launch the probe kernel on `device` and check its output: True, or an exception.
bool selftest(int device) {
  DeviceGuard guard(device);
  const int n = 1000;
  int* d_out = nullptr;
  FC_THROW_ON_ERROR(cudaMalloc(reinterpret_cast<void**>(&d_out), n * sizeof(int)), "cudaMalloc");
  std::vector<int> h(n, -1);
  cudaError_t err = flashconv::probe_launch(d_out, n, nullptr);
  if (err == cudaSuccess) err = cudaMemcpy(h.data(), d_out, n * sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(d_out);
  FC_THROW_ON_ERROR(err, "probe_kernel");
  for (int i = 0; i < n; ++i)
    if (h[i] != i * 3 + 1) throw std::runtime_error("flashconv: probe_kernel wrote wrong values");
  return true;
}

int device_attribute(cudaDeviceAttr attr, int device) {
  int v = 0;
  FC_THROW_ON_ERROR(cudaDeviceGetAttribute(&v, attr, device), "cudaDeviceGetAttribute");
  return v;
}

using Strides = std::array<int64_t, 3>;

template <class Ptr>
Ptr as_ptr(uintptr_t p) {
  return reinterpret_cast<Ptr>(p);
}

const char* dtype_name(int dtype) {
  switch (dtype) {
    case flashconv::kFloat32: return "float32";
    case flashconv::kFloat16: return "float16";
    case flashconv::kBFloat16: return "bfloat16";
  }
  return "?";
}

flashconv::View3 view(uintptr_t p, const Strides& s, bool f32 = false) {
  return {as_ptr<const void*>(p), s[0], s[1], s[2], f32};
}
flashconv::MutView3 mut_view(uintptr_t p, const Strides& s) { return {as_ptr<void*>(p), s[0], s[1], s[2]}; }

// Runs a launcher on `device` and `stream` with the GIL released; errors name the kernel. The
// caller's current device is restored afterwards (DeviceGuard).
template <class Launch>
void run_kernel(const char* kernel, int dtype, int64_t N, int device, Launch&& launch) {
  DeviceGuard guard(device);
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = launch(sms);
  }
  const std::string what = std::string(kernel) + "<" + dtype_name(dtype) + "> (N=" +
                           std::to_string(N) + ") launch";
  FC_THROW_ON_ERROR(err, what.c_str());
}

// The fused forward kernel on the caller's stream. Pointers are device addresses (0 for an
// absent D or gate); strides are in elements; Python has validated everything. The fused
// epilogue: act (0 none, 1 GELU, 2 SiLU) and a float32 dropout mask (0: none; strides of its
// (B, H, L) view, 0 along L for a (B, H) mask); z: a float32 (B, H, L) output of the
// pre-activation value (0: none; y may then be 0).
// K16 (bfloat16 only): the spectrum as fp16 in the tensor-core kernel's fragment order
// (flashconv/spectrum.py: fragment_spectrum); 0 for the other dtypes.
void fftconv_fwd(uintptr_t u, uintptr_t g_in, uintptr_t g_out, uintptr_t y, uintptr_t K,
                 uintptr_t K16, uintptr_t k_exp, uintptr_t D, int64_t B, int64_t H, int64_t L,
                 int64_t N, Strides u_s, Strides gi_s, Strides go_s, Strides y_s, int dtype,
                 int device, uintptr_t stream, int act, uintptr_t mask, Strides mask_s, uintptr_t z,
                 Strides z_s) {
  flashconv::FwdParams p{};
  p.u = view(u, u_s), p.g_in = view(g_in, gi_s), p.g_out = view(g_out, go_s);
  p.y = mut_view(y, y_s);
  p.act = act;
  p.mask = view(mask, mask_s, true);
  p.z = mut_view(z, z_s);
  p.spec = {as_ptr<const flashconv::cf32*>(K), as_ptr<const int32_t*>(k_exp),
            as_ptr<const uint16_t*>(K16)};
  p.D = as_ptr<const float*>(D);
  p.B = B, p.H = H, p.L = L, p.N = N;
  run_kernel("fftconv_fwd_kernel", dtype, N, device, [&](int sms) {
    return flashconv::fftconv_fwd(p, dtype, sms, as_ptr<cudaStream_t>(stream));
  });
}

// The fused backward kernel. dk (H, lk), dD (H,) and dk_rev (H, lk_rev) are float32 buffers
// the kernel adds into (Python zeroes them); dg_in / dg_out / dD / dk_rev are 0 when not
// wanted (dk_rev: not a bidirectional convolution). g_out_f32: g_out holds float32 (a call with
// the fused epilogue passes g_out * mask * act'(z) there; fftconv_bwd.h).
void fftconv_bwd(uintptr_t u, uintptr_t g_in, uintptr_t g_out, uintptr_t dy, uintptr_t du,
                 uintptr_t dg_in, uintptr_t dg_out, uintptr_t K, uintptr_t K16, uintptr_t k_exp, uintptr_t D,
                 uintptr_t dk, uintptr_t dD, uintptr_t dk_rev, int64_t B, int64_t H, int64_t L,
                 int64_t N, int64_t lk, int64_t lk_rev, Strides u_s, Strides gi_s, Strides go_s, Strides dy_s,
                 Strides du_s, Strides dgi_s, Strides dgo_s, int dtype, int device,
                 uintptr_t stream, bool g_out_f32) {
  flashconv::BwdParams p{};
  p.u = view(u, u_s), p.g_in = view(g_in, gi_s), p.g_out = view(g_out, go_s, g_out_f32);
  p.dy = view(dy, dy_s);
  p.du = mut_view(du, du_s), p.dg_in = mut_view(dg_in, dgi_s), p.dg_out = mut_view(dg_out, dgo_s);
  p.spec = {as_ptr<const flashconv::cf32*>(K), as_ptr<const int32_t*>(k_exp),
            as_ptr<const uint16_t*>(K16)};
  p.D = as_ptr<const float*>(D);
  p.dk = as_ptr<float*>(dk);
  p.dD = as_ptr<float*>(dD);
  p.dk_rev = as_ptr<float*>(dk_rev);
  p.B = B, p.H = H, p.L = L, p.N = N, p.lk = lk, p.lk_rev = lk_rev;
  run_kernel("fftconv_bwd_kernel", dtype, N, device, [&](int sms) {
    return flashconv::fftconv_bwd(p, dtype, sms, as_ptr<cudaStream_t>(stream));
  });
}

// The two-level (long) forward convolution (fftconv_long.h): passes A, B, C on the caller's
// stream. K: (H, N1, N2) complex64 in the two-level order (flashconv/_long.py long_spectrum);
// ws: a (ceil(B/2), H, N1*N2) complex64 workspace on the same device.
void fftconv_long_fwd(uintptr_t u, uintptr_t g_in, uintptr_t g_out, uintptr_t y, uintptr_t K,
                      uintptr_t k_exp, uintptr_t D, uintptr_t ws, int64_t B, int64_t H, int64_t L,
                      int64_t N1, int64_t N2, Strides u_s, Strides gi_s, Strides go_s, Strides y_s,
                      int dtype, int device, uintptr_t stream, int act, uintptr_t mask,
                      Strides mask_s) {
  flashconv::FwdParams p{};
  p.u = view(u, u_s), p.g_in = view(g_in, gi_s), p.g_out = view(g_out, go_s);
  p.y = mut_view(y, y_s);
  p.act = act;
  p.mask = view(mask, mask_s, true);
  p.spec = {as_ptr<const flashconv::cf32*>(K), as_ptr<const int32_t*>(k_exp)};
  p.D = as_ptr<const float*>(D);
  p.B = B, p.H = H, p.L = L, p.N = N1 * N2;
  run_kernel("fftconv_long_fwd", dtype, p.N, device, [&](int sms) {
    return flashconv::fftconv_long_fwd(p, as_ptr<flashconv::cf32*>(ws), N1, N2, dtype, sms,
                                       as_ptr<cudaStream_t>(stream));
  });
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashconv CUDA kernels (fused block-FFT convolution)";
  m.attr("__version__") = FLASHCONV_VERSION;
  m.def("info", &info, "Build and runtime facts: version, CUDA runtime/driver, archs, devices.");
  m.def("device_count", &device_count, "(count, reason): visible CUDA devices; reason if none.");
  m.def("selftest", &selftest, py::arg("device") = 0,
        "Run a trivial kernel on `device` and check its output.");
  m.def("max_shared_memory", [](int device) {
    return device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  }, py::arg("device"), "Opt-in dynamic shared memory per block (bytes) of `device`.");
  m.def("fftconv_fwd_max_n", &flashconv::fftconv_fwd_max_n, py::arg("dtype"),
        "Largest FFT size the fused forward kernel serves for a dtype code.");
  m.def("fftconv_bwd_max_n", &flashconv::fftconv_bwd_max_n, py::arg("dtype"),
        "Largest FFT size the fused backward kernel serves for a dtype code.");
  m.def("fftconv_bwd", &fftconv_bwd, "Fused block-FFT convolution backward (see ops.py).",
        py::arg("u"), py::arg("g_in"), py::arg("g_out"), py::arg("dy"), py::arg("du"),
        py::arg("dg_in"), py::arg("dg_out"), py::arg("K"), py::arg("K16"), py::arg("k_exp"), py::arg("D"),
        py::arg("dk"), py::arg("dD"), py::arg("dk_rev"), py::arg("B"), py::arg("H"), py::arg("L"),
        py::arg("N"), py::arg("lk"), py::arg("lk_rev"), py::arg("u_strides"), py::arg("g_in_strides"), py::arg("g_out_strides"),
        py::arg("dy_strides"), py::arg("du_strides"), py::arg("dg_in_strides"),
        py::arg("dg_out_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("g_out_f32") = false);
  m.def("fftconv_fwd", &fftconv_fwd, "Fused block-FFT convolution forward (see ops.py).",
        py::arg("u"), py::arg("g_in"), py::arg("g_out"), py::arg("y"), py::arg("K"),
        py::arg("K16"), py::arg("k_exp"), py::arg("D"), py::arg("B"), py::arg("H"), py::arg("L"),
        py::arg("N"), py::arg("u_strides"), py::arg("g_in_strides"), py::arg("g_out_strides"),
        py::arg("y_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"),
        py::arg("act") = 0, py::arg("mask") = 0, py::arg("mask_strides") = Strides{0, 0, 0},
        py::arg("z") = 0, py::arg("z_strides") = Strides{0, 0, 0});
  m.def("fftconv_fwd_smem", &flashconv::fftconv_fwd_smem, py::arg("dtype"), py::arg("N"),
        "Dynamic shared memory (bytes) of the fused forward launch at FFT size N.");
  m.def("fftconv_bwd_smem", &flashconv::fftconv_bwd_smem, py::arg("dtype"), py::arg("N"),
        "Dynamic shared memory (bytes) of the fused backward launch at FFT size N.");
  m.def("fftconv_long_fwd", &fftconv_long_fwd,
        "Two-level block-FFT convolution forward for long L (see flashconv/_long.py).",
        py::arg("u"), py::arg("g_in"), py::arg("g_out"), py::arg("y"), py::arg("K"),
        py::arg("k_exp"), py::arg("D"), py::arg("ws"), py::arg("B"), py::arg("H"), py::arg("L"),
        py::arg("N1"), py::arg("N2"), py::arg("u_strides"), py::arg("g_in_strides"),
        py::arg("g_out_strides"), py::arg("y_strides"), py::arg("dtype"), py::arg("device"),
        py::arg("stream"), py::arg("act") = 0, py::arg("mask") = 0,
        py::arg("mask_strides") = Strides{0, 0, 0});
}
