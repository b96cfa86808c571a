"""The shapes the Nsight Compute pass of scripts/gpu_check.sh profiles: fused forward and
backward launches at H = 768 (one CTA per channel, so bench/ncu_compare.py can scale the
emulator's per-pair counts to them exactly). Prints one line per launch, in launch order.

    ncu ... python scripts/ncu_case.py        (CASES below; each call launches one kernel)
"""
import torch

import flashconv

# (kind, dtype, B, H, L): forward launches the fused forward kernel once; backward runs the
# forward under no_grad first (also profiled) and then the fused backward kernel once.
CASES = [
    ("fwd", torch.bfloat16, 16, 768, 1024),
    ("fwd", torch.bfloat16, 16, 768, 4096),
    ("fwd", torch.float32, 16, 768, 1024),
    ("bwd", torch.bfloat16, 16, 768, 1024),
]


def main():
    torch.manual_seed(0)
    with flashconv.use_engines(["cuda_fused"]):
        for kind, dtype, B, H, L in CASES:
            u = torch.randn(B, H, L, device="cuda", dtype=dtype, requires_grad=(kind == "bwd"))
            k = torch.randn(H, L, device="cuda", requires_grad=(kind == "bwd")) / L ** 0.5
            D = torch.randn(H, device="cuda", requires_grad=(kind == "bwd"))
            y = flashconv.fftconv(u, k, D)
            if kind == "bwd":
                y.backward(torch.randn_like(y))
            torch.cuda.synchronize()
            print("case", kind, str(dtype).replace("torch.", ""), B, H, L, flush=True)


if __name__ == "__main__":
    main()
