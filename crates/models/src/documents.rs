//! What the recurrent families' blocks share in one forward over packed documents: made once per
//! forward from the batch's [`Documents`], used by every layer.

use glatrain_ops::gla::GlaDocuments;
use tch::Tensor;

use crate::language_model::ContextSettings;
use crate::Documents;

/// The forms of one batch's documents a recurrent family's layers take, each made only where the
/// family uses it.
#[derive(Debug)]
pub struct PackedDocuments {
    /// GLA's laid-out sequence.
    pub gla: Option<GlaDocuments>,
    /// Where documents begin, `[B, T]` bool: the selective scan's and the convolutions'
    /// restarts.
    pub resets: Option<Tensor>,
}

impl PackedDocuments {
    fn shallow_clone(&self) -> Self {
        PackedDocuments {
            gla: self.gla.as_ref().map(GlaDocuments::shallow_clone),
            resets: self.resets.as_ref().map(Tensor::shallow_clone),
        }
    }
}

/// Which forms of the documents a recurrent family needs.
#[derive(Debug, Clone, Copy)]
pub struct RecurrentSettings {
    /// GLA's layout.
    pub gla: bool,
    /// The restarts (the scan's, the convolutions').
    pub resets: bool,
}

impl ContextSettings for RecurrentSettings {
    /// `None` without documents, or when every row is one document (the plain path).
    type Context = Option<PackedDocuments>;

    fn context(
        &self,
        tokens: &Tensor,
        _: i64,
        documents: Option<&Documents>,
    ) -> Option<PackedDocuments> {
        let documents = documents.filter(|d| d.has_boundaries())?;
        let size = tokens.size();
        assert!(
            size == [documents.rows() as i64, documents.seq_len() as i64],
            "documents of {} rows of {} tokens given for tokens of shape {size:?}",
            documents.rows(),
            documents.seq_len()
        );
        let device = tokens.device();
        let failed = |e: &dyn std::fmt::Display| -> ! {
            panic!("laying out the batch's documents on {device:?}: {e}")
        };
        Some(PackedDocuments {
            gla: self
                .gla
                .then(|| GlaDocuments::new(documents, device).unwrap_or_else(|e| failed(&e))),
            resets: self
                .resets
                .then(|| documents.resets(device).unwrap_or_else(|e| failed(&e))),
        })
    }

    fn share(context: &Option<PackedDocuments>) -> Option<PackedDocuments> {
        context.as_ref().map(PackedDocuments::shallow_clone)
    }
}
