#!/usr/bin/env python3
"""Compiles every entry point of kernel sources with NVRTC, as the runtime does, and reports
registers, spills and shared memory per kernel.

Each source is compiled once per (entry point, dtype, tier), with the options of
crates/cuda/src/compile.rs:

    --gpu-architecture=<arch> -std=c++17 -DKERNEL_DTYPE_<DT> -DKERNEL_INDEX=<i> --ftz=true
    [--Ofast-compile=mid]   (the quick tier)

plus --ptxas-options=-v so the log carries ptxas's resource report. The last column is a digest of
the machine code (the CUBIN's executable sections): a change to a source that leaves a kernel's
digest as it was leaves its SASS byte for byte as it was (for refactors of kernel code). Compare
digests of `--jobs 1` runs: programs compiled side by side in one process have come out with
other bytes (NVRTC 13.0), and the same ones again whenever compiled alone. Entry points are found by
their `WANT_KERNEL(i)` guards; headers a source includes with `#include "name"` are read from the
source's directory and passed to NVRTC as headers. No GPU is needed, only libnvrtc: by default
the one of the NVIDIA wheels in the running Python's environment (the project's .venv, which
torch brings), else --lib or $NVRTC_LIB.

    .venv/bin/python scripts/nvrtc-check.py kernels/selective_scan.cu
    .venv/bin/python scripts/nvrtc-check.py --dtypes bf16 --tiers full kernels/gla_tc.cu

Exits 1 if any program fails to compile (its log is printed), 2 on bad arguments.
"""

import argparse
import concurrent.futures
import ctypes
import hashlib
import os
import re
import struct
import sys
import time
from pathlib import Path

DTYPES = {"f32": "KERNEL_DTYPE_F32", "bf16": "KERNEL_DTYPE_BF16", "f16": "KERNEL_DTYPE_F16"}
TIERS = {"full": [], "quick": ["--Ofast-compile=mid"]}


def default_lib():
    """libnvrtc of the NVIDIA wheels installed next to the running Python, if any."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        for root in nvidia.__path__:
            found = sorted(Path(root).glob("cu*/lib/libnvrtc.so.*"))
            found = [f for f in found if ".alt." not in f.name]
            if found:
                return str(found[-1])
    except ImportError:
        pass
    return "libnvrtc.so"


class Nvrtc:
    """The few NVRTC calls a compile needs, through ctypes."""

    def __init__(self, path):
        # NVRTC opens its builtins library by name at compile time; load it from the same
        # directory first so no LD_LIBRARY_PATH is needed.
        for builtins in sorted(Path(path).parent.glob("libnvrtc-builtins.so.*")):
            if ".alt." not in builtins.name:
                ctypes.CDLL(str(builtins), mode=ctypes.RTLD_GLOBAL)
        self.lib = ctypes.CDLL(path)
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        major, minor = ctypes.c_int(), ctypes.c_int()
        self.check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        self.version = (major.value, minor.value)

    def check(self, status, what):
        if status != 0:
            raise RuntimeError(f"{what}: {self.lib.nvrtcGetErrorString(status).decode()}")

    def compile(self, name, text, headers, options):
        """Returns (ok, log, cubin bytes)."""
        prog = ctypes.c_void_p()
        hnames = list(headers)
        htexts = [headers[h] for h in hnames]
        arr = ctypes.c_char_p * len(hnames)
        self.check(
            self.lib.nvrtcCreateProgram(
                ctypes.byref(prog),
                text.encode(),
                name.encode(),
                len(hnames),
                arr(*[t.encode() for t in htexts]),
                arr(*[h.encode() for h in hnames]),
            ),
            "nvrtcCreateProgram",
        )
        try:
            opts = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
            status = self.lib.nvrtcCompileProgram(prog, len(options), opts)
            size = ctypes.c_size_t()
            self.check(self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size)), "log size")
            buf = ctypes.create_string_buffer(size.value)
            self.check(self.lib.nvrtcGetProgramLog(prog, buf), "log")
            log = buf.value.decode(errors="replace")
            cubin = b""
            if status == 0:
                csize = ctypes.c_size_t()
                self.check(self.lib.nvrtcGetCUBINSize(prog, ctypes.byref(csize)), "cubin size")
                cbuf = ctypes.create_string_buffer(csize.value)
                self.check(self.lib.nvrtcGetCUBIN(prog, cbuf), "cubin")
                cubin = cbuf.raw
            return status == 0, log, cubin
        finally:
            self.lib.nvrtcDestroyProgram(ctypes.byref(prog))


def code_digest(cubin):
    """The first 12 hex digits of a sha256 over the CUBIN's `.text.*` sections (name and
    bytes, in name order): the kernels' machine code, without the metadata around it."""
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)

    def section(i):
        name, _, _, _, offset, size = struct.unpack_from("<IIQQQQ", cubin, shoff + i * shentsize)
        return name, offset, size

    _, names_at, _ = section(shstrndx)
    texts = []
    for i in range(shnum):
        name_at, offset, size = section(i)
        name = cubin[names_at + name_at:cubin.index(b"\0", names_at + name_at)]
        if name.startswith(b".text."):
            texts.append((name, cubin[offset:offset + size]))
    digest = hashlib.sha256()
    for name, code in sorted(texts):
        digest.update(name + b"\0" + code)
    return digest.hexdigest()[:12]


def entry_points(text):
    """The indices of the source's `WANT_KERNEL(i)` guards, in order."""
    return sorted({int(i) for i in re.findall(r"WANT_KERNEL\((\d+)\)", text)})


def headers_of(path, text):
    """`#include "x"` files next to the source, by name."""
    return {
        name: (path.parent / name).read_text()
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', text, re.M)
    }


def resources(log):
    """ptxas's report per entry function: {name: dict}."""
    out = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line)
        if m:
            stack, st, ld = (int(g) for g in m.groups())
            current.update(stack=stack, spill_st=st, spill_ld=ld)
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", line)
        if m:
            current["smem"] = int(m.group(1))
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("sources", nargs="+", type=Path)
    ap.add_argument("--arch", default="sm_90")
    ap.add_argument("--dtypes", default="f32,bf16,f16", help="comma-separated: f32, bf16, f16")
    ap.add_argument("--tiers", default="full,quick", help="comma-separated: full, quick")
    ap.add_argument("--kernels", help="comma-separated entry point indices (default: all)")
    ap.add_argument("--lib", default=os.environ.get("NVRTC_LIB") or default_lib())
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()

    dtypes = args.dtypes.split(",")
    tiers = args.tiers.split(",")
    bad = [d for d in dtypes if d not in DTYPES] + [t for t in tiers if t not in TIERS]
    if bad:
        print(f"unknown dtype or tier: {', '.join(bad)}", file=sys.stderr)
        return 2
    try:
        nvrtc = Nvrtc(args.lib)
    except OSError as e:
        print(f"cannot load libnvrtc ({args.lib}): {e}", file=sys.stderr)
        return 2

    jobs = []
    for src in args.sources:
        if not src.is_file():
            print(f"{src}: no such file", file=sys.stderr)
            return 2
        text = src.read_text()
        headers = headers_of(src, text)
        kernels = entry_points(text)
        if args.kernels:
            kernels = [int(k) for k in args.kernels.split(",")]
        if not kernels:
            kernels = [-1]  # a source without guards: one program
        for k in kernels:
            for dt in dtypes:
                for tier in tiers:
                    opts = [
                        f"--gpu-architecture={args.arch}",
                        "-std=c++17",
                        f"-D{DTYPES[dt]}",
                        f"-DKERNEL_INDEX={k}",
                        "--ftz=true",
                        *TIERS[tier],
                        "--ptxas-options=-v",
                    ]
                    jobs.append((src, text, headers, k, dt, tier, opts))

    print(f"NVRTC {nvrtc.version[0]}.{nvrtc.version[1]}, {args.arch}, {len(jobs)} programs")

    def run(job):
        src, text, headers, k, dt, tier, opts = job
        t0 = time.perf_counter()
        ok, log, cubin = nvrtc.compile(src.name, text, headers, opts)
        return job, ok, log, cubin, time.perf_counter() - t0

    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(run, jobs))
    print(f"{'source':<20} {'kernel':<34} {'tier':<5} {'regs':>4} {'spill st/ld':>11} "
          f"{'stack':>5} {'smem':>5} {'cubin':>7} {'time s':>6} {'code':>12}")
    for (src, _, _, k, dt, tier, _), ok, log, cubin, secs in results:
        if not ok:
            failed += 1
            print(f"{src.name:<20} #{k} {dt:<5} {tier:<5} FAILED\n{log}")
            continue
        res = resources(log)
        code = code_digest(cubin)
        if not res:
            print(f"{src.name:<20} #{k} {dt:<5} {tier:<5} compiled, no ptxas report\n{log}")
        for name, r in sorted(res.items()):
            spill = f"{r.get('spill_st', 0)}/{r.get('spill_ld', 0)}"
            print(f"{src.name:<20} {name:<34} {tier:<5} {r.get('regs', 0):>4} {spill:>11} "
                  f"{r.get('stack', 0):>5} {r.get('smem', 0):>5} {len(cubin):>7} {secs:>6.2f} "
                  f"{code:>12}")
        warnings = [l for l in log.splitlines() if "warning" in l.lower()]
        for w in warnings:
            print(f"    {w}")
    if failed:
        print(f"{failed} of {len(jobs)} programs failed")
        return 1
    print(f"all {len(jobs)} programs compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
