// Instantiations of the fused backward kernel, one per io dtype (fftconv_bwd.h holds the code).
#include "flashconv/fftconv_bwd.h"

namespace flashconv {

cudaError_t fftconv_bwd(const BwdParams& p, int dtype, int num_sms, cudaStream_t stream) {
  switch (dtype) {
    case kFloat32: return fftconv_bwd_launch<float>(p, num_sms, stream);
    case kFloat16: return fftconv_bwd_launch<half_t>(p, num_sms, stream);
    case kBFloat16: return fftconv_bwd_launch<bf16_t>(p, num_sms, stream);
    default: return cudaErrorInvalidValue;
  }
}

int64_t fftconv_bwd_smem(int dtype, int64_t N) {
  switch (dtype) {
    case kFloat32: return int64_t(bwd_smem_bytes<float>(N));
    case kFloat16: return int64_t(bwd_smem_bytes<half_t>(N));
    case kBFloat16: return int64_t(bwd_smem_bytes<bf16_t>(N));
    default: return 0;
  }
}

int64_t fftconv_bwd_max_n(int dtype) {
  switch (dtype) {
    case kFloat32: return kMaxFusedBwdN<float>;
    case kFloat16: return kMaxFusedBwdN<half_t>;
    case kBFloat16: return kMaxFusedBwdN<bf16_t>;
    default: return 0;
  }
}

}  // namespace flashconv
