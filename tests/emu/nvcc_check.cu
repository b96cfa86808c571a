// Compile-only: builds flashconv/hw.h and every proof kernel and launcher with nvcc, so the
// GPU side of the layer (intrinsics, mma PTX, the launch path) is checked wherever nvcc is.
//   nvcc -std=c++17 -arch=sm_80 -I cuda/include -c tests/emu/nvcc_check.cu   (and sm_90)
// tests/test_emu.py runs it and looks for the HMMA instructions in the SASS.
#include "kernels.h"

namespace proof {

hw::Error instantiate_all(hw::Stream s) {
  float* f = nullptr;
  uint32_t* u = nullptr;
  hw::half_t* h = nullptr;
  hw::bf16_t* b = nullptr;
  hw::Error e = hw::Success;
  auto keep = [&](hw::Error r) { e = e == hw::Success ? r : e; };
  keep(launch_block_sum(f, f, 1, 1, 1, s));
  keep(launch_warp_ops(f, f, u, f, f, 128, s));
  keep(launch_mma_tile(h, h, f, f, s));
  keep(launch_mma_tile(b, b, f, f, s));
  keep(launch_dft256<hw::half_t>(f, f, f, 2, s));
  keep(launch_dft256<hw::bf16_t>(f, f, f, 2, s));
  keep(launch_convert(f, h, f, 1, s));
  keep(launch_convert(f, b, f, 1, s));
  keep(launch_counters(f, f, s));
  keep(launch_ldmatrix(reinterpret_cast<const uint16_t*>(h), u, u, u, nullptr, s));
  keep(launch_racy(f, s));
  keep(launch_early_exit(f, s));
  keep(launch_deadlock(f, s));
  keep(launch_divergent_barrier(f, s));
  keep(launch_oob(f, 1, s));
  keep(launch_smem_oob(f, 1, s));
  keep(launch_smem_fill(f, 4, s));
  return e;
}

}  // namespace proof
