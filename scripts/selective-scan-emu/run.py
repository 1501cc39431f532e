#!/usr/bin/env python3
"""Runs kernels/selective_scan.cu on the CPU and checks its outputs and gradients against
autograd of the plain recurrence (the reference in scripts/selective_scan_model.py).

The kernel source itself, with kernels/common.cuh, is rendered for the CPU by
scripts/kernel-emu/emu.py (its inline PTX in C++) and compiled with g++ against that emulator's
cuda_cpu.h (CUDA's built-ins; each CUDA thread a ucontext, __syncthreads a barrier of the
block's threads); selective_scan_emu.cpp launches it as the launcher does. This checks the
kernels' indexing, shared-memory layouts, barriers, segment logic, alignment and launch contract
without a GPU; not the GPU's rounding (fp32 math on the CPU, exp2f for ex2.approx), nor warp
timing or bank conflicts.

Inputs are rounded to the dtype and the reference runs on the rounded values in float64.
Tolerance (relative RMS): 1e-4 for fp32, 3e-2 for bf16 / fp16 (output rounding dominates).

    .venv/bin/python scripts/selective-scan-emu/run.py            # the matrix (~10 minutes)
    .venv/bin/python scripts/selective-scan-emu/run.py --quick    # a subset (under a minute; scripts/test.sh runs it)

Needs g++ >= 12 (_Float16). Exits 1 if any case fails.
"""

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "kernel-emu"))
import emu  # noqa: E402
import selective_scan_model as model  # noqa: E402

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def build(out: Path):
    """The emulator binaries, one per dtype, in `out`."""
    source = ROOT / "kernels" / "selective_scan.cu"
    unit = emu.translation_unit(source, emu.render(source.read_text(), source.name))
    (out / "selective_scan_cpu.cu").write_text(unit)
    jobs = [
        subprocess.Popen(
            [*emu.GXX, f"-DKERNEL_DTYPE_{dt}", f"-I{out}", str(HERE / "selective_scan_emu.cpp"),
             "-o", str(out / f"emu_{dt}")]
        )
        for dt in DTYPES
    ]
    if any(j.wait() != 0 for j in jobs):
        sys.exit("g++ failed")


def raw(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().untyped_storage())


def run(bins: Path, case, seed: int, dt: str, fwd_chunks: int, bwd_chunks: int, R: int) -> bool:
    """One case: inputs, the emulated kernels, the comparison."""
    kind = DTYPES[dt]
    x, dout, dhT = model.make(case, seed)

    def rnd(t, k=kind):
        return None if t is None else t.to(k).to(torch.float64)

    x = model.Inputs(
        u=rnd(x.u), delta=rnd(x.delta), A=rnd(x.A, torch.float32), Bm=rnd(x.Bm), Cm=rnd(x.Cm),
        z=rnd(x.z), Dv=rnd(x.Dv, torch.float32), bias=rnd(x.bias, torch.float32),
        h0=rnd(x.h0, torch.float32), softplus=x.softplus, resets=x.resets,
    )
    dout, dhT = rnd(dout), rnd(dhT, torch.float32)
    B, T, D = x.u.shape
    N = x.A.shape[1]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        files = {"u": (x.u, kind), "delta": (x.delta, kind), "dout": (dout, kind),
                 "B": (x.Bm, kind), "C": (x.Cm, kind), "A": (x.A, torch.float32),
                 "z": (x.z, kind), "D": (x.Dv, torch.float32), "bias": (x.bias, torch.float32),
                 "h0": (x.h0, torch.float32), "dhT": (dhT, torch.float32),
                 "reset": (x.resets, torch.bool)}
        for name, (t, k) in files.items():
            if t is not None:
                (d / f"{name}.bin").write_bytes(raw(t.to(k)))
        flags = [x.z, x.Dv, x.bias, x.h0, dhT]
        config = [B, T, D, N, *(int(f is not None) for f in flags), int(x.softplus),
                  fwd_chunks, bwd_chunks, R, int(x.resets is not None)]
        (d / "config.txt").write_text(" ".join(map(str, config)))
        t0 = time.time()
        r = subprocess.run([str(bins / f"emu_{dt}"), str(d)], capture_output=True, text=True)
        secs = time.time() - t0
        if r.returncode != 0:
            print(f"FAIL {dt} B{B} T{T} D{D} N{N}: the emulator stopped\n{r.stderr[-2000:]}")
            return False

        def got(name, k, shape):
            buf = bytearray((d / f"{name}.bin").read_bytes())
            return torch.frombuffer(buf, dtype=k).reshape(shape).to(torch.float64)

        out = {
            "out": got("out", kind, (B, T, D)), "hT": got("hT", torch.float32, (B, D, N)),
            "du": got("du", kind, (B, T, D)), "ddelta": got("ddelta", kind, (B, T, D)),
            "dA": got("dA", torch.float32, (D, N)), "dB": got("dB", kind, (B, T, N)),
            "dC": got("dC", kind, (B, T, N)), "dz": got("dz", kind, (B, T, D)),
            "dD": got("dD", torch.float32, (D,)), "dbias": got("dbias", torch.float32, (D,)),
            "dh0": got("dh0", torch.float32, (B, D, N)),
        }
    ref_out, ref_hT, grads = model.reference(x, dout, dhT)
    ref = {"out": ref_out, "hT": ref_hT, **{"d" + k: v for k, v in grads.items()}}
    errs = {k: model.rel_rms(out[k], v) for k, v in ref.items()}
    tol = 1e-4 if dt == "F32" else 3e-2
    worst = max(errs, key=errs.get)
    ok = errs[worst] <= tol and all(torch.isfinite(out[k]).all() for k in ref)
    print(
        f"{'ok  ' if ok else 'FAIL'} {dt:<4} B{B} T{T:<5} D{D:<3} N{N:<3} R{R} "
        f"restarts {int(x.resets is not None)} "
        f"chunks per segment {fwd_chunks}/{bwd_chunks}  worst {errs[worst]:.1e} ({worst}) "
        f"{secs:.1f}s" + ("" if ok else "  " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    )
    return ok


def cases(quick: bool):
    """(case, dtype, forward chunks per segment, backward chunks per segment, B's column).

    The quick subset: four option combinations (segmented each way), every state size at
    T = 63 and 65 in all three dtypes, and channel counts past one block's width."""
    C = model.Case
    combos, grid, widths = [], [], []
    # Every option combination, fp32, one segment and one-chunk segments; aligned / odd rows.
    for i, flags in enumerate(itertools.product([False, True], repeat=6)):
        seg = [(1000, 1), (1, 1000)][i % 2]
        combos.append((C(2, 65, 70, 16, *flags, cps=0), "F32", *seg, [8, 3][i % 2]))
    # T x N, dtypes rotating, segment lengths varying.
    for i, (T, N) in enumerate(itertools.product([1, 7, 63, 64, 65, 1000, 2049], [1, 4, 16, 64, 256])):
        bits = [(i >> k) & 1 == 1 for k in range(6)]
        D = 70 if N <= 64 else 9
        B = 2 if T * N <= 1000 * 16 else 1
        nck = -(-T // model.CHUNK)
        seg = [(1000, 1000), (1, 1), (2, 3), (3, 1000), (1000, 2), (nck // 4 + 1, nck // 3 + 1)]
        seg = seg[i % 6]
        case = C(B, T, D, N, bits[0] or N == 16, bits[1], bits[2], not bits[3], bits[4] or T == 1,
                 bits[5] or T == 1, cps=0)
        for dt in (["F32", "BF16", "F16"] if T <= 65 else [["F32", "BF16", "F16"][i % 3]]):
            grid.append((case, dt, *seg, [8, 3, 0][i % 3]))
    # Channel counts around the tile widths.
    for D in [1, 8, 31, 64, 65, 129]:
        widths.append((C(1, 100, D, 16, True, True, True, True, True, True, cps=0), "BF16", 2, 1, 8))
    # Restarts inside chunks, on chunk and segment edges, at every segmenting; more states than
    # one backward pass holds; an initial state and the final state's gradient.
    restarts = []
    for i, (T, N, seg) in enumerate([(130, 16, (1000, 1000)), (130, 16, (1, 1)), (200, 16, (2, 3)),
                                     (100, 64, (1, 1000)), (65, 4, (1000, 1)), (33, 1, (1, 1))]):
        case = C(2, T, 70, N, True, True, True, True, True, True, cps=0, restarts=True)
        for dt in ["F32", "BF16"] if i < 2 else ["F32"]:
            restarts.append((case, dt, *seg, [8, 3][i % 2]))
    if quick:
        return (combos[:4] + [c for c in grid if c[0].T in (63, 65)]
                + [c for c in widths if c[0].D in (65, 129)] + restarts[:3])
    return combos + grid + widths + restarts


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as bins:
        bins = Path(bins)
        build(bins)
        results = [run(bins, *c[:1], 1000 + i, *c[1:]) for i, c in enumerate(cases(args.quick))]
    bad = results.count(False)
    print(f"{len(results) - bad} of {len(results)} cases pass")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
