//! What the recurrent families' blocks share in one forward over packed documents: made once per
//! forward from the batch's [`Documents`], used by every layer.

use glatrain_ops::gla::GlaDocuments;
use tch::Tensor;

use crate::conv::DocumentTaps;
use crate::language_model::ContextSettings;
use crate::Documents;

/// The forms of one batch's documents a recurrent family's layers take, each made only where the
/// family uses it.
#[derive(Debug)]
pub struct PackedDocuments {
    /// GLA's laid-out sequence.
    pub gla: Option<GlaDocuments>,
    /// The selective scan's restarts, `[B, T]` bool.
    pub resets: Option<Tensor>,
    /// The short convolutions' taps.
    pub taps: Option<DocumentTaps>,
}

impl PackedDocuments {
    fn shallow_clone(&self) -> Self {
        PackedDocuments {
            gla: self.gla.as_ref().map(GlaDocuments::shallow_clone),
            resets: self.resets.as_ref().map(Tensor::shallow_clone),
            taps: self.taps.as_ref().map(DocumentTaps::shallow_clone),
        }
    }
}

/// Which forms of the documents a recurrent family needs.
#[derive(Debug, Clone, Copy)]
pub struct RecurrentSettings {
    /// GLA's layout.
    pub gla: bool,
    /// The scan's restarts.
    pub resets: bool,
    /// The width of the family's convolutions, when it has them.
    pub conv_width: Option<i64>,
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
            taps: self.conv_width.map(|width| {
                DocumentTaps::new(documents, width, device).unwrap_or_else(|e| failed(&e))
            }),
        })
    }

    fn share(context: &Option<PackedDocuments>) -> Option<PackedDocuments> {
        context.as_ref().map(PackedDocuments::shallow_clone)
    }
}
