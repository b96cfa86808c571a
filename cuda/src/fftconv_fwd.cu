// Instantiations of the fused forward kernel, one per io dtype (fftconv_fwd.h holds the code).
#include "flashconv/fftconv_fwd.h"

namespace flashconv {

cudaError_t fftconv_fwd(const FwdParams& p, int dtype, int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return fftconv_fwd_launch<float>(p, num_sms, stream);
    case kFloat16: return fftconv_fwd_launch<half_t>(p, num_sms, stream);
    case kBFloat16: return fftconv_fwd_launch<bf16_t>(p, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t fftconv_fwd_smem(int dtype, int64_t N) {
  switch (dtype) {
    case kFloat32: return int64_t(fwd_smem_bytes<float>(N));
    case kFloat16: return int64_t(fwd_smem_bytes<half_t>(N));
    case kBFloat16: return int64_t(fwd_smem_bytes<bf16_t>(N));
    default: return 0;
  }
}

int64_t fftconv_fwd_max_n(int dtype) {
  switch (dtype) {
    case kFloat32: return kMaxFusedN<float>;
    case kFloat16: return kMaxFusedN<half_t>;
    case kBFloat16: return kMaxFusedN<bf16_t>;
    default: return 0;
  }
}

}  // namespace flashconv
