// Instantiations of the two-level (long) forward convolution, one per io dtype
// (fftconv_long.h holds the code).
#include "flashconv/fftconv_long.h"

namespace flashconv {

// The binding passes the fused kernel's parameters plus the workspace and the split N = N1 N2.
cudaError_t fftconv_long_fwd(const FwdParams& f, cf32* ws, int64_t N1, int64_t N2, int dtype,
                             int num_sms, cudaStream_t stream) {
  LongParams p{};
  p.u = f.u, p.g_in = f.g_in, p.g_out = f.g_out, p.y = f.y, p.spec = f.spec, p.D = f.D;
  p.act = f.act, p.mask = f.mask;
  p.ws = ws;
  p.B = f.B, p.H = f.H, p.L = f.L, p.N = f.N, p.N1 = N1, p.N2 = N2, p.C = 0;
  switch (dtype) {
    case kFloat32: return fftconv_long_launch<float>(p, num_sms, stream);
    case kFloat16: return fftconv_long_launch<half_t>(p, num_sms, stream);
    case kBFloat16: return fftconv_long_launch<bf16_t>(p, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace flashconv
