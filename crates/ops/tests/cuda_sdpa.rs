//! libtorch's SDPA backends on the GPU, as the benchmark runs them: restricting the choice to one
//! backend makes libtorch run that one, and each computes causal attention within 2x the error of
//! a naive bf16 computation (both against f64). Skips on machines without CUDA.

use glatrain_ops::sdpa::{causal_sdpa, chosen_backend, naive_causal_attention as naive};
use glatrain_shim::sdp::{OnlyBackend, SdpaBackend};
use glatrain_testing::{cuda_or_skip, rel_rms};
use tch::{Kind, Tensor};

#[test]
fn each_backend_runs_when_chosen_alone_and_computes_attention() {
    let Some(dev) = cuda_or_skip() else {
        return;
    };
    tch::manual_seed(7);
    let [q, k, v] = [0, 1, 2].map(|_| Tensor::randn([2, 200, 4, 64], (Kind::BFloat16, dev)));
    let exact = naive(&q, &k, &v, Kind::Double);
    let naive_err = rel_rms(&naive(&q, &k, &v, Kind::BFloat16), &exact);
    println!(
        "libtorch's own choice: {:?}",
        chosen_backend(&q, &k, &v).unwrap()
    );
    for backend in [
        SdpaBackend::Flash,
        SdpaBackend::Cudnn,
        SdpaBackend::Efficient,
    ] {
        let _only = OnlyBackend::new(backend);
        match chosen_backend(&q, &k, &v).unwrap() {
            Some(chosen) => assert_eq!(chosen, backend),
            None => {
                // cuDNN's attention is missing from some builds and GPUs.
                println!("{}: not available here", backend.name());
                continue;
            }
        }
        let err = rel_rms(&causal_sdpa(&q, &k, &v).unwrap(), &exact);
        println!(
            "{}: rel RMS {err:.2e} (naive bf16 {naive_err:.2e})",
            backend.name()
        );
        assert!(
            err <= 2.0 * naive_err,
            "{}: {err} > 2 x {naive_err}",
            backend.name()
        );
    }
}
