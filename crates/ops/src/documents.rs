//! Document boundaries inside packed windows, and the forms the sequence-mixing ops take them in:
//! flash-linear-attention's `cu_seqlens` (offsets over the rows laid end to end), per-token resets
//! (where a recurrent state starts again from zero), per-token document indices (for masks) and
//! positions inside the documents (for rotary embeddings).

use tch::{Device, Tensor};

use crate::OpError;

const OP: &str = "documents";

/// Where documents begin inside the rows of a `[rows, seq_len]` batch. Every row begins a
/// document at position 0; `starts(r)` lists row `r`'s other beginnings, increasing, each in
/// `1..seq_len`. With boundaries, every op computes each document as if it were alone: no state,
/// attention or convolution reaches across a boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Documents {
    seq_len: usize,
    starts: Vec<Vec<usize>>,
}

impl Documents {
    /// The documents of rows of `seq_len` tokens whose inner beginnings are `starts` (one list
    /// per row); errors when a list is not increasing inside `1..seq_len`.
    pub fn new(seq_len: usize, starts: Vec<Vec<usize>>) -> Result<Self, OpError> {
        for (row, list) in starts.iter().enumerate() {
            let mut previous = 0;
            for &p in list {
                if p <= previous || p >= seq_len {
                    return Err(OpError::Documents(format!(
                        "{OP}: row {row}'s document starts {list:?} must increase inside 1..{seq_len}"
                    )));
                }
                previous = p;
            }
        }
        Ok(Documents { seq_len, starts })
    }

    /// One document per row.
    pub fn whole_rows(rows: usize, seq_len: usize) -> Self {
        Documents {
            seq_len,
            starts: vec![Vec::new(); rows],
        }
    }

    /// Rows in the batch.
    pub fn rows(&self) -> usize {
        self.starts.len()
    }

    /// Tokens per row.
    pub fn seq_len(&self) -> usize {
        self.seq_len
    }

    /// Row `row`'s document beginnings after position 0.
    pub fn starts(&self, row: usize) -> &[usize] {
        &self.starts[row]
    }

    /// Whether some row holds more than one document.
    pub fn has_boundaries(&self) -> bool {
        self.starts.iter().any(|s| !s.is_empty())
    }

    /// Every document as (row, first position, length), in order.
    pub fn spans(&self) -> Vec<(usize, usize, usize)> {
        let mut spans = Vec::new();
        for (row, list) in self.starts.iter().enumerate() {
            let mut begin = 0;
            for &end in list.iter().chain(std::iter::once(&self.seq_len)) {
                spans.push((row, begin, end - begin));
                begin = end;
            }
        }
        spans
    }

    /// Each document's first token over the rows laid end to end (row `r`, position `t` is token
    /// `r * seq_len + t`), then the total: flash-linear-attention's `cu_seqlens`.
    pub fn offsets(&self) -> Vec<i64> {
        let mut offsets: Vec<i64> = self
            .spans()
            .iter()
            .map(|&(row, begin, _)| (row * self.seq_len + begin) as i64)
            .collect();
        offsets.push((self.rows() * self.seq_len) as i64);
        offsets
    }

    /// The longest document's length.
    pub fn longest(&self) -> usize {
        self.spans().iter().map(|s| s.2).max().unwrap_or(0)
    }

    /// `[rows, seq_len]` bool, true where a document begins after position 0: where a recurrent
    /// state restarts from zero.
    pub fn resets(&self, device: Device) -> Result<Tensor, OpError> {
        let mut flags = vec![false; self.rows() * self.seq_len];
        for (row, list) in self.starts.iter().enumerate() {
            for &p in list {
                flags[row * self.seq_len + p] = true;
            }
        }
        self.per_token(Tensor::f_from_slice(&flags)?, device)
    }

    /// `[rows, seq_len]` i64: the index of each token's document within its row (0 for the
    /// first). Two tokens may interact only where their indices are equal.
    pub fn document_ids(&self, device: Device) -> Result<Tensor, OpError> {
        let mut ids = Vec::with_capacity(self.rows() * self.seq_len);
        for list in &self.starts {
            let mut next = list.iter().peekable();
            let mut id = 0i64;
            for t in 0..self.seq_len {
                while next.next_if(|&&p| p == t).is_some() {
                    id += 1;
                }
                ids.push(id);
            }
        }
        self.per_token(Tensor::f_from_slice(&ids)?, device)
    }

    /// `[rows, seq_len]` i64: each token's position inside its document (0 where a document
    /// begins), the positions a document run alone has.
    pub fn positions(&self, device: Device) -> Result<Tensor, OpError> {
        let mut positions = vec![0i64; self.rows() * self.seq_len];
        for (row, begin, len) in self.spans() {
            let first = row * self.seq_len + begin;
            for (i, p) in positions[first..first + len].iter_mut().enumerate() {
                *p = i as i64;
            }
        }
        self.per_token(Tensor::f_from_slice(&positions)?, device)
    }

    /// A flat per-token tensor shaped `[rows, seq_len]` on `device`.
    fn per_token(&self, flat: Tensor, device: Device) -> Result<Tensor, OpError> {
        let shape = [self.rows() as i64, self.seq_len as i64];
        Ok(flat.f_view(shape)?.f_to_device(device)?)
    }

    /// Checks that `x` has this batch's rows and tokens as its first two dimensions.
    pub fn check_batch(
        &self,
        op: &'static str,
        name: &'static str,
        x: &Tensor,
    ) -> Result<(), OpError> {
        let size = x.size();
        if size.len() < 2 || size[0] != self.rows() as i64 || size[1] != self.seq_len as i64 {
            let expected = format!("[{}, {}, ...] as its documents", self.rows(), self.seq_len);
            return Err(OpError::shape(op, name, expected, size));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_offsets_resets_and_ids_agree() {
        let docs = Documents::new(5, vec![vec![2, 3], vec![], vec![4]]).unwrap();
        assert_eq!(
            docs.spans(),
            [
                (0, 0, 2),
                (0, 2, 1),
                (0, 3, 2),
                (1, 0, 5),
                (2, 0, 4),
                (2, 4, 1)
            ]
        );
        assert_eq!(docs.offsets(), [0, 2, 3, 5, 10, 14, 15]);
        assert_eq!(docs.longest(), 5);
        assert!(docs.has_boundaries());
        let resets = docs.resets(Device::Cpu).unwrap();
        let expected = Tensor::from_slice(&[
            false, false, true, true, false, //
            false, false, false, false, false, //
            false, false, false, false, true,
        ])
        .view([3, 5]);
        assert!(resets.equal(&expected));
        let ids = docs.document_ids(Device::Cpu).unwrap();
        let expected =
            Tensor::from_slice(&[0i64, 0, 1, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]).view([3, 5]);
        assert!(ids.equal(&expected));
        let positions = docs.positions(Device::Cpu).unwrap();
        let expected =
            Tensor::from_slice(&[0i64, 1, 0, 0, 1, 0, 1, 2, 3, 4, 0, 1, 2, 3, 0]).view([3, 5]);
        assert!(positions.equal(&expected));
    }

    #[test]
    fn whole_rows_have_no_boundaries() {
        let docs = Documents::whole_rows(2, 4);
        assert!(!docs.has_boundaries());
        assert_eq!(docs.offsets(), [0, 4, 8]);
        assert_eq!(docs.spans(), [(0, 0, 4), (1, 0, 4)]);
    }

    #[test]
    fn starts_outside_the_row_or_out_of_order_are_errors() {
        for bad in [
            vec![vec![0]],
            vec![vec![5]],
            vec![vec![3, 2]],
            vec![vec![2, 2]],
        ] {
            let err = Documents::new(5, bad.clone()).unwrap_err().to_string();
            assert!(err.contains("must increase inside 1..5"), "{bad:?}: {err}");
        }
    }
}
