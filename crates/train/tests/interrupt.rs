//! SIGTERM during training: the step finishes, a checkpoint is written, `train` returns normally,
//! and `--resume` finishes the run. Its own test binary, because the signal flag is per process.

mod common;

use glatrain_train::checkpoint;
use glatrain_train::{train, TrainOptions};

#[test]
fn sigterm_checkpoints_and_resume_finishes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = |overrides: &[String]| common::config(tmp.path(), overrides);
    let run_dir = tmp.path().join("sig");

    let signaller = {
        let run_dir = run_dir.clone();
        std::thread::spawn(move || {
            // Training has started (and the handler is installed) once steps are logged.
            common::wait_for(&run_dir, |records| records.len() >= 3);
            common::sigterm_self();
        })
    };
    let first = train(cfg(&[]), &TrainOptions::default()).unwrap();
    signaller.join().unwrap();
    assert!(first.stopped_early);
    assert_eq!(first.interrupted.map(|s| s.exit_status()), Some(143));
    assert!(first.final_step >= 3 && first.final_step < 100_000);
    let ck = first.checkpoint.unwrap();
    assert_eq!(
        ck,
        run_dir
            .join("checkpoints")
            .join(checkpoint::step_dir_name(first.final_step))
    );
    checkpoint::verify(&ck).unwrap();

    // Resume and finish a little later (a shorter run: max_steps is not part of the model).
    let end = first.final_step + 5;
    let second = train(
        cfg(&[format!("train.max_steps={end}")]),
        &TrainOptions {
            resume: true,
            stop_after: None,
            world: None,
        },
    )
    .unwrap();
    assert_eq!(second.start_step, first.final_step);
    assert_eq!(second.final_step, end);
    assert!(!second.stopped_early && second.interrupted.is_none());
    assert!(second.eval.is_some());
}
