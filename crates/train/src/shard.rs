//! A rank's share of an optimizer step in data-parallel training. The step's `batch_size`
//! sequences (global) come as `accum` global micro-batches of `micro_batch_size` x ranks
//! sequences, exactly what one process with that micro-batch would draw, in the same order;
//! rank `r` trains on rows `r * m .. (r + 1) * m` of each.

use glatrain_config::ResolvedConfig;
use glatrain_data::Batch;

use crate::TrainError;

/// This rank's rows of every global micro-batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
    /// Sequences per micro-batch on this rank (`train.micro_batch_size`).
    pub rows: usize,
    /// Micro-batches per optimizer step on each rank.
    pub accum: usize,
}

impl Shard {
    /// Rank `rank`'s share among `ranks`.
    ///
    /// # Errors
    /// [`TrainError::BadValue`] when the step's sequences do not split into `ranks` equal
    /// micro-batches of `train.micro_batch_size`.
    pub fn new(cfg: &ResolvedConfig, rank: usize, ranks: usize) -> Result<Self, TrainError> {
        let rows = cfg.config.train.micro_batch_size;
        let global_rows = rows * ranks;
        if cfg.batch_size % global_rows != 0 {
            return Err(TrainError::BadValue {
                source_name: cfg.source.clone(),
                key: "train.batch_size",
                value: cfg.batch_size.to_string(),
                reason: format!(
                    "with {ranks} ranks each step's sequences are split into micro-batches of \
                     train.micro_batch_size = {rows} on every rank, so the step's {} sequences \
                     must be a multiple of {rows} x {ranks} = {global_rows}",
                    cfg.batch_size
                ),
            });
        }
        Ok(Shard {
            rank,
            ranks,
            rows,
            accum: cfg.batch_size / global_rows,
        })
    }

    /// Sequences per global micro-batch (all ranks' rows).
    pub fn global_rows(&self) -> usize {
        self.rows * self.ranks
    }

    /// This rank's rows of a global micro-batch, with their document starts.
    pub fn own_rows(&self, global: Batch) -> Batch {
        if self.ranks == 1 {
            return global;
        }
        let rows = self.rank * self.rows..(self.rank + 1) * self.rows;
        let tokens = rows.start * global.seq_len..rows.end * global.seq_len;
        Batch {
            inputs: global.inputs[tokens.clone()].to_vec(),
            targets: global.targets[tokens].to_vec(),
            rows: self.rows,
            seq_len: global.seq_len,
            document_starts: global.document_starts.map(|starts| starts[rows].to_vec()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(batch: usize, micro: usize) -> ResolvedConfig {
        glatrain_config::from_str(
            &format!(
                "[model]\ntype = \"gla\"\nhidden_size = 16\nnum_layers = 1\nnum_heads = 1\n\
                 vocab_size = 256\n[data]\nseq_len = 4\n[train]\nbatch_size = {batch}\n\
                 micro_batch_size = {micro}\n"
            ),
            "test.toml",
            &[],
        )
        .unwrap()
    }

    #[test]
    fn ranks_split_each_global_micro_batch_in_order() {
        let cfg = config(16, 4);
        let shards: Vec<Shard> = (0..2).map(|r| Shard::new(&cfg, r, 2).unwrap()).collect();
        assert_eq!((shards[0].accum, shards[0].global_rows()), (2, 8));
        let starts: Vec<Vec<usize>> = (0..8).map(|r| (1..=r % 4).collect()).collect();
        let global = Batch {
            inputs: (0..32).collect(),
            targets: (100..132).collect(),
            rows: 8,
            seq_len: 4,
            document_starts: Some(starts.clone()),
        };
        let own: Vec<Batch> = shards.iter().map(|s| s.own_rows(global.clone())).collect();
        assert_eq!(own[0].inputs, (0..16).collect::<Vec<_>>());
        assert_eq!(own[1].inputs, (16..32).collect::<Vec<_>>());
        assert_eq!(own[1].targets, (116..132).collect::<Vec<_>>());
        assert_eq!((own[1].rows, own[1].seq_len), (4, 4));
        assert_eq!(own[0].document_starts.as_deref(), Some(&starts[..4]));
        assert_eq!(own[1].document_starts.as_deref(), Some(&starts[4..]));
        let plain = Batch {
            document_starts: None,
            ..global.clone()
        };
        assert_eq!(shards[1].own_rows(plain).document_starts, None);
        assert_eq!(
            Shard::new(&cfg, 0, 1).unwrap().own_rows(global.clone()),
            global
        );
    }

    #[test]
    fn a_step_that_does_not_split_names_the_key() {
        let err = Shard::new(&config(12, 4), 0, 2).unwrap_err();
        assert!(err.is_bad_input());
        let msg = err.to_string();
        assert!(
            msg.contains("train.batch_size = 12") && msg.contains("multiple of 4 x 2 = 8"),
            "{msg}"
        );
    }
}
