//! Every kernel of every source compiles with NVRTC (one program per kernel), for each dtype it is
//! instantiated for, for sm_90 (H100) and sm_80 (A100), at both tiers.
//!
//! Runs on machines without a GPU: only libnvrtc is needed (the torch wheel ships it, and the
//! test binary has an rpath to it), so a kernel that does not compile fails CI.

use glatrain_cuda::compile::compile_uncached;
use glatrain_cuda::Tier;

#[test]
fn every_kernel_compiles_for_sm90_and_sm80_at_both_tiers() {
    let mut jobs = Vec::new();
    for source in glatrain_ops::kernel_sources() {
        for &dtype in source.dtypes {
            for arch in ["sm_90", "sm_80"] {
                jobs.push((source, dtype, arch, Tier::Full));
            }
            // The quick code runs only until the optimised code is in: the GPU the tests run on.
            jobs.push((source, dtype, "sm_90", Tier::Quick));
        }
    }
    // Two at a time: the compilations are independent and CI machines have a few cores.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .chunks(jobs.len().div_ceil(2))
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|&(source, dtype, arch, tier)| {
                            let start = std::time::Instant::now();
                            let result = compile_uncached(source, dtype, arch, tier);
                            println!(
                                "{} {dtype:?} {arch} {}: {:.2} s",
                                source.file,
                                tier.name(),
                                start.elapsed().as_secs_f64()
                            );
                            match result {
                                Ok(compiled)
                                    if compiled.len() == source.kernels.len()
                                        && compiled.iter().all(|c| c.cubin.len() > 1000) =>
                                {
                                    None
                                }
                                Ok(compiled) => Some(format!(
                                    "{} {dtype:?} {arch} {tier:?}: {} CUBINs for {} kernels, sizes {:?}",
                                    source.file,
                                    compiled.len(),
                                    source.kernels.len(),
                                    compiled.iter().map(|c| c.cubin.len()).collect::<Vec<_>>()
                                )),
                                Err(e) => Some(e.to_string()),
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
