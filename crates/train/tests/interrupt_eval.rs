//! SIGTERM during a periodic evaluation: the evaluation stops at its next batch (a whole one
//! over the validation set takes seconds here, minutes on real data) and the run checkpoints
//! its last step and returns. Its own test binary, because the signal flag is per process.

mod common;

use std::time::{Duration, Instant};

use common::logged;
use glatrain_train::checkpoint;
use glatrain_train::{train, TrainOptions};

#[test]
fn sigterm_during_an_evaluation_stops_it_at_the_next_batch() {
    let tmp = tempfile::tempdir().unwrap();
    // An evaluation after step 2, over the whole embedded validation set.
    let overrides = [
        "run.name=sig-eval",
        "train.max_steps=100",
        "train.eval_every=2",
        "train.eval_batches=0",
    ];
    let cfg = common::config(tmp.path(), &overrides.map(String::from));
    let run_dir = tmp.path().join("sig-eval");
    let signaller = {
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            // Step 2 is logged just before its evaluation starts.
            common::wait_for(&run_dir, |records| records.iter().any(|v| v["step"] == 2));
            std::thread::sleep(Duration::from_millis(200));
            common::sigterm_self()
        })
    };
    let summary = train(cfg, &TrainOptions::default()).unwrap();
    let returned = Instant::now();
    let signalled = signaller.join().unwrap();
    assert_eq!(summary.final_step, 2);
    assert!(summary.stopped_early);
    assert_eq!(summary.interrupted.map(|s| s.exit_status()), Some(143));
    checkpoint::verify(&run_dir.join("checkpoints/step-2")).unwrap();
    // The evaluation was cut short: it logged nothing.
    assert!(
        !logged(&run_dir)
            .iter()
            .any(|v| v.get("eval/loss").is_some()),
        "the evaluation ran to its end"
    );
    let waited = returned.duration_since(signalled);
    assert!(
        waited < Duration::from_secs(5),
        "returned {waited:?} after the signal"
    );
}
