//! Batches for training and evaluation, as plain `i64` data the trainer turns into tensors.
//!
//! Training: each epoch cuts the source into non-overlapping windows of `seq_len + 1` tokens (one
//! token shared between neighbours, so every token after the first is a target exactly once per
//! epoch), starting at a random offset below `seq_len`, and visits them in a shuffled order. The
//! offset and order come from ChaCha8 seeded with `seed` on stream `epoch`, so the whole batch
//! sequence is a pure function of (seed, source length, seq_len) and a [`LoaderState`] of a few
//! integers resumes it exactly. Epochs follow each other without end.
//!
//! Evaluation: [`EvalBatches`] walks the same kind of windows in order from offset 0.
//!
//! Either, asked for document starts (`with_document_starts`), also gives each row the positions
//! where its input tokens begin documents, found in the source's record for the row's window: a
//! pure function of the window, so resuming stays exact and the state does not change.

use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::source::TokenSource;

/// A batch of `rows` sequences.
///
/// # Shapes
/// `inputs` and `targets`: row-major `[rows, seq_len]`; `targets[r][t] = inputs[r][t + 1]` of the
/// underlying window, i.e. the next token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    /// Token ids fed to the model, `[rows, seq_len]`.
    pub inputs: Vec<i64>,
    /// Next-token targets, `[rows, seq_len]`.
    pub targets: Vec<i64>,
    /// Number of sequences (the micro batch, or fewer for the last evaluation batch).
    pub rows: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Per row, the positions in `1..seq_len` where an input token begins a document, increasing
    /// (position 0 is taken to begin one, whatever came before the window); `None` unless the
    /// loader was asked for document starts.
    pub document_starts: Option<Vec<Vec<usize>>>,
}

impl Batch {
    fn with_capacity(rows: usize, seq_len: usize, document_starts: bool) -> Self {
        Batch {
            inputs: Vec::with_capacity(rows * seq_len),
            targets: Vec::with_capacity(rows * seq_len),
            rows: 0,
            seq_len,
            document_starts: document_starts.then(|| Vec::with_capacity(rows)),
        }
    }

    /// Appends the window of `seq_len + 1` tokens starting at `start` (and its document starts,
    /// when the batch has them).
    fn push_window(&mut self, source: &TokenSource, start: u64, window: &mut [i64]) {
        source.read(start, window);
        self.inputs.extend_from_slice(&window[..self.seq_len]);
        self.targets.extend_from_slice(&window[1..]);
        self.rows += 1;
        if let Some(rows) = &mut self.document_starts {
            let inner = start + 1..start + self.seq_len as u64;
            let starts = source
                .document_starts(inner)
                .expect("asked for document starts only where the source has them");
            rows.push(starts.into_iter().map(|p| (p - start) as usize).collect());
        }
    }

    /// Number of target tokens (`rows * seq_len`).
    pub fn num_tokens(&self) -> usize {
        self.rows * self.seq_len
    }
}

/// Where a [`BatchLoader`] stands; stored in checkpoints to resume the exact batch sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    /// Seed of the shuffles.
    pub seed: u64,
    /// Sequence length the windows were cut for.
    pub seq_len: usize,
    /// Length of the source the state belongs to (a guard against resuming on other data).
    pub source_tokens: u64,
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Windows of this epoch already served (always below the epoch's window count).
    pub cursor: u64,
    /// Batches served since the start of training.
    pub batches: u64,
}

/// One epoch's window layout.
struct Epoch {
    offset: u64,
    order: Vec<u64>,
}

impl Epoch {
    fn new(seed: u64, epoch: u64, len: u64, seq_len: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch);
        // Largest offset that still leaves one full window.
        let max_offset = (seq_len - 1).min(len - 1 - seq_len);
        let offset = rng.random_range(0..=max_offset);
        let windows = (len - 1 - offset) / seq_len;
        let mut order: Vec<u64> = (0..windows).collect();
        order.shuffle(&mut rng);
        Epoch { offset, order }
    }
}

/// Endless, deterministic training batches over a [`TokenSource`].
pub struct BatchLoader {
    source: Arc<TokenSource>,
    micro_batch: usize,
    seq_len: usize,
    seed: u64,
    epoch_index: u64,
    cursor: u64,
    batches: u64,
    epoch: Epoch,
    window: Vec<i64>,
    document_starts: bool,
}

impl std::fmt::Debug for BatchLoader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchLoader")
            .field("source", &self.source.name())
            .field("micro_batch", &self.micro_batch)
            .field("state", &self.state())
            .finish()
    }
}

fn check_shape(source: &TokenSource, micro_batch: usize, seq_len: usize) -> Result<()> {
    let bad = |what: String| DataError::Loader {
        source_name: source.name().to_string(),
        what,
    };
    if micro_batch == 0 {
        return Err(bad("micro batch size must be at least 1, got 0".into()));
    }
    if seq_len == 0 {
        return Err(bad("seq_len must be at least 1, got 0".into()));
    }
    if source.len() < seq_len as u64 + 1 {
        return Err(bad(format!(
            "{} tokens cannot fill one sequence of seq_len + 1 = {} tokens",
            source.len(),
            seq_len + 1
        )));
    }
    Ok(())
}

/// Errors unless `source` records where its documents begin.
fn check_document_starts(source: &TokenSource) -> Result<()> {
    if source.has_document_starts() {
        return Ok(());
    }
    Err(DataError::Loader {
        source_name: source.name().to_string(),
        what: "records no document starts (a dataset directory that `glatrain prepare` writes \
               has them)"
            .into(),
    })
}

impl BatchLoader {
    /// A loader at the start of epoch 0.
    pub fn new(
        source: Arc<TokenSource>,
        micro_batch: usize,
        seq_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let state = LoaderState {
            seed,
            seq_len,
            source_tokens: source.len(),
            epoch: 0,
            cursor: 0,
            batches: 0,
        };
        BatchLoader::with_state(source, micro_batch, &state)
    }

    /// A loader that continues exactly where `state` was taken. `micro_batch` may differ from the
    /// one that produced the state (the state counts windows, not batches).
    pub fn with_state(
        source: Arc<TokenSource>,
        micro_batch: usize,
        state: &LoaderState,
    ) -> Result<Self> {
        check_shape(&source, micro_batch, state.seq_len)?;
        let bad = |what: String| DataError::LoaderState {
            source_name: source.name().to_string(),
            what,
        };
        if state.source_tokens != source.len() {
            return Err(bad(format!(
                "the saved state is for a source of {} tokens, this one has {}",
                state.source_tokens,
                source.len()
            )));
        }
        let epoch = Epoch::new(state.seed, state.epoch, source.len(), state.seq_len as u64);
        if state.cursor >= epoch.order.len() as u64 {
            return Err(bad(format!(
                "cursor {} is not below the {} windows of epoch {}",
                state.cursor,
                epoch.order.len(),
                state.epoch
            )));
        }
        Ok(BatchLoader {
            micro_batch,
            seq_len: state.seq_len,
            seed: state.seed,
            epoch_index: state.epoch,
            cursor: state.cursor,
            batches: state.batches,
            epoch,
            window: vec![0; state.seq_len + 1],
            source,
            document_starts: false,
        })
    }

    /// This loader with each batch's document starts ([`Batch::document_starts`]); errors when
    /// the source does not record them.
    pub fn with_document_starts(mut self) -> Result<Self> {
        check_document_starts(&self.source)?;
        self.document_starts = true;
        Ok(self)
    }

    /// The position to save in a checkpoint.
    pub fn state(&self) -> LoaderState {
        LoaderState {
            seed: self.seed,
            seq_len: self.seq_len,
            source_tokens: self.source.len(),
            epoch: self.epoch_index,
            cursor: self.cursor,
            batches: self.batches,
        }
    }

    /// Windows per epoch (it varies by one or so with the epoch's random offset).
    pub fn windows_per_epoch(&self) -> u64 {
        self.epoch.order.len() as u64
    }

    /// The source batches are drawn from.
    pub fn source(&self) -> &Arc<TokenSource> {
        &self.source
    }

    /// The next `micro_batch` windows, moving to the next epoch when one is used up.
    pub fn next_batch(&mut self) -> Batch {
        let mut batch = Batch::with_capacity(self.micro_batch, self.seq_len, self.document_starts);
        for _ in 0..self.micro_batch {
            let window = self.epoch.order[self.cursor as usize];
            let start = self.epoch.offset + window * self.seq_len as u64;
            batch.push_window(&self.source, start, &mut self.window);
            self.cursor += 1;
            // Advance eagerly so a saved state always points at a window still to serve.
            if self.cursor == self.epoch.order.len() as u64 {
                self.epoch_index += 1;
                self.cursor = 0;
                self.epoch = Epoch::new(
                    self.seed,
                    self.epoch_index,
                    self.source.len(),
                    self.seq_len as u64,
                );
            }
        }
        self.batches += 1;
        batch
    }
}

/// Sequential, non-overlapping evaluation windows from the start of a source, in batches.
///
/// Window `i` covers tokens `i * seq_len ..= (i + 1) * seq_len`, so over all windows every token
/// from index 1 to `windows * seq_len` is a target exactly once; the tail of fewer than `seq_len`
/// tokens is left out. The last batch may have fewer rows.
pub struct EvalBatches<'a> {
    source: &'a TokenSource,
    micro_batch: usize,
    seq_len: usize,
    next_window: u64,
    end_window: u64,
    window: Vec<i64>,
    document_starts: bool,
}

impl<'a> EvalBatches<'a> {
    /// Batches over `source`; `max_batches` limits them (`None`: all windows).
    pub fn new(
        source: &'a TokenSource,
        micro_batch: usize,
        seq_len: usize,
        max_batches: Option<usize>,
    ) -> Result<Self> {
        check_shape(source, micro_batch, seq_len)?;
        let windows = (source.len() - 1) / seq_len as u64;
        let end_window = match max_batches {
            Some(n) => windows.min(n as u64 * micro_batch as u64),
            None => windows,
        };
        Ok(EvalBatches {
            source,
            micro_batch,
            seq_len,
            next_window: 0,
            end_window,
            window: vec![0; seq_len + 1],
            document_starts: false,
        })
    }

    /// These batches with their document starts ([`Batch::document_starts`]); errors when the
    /// source does not record them.
    pub fn with_document_starts(mut self) -> Result<Self> {
        check_document_starts(self.source)?;
        self.document_starts = true;
        Ok(self)
    }

    /// Target tokens over all batches (for weighting and bits per byte).
    pub fn total_tokens(&self) -> u64 {
        self.end_window * self.seq_len as u64
    }

    /// The source the batches come from.
    pub fn source(&self) -> &'a TokenSource {
        self.source
    }

    /// Tokens per sequence.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next_window == self.end_window {
            return None;
        }
        let rows = (self.end_window - self.next_window).min(self.micro_batch as u64) as usize;
        let mut batch = Batch::with_capacity(rows, self.seq_len, self.document_starts);
        for _ in 0..rows {
            let start = self.next_window * self.seq_len as u64;
            batch.push_window(self.source, start, &mut self.window);
            self.next_window += 1;
        }
        Some(batch)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.end_window - self.next_window).div_ceil(self.micro_batch as u64) as usize;
        (left, Some(left))
    }
}

impl ExactSizeIterator for EvalBatches<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tests::positions_with_documents;

    /// A source whose token at position i is i (so windows reveal where they came from).
    fn positions(len: u32) -> Arc<TokenSource> {
        let tokens: Vec<u32> = (0..len).collect();
        Arc::new(TokenSource::from_tokens("positions", &tokens, len, None).unwrap())
    }

    fn take(loader: &mut BatchLoader, n: usize) -> Vec<Batch> {
        (0..n).map(|_| loader.next_batch()).collect()
    }

    #[test]
    fn batches_are_shifted_windows() {
        let mut loader = BatchLoader::new(positions(1000), 3, 16, 7).unwrap();
        let batch = loader.next_batch();
        assert_eq!((batch.rows, batch.seq_len, batch.num_tokens()), (3, 16, 48));
        assert_eq!(batch.inputs.len(), 48);
        for r in 0..3 {
            let inputs = &batch.inputs[r * 16..(r + 1) * 16];
            let targets = &batch.targets[r * 16..(r + 1) * 16];
            for t in 0..16 {
                assert_eq!(targets[t], inputs[t] + 1);
                if t > 0 {
                    assert_eq!(inputs[t], inputs[t - 1] + 1);
                }
            }
        }
    }

    #[test]
    fn same_seed_same_batches_different_seed_different() {
        let source = positions(5000);
        let a = take(&mut BatchLoader::new(source.clone(), 4, 32, 1).unwrap(), 50);
        let b = take(&mut BatchLoader::new(source.clone(), 4, 32, 1).unwrap(), 50);
        let c = take(&mut BatchLoader::new(source, 4, 32, 2).unwrap(), 50);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn each_epoch_covers_its_windows_once_in_a_new_order() {
        let seq_len = 10u64;
        let mut loader = BatchLoader::new(positions(1001), 1, seq_len as usize, 3).unwrap();
        let mut previous: Option<Vec<i64>> = None;
        for epoch in 0..4 {
            assert_eq!(loader.state().epoch, epoch);
            let n = loader.windows_per_epoch();
            let starts: Vec<i64> = (0..n).map(|_| loader.next_batch().inputs[0]).collect();
            let mut sorted = starts.clone();
            sorted.sort();
            let offset = sorted[0];
            assert!(offset < seq_len as i64);
            let expected: Vec<i64> = (0..n as i64).map(|w| offset + w * seq_len as i64).collect();
            assert_eq!(
                sorted, expected,
                "epoch {epoch}: windows are not a partition"
            );
            assert!(offset as u64 + n * seq_len < 1001);
            assert_ne!(
                previous.as_ref(),
                Some(&starts),
                "epoch {epoch} repeats the order"
            );
            previous = Some(starts);
            assert_eq!(
                (loader.state().epoch, loader.state().cursor),
                (epoch + 1, 0)
            );
        }
    }

    #[test]
    fn resume_continues_the_exact_sequence() {
        let source = positions(3000);
        // 45 or 46 windows of 64 per epoch: 40 batches of 3 cross two epoch boundaries.
        let straight = take(
            &mut BatchLoader::new(source.clone(), 3, 64, 11).unwrap(),
            40,
        );
        for k in [0, 1, 15, 16, 39] {
            let mut first = BatchLoader::new(source.clone(), 3, 64, 11).unwrap();
            let mut got = take(&mut first, k);
            let saved = serde_json::to_string(&first.state()).unwrap();
            let state: LoaderState = serde_json::from_str(&saved).unwrap();
            let mut resumed = BatchLoader::with_state(source.clone(), 3, &state).unwrap();
            got.extend(take(&mut resumed, 40 - k));
            assert_eq!(got, straight, "resume after {k} batches");
            assert_eq!(resumed.state().batches, 40);
        }
    }

    #[test]
    fn resume_refuses_another_source() {
        let mut loader = BatchLoader::new(positions(3000), 2, 64, 0).unwrap();
        loader.next_batch();
        let err = BatchLoader::with_state(positions(2999), 2, &loader.state()).unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string().contains("3000 tokens, this one has 2999"),
            "{err}"
        );
        let mut past = loader.state();
        past.cursor = 1_000;
        assert!(BatchLoader::with_state(positions(3000), 2, &past).is_err());
    }

    #[test]
    fn too_short_source_is_a_clear_error() {
        let err = BatchLoader::new(positions(64), 1, 64, 0).unwrap_err();
        assert_eq!(
            err.to_string(),
            "positions: 64 tokens cannot fill one sequence of seq_len + 1 = 65 tokens"
        );
        assert!(err.is_bad_input());
        // Exactly seq_len + 1 tokens: one window per epoch, always the same.
        let mut loader = BatchLoader::new(positions(65), 2, 64, 0).unwrap();
        let batch = loader.next_batch();
        assert_eq!(batch.inputs[0], 0);
        assert_eq!(batch.inputs[64], 0);
        assert!(EvalBatches::new(&positions(10), 0, 4, None).is_err());
    }

    #[test]
    fn eval_covers_every_target_once_in_order() {
        let source = positions(1000);
        let seq_len = 30;
        let batches: Vec<Batch> = EvalBatches::new(&source, 4, seq_len, None)
            .unwrap()
            .collect();
        // 999 / 30 = 33 windows = 8 batches of 4 + 1 of 1.
        assert_eq!(batches.len(), 9);
        assert_eq!(batches.last().unwrap().rows, 1);
        let targets: Vec<i64> = batches
            .iter()
            .flat_map(|b| b.targets.iter().copied())
            .collect();
        assert_eq!(targets, (1..=33 * 30).collect::<Vec<i64>>());
        let iter = EvalBatches::new(&source, 4, seq_len, None).unwrap();
        assert_eq!((iter.len(), iter.total_tokens()), (9, 990));

        let limited: Vec<Batch> = EvalBatches::new(&source, 4, seq_len, Some(2))
            .unwrap()
            .collect();
        assert_eq!(limited.len(), 2);
        assert_eq!(limited, batches[..2]);
        assert_eq!(
            EvalBatches::new(&source, 4, seq_len, Some(2))
                .unwrap()
                .total_tokens(),
            240
        );
    }

    /// 3000 positions in shards of 700 tokens, with documents of 1 to 150 tokens (some beginning
    /// at shard boundaries, some running over them), and those documents' starts.
    fn documents_source() -> (Arc<TokenSource>, Vec<u64>) {
        let mut documents = vec![0u64];
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        loop {
            let next = documents.last().unwrap() + rng.random_range(1..=150);
            if next >= 3000 {
                break;
            }
            documents.push(next);
        }
        documents.extend([700, 1400]);
        documents.sort();
        documents.dedup();
        let source = positions_with_documents(&[700, 700, 700, 700, 200], &documents);
        (Arc::new(source), documents)
    }

    /// Each row's document starts, found from scratch: the positions after the first whose input
    /// (a source position, in these sources) begins a document.
    fn expected_starts(batch: &Batch, documents: &[u64]) -> Vec<Vec<usize>> {
        batch
            .inputs
            .chunks(batch.seq_len)
            .map(|row| {
                (1..batch.seq_len)
                    .filter(|&t| documents.contains(&(row[t] as u64)))
                    .collect()
            })
            .collect()
    }

    #[test]
    fn batches_carry_the_document_starts_of_their_rows() {
        let (source, documents) = documents_source();
        let mut loader = BatchLoader::new(source.clone(), 4, 64, 9)
            .unwrap()
            .with_document_starts()
            .unwrap();
        let mut plain = BatchLoader::new(source.clone(), 4, 64, 9).unwrap();
        let mut inner_starts = 0;
        for _ in 0..30 {
            let batch = loader.next_batch();
            let starts = batch.document_starts.clone().unwrap();
            assert_eq!(starts, expected_starts(&batch, &documents));
            inner_starts += starts.iter().map(Vec::len).sum::<usize>();
            // The same tokens as without them.
            let without = plain.next_batch();
            assert_eq!(without.document_starts, None);
            assert_eq!(
                (&batch.inputs, &batch.targets),
                (&without.inputs, &without.targets)
            );
        }
        // Documents of 75 tokens on average: about 0.84 starts after position 0 a window.
        assert!(inner_starts > 60, "{inner_starts} starts in 120 windows");

        for batch in EvalBatches::new(&source, 5, 64, None)
            .unwrap()
            .with_document_starts()
            .unwrap()
        {
            let starts = batch.document_starts.clone().unwrap();
            assert_eq!(starts.len(), batch.rows);
            assert_eq!(starts, expected_starts(&batch, &documents));
        }

        let err = BatchLoader::new(positions(100), 1, 8, 0)
            .unwrap()
            .with_document_starts()
            .unwrap_err();
        assert!(err.is_bad_input());
        assert!(
            err.to_string()
                .starts_with("positions: records no document starts"),
            "{err}"
        );
        assert!(EvalBatches::new(&positions(100), 1, 8, None)
            .unwrap()
            .with_document_starts()
            .is_err());
    }

    #[test]
    fn resumed_document_starts_are_the_uninterrupted_ones() {
        let (source, _) = documents_source();
        let loader = |state: Option<&LoaderState>| {
            match state {
                None => BatchLoader::new(source.clone(), 3, 64, 11),
                Some(state) => BatchLoader::with_state(source.clone(), 3, state),
            }
            .unwrap()
            .with_document_starts()
            .unwrap()
        };
        // 45 or 46 windows of 64 per epoch: 40 batches of 3 cross two epoch boundaries.
        let straight = take(&mut loader(None), 40);
        for k in [1, 16, 39] {
            let mut first = loader(None);
            let mut got = take(&mut first, k);
            got.extend(take(&mut loader(Some(&first.state())), 40 - k));
            assert_eq!(got, straight, "resume after {k} batches");
        }
    }
}
