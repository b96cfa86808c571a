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

// Launch the probe kernel on `device` and check its output: True, or an exception.
bool selftest(int device) {
  FC_THROW_ON_ERROR(cudaSetDevice(device), "cudaSetDevice");
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

// The fused forward kernel on the caller's stream. Pointers are device addresses (0 for an
// absent D or gate); strides are in elements; Python has validated everything.
void fftconv_fwd(uintptr_t u, uintptr_t g_in, uintptr_t g_out, uintptr_t y, uintptr_t K,
                 uintptr_t k_exp, uintptr_t D, int64_t B, int64_t H, int64_t L, int64_t N,
                 Strides u_s, Strides gi_s, Strides go_s, Strides y_s, int dtype, int device,
                 uintptr_t stream) {
  flashconv::FwdParams p{};
  p.u = as_ptr<const void*>(u);
  p.g_in = as_ptr<const void*>(g_in);
  p.g_out = as_ptr<const void*>(g_out);
  p.y = as_ptr<void*>(y);
  p.K = as_ptr<const flashconv::cf32*>(K);
  p.k_exp = as_ptr<const int32_t*>(k_exp);
  p.D = as_ptr<const float*>(D);
  p.B = B, p.H = H, p.L = L, p.N = N;
  p.u_sb = u_s[0], p.u_sh = u_s[1], p.u_st = u_s[2];
  p.gi_sb = gi_s[0], p.gi_sh = gi_s[1], p.gi_st = gi_s[2];
  p.go_sb = go_s[0], p.go_sh = go_s[1], p.go_st = go_s[2];
  p.y_sb = y_s[0], p.y_sh = y_s[1], p.y_st = y_s[2];
  FC_THROW_ON_ERROR(cudaSetDevice(device), "cudaSetDevice");
  const int sms = device_attribute(cudaDevAttrMultiProcessorCount, device);
  cudaError_t err;
  {
    py::gil_scoped_release nogil;
    err = flashconv::fftconv_fwd(p, dtype, sms, as_ptr<cudaStream_t>(stream));
  }
  const std::string what = std::string("fftconv_fwd_kernel<") + dtype_name(dtype) + "> (N=" +
                           std::to_string(N) + ") launch";
  FC_THROW_ON_ERROR(err, what.c_str());
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
  m.def("fftconv_fwd", &fftconv_fwd, "Fused block-FFT convolution forward (see ops.py).",
        py::arg("u"), py::arg("g_in"), py::arg("g_out"), py::arg("y"), py::arg("K"),
        py::arg("k_exp"), py::arg("D"), py::arg("B"), py::arg("H"), py::arg("L"), py::arg("N"),
        py::arg("u_strides"), py::arg("g_in_strides"), py::arg("g_out_strides"),
        py::arg("y_strides"), py::arg("dtype"), py::arg("device"), py::arg("stream"));
}
