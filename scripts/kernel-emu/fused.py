#!/usr/bin/env python3
"""Runs kernels/fused.cu on the CPU (emu.py) through the launch sequence of its launchers
(crates/ops/src/fused/norm.rs, swiglu.rs, conv.rs and rotary.rs: the plans below restate theirs) and checks
every output and gradient against float64 autograd of the formulas:

    rms_norm     y = x * rsqrt(mean(x^2) + eps) * w [* silu(g)]
    swiglu       y = silu(a) * b
    causal_conv  y_t = silu(bias + sum_j w_j x_{t-K+1+j}), taps inside t's document only
    rotary       (y_i, y_{i+h}) = (x_i c - x_{i+h} s, x_{i+h} c + x_i s), h = D / 2

Inputs are rounded to the dtype first and the float64 reference runs on the rounded values.
Tolerance (relative RMS against float64): max(1e-5, 2x the error of the same formulas run in
the dtype itself, by autograd on the CPU). eps is 1e-6, but 0.5 for one-element rows, whose dx
(dy w eps rstd^3) is ill-conditioned at 1e-6 (crates/ops/tests/cuda_fused.rs does the same).
The backwards of rms_norm and swiglu write y again in the cases that give them a buffer for it
(`again`); it must equal the forward's y bit for bit. Output buffers start as NaN (an element no
kernel wrote fails), every buffer sits between NaN
margins (an out-of-bounds read that reaches a result fails; a write into a margin fails), and
some cases offset the tensors by one element so that the kernels must take their unaligned
path.

    .venv/bin/python scripts/kernel-emu/fused.py           # every case (about a minute)
    .venv/bin/python scripts/kernel-emu/fused.py --quick   # a few

Exits 1 if any case fails.
"""

import argparse
import math
import sys
import time

import torch

from emu import Kernels

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
FLOOR = 1e-5
MARGIN = 64  # elements of NaN on either side of every buffer

# The launchers' plans (crates/ops/src/fused/norm.rs and swiglu.rs).
FWD_ROWS_PER_BLOCK = 8
BWD_SMEM_TARGET = 32 * 1024
BWD_MAX_WARPS = 8
BWD_TARGET_BLOCKS = 1024
DW_COLUMNS = 8
SWIGLU_THREADS = 256
SWIGLU_MAX_BLOCKS = 4096
ROTARY_THREADS = 256
CONV_STEPS = 16
CONV_RUNS = 4


def cdiv(a, b):
    return -(-a // b)


def vec_width(dtype):
    return 16 // torch.empty((), dtype=dtype).element_size()


def bwd_plan(rows, n, target_blocks=BWD_TARGET_BLOCKS):
    """(warps per block, rows per warp, blocks) of rms_norm_bwd."""
    warps = max(1, min(BWD_MAX_WARPS, BWD_SMEM_TARGET // (4 * n)))
    warp_rows = max(1, cdiv(rows, warps * target_blocks))
    return warps, warp_rows, cdiv(rows, warps * warp_rows)


class Buffer:
    """A tensor between NaN margins, `offset` elements past a 16-byte boundary."""

    def __init__(self, shape, dtype, offset=0, values=None):
        numel = math.prod(shape)
        self.storage = torch.full((2 * MARGIN + offset + numel,), float("nan"), dtype=dtype)
        self.start = MARGIN + offset
        self.t = self.storage[self.start : self.start + numel].view(shape)
        if values is not None:
            self.t.copy_(values)

    def margins_intact(self):
        bits = {2: torch.int16, 4: torch.int32}[self.storage.element_size()]
        whole = self.storage.view(bits)
        nan = torch.full((1,), float("nan"), dtype=self.storage.dtype).view(bits)[0]
        inside = slice(self.start, self.start + self.t.numel())
        outside = torch.cat([whole[: inside.start], whole[inside.stop :]])
        return bool((outside == nan).all())


def aligned(*bufs):
    return all(b is None or b.t.data_ptr() % 16 == 0 for b in bufs)


def rel_rms(a, b):
    a, b = a.double(), b.double()
    ref = b.norm().item()
    diff = (a - b).norm().item()
    return diff / ref if ref > 0 else diff


def norm_formula(x, w, g, eps):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w
    return y * torch.nn.functional.silu(g) if g is not None else y


def same_bits(again, y):
    """Whether the y a backward wrote again equals the forward's, bit for bit."""
    if again is None:
        return True
    bits = {2: torch.int16, 4: torch.int32}[y.element_size()]
    return bool((again.t.view(bits) == y.view(bits)).all())


def run_norm(k, dt, rows, n, gated, offset, scale, target_blocks, seed, again):
    kind = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    x = (rnd(rows, n) * scale).to(kind)
    w = (1 + 0.5 * rnd(n)).to(kind)
    g = (rnd(rows, n) * 3).to(kind) if gated else None
    dy = rnd(rows, n).to(kind)
    eps = 0.5 if n == 1 else 1e-6

    xb = Buffer((rows, n), kind, offset, x)
    wb = Buffer((n,), torch.float32, 0, w.float())
    gb = Buffer((rows, n), kind, offset, g) if gated else None
    yb = Buffer((rows, n), kind, offset)
    rb = Buffer((rows,), torch.float32)
    vw = vec_width(kind)
    vec = int(n % vw == 0 and aligned(xb, gb, yb))
    k.launch("rms_norm_fwd", (cdiv(rows, FWD_ROWS_PER_BLOCK), 1, 1), 32 * FWD_ROWS_PER_BLOCK, 0,
             [xb.t, wb.t, gb.t if gated else 0, yb.t, rb.t, rows, n, vec, eps])

    warps, warp_rows, blocks = bwd_plan(rows, n, target_blocks)
    dyb = Buffer((rows, n), kind, offset, dy)
    dxb = Buffer((rows, n), kind, offset)
    dgb = Buffer((rows, n), kind, offset) if gated else None
    againb = Buffer((rows, n), kind, offset) if again else None
    partb = Buffer((blocks, n), torch.float32)
    dwb = Buffer((n,), torch.float32)
    vec_b = int(n % vw == 0 and aligned(xb, gb, dyb, dxb, dgb, againb))
    per_warp = cdiv(n, 32 * (vw if vec_b else 1)) * 32 * (vw if vec_b else 1)
    k.launch("rms_norm_bwd", (blocks, 1, 1), 32 * warps, warps * per_warp * 4,
             [xb.t, wb.t, gb.t if gated else 0, rb.t, dyb.t, dxb.t, dgb.t if gated else 0,
              againb.t if again else 0, partb.t, rows, n, warp_rows, vec_b])
    k.launch("column_sums", (cdiv(n, DW_COLUMNS), 1, 1), 256, 0, [partb.t, dwb.t, blocks, n])

    def grads(kind_):
        xs = x.to(kind_).requires_grad_()
        ws = w.to(kind_).requires_grad_()
        gs = g.to(kind_).requires_grad_() if gated else None
        y = norm_formula(xs, ws, gs, eps)
        y.backward(dy.to(kind_))
        rstd = torch.rsqrt(xs.detach().pow(2).mean(-1) + eps)
        out = {"y": y.detach(), "rstd": rstd, "dx": xs.grad, "dw": ws.grad}
        if gated:
            out["dg"] = gs.grad
        return out

    exact, naive = grads(torch.float64), grads(kind)
    got = {"y": yb.t, "rstd": rb.t, "dx": dxb.t, "dw": dwb.t}
    if gated:
        got["dg"] = dgb.t
    bufs = [xb, wb, gb, yb, rb, dyb, dxb, dgb, againb, partb, dwb]
    return check(f"rms_norm {dt:<4} rows {rows:<4} n {n:<5} gate {int(gated)} "
                 f"offset {offset} scale {scale:g} vec {vec}/{vec_b} warp_rows {warp_rows} "
                 f"again {int(again)}",
                 got, exact, naive, bufs, same_bits(againb, yb.t))


def run_swiglu(k, dt, numel, offset, scale, max_blocks, seed, again):
    kind = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    a, b, dy = (rnd(numel) * scale).to(kind), rnd(numel).to(kind), rnd(numel).to(kind)
    ab, bb = Buffer((numel,), kind, offset, a), Buffer((numel,), kind, offset, b)
    yb = Buffer((numel,), kind, offset)
    dyb, dab, dbb = (Buffer((numel,), kind, offset, dy), Buffer((numel,), kind, offset),
                     Buffer((numel,), kind, offset))
    vw = vec_width(kind)
    vec = int(aligned(ab, bb, yb))
    work = numel // vw if vec else numel
    blocks = max(1, min(max_blocks, cdiv(work, SWIGLU_THREADS)))
    k.launch("swiglu_fwd", (blocks, 1, 1), SWIGLU_THREADS, 0, [ab.t, bb.t, yb.t, numel, vec])
    againb = Buffer((numel,), kind, offset) if again else None
    vec_b = int(aligned(ab, bb, dyb, dab, dbb, againb))
    work = numel // vw if vec_b else numel
    blocks = max(1, min(max_blocks, cdiv(work, SWIGLU_THREADS)))
    k.launch("swiglu_bwd", (blocks, 1, 1), SWIGLU_THREADS, 0,
             [ab.t, bb.t, dyb.t, dab.t, dbb.t, againb.t if again else 0, numel, vec_b])

    def grads(kind_):
        a_, b_ = a.to(kind_).requires_grad_(), b.to(kind_).requires_grad_()
        y = torch.nn.functional.silu(a_) * b_
        y.backward(dy.to(kind_))
        return {"y": y.detach(), "da": a_.grad, "db": b_.grad}

    got = {"y": yb.t, "da": dab.t, "db": dbb.t}
    return check(f"swiglu   {dt:<4} numel {numel:<6} offset {offset} scale {scale:g} "
                 f"vec {vec}/{vec_b} blocks <= {max_blocks} again {int(again)}",
                 got, grads(torch.float64), grads(kind), [ab, bb, yb, dyb, dab, dbb, againb],
                 same_bits(againb, yb.t))


def conv_formula(x, w, bias, resets):
    """The causal convolution with silu as shifted, masked sums, in x's dtype."""
    t, k = x.shape[1], w.shape[1]
    ids = (resets.long().cumsum(1) + 1) if resets is not None else torch.ones(x.shape[:2])
    pre = bias.expand_as(x) if bias is not None else torch.zeros_like(x)
    for j in range(k):
        shift = k - 1 - j
        if shift >= t:
            continue
        src = torch.nn.functional.pad(x[:, : t - shift], (0, 0, shift, 0))
        src_ids = torch.nn.functional.pad(ids[:, : t - shift], (shift, 0))
        pre = pre + src * w[:, j] * (src_ids == ids).unsqueeze(-1).to(x.dtype)
    return torch.nn.functional.silu(pre)


def run_conv(k, dt, b, t, d, kk, with_bias, documents, columns, seed):
    """x as columns [columns, columns + d) of rows `columns + d + columns` wide (0: contiguous)."""
    kind = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    width = d + 2 * columns
    xfull = rnd(b, t, width).to(kind)
    w = (0.5 * rnd(d, kk)).float()
    bias = rnd(d).float() if with_bias else None
    dy = rnd(b, t, d).to(kind)
    resets = None
    if documents:
        resets = torch.zeros(b, t, dtype=torch.bool)
        for row in range(b):
            for step in (1, 2, 17, 5 + 16 * row, t - 1):
                if 0 < step < t:
                    resets[row, step] = True
    xb = Buffer((b, t, width), kind, 0, xfull)
    xv = xb.t[:, :, columns : columns + d]
    wb = Buffer((d, kk), torch.float32, 0, w)
    bb = Buffer((d,), torch.float32, 0, bias) if with_bias else None
    yb, dyb, dxb = Buffer((b, t, d), kind), Buffer((b, t, d), kind, 0, dy), Buffer((b, t, d), kind)
    vw = vec_width(kind)
    sb, st = t * width, width
    base = d % vw == 0 and sb % vw == 0 and st % vw == 0 and xv.data_ptr() % 16 == 0
    vec = int(base and aligned(yb))
    vec_b = int(base and aligned(dyb, dxb))
    r = resets if resets is not None else 0
    grid = lambda v: (cdiv(d, 32 * (vw if v else 1)), cdiv(t, CONV_RUNS * CONV_STEPS), b)
    k.launch("causal_conv_fwd", grid(vec), 32 * CONV_RUNS, 0,
             [xv, sb, st, wb.t, bb.t if bb else 0, r, yb.t, t, d, kk, vec])
    g = grid(vec_b)
    slots, cols = g[1] * g[2], d * (kk + 1)
    partb, sumb = Buffer((slots, cols), torch.float32), Buffer((cols,), torch.float32)
    k.launch("causal_conv_bwd", g, 32 * CONV_RUNS, 0,
             [xv, sb, st, wb.t, bb.t if bb else 0, r, dyb.t, dxb.t, partb.t, t, d, kk, vec_b])
    k.launch("column_sums", (cdiv(cols, DW_COLUMNS), 1, 1), 256, 0, [partb.t, sumb.t, slots, cols])

    def grads(kind_):
        xs = xfull[:, :, columns : columns + d].to(kind_).requires_grad_()
        # The weights in fp32 beside half-precision activations, as the models keep them.
        pk = torch.float64 if kind_ == torch.float64 else torch.float32
        ws = w.to(pk).requires_grad_()
        bs = bias.to(pk).requires_grad_() if with_bias else None
        y = conv_formula(xs.to(pk), ws, bs, resets).to(kind_)
        y.backward(dy.to(kind_))
        out = {"y": y.detach(), "dx": xs.grad, "dw": ws.grad}
        if with_bias:
            out["dbias"] = bs.grad
        return out

    got = {"y": yb.t, "dx": dxb.t, "dw": sumb.t[: d * kk].view(d, kk)}
    if with_bias:
        got["dbias"] = sumb.t[d * kk :]
    return check(f"conv     {dt:<4} B {b} T {t:<4} D {d:<4} K {kk} bias {int(with_bias)} "
                 f"documents {int(documents)} columns {columns} vec {vec}/{vec_b}",
                 got, grads(torch.float64), grads(kind), [xb, wb, bb, yb, dyb, dxb, partb, sumb])


def run_rotary(k, dt, b, t, h, d, per_row, offset, max_blocks, seed):
    """x [b, t, h, d] `offset` elements off alignment; tables [t, d/2] or [b, t, d/2]."""
    kind = DTYPES[dt]
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    half = d // 2
    x, dy = rnd(b, t, h, d).to(kind), rnd(b, t, h, d).to(kind)
    angles = rnd(*((b, t, half) if per_row else (t, half))) * 3
    cos, sin = angles.cos().float(), angles.sin().float()
    xb, yb = Buffer((b, t, h, d), kind, offset, x), Buffer((b, t, h, d), kind, offset)
    dyb, dxb = Buffer((b, t, h, d), kind, offset, dy), Buffer((b, t, h, d), kind, offset)
    cb, sb = Buffer(cos.shape, torch.float32, 0, cos), Buffer(sin.shape, torch.float32, 0, sin)
    vw = vec_width(kind)
    pairs = b * t * h * half

    def launch(src, dst):
        vec = int(half % vw == 0 and aligned(src, dst, cb, sb))
        blocks = max(1, min(max_blocks, cdiv(pairs // vw if vec else pairs, ROTARY_THREADS)))
        sign = 1.0 if dst is yb else -1.0
        k.launch("rotary", (blocks, 1, 1), ROTARY_THREADS, 0,
                 [src.t, cb.t, sb.t, dst.t, b * t, t, h, half, int(per_row), sign, vec])
        return vec

    vec = launch(xb, yb)
    vec_b = launch(dyb, dxb)

    def grads(kind_):
        xs = x.to(kind_).requires_grad_()
        shape = (b, t, 1, half) if per_row else (t, 1, half)
        c, s_ = cos.to(kind_).view(shape), sin.to(kind_).view(shape)
        x1, x2 = xs[..., :half], xs[..., half:]
        y = torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], -1)
        y.backward(dy.to(kind_))
        return {"y": y.detach(), "dx": xs.grad}

    return check(f"rotary   {dt:<4} B {b} T {t:<4} H {h} D {d:<4} per_row {int(per_row)} "
                 f"offset {offset} vec {vec}/{vec_b} blocks <= {max_blocks}",
                 {"y": yb.t, "dx": dxb.t}, grads(torch.float64), grads(kind),
                 [xb, yb, dyb, dxb, cb, sb])


def check(label, got, exact, naive, bufs, same=True):
    errs, bounds = {}, {}
    for name, ref in exact.items():
        errs[name] = rel_rms(got[name], ref)
        bounds[name] = max(FLOOR, 2 * rel_rms(naive[name], ref))
    ok = same and all(errs[k] <= bounds[k] for k in errs) and all(
        b.margins_intact() for b in bufs if b is not None
    )
    worst = max(errs, key=lambda k: errs[k] / bounds[k])
    print(f"{'ok  ' if ok else 'FAIL'} {label}  worst {worst} {errs[worst]:.1e} "
          f"(bound {bounds[worst]:.1e})"
          + ("" if ok else "  " + " ".join(f"{k} {errs[k]:.1e}/{bounds[k]:.1e}" for k in errs)
             + ("" if all(b.margins_intact() for b in bufs if b is not None)
                else "  a margin was written")
             + ("" if same else "  y written again differs from the forward's")))
    return ok


def cases(quick):
    """(kind, dtype, arguments) of every case."""
    out = []
    for dt in DTYPES:
        # Row lengths (odd, one, the per-head norm's 256, 1000, 4096) at a few row counts.
        for i, (n, rows) in enumerate([(1, 37), (7, 9), (7, 300), (256, 1), (256, 70),
                                       (1000, 13), (4096, 5), (4096, 17)]):
            for gated in (False, True):
                out.append(("norm", dt, (rows, n, gated, 0, 1.0, BWD_TARGET_BLOCKS, 10 * i,
                                         i % 2 == 1)))
        # Unaligned tensors, several rows per warp, large and small rows, saturated gates.
        out.append(("norm", dt, (21, 256, True, 1, 1.0, BWD_TARGET_BLOCKS, 1, True)))
        out.append(("norm", dt, (21, 1000, False, 3, 1.0, BWD_TARGET_BLOCKS, 2, True)))
        out.append(("norm", dt, (70, 256, True, 0, 1.0, 2, 3, True)))
        out.append(("norm", dt, (29, 7, True, 0, 1.0, 1, 4, False)))
        out.append(("norm", dt, (19, 256, True, 0, 30.0 if dt != "f16" else 8.0,
                                 BWD_TARGET_BLOCKS, 5, True)))
        out.append(("norm", dt, (19, 256, False, 0, 1e-3, BWD_TARGET_BLOCKS, 6, False)))
        for i, (numel, offset, scale, max_blocks) in enumerate([
                (1, 0, 1.0, 4096), (7, 0, 1.0, 4096), (2816 * 3, 0, 1.0, 4096),
                (5003, 0, 4.0, 3), (4096, 1, 1.0, 4096), (999, 2, 30.0, 2)]):
            out.append(("swiglu", dt, (numel, offset, scale, max_blocks, numel, i % 2 == 0)))
        # Widths 1 to 4, T below K and across runs and blocks, odd D (the element path), x as
        # columns of a wider row (unaligned: 3; aligned: Mamba's x half), with and without
        # documents.
        for i, (b, t, d, kk, bias, documents, columns) in enumerate([
            (1, 1, 8, 4, True, False, 0), (2, 5, 3, 4, False, True, 0),
            (3, 100, 64, 4, True, True, 0), (2, 130, 136, 3, True, True, 0),
            (2, 77, 40, 2, False, True, 3), (2, 50, 24, 1, True, True, 0),
            (1, 300, 256, 4, True, True, 256), (2, 70, 256, 4, True, False, 8)]):
            out.append(("conv", dt, (b, t, d, kk, bias, documents, columns, 20 + i)))
        # Head dims 2 (one pair), odd halves (the pair-by-pair path), Transformer++'s 64 and
        # 128, shared and per-row tables, unaligned x, a grid smaller than the work.
        for i, (b, t, h, d, per_row, offset, max_blocks) in enumerate([
            (1, 3, 1, 2, False, 0, 4096), (2, 5, 3, 6, True, 0, 4096),
            (2, 17, 4, 64, False, 0, 4096), (2, 9, 2, 128, True, 0, 4096),
            (1, 7, 3, 64, True, 1, 4096), (2, 33, 4, 64, False, 0, 2)]):
            out.append(("rotary", dt, (b, t, h, d, per_row, offset, max_blocks, 40 + i)))
    if quick:
        out = [c for c in out if c[1] == "bf16"][::4]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    kernels = {dt: Kernels("kernels/fused.cu", dt) for dt in DTYPES}
    t0 = time.time()
    results = []
    for kind, dt, a in cases(args.quick):
        run = {"norm": run_norm, "swiglu": run_swiglu, "conv": run_conv,
               "rotary": run_rotary}[kind]
        results.append(run(kernels[dt], dt, *a))
    bad = results.count(False)
    print(f"{len(results) - bad} of {len(results)} cases pass ({time.time() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
