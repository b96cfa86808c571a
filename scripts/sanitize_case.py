"""Small-shape runs of every fused kernel (forward, backward, each dtype, gates, D,
bidirectional when available) for compute-sanitizer memcheck / racecheck on a GPU."""
import torch

import flashconv


def main():
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for L in (17, 300, 2048):
            B, H = 3, 2
            u = torch.randn(B, H, L, device="cuda", dtype=dtype, requires_grad=True)
            k = torch.randn(H, L, device="cuda", requires_grad=True)
            D = torch.randn(H, device="cuda", requires_grad=True)
            g = torch.randn(B, H, L, device="cuda", dtype=dtype, requires_grad=True)
            y = flashconv.fftconv(u, k, D, g_in=g, g_out=g)
            y.float().sum().backward()
            torch.cuda.synchronize()
            print("ok", dtype, L, float(y.float().abs().mean()))


if __name__ == "__main__":
    main()
