"""Runs a kernel source of kernels/ on the CPU: the source and the prelude are compiled by g++
against cuda_cpu.h (CUDA's built-ins; each CUDA thread a ucontext), one shared library per
dtype, and every entry point becomes a function that Python calls through ctypes with a launch
geometry and the kernel's arguments. A driver in C++ (a source whose entry points take a
struct, as scripts/selective-scan-emu's) includes `translation_unit`'s text instead and builds
with `GXX`.

    from emu import Kernels
    k = Kernels("kernels/fused.cu", "bf16")
    k.launch("rms_norm_fwd", grid=(4, 1, 1), threads=256, smem=0, args=[x, w, 0, y, ...])

Arguments: a torch tensor (its address), an int or a float, in the kernel's order; pointer
parameters also take an int address (0 for null). Before compiling, the inline PTX of the
prelude and the source is rendered in C++ by the table PTX (a source with any other inline PTX
is refused: extend the table), `extern __shared__` arrays become the launch's dynamic shared
memory and static `__shared__` arrays become function statics.

This checks indexing, barriers, shared-memory layouts, alignment (built with
-fsanitize=alignment: a misaligned 16-byte access stops the run) and the launch contract
without a GPU; not the GPU's rounding of approximate instructions, nor timing.

Needs g++ >= 12 (_Float16).
"""

import ctypes
import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DTYPES = {"f32": "KERNEL_DTYPE_F32", "bf16": "KERNEL_DTYPE_BF16", "f16": "KERNEL_DTYPE_F16"}

# Inline PTX of kernels/common.cuh and the sources, and its C++ rendering.
PTX = {
    'asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));':
        "{ _Float16 h; memcpy(&h, &x.bits, 2); f = (float)h; }",
    'asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));':
        "r.bits = emu_f32_to_bf16(x);",
    'asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));':
        "{ const _Float16 h = (_Float16)x; memcpy(&r.bits, &h, 2); }",
    'asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));':
        "y = emu_ftz(exp2f(emu_ftz(x)));",
    'asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));':
        "y = emu_ftz(log2f(emu_ftz(x)));",
    'asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));':
        "y = emu_ftz(1.f / emu_ftz(x));",
    'asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(r));':
        "r = (unsigned)emu_dynamic_smem_bytes();",
}

# g++ and its flags for every build: C++17, cuda_cpu.h on the include path, no fused
# multiply-adds the GPU code does not ask for, and a misaligned access stops the run.
GXX = [
    "g++", "-std=c++17", "-O1", "-g", "-w", "-fno-strict-aliasing", "-ffp-contract=off",
    "-fsanitize=alignment", "-fno-sanitize-recover=all", f"-I{HERE}",
]

EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+)\s+(\w+)\s*\[\s*\]\s*;"
)
ENTRY = re.compile(r"ENTRY\((\w+)\)\s*\(")

C_TYPES = {
    "int": ctypes.c_int,
    "unsigned": ctypes.c_uint,
    "unsigned int": ctypes.c_uint,
    "long long": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong,
    "float": ctypes.c_float,
}


def render(text: str, name: str) -> str:
    """`text` with its inline PTX in C++ and its shared memory as the emulator has it."""
    for ptx, cpp in PTX.items():
        text = text.replace(ptx, cpp)
    if "asm(" in text or "asm volatile(" in text:
        line = next(l for l in text.splitlines() if "asm(" in l or "asm volatile(" in l)
        raise SystemExit(f"{name} has inline PTX that emu.py does not render: {line.strip()}")
    text = EXTERN_SHARED.sub(
        lambda m: f"{m[1]}* {m[2]} = reinterpret_cast<{m[1]}*>(emu_dynamic_smem());", text
    )
    return re.sub(r"\b__shared__\b", "static", text)


def parameters(text: str, start: int):
    """The parameter list starting after the `(` at `start`: its text and end."""
    depth, i = 1, start
    while depth:
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        i += 1
    return text[start : i - 1], i


def split_parameter(p: str):
    """(ctypes type, name) of one parameter declaration."""
    p = " ".join(p.replace("__restrict__", " ").split())
    name = re.search(r"(\w+)\s*$", p)[1]
    kind = p[: -len(name)].strip()
    if "*" in kind:
        return ctypes.c_void_p, name
    kind = kind.replace("const ", "").strip()
    if kind not in C_TYPES:
        raise SystemExit(f"emu.py: no ctypes type for a kernel parameter of type {kind!r}")
    return C_TYPES[kind], name


def translation_unit(source: Path, text: str) -> str:
    """cuda_cpu.h, the prelude and `text` (the kernel source `source`, rendered) as one C++ text;
    the includer defines the dtype macro first."""
    prelude = render((ROOT / "kernels" / "common.cuh").read_text(), "common.cuh")
    return "\n".join(
        [
            '#include "cuda_cpu.h"',
            '#line 1 "common.cuh"',
            prelude.replace("#pragma once", ""),
            f'#line 1 "{source.name}"',
            text.replace('#include "common.cuh"', ""),
        ]
    )


class Kernels:
    """The entry points of one kernel source for one dtype, compiled for the CPU."""

    def __init__(self, source: str, dtype: str):
        self.source = ROOT / source if not Path(source).is_absolute() else Path(source)
        text = render(self.source.read_text(), self.source.name)
        self.entries = {}
        wrappers = []
        for m in ENTRY.finditer(text):
            params, _ = parameters(text, m.end())
            decls = [p for p in params.split(",") if p.strip()]
            typed = [split_parameter(p) for p in decls]
            self.entries[m[1]] = [t for t, _ in typed]
            args = ", ".join(n for _, n in typed)
            wrappers.append(
                f'extern "C" void emu_{m[1]}(unsigned gx, unsigned gy, unsigned gz, '
                f"unsigned threads, unsigned long long smem{', ' if decls else ''}"
                f"{', '.join(decls)}) {{\n"
                f"  emu_launch({{gx, gy, gz}}, threads, smem, [=] {{ ENTRY({m[1]})({args}); }});\n"
                "}\n"
            )
        unit = "\n".join(
            [
                f"#define {DTYPES[dtype]}",
                translation_unit(self.source, text),
                "// emulator entry points",
                *wrappers,
            ]
        )
        key = hashlib.sha256((unit + (HERE / "cuda_cpu.h").read_text()).encode()).hexdigest()[:16]
        name = f"kernel-emu-{self.source.stem}-{dtype}-{key}"
        out = Path(tempfile.gettempdir()) / name  # a build per text: reused while it is unchanged
        lib = out / "kernels.so"
        if not lib.exists():
            out.mkdir(parents=True, exist_ok=True)
            (out / "unit.cpp").write_text(unit)
            cmd = [*GXX, "-shared", "-fPIC", str(out / "unit.cpp"), "-o", str(lib) + ".tmp"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise SystemExit(f"g++ failed on {self.source.name} ({dtype}):\n{r.stderr[-4000:]}")
            os.replace(str(lib) + ".tmp", lib)
        self.lib = ctypes.CDLL(str(lib))

    def launch(self, name, grid, threads, smem, args):
        """Runs entry point `name` over `grid` (x, y, z) blocks of `threads` threads with `smem`
        bytes of dynamic shared memory."""
        types = self.entries[name]
        if len(args) != len(types):
            raise TypeError(f"{name} takes {len(types)} arguments, got {len(args)}")
        values = []
        for t, a in zip(types, args):
            if t is ctypes.c_void_p:
                a = a if isinstance(a, int) else a.data_ptr()
            values.append(t(a))
        f = getattr(self.lib, f"emu_{name}")
        f.restype = None
        f(*(ctypes.c_uint(v) for v in grid), ctypes.c_uint(threads), ctypes.c_ulonglong(smem),
          *values)
