#!/usr/bin/env python3
"""CPU model of kernels/selective_scan.cu's schedule, checked in float64 against autograd of the
plain sequential recurrence.

The model runs the kernels' algorithm step for step, vectorised over what the kernels spread
over threads: the same chunk (32 steps), backward sub-chunk (4 steps), state padding (N up to a
power of two >= 4, as identity states), channel tiles (the backward's 64-channel tiles whose
dB / dC partial sums the reduce kernel adds), backward state passes (16 states each), time
segments (local walks from zero, the carry across segments, then walks from the carried states),
the chunk-start states the forward keeps, the backward's recompute inside each chunk (pass A for
the sub-chunk starts, then per sub-chunk a recompute and a reverse walk), its adjoint written as
mu_t = exp(delta'_{t+1} A) lambda_{t+1}, and the fixed-order reductions (dB, dC over channel
tiles; dA, dD, d(delta_bias) over segments and batch). Padded steps past T, padded states past N
and padded channels past D are run as the kernels run them (zero delta', B, C, dy), so the check
also covers the claim that they change nothing. Rounding is not modelled (float64 throughout):
the check is of the formulas and the schedule, not of fp32 error.

    scripts/selective_scan_model.py            # the whole matrix (a few minutes on 2 cores)
    scripts/selective_scan_model.py --quick    # a subset (seconds)

Exits 1 if any output or gradient differs from autograd by more than 1e-10 relative RMS.
"""

import argparse
import itertools
import math
import sys
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

# Schedule constants, as in kernels/selective_scan.cu.
CHUNK = 32  # steps per chunk: the staging unit and the interval of the kept states
SUB = 4  # steps per backward sub-chunk
NS = 4  # states per thread
BWD_TILE = 64  # channels per backward block (dB / dC partial sums per tile)
MAX_BWD_LANES = 4  # state lanes per channel group in the backward (16 states per pass)
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)
SOFTPLUS_LINEAR = 20.0  # softplus(v) = v past this (mamba_ssm's rule)

Tensor = torch.Tensor


def padded_states(n: int) -> int:
    """States per channel as the kernels lay them out: a power of two >= max(N, 4)."""
    p = 4
    while p < n:
        p *= 2
    return p


def bwd_pass_states(n: int) -> int:
    """States per backward pass: NS x min(padded / NS, MAX_BWD_LANES)."""
    return NS * min(padded_states(n) // NS, MAX_BWD_LANES)


def fwd_channels(n: int) -> int:
    """Channels per forward block: threads / state lanes, threads = max(128, 8 x lanes)."""
    lanes = padded_states(n) // NS
    return max(128, 8 * lanes) // lanes


@dataclass
class Inputs:
    u: Tensor  # [B, T, D]
    delta: Tensor  # [B, T, D]
    A: Tensor  # [D, N]
    Bm: Tensor  # [B, T, N]
    Cm: Tensor  # [B, T, N]
    z: Optional[Tensor] = None  # [B, T, D]
    Dv: Optional[Tensor] = None  # [D]
    bias: Optional[Tensor] = None  # [D]
    h0: Optional[Tensor] = None  # [B, D, N]
    softplus: bool = True
    resets: Optional[Tensor] = None  # [B, T] bool: the state restarts from zero there


def softplus(v: Tensor) -> Tensor:
    below = torch.clamp(v, max=SOFTPLUS_LINEAR)
    return torch.where(v > SOFTPLUS_LINEAR, v, torch.log1p(torch.exp(below)))


def silu_and_grad(z: Tensor):
    s = torch.sigmoid(z)
    return z * s, s * (1 + z * (1 - s))


def pad_to(x: Tensor, dim: int, size: int) -> Tensor:
    if x.shape[dim] == size:
        return x
    shape = list(x.shape)
    shape[dim] = size - x.shape[dim]
    return torch.cat([x, x.new_zeros(shape)], dim)


class Layout:
    """Sizes of one call: the kernels' padded extents, chunks and segments."""

    def __init__(self, x: Inputs, chunks_per_segment: int):
        self.B, self.T, self.D = x.u.shape
        self.N = x.A.shape[1]
        self.NP = padded_states(self.N)
        self.nck = -(-self.T // CHUNK)
        self.Tp = self.nck * CHUNK
        self.cps = chunks_per_segment
        self.S = -(-self.nck // chunks_per_segment)
        self.tiles = -(-self.D // BWD_TILE)
        self.Dp = self.tiles * BWD_TILE

    def chunks(self, s: int) -> range:
        return range(s * self.cps, min((s + 1) * self.cps, self.nck))

    def steps(self, s: int) -> range:
        c = self.chunks(s)
        return range(c.start * CHUNK, c.stop * CHUNK)


class Staged:
    """What the kernels' prep writes to shared memory, for the whole call: delta', x = delta' u,
    B and C, zero on padded steps, channels and states (so those steps are identities)."""

    def __init__(self, x: Inputs, L: Layout):
        v = x.delta if x.bias is None else x.delta + x.bias
        dp = softplus(v) if x.softplus else v
        self.dp = pad_to(pad_to(dp, 1, L.Tp), 2, L.Dp)
        self.x = pad_to(pad_to(dp * x.u, 1, L.Tp), 2, L.Dp)
        self.Bm = pad_to(pad_to(x.Bm, 1, L.Tp), 2, L.NP)
        self.Cm = pad_to(pad_to(x.Cm, 1, L.Tp), 2, L.NP)
        # Padded channels and states take A = 0 (decay 1); with zero inputs their states stay 0.
        self.A = pad_to(pad_to(x.A, 0, L.Dp), 1, L.NP)
        self.A2 = self.A * LOG2E

    def decay(self, t: int, states=slice(None)) -> Tensor:
        """exp2(delta'_t A2) for every channel and the given states: [B, Dp, S]."""
        return torch.exp2(self.dp[:, t, :, None] * self.A2[:, states])

    def drive(self, t: int, states=slice(None)) -> Tensor:
        """x_t B_t: [B, Dp, S]."""
        return self.x[:, t, :, None] * self.Bm[:, t, None, states]


def padded_state(h: Optional[Tensor], L: Layout, like: Tensor) -> Tensor:
    if h is None:
        return like.new_zeros(L.B, L.Dp, L.NP)
    return pad_to(pad_to(h, 1, L.Dp), 2, L.NP)


# ---------------------------------------------------------------------------------------------
# Forward: selective_scan_fwd_states (segments 0 .. S-2 from zero), selective_scan_carry, then
# selective_scan_fwd (every segment from its true start).
# ---------------------------------------------------------------------------------------------


def fwd_states(st: Staged, L: Layout, seg_h: Tensor, dsum: Tensor):
    """Local end state of segment s (walked from zero) into seg_h[s + 1], its delta' sum into
    dsum[s]."""
    for s in range(L.S - 1):
        h = seg_h.new_zeros(L.B, L.Dp, L.NP)
        ds = dsum.new_zeros(L.B, L.Dp)
        for t in L.steps(s):
            h = st.decay(t) * h + st.drive(t)
            ds = ds + st.dp[:, t]
        seg_h[s + 1] = h
        dsum[s] = ds


def carry_forward(seg_h: Tensor, dsum: Tensor, A2: Tensor, h0: Tensor, S: int):
    """seg_h[s + 1] <- exp2(A2 dsum[s]) seg_h[s] + seg_h[s + 1] (local end -> true start)."""
    h = h0
    for s in range(S - 1):
        h = torch.exp2(A2 * dsum[s][..., None]) * h + seg_h[s + 1]
        seg_h[s + 1] = h


def forward(x: Inputs, chunks_per_segment: int):
    L = Layout(x, chunks_per_segment)
    st = Staged(x, L)
    h0 = padded_state(x.h0, L, x.u)
    seg_h = x.u.new_zeros(L.S, L.B, L.Dp, L.NP)
    dsum = x.u.new_zeros(L.S, L.B, L.Dp)
    if L.S > 1:
        fwd_states(st, L, seg_h, dsum)
        carry_forward(seg_h, dsum, st.A2, h0, L.S)
    ckpt = x.u.new_zeros(L.B, L.nck, L.Dp, L.NP)
    y = x.u.new_zeros(L.B, L.Tp, L.Dp)
    hT = None
    for s in range(L.S):
        h = h0 if s == 0 else seg_h[s]
        for j in L.chunks(s):
            ckpt[:, j] = h
            for t in range(j * CHUNK, (j + 1) * CHUNK):
                h = st.decay(t) * h + st.drive(t)
                y[:, t] = (h * st.Cm[:, t, None, :]).sum(-1)
        if s == L.S - 1:
            hT = h
    y = y[:, : L.T, : L.D]
    if x.Dv is not None:
        y = y + x.Dv * x.u
    out = y * silu_and_grad(x.z)[0] if x.z is not None else y
    return out, y, hT[:, : L.D, : L.N], ckpt


# ---------------------------------------------------------------------------------------------
# Backward: selective_scan_bwd_dh (segments 1 .. S-1, adjoint from zero), selective_scan_carry,
# selective_scan_bwd (every segment from its true end adjoint), selective_scan_reduce_*.
# ---------------------------------------------------------------------------------------------


def bwd_dh(st: Staged, dy: Tensor, L: Layout, seg_mu: Tensor, dsum: Tensor):
    """Local adjoint at the start of segment s (walked back from zero) into seg_mu[s - 1], its
    delta' sum into dsum[s]."""
    for s in range(1, L.S):
        mu = seg_mu.new_zeros(L.B, L.Dp, L.NP)
        ds = dsum.new_zeros(L.B, L.Dp)
        for t in reversed(L.steps(s)):
            lam = st.Cm[:, t, None, :] * dy[:, t, :, None] + mu
            mu = st.decay(t) * lam
            ds = ds + st.dp[:, t]
        seg_mu[s - 1] = mu
        dsum[s] = ds


def carry_backward(seg_mu: Tensor, dsum: Tensor, A2: Tensor, dhT: Tensor, S: int):
    """seg_mu[S-1] <- dhT; seg_mu[s - 1] <- exp2(A2 dsum[s]) seg_mu[s] + seg_mu[s - 1]."""
    mu = dhT
    seg_mu[S - 1] = mu
    for s in range(S - 1, 0, -1):
        mu = torch.exp2(A2 * dsum[s][..., None]) * mu + seg_mu[s - 1]
        seg_mu[s - 1] = mu


def tile_sum(v: Tensor, L: Layout) -> Tensor:
    """[B, Dp, S] -> [tiles, B, S]: a backward block's sum over its 64 channels."""
    return v.reshape(L.B, L.tiles, BWD_TILE, -1).sum(2).transpose(0, 1)


def backward(
    x: Inputs,
    dout: Tensor,
    dhT: Optional[Tensor],
    y_pre: Tensor,
    ckpt: Tensor,
    chunks_per_segment: int,
):
    L = Layout(x, chunks_per_segment)
    st = Staged(x, L)
    SP = bwd_pass_states(L.N)
    passes = L.NP // SP
    # Prep: the gradient reaching y_pre, and dz.
    if x.z is not None:
        silu, dsilu = silu_and_grad(x.z)
        dy = dout * silu
        dz = dout * y_pre * dsilu
    else:
        dy, dz = dout, None
    dy = pad_to(pad_to(dy, 1, L.Tp), 2, L.Dp)
    dhT_p = padded_state(dhT, L, x.u)

    seg_mu = x.u.new_zeros(L.S, L.B, L.Dp, L.NP)
    dsum = x.u.new_zeros(L.S, L.B, L.Dp)
    if L.S > 1:
        bwd_dh(st, dy, L, seg_mu, dsum)
        carry_backward(seg_mu, dsum, st.A2, dhT_p, L.S)

    # Block outputs: per-step sums over states (s, ag), partials of dB / dC per channel tile,
    # dA per (segment, batch), dD and d(delta_bias) per (segment, batch), dh0.
    acc_s = x.u.new_zeros(L.B, L.Tp, L.Dp)
    acc_ag = x.u.new_zeros(L.B, L.Tp, L.Dp)  # sum_n A2_n g_n (times ln 2 at assembly)
    part_b = x.u.new_zeros(L.tiles, L.B, L.Tp, L.NP)
    part_c = x.u.new_zeros(L.tiles, L.B, L.Tp, L.NP)
    part_a = x.u.new_zeros(L.S, L.B, L.Dp, L.NP)
    dh0 = None
    for s in range(L.S):
        mu = seg_mu[s].clone() if L.S > 1 else dhT_p.clone()
        for j in reversed(L.chunks(s)):
            t0 = j * CHUNK
            for p in range(passes):
                sl = slice(p * SP, (p + 1) * SP)
                A2p = st.A2[:, sl]
                mu_p = mu[..., sl]
                # Pass A: the chunk walked forward from its kept start, states at sub-chunk starts.
                h = ckpt[:, j][..., sl]
                starts = []
                for sub in range(CHUNK // SUB):
                    starts.append(h)
                    for i in range(SUB):
                        t = t0 + sub * SUB + i
                        h = st.decay(t, sl) * h + st.drive(t, sl)
                for sub in reversed(range(CHUNK // SUB)):
                    # Recompute: the sub-chunk's states and decays (registers in the kernel).
                    h = starts[sub]
                    hs, decays = [], []
                    for i in range(SUB):
                        t = t0 + sub * SUB + i
                        dA = st.decay(t, sl)
                        h = dA * h + st.drive(t, sl)
                        hs.append(h)
                        decays.append(dA)
                    # Reverse walk.
                    for i in reversed(range(SUB)):
                        t = t0 + sub * SUB + i
                        h_prev = hs[i - 1] if i > 0 else starts[sub]
                        lam = st.Cm[:, t, None, sl] * dy[:, t, :, None] + mu_p
                        mu_next = decays[i] * lam  # mu_{t-1}
                        g = mu_next * h_prev  # dL / d(delta'_t A)
                        acc_ag[:, t] += (A2p * g).sum(-1)
                        part_a[s][..., sl] += st.dp[:, t, :, None] * g
                        acc_s[:, t] += (lam * st.Bm[:, t, None, sl]).sum(-1)
                        part_b[:, :, t, sl] += tile_sum(st.x[:, t, :, None] * lam, L)
                        part_c[:, :, t, sl] += tile_sum(dy[:, t, :, None] * hs[i], L)
                        mu_p = mu_next
                mu[..., sl] = mu_p
        if s == 0:
            dh0 = mu
    # Assembly per (t, d) (the kernel's chunk epilogue), then the reduce kernels.
    dp = st.dp[:, : L.T, : L.D]
    s_ = acc_s[:, : L.T, : L.D]
    ag = acc_ag[:, : L.T, : L.D] * LN2
    dyv = dy[:, : L.T, : L.D]
    du = dp * s_
    if x.Dv is not None:
        du = du + x.Dv * dyv
    ddp = x.u * s_ + ag
    if x.softplus:
        sig = torch.where(dp > SOFTPLUS_LINEAR, torch.ones_like(dp), -torch.expm1(-dp))
        ddelta = ddp * sig
    else:
        ddelta = ddp
    # Partials per (segment, batch): each block sums its own steps.
    seg_of_t = torch.tensor([t // (L.cps * CHUNK) for t in range(L.T)])
    part_dD = torch.stack([(dyv * x.u)[:, seg_of_t == s].sum(1) for s in range(L.S)])
    part_db = torch.stack([ddelta[:, seg_of_t == s].sum(1) for s in range(L.S)])
    grads = {
        "u": du,
        "delta": ddelta,
        "A": part_a.sum((0, 1))[: L.D, : L.N],
        "B": part_b.sum(0)[:, : L.T, : L.N],
        "C": part_c.sum(0)[:, : L.T, : L.N],
    }
    if x.Dv is not None:
        grads["D"] = part_dD.sum((0, 1))
    if x.bias is not None:
        grads["bias"] = part_db.sum((0, 1))
    if x.z is not None:
        grads["z"] = dz
    if x.h0 is not None:
        grads["h0"] = dh0[:, : L.D, : L.N]
    return grads


# ---------------------------------------------------------------------------------------------
# Reference: the plain recurrence, differentiated by autograd.
# ---------------------------------------------------------------------------------------------


def reference(x: Inputs, dout: Tensor, dhT: Optional[Tensor]):
    names = ["u", "delta", "A", "B", "C", "z", "D", "bias", "h0"]
    vals = [x.u, x.delta, x.A, x.Bm, x.Cm, x.z, x.Dv, x.bias, x.h0]
    leaves = {n: v.detach().clone().requires_grad_() for n, v in zip(names, vals) if v is not None}
    u, delta, A, Bm, Cm = (leaves[n] for n in ["u", "delta", "A", "B", "C"])
    v = delta + leaves["bias"] if "bias" in leaves else delta
    dp = F.softplus(v) if x.softplus else v  # threshold 20: v itself past it, as mamba_ssm
    h = leaves["h0"] if "h0" in leaves else u.new_zeros(u.shape[0], u.shape[2], A.shape[1])
    ys = []
    for t in range(u.shape[1]):
        decay = torch.exp(dp[:, t, :, None] * A)
        if x.resets is not None:
            decay = decay * (~x.resets[:, t, None, None]).to(decay.dtype)
        h = decay * h + (dp * u)[:, t, :, None] * Bm[:, t, None, :]
        ys.append((h * Cm[:, t, None, :]).sum(-1))
    y = torch.stack(ys, 1)
    if "D" in leaves:
        y = y + leaves["D"] * u
    out = y * F.silu(leaves["z"]) if "z" in leaves else y
    loss = (out * dout).sum()
    if dhT is not None:
        loss = loss + (h * dhT).sum()
    g = torch.autograd.grad(loss, list(leaves.values()))
    return out.detach(), h.detach(), dict(zip(leaves.keys(), g))


def rel_rms(a: Tensor, b: Tensor) -> float:
    den = b.pow(2).mean().sqrt().item()
    num = (a - b).pow(2).mean().sqrt().item()
    return num / den if den > 0 else num


@dataclass
class Case:
    B: int
    T: int
    D: int
    N: int
    z: bool
    Dskip: bool
    bias: bool
    softplus: bool
    h0: bool
    dhT: bool
    cps: int  # chunks per segment (>= chunks: one segment)
    # Restarts (documents) around the chunk edges; the reference alone takes them (the
    # schedule model here does not: kernels/selective_scan.cu is run with them by
    # scripts/selective-scan-emu/run.py).
    restarts: bool = False


def restart_flags(B: int, T: int) -> Tensor:
    """[B, T] restarts at steps 1, 31, 32, 33 and 64 (around the chunk edges), one that moves
    with the row, and the last step."""
    flags = torch.zeros(B, T, dtype=torch.bool)
    for row in range(B):
        for step in (1, 31, 32, 33, 64, 100 + 7 * row, T - 1):
            if 0 < step < T:
                flags[row, step] = True
    return flags


def make(case: Case, seed: int):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    B, T, D, N = case.B, case.T, case.D, case.N
    # Mamba-like steps: delta' = softplus(randn - 1 + bias) ~ 0.3; A = -(1..N) scaled per channel.
    u01 = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    A = -torch.arange(1, N + 1, dtype=torch.float64).expand(D, N) * (0.5 + u01(D, 1))
    delta = r(B, T, D) - 1.0
    if not case.softplus:
        delta = F.softplus(delta)  # keep delta' positive without the fused softplus
    x = Inputs(
        u=r(B, T, D),
        delta=delta,
        A=A.contiguous(),
        Bm=r(B, T, N),
        Cm=r(B, T, N),
        z=r(B, T, D) if case.z else None,
        Dv=r(D) if case.Dskip else None,
        # Without the fused softplus delta' = delta + bias must stay >= 0 (A < 0: decays <= 1).
        bias=(0.5 * r(D) if case.softplus else 0.5 * u01(D)) if case.bias else None,
        h0=r(B, D, N) if case.h0 else None,
        softplus=case.softplus,
        resets=restart_flags(B, T) if case.restarts else None,
    )
    dout = r(B, T, D)
    dhT = r(B, D, N) if case.dhT else None
    return x, dout, dhT


TOL = 1e-10


def check(case: Case, seed: int) -> bool:
    x, dout, dhT = make(case, seed)
    out, y_pre, hT, ckpt = forward(x, case.cps)
    ref_out, ref_hT, ref_g = reference(x, dout, dhT)
    grads = backward(x, dout, dhT, y_pre, ckpt, case.cps)
    errs = {"out": rel_rms(out, ref_out), "hT": rel_rms(hT, ref_hT)}
    for k, v in ref_g.items():
        errs["d" + k] = rel_rms(grads[k], v)
    missing = set(ref_g) - set(grads)
    worst = max(errs.values())
    ok = worst <= TOL and not missing
    L = Layout(x, case.cps)
    on = [case.z, case.Dskip, case.bias, case.softplus, case.h0, case.dhT]
    flags = "".join(c if o else "-" for c, o in zip("zDbsHd", on))
    print(
        f"{'ok  ' if ok else 'FAIL'} B{case.B} T{case.T:<5} D{case.D:<3} N{case.N:<3} {flags} "
        f"segments {L.S:<3} worst {worst:.1e}"
        + ("" if ok else "  " + " ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        + (f" missing {missing}" if missing else "")
    )
    return ok


def cases(quick: bool):
    out = []
    # Every option combination at a small size, one segment and segments of one chunk.
    for flags in itertools.product([False, True], repeat=6):
        for cps in ([1000] if quick else [1000, 1]):
            z, Dskip, bias, softplus, h0, dhT = flags
            out.append(Case(2, 65, 70, 16, z, Dskip, bias, softplus, h0, dhT, cps))
        if quick and len(out) >= 8:
            break
    # Every T x N, with options and segment lengths varied across the grid.
    Ts = [1, 7, 63, 64, 65, 1000, 2049]
    Ns = [1, 4, 16, 64, 256]
    if quick:
        Ts, Ns = [1, 65, 130], [1, 16, 64]
    for i, (T, N) in enumerate(itertools.product(Ts, Ns)):
        bits = [(i >> k) & 1 == 1 for k in range(6)]
        nck = -(-T // CHUNK)
        cps = [1000, 1, 2, 3, max(1, nck // 4)][i % 5]
        D = 70 if N <= 64 else 9
        B = 2 if T * N <= 1000 * 64 else 1
        out.append(
            Case(
                B=B,
                T=T,
                D=D,
                N=N,
                z=bits[0] or N == 16,
                Dskip=bits[1],
                bias=bits[2],
                softplus=not bits[3],
                h0=bits[4] or T == 1,
                dhT=bits[5] or T == 1,
                cps=cps,
            )
        )
    return out


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = [check(c, seed) for seed, c in enumerate(cases(args.quick))]
    bad = results.count(False)
    print(f"{len(results) - bad} of {len(results)} cases within {TOL:.0e} relative RMS")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
