#!/usr/bin/env python3
"""Summarises training runs for the GPU measurements (scripts/gpu-check.sh measure).

For each run directory: tokens/s as the median of the logged windows after the warm-up (windows
that overlap `logging.profile_steps` are left out: the profiler slows them), MFU likewise, the
allocator's peak (allocated, reserved) and the device memory in use, the preflight's memory
estimate and its ratios to the allocator's peak and to the device memory in use (the estimate
counts the CUDA runtime, which the allocator does not see), and the first and last logged loss.
Prints one JSON object per run; with --out, writes them as a JSON list.

    scripts/run-summary.py [--warmup-steps N] [--out FILE] RUN_DIR...
"""
import argparse
import json
import pathlib
import statistics
import tomllib


def summary(run: pathlib.Path, warmup: int) -> dict:
    config = tomllib.loads((run / "config.toml").read_text())
    log_every = config.get("logging", {}).get("log_every", 10)
    profile = config.get("logging", {}).get("profile_steps", [])
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [l for l in lines if "train/loss" in l]

    def overlaps_profile(step: int) -> bool:
        first = step - log_every + 1
        return bool(profile) and first <= profile[1] and step >= profile[0]

    timed = [l for l in steps if l["step"] > warmup and not overlaps_profile(l["step"])]
    median = lambda key: statistics.median(l[key] for l in timed) if timed and key in timed[0] else None
    peak = lambda key: max((l[key] for l in lines if key in l), default=None)
    preflight = json.loads((run / "preflight.json").read_text())
    estimate = preflight["memory"]["total_bytes"]
    peak_allocated = peak("memory/peak_allocated_bytes")
    used = peak("memory/gpu_used_bytes")
    gb = lambda b: None if b is None else round(b / 1e9, 2)
    return {
        "run": run.name,
        "model": config["model"]["type"],
        "seq_len": config.get("data", {}).get("seq_len"),
        "micro_batch_size": config.get("train", {}).get("micro_batch_size"),
        "steps": steps[-1]["step"] if steps else 0,
        "timed_windows": len(timed),
        "tokens_per_s": median("perf/tokens_per_sec"),
        "mfu": median("perf/mfu"),
        "peak_allocated_gb": gb(peak_allocated),
        "peak_reserved_gb": gb(peak("memory/peak_reserved_bytes")),
        "device_used_gb": gb(used),
        "estimate_gb": gb(estimate),
        "estimate_over_peak": None if not peak_allocated else round(estimate / peak_allocated, 3),
        "estimate_over_device_used": None if not used else round(estimate / used, 3),
        "first_loss": steps[0]["train/loss"] if steps else None,
        "last_loss": steps[-1]["train/loss"] if steps else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=pathlib.Path)
    parser.add_argument("--warmup-steps", type=int, default=10)
    parser.add_argument("--out", type=pathlib.Path)
    args = parser.parse_args()
    rows = []
    for run in args.runs:
        try:
            rows.append(summary(run, args.warmup_steps))
        except (OSError, KeyError, ValueError) as e:
            rows.append({"run": run.name, "error": f"{type(e).__name__}: {e}"})
        print(json.dumps(rows[-1]))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
