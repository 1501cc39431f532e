//! libtorch's SDPA backends on the GPU, as the benchmark runs them: restricting the choice to one
//! backend makes libtorch run that one, and each computes causal attention within 2x the error of
//! a naive bf16 computation (both against f64).
//!
//! Block-causal attention over packed documents: its varlen FlashAttention path (bf16, fp16) and
//! its masked path (fp32, head dims FlashAttention refuses), outputs and q, k, v gradients, within
//! max(1e-5, 2x the error of the naive formula run in that dtype) relative RMS of the f64
//! reference, with grouped-query heads, one-token documents and a document filling its row.
//!
//! Skips on machines without CUDA.

use glatrain_ops::sdpa::{
    block_causal_sdpa, causal_sdpa, chosen_backend, flash_takes, naive_block_causal_attention,
    naive_causal_attention as naive, BlockCausal,
};
use glatrain_ops::Documents;
use glatrain_shim::autograd::grad;
use glatrain_shim::sdp::{OnlyBackend, SdpaBackend};
use glatrain_testing::{assert_all_passed, compare, cuda_or_skip, rel_rms, Compared, Rng};
use tch::{Device, Kind, Tensor};

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

const FLOOR: f64 = 1e-5;
const T: i64 = 200;

/// Three rows of 200 tokens. Row 0: documents of 1, 1, 76 and 122 tokens; row 1: one document
/// filling the row; row 2: 199 tokens, then the last alone.
fn documents() -> Documents {
    Documents::new(T as usize, vec![vec![1, 2, 78], vec![], vec![199]]).unwrap()
}

/// Block-causal attention's inputs as f64 on the GPU: q `[3, T, h, d]`, k and v `[3, T, h_kv, d]`
/// and an output gradient.
struct Case {
    qkv: [Tensor; 3],
    dout: Tensor,
}

impl Case {
    fn new(seed: u64, h: i64, h_kv: i64, d: i64, dev: Device) -> Self {
        let mut rng = Rng::new(seed);
        let mut draw = |heads: i64| rng.randn(&[3, T, heads, d], Kind::Double).to_device(dev);
        let qkv = [draw(h), draw(h_kv), draw(h_kv)];
        let dout = draw(h);
        Self { qkv, dout }
    }

    /// `attention`'s output and q, k, v gradients, named, with the inputs in `kind`.
    fn run(
        &self,
        kind: Kind,
        attention: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
    ) -> Vec<(&'static str, Tensor)> {
        let [q, k, v] = self
            .qkv
            .each_ref()
            .map(|x| x.to_kind(kind).detach().set_requires_grad(true));
        let o = attention(&q, &k, &v);
        let grads = grad(&o, &self.dout.to_kind(o.kind()), &[&q, &k, &v]).unwrap();
        let mut named = vec![("o", o.detach())];
        named.extend(["dq", "dk", "dv"].into_iter().zip(grads));
        named
    }

    /// block_causal_sdpa's results with the inputs in `kind`, from `calls` calls (each giving
    /// the first's output: the offsets on the device are reused), against the f64 reference by
    /// the module's rule.
    fn compare(&self, kind: Kind, blocks: &BlockCausal, calls: usize) -> Vec<Compared> {
        let [naive, exact] = [kind, Kind::Double].map(|in_kind| {
            self.run(in_kind, |q, k, v| {
                naive_block_causal_attention(q, k, v, blocks, in_kind)
            })
        });
        let (h, h_kv, d) = (
            self.qkv[0].size()[2],
            self.qkv[1].size()[2],
            self.qkv[0].size()[3],
        );
        let mut compared = Vec::new();
        let mut first: Option<Tensor> = None;
        for call in 0..calls {
            let label = format!("{kind:?} H {h} H_kv {h_kv} D {d} call {call}");
            let got = self.run(kind, |q, k, v| block_causal_sdpa(q, k, v, blocks).unwrap());
            let o = first.get_or_insert_with(|| got[0].1.shallow_clone());
            assert!(got[0].1.equal(o), "{label}: the output changed");
            compared.extend(compare(&label, &got, &exact, Some(&naive), FLOOR));
        }
        compared
    }

    /// Whether block_causal_sdpa takes the FlashAttention path for these inputs in `kind`.
    fn flash(&self, kind: Kind) -> bool {
        let [q, k, v] = self.qkv.each_ref().map(|x| x.to_kind(kind));
        flash_takes(&q, &k, &v).unwrap()
    }
}

#[test]
fn block_causal_flash_matches_the_masked_reference_in_half_precision() {
    let Some(dev) = cuda_or_skip() else {
        return;
    };
    let blocks = BlockCausal::new(&documents(), dev).unwrap();
    let mut compared = Vec::new();
    for kind in [Kind::BFloat16, Kind::Half] {
        // Multi-head, and grouped-query with 4 query heads a key head.
        for (h, h_kv) in [(4, 4), (8, 2)] {
            let case = Case::new(11, h, h_kv, 64, dev);
            assert!(
                case.flash(kind),
                "{kind:?}, H {h}, H_kv {h_kv}: not on FlashAttention"
            );
            compared.extend(case.compare(kind, &blocks, 3));
        }
    }
    assert_all_passed(&compared);
}

#[test]
fn block_causal_inputs_flash_refuses_take_the_masked_path() {
    let Some(dev) = cuda_or_skip() else {
        return;
    };
    let blocks = BlockCausal::new(&documents(), dev).unwrap();
    let mut compared = Vec::new();
    // fp32; a head dim that is not a multiple of 8 in bf16; grouped-query heads in both.
    for (kind, d) in [(Kind::Float, 64), (Kind::BFloat16, 12)] {
        let case = Case::new(12, 6, 3, d, dev);
        assert!(!case.flash(kind), "{kind:?}, D {d}: on FlashAttention");
        compared.extend(case.compare(kind, &blocks, 1));
    }
    assert_all_passed(&compared);
}
