"""The engine table: every fftconv call is served by the first engine whose check says yes.

Each engine is a module with
  NAME, DESCRIPTION    its name (for use_engines / FLASHCONV_ENGINES / explain) and one line
  available()          "" if it can run on this machine at all, else why not
  check(problem)       None if it serves this call (a flashconv.problem.Problem), else the
                       reason it does not apply (dtype, size, device, option, machine)
  forward(p, operands) y
  backward(p, operands, dy, mask)   (du, dk, dD, dg_in, dg_out, dk_rev), None where not
                       wanted; None for a forward-only engine (its check says so)

Order: the fused CUDA kernel first, then the CUDA paths around it, then the CPU engines, then
torch.fft on any device. flashconv/dispatch.py walks this table; docs/architecture.md
describes it.
"""
from flashconv.engines import (cpu_overlap_save, cpu_scipy, cpu_torch, cuda_fused,
                               cuda_overlap_save, cuda_two_level, torch_fft)

TABLE = (cuda_fused, cuda_overlap_save, cuda_two_level, cpu_overlap_save, cpu_torch,
         cpu_scipy, torch_fft)
NAMES = tuple(e.NAME for e in TABLE)
BY_NAME = {e.NAME: e for e in TABLE}

__all__ = ["TABLE", "NAMES", "BY_NAME"]
