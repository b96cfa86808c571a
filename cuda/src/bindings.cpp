// pybind11 module flashconv._C: a thin layer. Python validates shapes and dtypes and
// allocates outputs; this file receives plain integers (pointers, sizes, strides, dtype
// codes, stream handles), calls the launchers and turns CUDA errors into exceptions.
#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <string>
#include <vector>

#include "flashconv/check.h"

namespace py = pybind11;

namespace flashconv {
cudaError_t probe_launch(int* out, int n, cudaStream_t stream);
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

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "flashconv CUDA kernels (fused block-FFT convolution)";
  m.attr("__version__") = FLASHCONV_VERSION;
  m.def("info", &info, "Build and runtime facts: version, CUDA runtime/driver, archs, devices.");
  m.def("device_count", &device_count, "(count, reason): visible CUDA devices; reason if none.");
  m.def("selftest", &selftest, py::arg("device") = 0,
        "Run a trivial kernel on `device` and check its output.");
}
