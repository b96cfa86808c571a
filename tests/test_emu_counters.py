"""The emulator's memory counters (hw.h, config().counters) against hand-computed counts.

tests/emu/kernels.h's counters_kernel runs one access pattern per region; each expected value
below follows from the hardware rules hw.h states (32 banks of 4 bytes, 8-byte accesses in
half-warps and 16-byte ones in quarter-warps, 32-byte global sectors). These are the numbers
Nsight Compute reports as shared wavefronts / bank conflicts and global sectors / requests for
the same patterns, so the model (bench/model.py) can be trusted only as far as they hold.
"""
import numpy as np
import pytest

from tests.emu import build as emu

pytestmark = pytest.mark.emu


@pytest.fixture(scope="module")
def regions():
    x = np.arange(2048, dtype=np.float32)
    res = emu.run("counters", {"x": x}, counters=True)
    (launch,) = res.counters
    assert launch["kernel"].startswith("proof::counters_kernel")
    assert launch["threads"] == 64 and launch["grid"] == [1, 1]
    # The outputs are unchanged by counting: warp 0 sums its loads, warp 1 stores 0.
    assert np.all(res.outputs["y"][32:] == 0) and np.all(np.isfinite(res.outputs["y"]))
    return {r["name"]: r for r in launch["regions"]}


# region -> (instructions, wavefronts, ideal) of its shared-memory loads
SMEM_LOADS = {
    "row": (1, 1, 1),              # 32 distinct banks
    "broadcast": (1, 1, 1),        # one word for every lane
    "column": (1, 32, 1),          # stride 32 words: one bank, 32 words
    "padded": (1, 1, 1),           # stride 33: a different bank per lane
    "swizzled": (1, 1, 1),         # column 7 ^ lane of 32-word rows
    "wide64": (1, 2, 2),           # 8 bytes each: two half-warps of 128 bytes
    "wide64_stride2": (1, 4, 2),   # lanes i and i + 8 of a half-warp share banks: 2-way
    "wide128": (1, 4, 4),          # 16 bytes each: four quarter-warps
    "diverged": (2, 17, 2),        # odd lanes a row (1) and even lanes a column (16 words)
    "tail": (2, 2, 2),             # 40 elements: 32 lanes, then 8
}


@pytest.mark.parametrize("name", sorted(SMEM_LOADS))
def test_shared_wavefronts(regions, name):
    lds = regions[name]["lds"]
    got = (lds["instr"], lds["wavefronts"], lds["ideal"])
    print(name, lds)
    assert got == SMEM_LOADS[name]


# region -> (requests, sectors, bytes used) of its global loads of x
GLOBAL_LOADS = {
    "coalesced": (1, 4, 128),    # 32 consecutive floats
    "strided": (1, 32, 128),     # 32 floats 128 bytes apart: 4 useful bytes per sector
    "half": (1, 2, 64),          # 32 consecutive 2-byte values
    "rounds": (6, 24, 768),
    "rounds_again": (6, 24, 768),
}


@pytest.mark.parametrize("name", sorted(GLOBAL_LOADS))
def test_global_sectors(regions, name):
    x = regions[name]["ldg"]["x"]
    print(name, x)
    assert (x["requests"], x["sectors"], x["bytes"]) == GLOBAL_LOADS[name]


def test_first_touch_and_latency_rounds(regions):
    # DRAM estimate: a sector counts once per launch, the first time it is read.
    assert regions["coalesced"]["ldg"]["x"]["first"] == 4
    assert regions["strided"]["ldg"]["x"]["first"] == 31  # sector 0 was read just before
    assert regions["half"]["ldg"]["x"]["first"] == 0      # within sectors 0-1, already read
    assert regions["rounds"]["ldg"]["x"]["first"] == 24
    assert regions["rounds_again"]["ldg"]["x"]["first"] == 0
    # Two loads per iteration overlap; the three iterations, each used before the next, do not;
    # four loads issued back to back are one round.
    assert (regions["rounds"]["ld_rounds_dram"], regions["rounds"]["ld_rounds_l2"]) == (3, 0)
    assert (regions["rounds_again"]["ld_rounds_dram"], regions["rounds_again"]["ld_rounds_l2"]) == (0, 3)
    assert (regions["batched"]["ld_rounds_dram"], regions["batched"]["ld_rounds_l2"]) == (1, 0)
    assert regions["batched"]["ldg"]["x"]["requests"] == 4


def test_stores_and_barriers(regions):
    y = regions["store"]["stg"]["y"]
    assert (y["requests"], y["sectors"], y["bytes"], y["first"]) == (2, 8, 256, 8)
    assert regions["store"]["barriers"] == 1 and regions["kernel"]["barriers"] == 1
    # The fill loop: 1568 floats over 64 threads, 24.5 iterations: 25 + 24 warp instructions.
    sts = regions["kernel"]["sts"]
    assert (sts["instr"], sts["wavefronts"], sts["ideal"]) == (49, 49, 49)


def test_counters_off_by_default():
    res = emu.run("counters", {"x": np.arange(2048, dtype=np.float32)})
    assert res.counters == []


@pytest.mark.parametrize("variant", ["plain", "tsan"])
def test_collectives_counted(variant):
    # Tensor-core and shuffle instructions complete per warp, concurrently in different warps:
    # ThreadSanitizer checks that counting them is race-free. dft256: 4 blocks x 2 warps, each
    # warp 2 column tiles x (4 + 4) real mma.
    x = np.random.default_rng(0).standard_normal((8, 256, 2)).astype(np.float32)
    res = emu.run("dft256_bf16", {"x": x}, variant, counters=True)
    (launch,) = res.counters
    assert sum(r["mma"] for r in launch["regions"]) == 4 * 2 * 16
    # warp_ops: 2 blocks x 4 warps, each 5 xor-shuffles, 2 indexed shuffles and one sync_warp.
    res = emu.run("warp_ops", {"x": np.arange(256, dtype=np.float32)}, variant, counters=True)
    (launch,) = res.counters
    assert sum(r["shfl"] for r in launch["regions"]) == 8 * 7
    assert sum(r["warp_syncs"] for r in launch["regions"]) == 8
