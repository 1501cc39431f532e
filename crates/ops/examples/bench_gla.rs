//! Benchmark of the GLA kernels next to libtorch's SDPA (flash) on the ANCHORS.md shapes.
//!
//! For each B x T x H x D (K = V = D, bf16 q/k/v, f32 log gates) and each mode: forward, and
//! forward + backward (`sum(o * do).backward()`, the same for SDPA), as CUDA-event medians after
//! warm-up, on the legacy default stream that libtorch uses. Also the first call's wall time
//! (NVRTC compilation into an empty cache, then module load), and each shape's memory floor.
//! Prints a table; writes JSON to the path given as the first argument (default
//! `bench/results/gla-<gpu>-<date>.json`).
//!
//!     cargo build --release -p glatrain-ops --example bench_gla
//!     target/release/examples/bench_gla [out.json]

use std::time::Instant;

use cudarc::driver::sys::CUevent_flags;
use glatrain_ops::cuda::compile::compile_uncached;
use glatrain_ops::cuda::{Device as CudaDevice, KernelDtype, KernelSource};
use glatrain_ops::{gla, GlaMode};
use serde_json::json;
use tch::{Device, Kind, Tensor};

/// Device-to-device copy bandwidth of an H100 SXM measured on the bench machine (bytes read +
/// written), used for the memory floor.
const COPY_BYTES_PER_S: f64 = 3.0e12;

const SHAPES: [(i64, i64, i64, i64); 6] = [
    (8, 2048, 16, 32),
    (8, 2048, 16, 64),
    (8, 2048, 16, 128),
    (4, 4096, 16, 128),
    (2, 8192, 16, 128),
    (1, 16384, 16, 128),
];

/// FLA chunk_gla fwd+bwd from ANCHORS.md (ms), for the same shapes.
const FLA_FWD_BWD_MS: [f64; 6] = [2.41, 2.81, 3.69, 3.74, 3.97, 4.53];

struct Timer {
    dev: std::sync::Arc<CudaDevice>,
}

impl Timer {
    /// Median over `iters` event-timed calls of `f`, after `warmup` untimed calls.
    fn median_ms(&self, warmup: usize, iters: usize, mut f: impl FnMut()) -> f64 {
        for _ in 0..warmup {
            f();
        }
        let ctx = self.dev.context();
        let mut times = Vec::with_capacity(iters);
        for _ in 0..iters {
            let start = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            let end = ctx
                .new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .unwrap();
            start.record(self.dev.stream()).unwrap();
            f();
            end.record(self.dev.stream()).unwrap();
            times.push(start.elapsed_ms(&end).unwrap() as f64);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        times[times.len() / 2]
    }
}

/// GLA in `mode`, or causal SDPA (libtorch's flash kernel for bf16) when `mode` is None.
fn attention(mode: Option<GlaMode>, q: &Tensor, k: &Tensor, v: &Tensor, g: &Tensor) -> Tensor {
    match mode {
        Some(m) => gla(q, k, v, g, None, None, m, false).unwrap().0,
        None => {
            // [B, T, H, D] -> [B, H, T, D] views; SDPA handles the strides.
            let tr = |x: &Tensor| x.transpose(1, 2);
            Tensor::scaled_dot_product_attention::<Tensor>(
                &tr(q),
                &tr(k),
                &tr(v),
                None,
                0.0,
                true,
                None,
                false,
            )
            .transpose(1, 2)
        }
    }
}

fn today() -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm), UTC.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

fn main() {
    if !tch::Cuda::is_available() {
        println!("skipped: no CUDA device");
        return;
    }
    let dev = Device::Cuda(0);
    let cuda = CudaDevice::get(0).expect("CUDA device");
    let gpu = cuda.context().name().unwrap_or_else(|_| "unknown".into());
    let timer = Timer { dev: cuda.clone() };
    let _guard = tch::no_grad_guard();

    // First call into an empty kernel cache: NVRTC compilation of the bf16 module, load, run.
    let cache = std::env::temp_dir().join(format!("glatrain-bench-cache-{}", std::process::id()));
    std::env::set_var("GLATRAIN_CACHE_DIR", &cache);
    let small = Tensor::randn([1, 64, 1, 128], (Kind::BFloat16, dev));
    let gsmall = Tensor::randn([1, 64, 1, 128], (Kind::Float, dev)).log_sigmoid() / 16.0;
    let t0 = Instant::now();
    let (o, _) = gla(
        &small,
        &small,
        &small,
        &gsmall,
        None,
        None,
        GlaMode::Chunk,
        false,
    )
    .unwrap();
    o.sum(Kind::Float).double_value(&[]);
    let first_call_s = t0.elapsed().as_secs_f64();
    println!("first call (NVRTC compile of the bf16 module + load + run): {first_call_s:.2} s");
    let t0 = Instant::now();
    compile_uncached(KernelSource::Gla, KernelDtype::Bf16, cuda.arch()).unwrap();
    let compile_s = t0.elapsed().as_secs_f64();
    println!("NVRTC compile of the bf16 module alone: {compile_s:.2} s");

    let mut rows = Vec::new();
    println!(
        "{:<20} {:<15} {:>9} {:>11} {:>9} {:>10} {:>10}",
        "B x T x H x D", "mode", "fwd ms", "fwd+bwd ms", "floor ms", "x floor", "vs FLA"
    );
    for (si, &(b, t, h, d)) in SHAPES.iter().enumerate() {
        let n = (b * t * h * d) as f64;
        // fwd reads q, k, v (bf16), g (f32), writes o (bf16); bwd reads q, k, v, do, g and writes
        // dq, dk, dv (bf16), dg (f32).
        let floor_fwd = 12.0 * n / COPY_BYTES_PER_S * 1e3;
        let floor_fb = 34.0 * n / COPY_BYTES_PER_S * 1e3;
        let q = Tensor::randn([b, t, h, d], (Kind::BFloat16, dev));
        let k = Tensor::randn([b, t, h, d], (Kind::BFloat16, dev));
        let v = Tensor::randn([b, t, h, d], (Kind::BFloat16, dev));
        let g = Tensor::randn([b, t, h, d], (Kind::Float, dev)).log_sigmoid() / 16.0;
        let d_o = Tensor::randn([b, t, h, d], (Kind::BFloat16, dev));
        let shape = format!("{b} x {t} x {h} x {d}");
        let iters = if t * b >= 16384 { 10 } else { 20 };

        let mut modes: Vec<(&str, Option<GlaMode>)> = vec![
            ("chunk", Some(GlaMode::Chunk)),
            ("fused_chunk", Some(GlaMode::FusedChunk)),
        ];
        if d <= 64 {
            modes.push(("fused_recurrent", Some(GlaMode::FusedRecurrent)));
        }
        modes.push(("sdpa_flash", None));
        for (name, mode) in modes {
            let fwd = timer.median_ms(3, iters, || {
                let _ = attention(mode, &q, &k, &v, &g);
            });
            let leaves: Vec<Tensor> = [&q, &k, &v, &g]
                .iter()
                .map(|x| x.detach().set_requires_grad(true))
                .collect();
            let fb = timer.median_ms(2, iters, || {
                tch::with_grad(|| {
                    let o = attention(mode, &leaves[0], &leaves[1], &leaves[2], &leaves[3]);
                    let loss = (o * &d_o).sum(Kind::Float);
                    // Returns the gradients without accumulating them into the leaves.
                    Tensor::run_backward(&[&loss], &leaves, false, false);
                });
            });
            let vs_fla = fb / FLA_FWD_BWD_MS[si];
            println!(
                "{shape:<20} {name:<15} {fwd:>9.3} {fb:>11.3} {floor_fb:>9.3} {:>10.1} {vs_fla:>10.2}",
                fb / floor_fb
            );
            rows.push(json!({
                "shape": {"B": b, "T": t, "H": h, "K": d, "V": d},
                "mode": name,
                "fwd_ms": fwd,
                "fwd_bwd_ms": fb,
                "floor_fwd_ms": floor_fwd,
                "floor_fwd_bwd_ms": floor_fb,
                "fla_chunk_fwd_bwd_ms_anchor": FLA_FWD_BWD_MS[si],
            }));
        }
    }
    let out = std::env::args().nth(1).unwrap_or_else(|| {
        let card = if gpu.contains("H100") {
            "h100"
        } else if gpu.contains("H200") {
            "h200"
        } else {
            "gpu"
        };
        format!("bench/results/gla-{card}-{}.json", today())
    });
    let report = json!({
        "gpu": gpu,
        "date": today(),
        "dtype": "bf16 q/k/v, f32 log gates",
        "timing": "CUDA-event median after warm-up; fwd+bwd = forward + sum(o*do).backward()",
        "floor": "bytes moved once at 3.0 TB/s: fwd 12 B/elem, fwd+bwd 34 B/elem of B*T*H*D",
        "first_call_s": first_call_s,
        "nvrtc_compile_s": compile_s,
        "rows": rows,
    });
    std::fs::write(&out, serde_json::to_string_pretty(&report).unwrap())
        .unwrap_or_else(|e| panic!("cannot write {out}: {e}"));
    let _ = std::fs::remove_dir_all(&cache);
    println!("wrote {out}");
}
