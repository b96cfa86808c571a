"""``python -m python_ref [N ...]``: table of the emulated block-FFT convolution errors.

For each FFT size N (default 256, 4096, 16384) and each storage format of u and y (bf16,
fp16) it prints the output-rounding floor and the relative L2 error of blockfft_conv with
fp16, bf16 and fp32 tensor-core operands (ratio to the floor in brackets). The setup is
python_ref.blockfft.emulated_error: L = Lk = N/2, B = 2, H = 4, random normal u, k scaled
to keep y O(1), no D or gates, fixed seed.
"""

import argparse

from .blockfft import SCALINGS, emulated_error, plan

IO_FORMATS = ("bf16", "fp16")
OPERAND_FORMATS = ("fp16", "bf16", "fp32")


def error_table(sizes=(256, 4096, 16384), scaling="stage"):
    """Return the table's lines (header first) for the given FFT sizes."""
    header = f"{'N':>6}  {'plan':<18} {'io':<5} {'floor':>9}" + "".join(
        f"  {op + ' operands':>18}" for op in OPERAND_FORMATS
    )
    lines = [header]
    for N in sizes:
        for io in IO_FORMATS:
            cells = []
            floor = None
            for op in OPERAND_FORMATS:
                r = emulated_error(N, op, io, scaling=scaling)
                floor = r["floor"]
                cells.append(f"{r['error']:.3e} ({r['ratio']:4.2f}x)")
            lines.append(
                f"{N:>6}  {str(plan(N)):<18} {io:<5} {floor:>9.3e}"
                + "".join(f"  {c:>18}" for c in cells)
            )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m python_ref",
        description="Emulated relative error of the block-FFT convolution kernel.",
    )
    parser.add_argument("sizes", nargs="*", type=int, default=[256, 4096, 16384],
                        help="FFT sizes N (powers of two, 32 .. 2**22); L = N/2")
    parser.add_argument("--scaling", choices=SCALINGS, default="stage",
                        help="overflow control of the fp16/bf16 stages")
    args = parser.parse_args(argv)
    print("Relative L2 error of the emulated block-FFT convolution vs float64 "
          f"(L = Lk = N/2, B=2, H=4, no D/gates, scaling={args.scaling!r});")
    print("floor = error of rounding the exact output to the io format; "
          "(ratio to the floor).")
    for line in error_table(args.sizes, args.scaling):
        print(line)


if __name__ == "__main__":
    main()
