// A minimal kernel the binding uses to prove, on a GPU, that the module's code for this
// device loads and runs (flashconv._C.selftest()). It also gives the ptxas report a kernel
// to parse before the FFT kernels exist.
#include <cuda_runtime.h>

#include "flashconv/check.h"

namespace flashconv {

// out[i] = i * 3 + 1 for i < n: trivially checkable on the host.
__global__ void probe_kernel(int* out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = i * 3 + 1;
}

cudaError_t probe_launch(int* out, int n, cudaStream_t stream) {
  const int threads = 128;
  probe_kernel<<<(n + threads - 1) / threads, threads, 0, stream>>>(out, n);
  return cudaGetLastError();
}

}  // namespace flashconv
