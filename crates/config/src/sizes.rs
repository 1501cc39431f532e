//! Sizes that must fit 64-bit integers. libtorch counts a tensor's bytes in int64 and the
//! trainer keeps 16 bytes per parameter (fp32 weight, gradient, two AdamW moments), so a config
//! whose weight tensors, parameter total or logits cannot be counted in 64 bits is refused here,
//! naming the key that makes them so large, before an estimate wraps around or an allocation
//! fails inside libtorch. Whether the sizes fit the device's memory is the preflight's question.

use std::fmt::Display;

use crate::error::{ConfigError, Origin};
use crate::schema::{Config, GlaConfig, MambaConfig, ModelConfig, TransformerConfig};

/// Most elements of one fp32 tensor: its bytes fit in an i64.
const MAX_TENSOR_ELEMENTS: u128 = i64::MAX as u128 / 4;
/// Most parameters of a model: 16 bytes each fit in an i64.
const MAX_PARAMETERS: u128 = i64::MAX as u128 / 16;

/// A config key that a size grows with, and its value (`magnitude` ranks the keys to blame).
#[derive(Debug, Clone)]
struct Key {
    key: &'static str,
    value: String,
    magnitude: f64,
}

fn key(key: &'static str, value: impl Display + Copy + Into<f64>) -> Key {
    Key {
        key,
        value: value.to_string(),
        magnitude: value.into(),
    }
}

/// `usize` keys as `Key`s (the cast only ranks them).
fn size_key(name: &'static str, value: usize) -> Key {
    Key {
        key: name,
        value: value.to_string(),
        magnitude: value as f64,
    }
}

/// A tensor: what it is, its dimensions (label and width) and the keys its size grows with.
#[derive(Debug)]
struct Shape {
    what: &'static str,
    dims: Vec<(&'static str, u128)>,
    keys: Vec<Key>,
}

impl Shape {
    fn new(what: &'static str, dims: &[(&'static str, u128)], keys: &[&Key]) -> Self {
        Shape {
            what,
            dims: dims.to_vec(),
            keys: keys.iter().map(|k| (*k).clone()).collect(),
        }
    }

    fn elements(&self) -> Option<u128> {
        self.dims
            .iter()
            .try_fold(1u128, |product, (_, width)| product.checked_mul(*width))
    }
}

/// The key with the largest value: the one that makes a size too large.
fn largest<'a>(keys: impl IntoIterator<Item = &'a Key>) -> Option<&'a Key> {
    keys.into_iter()
        .fold(None, |best: Option<&Key>, k| match best {
            Some(b) if b.magnitude >= k.magnitude => Some(b),
            _ => Some(k),
        })
}

/// Checks every weight tensor, the parameter total and one micro-batch's logits.
pub(crate) fn check(config: &Config, origin: &Origin) -> Result<(), ConfigError> {
    let model = &config.model;
    let shapes = weight_shapes(model);
    let vocab = size_key("model.vocab_size", model.vocab_size());
    let micro = size_key("train.micro_batch_size", config.train.micro_batch_size);
    let seq_len = size_key("data.seq_len", config.data.seq_len);
    let logits = Shape::new(
        "one micro-batch's logits",
        &[
            ("micro_batch_size", config.train.micro_batch_size as u128),
            ("seq_len", config.data.seq_len as u128),
            ("vocab_size", model.vocab_size() as u128),
        ],
        &[&micro, &seq_len, &vocab],
    );
    for shape in shapes.iter().chain([&logits]) {
        let elements = shape.elements();
        if elements.is_some_and(|n| n <= MAX_TENSOR_ELEMENTS) {
            continue;
        }
        let Some(blame) = largest(&shape.keys) else {
            continue;
        };
        let dims: Vec<String> = shape
            .dims
            .iter()
            .map(|(label, width)| format!("{label} {width}"))
            .collect();
        let count = elements.map_or_else(|| "more than 2^128".to_string(), |n| n.to_string());
        return Err(origin.invalid(
            blame.key,
            &blame.value,
            format!(
                "{} ({}) would have {count} elements; a tensor holds at most \
                 {MAX_TENSOR_ELEMENTS} (its fp32 bytes are counted in 64 bits)",
                shape.what,
                dims.join(" x ")
            ),
        ));
    }
    // Every tensor is bounded now, so the 128-bit total cannot overflow.
    let total = model.parameter_count_wide();
    if total > MAX_PARAMETERS {
        let layers = size_key("model.num_layers", num_layers(model));
        let keys = shapes.iter().flat_map(|s| &s.keys);
        if let Some(blame) = largest(keys.chain([&layers])) {
            return Err(origin.invalid(
                blame.key,
                &blame.value,
                format!(
                    "the model would have {total} parameters; training keeps 16 bytes of each \
                     (weight, gradient, two AdamW moments), counted in 64 bits: at most \
                     {MAX_PARAMETERS} parameters"
                ),
            ));
        }
    }
    Ok(())
}

fn num_layers(model: &ModelConfig) -> usize {
    match model {
        ModelConfig::Gla(m) => m.num_layers,
        ModelConfig::Transformer(m) => m.num_layers,
        ModelConfig::Mamba(m) => m.num_layers,
    }
}

/// The model's distinct weight shapes (the largest of each kind).
fn weight_shapes(model: &ModelConfig) -> Vec<Shape> {
    match model {
        ModelConfig::Gla(m) => gla(m),
        ModelConfig::Transformer(m) => transformer(m),
        ModelConfig::Mamba(m) => mamba(m),
    }
}

/// The token embedding, `vocab_size x hidden_size`.
fn embedding(vocab_size: usize, vocab: &Key, hidden_size: usize, hidden: &Key) -> Shape {
    Shape::new(
        "the embedding",
        &[
            ("vocab_size", vocab_size as u128),
            ("hidden_size", hidden_size as u128),
        ],
        &[hidden, vocab],
    )
}

/// An MLP projection, `hidden_size x width`; the width grows with `intermediate_size` when set,
/// else with hidden_size (its default).
fn mlp_projection(
    hidden_size: usize,
    hidden: &Key,
    intermediate: Option<usize>,
    width: usize,
) -> Shape {
    let grows_with = match intermediate {
        Some(set) => size_key("model.intermediate_size", set),
        None => hidden.clone(),
    };
    Shape::new(
        "the MLP projection",
        &[
            ("hidden_size", hidden_size as u128),
            ("intermediate_size", width as u128),
        ],
        &[hidden, &grows_with],
    )
}

fn gla(m: &GlaConfig) -> Vec<Shape> {
    let h = m.hidden_size as u128;
    let (kd, vd) = (m.key_dim() as u128, m.value_dim() as u128);
    let hidden = size_key("model.hidden_size", m.hidden_size);
    let expand_k = key("model.expand_k", m.expand_k);
    let expand_v = key("model.expand_v", m.expand_v);
    let vocab = size_key("model.vocab_size", m.vocab_size);
    let rank = size_key("model.gate_low_rank_dim", m.gate_low_rank_dim);
    let conv = size_key("model.conv_size", m.conv_size);
    vec![
        embedding(m.vocab_size, &vocab, m.hidden_size, &hidden),
        Shape::new(
            "the query/key projection",
            &[("hidden_size", h), ("key_dim", kd)],
            &[&hidden, &expand_k],
        ),
        Shape::new(
            "the value/output projection",
            &[("hidden_size", h), ("value_dim", vd)],
            &[&hidden, &expand_v],
        ),
        Shape::new(
            "the forget-gate projection",
            &[
                ("gate_low_rank_dim", m.gate_low_rank_dim as u128),
                ("key_dim", kd),
            ],
            &[&hidden, &expand_k, &rank],
        ),
        Shape::new(
            "the short convolution",
            &[
                ("value_dim", vd.max(kd)),
                ("conv_size", m.conv_size as u128),
            ],
            &[&hidden, &expand_k, &expand_v, &conv],
        ),
        mlp_projection(m.hidden_size, &hidden, m.intermediate_size, m.mlp_size()),
    ]
}

fn transformer(m: &TransformerConfig) -> Vec<Shape> {
    let h = m.hidden_size as u128;
    let hidden = size_key("model.hidden_size", m.hidden_size);
    let vocab = size_key("model.vocab_size", m.vocab_size);
    vec![
        embedding(m.vocab_size, &vocab, m.hidden_size, &hidden),
        Shape::new(
            "the query/output projection",
            &[("hidden_size", h), ("hidden_size", h)],
            &[&hidden],
        ),
        mlp_projection(m.hidden_size, &hidden, m.intermediate_size, m.mlp_size()),
    ]
}

fn mamba(m: &MambaConfig) -> Vec<Shape> {
    let h = m.hidden_size as u128;
    // expand * hidden_size in 128 bits: it may not fit a usize before this check.
    let inner = m.expand as u128 * h;
    let hidden = size_key("model.hidden_size", m.hidden_size);
    let expand = size_key("model.expand", m.expand);
    let vocab = size_key("model.vocab_size", m.vocab_size);
    let state = size_key("model.d_state", m.d_state);
    let conv = size_key("model.conv_size", m.conv_size);
    let rank = match m.dt_rank {
        Some(rank) => size_key("model.dt_rank", rank),
        None => hidden.clone(),
    };
    let x_proj_width = m.dt_rank() as u128 + 2 * m.d_state as u128;
    vec![
        embedding(m.vocab_size, &vocab, m.hidden_size, &hidden),
        Shape::new(
            "the input/output projection",
            &[("hidden_size", h), ("d_inner", inner)],
            &[&hidden, &expand],
        ),
        Shape::new(
            "the x projection",
            &[("d_inner", inner), ("dt_rank + 2 * d_state", x_proj_width)],
            &[&hidden, &expand, &rank, &state],
        ),
        Shape::new(
            "the state matrix A",
            &[("d_inner", inner), ("d_state", m.d_state as u128)],
            &[&hidden, &expand, &state],
        ),
        Shape::new(
            "the convolution",
            &[("d_inner", inner), ("conv_size", m.conv_size as u128)],
            &[&hidden, &expand, &conv],
        ),
    ]
}
