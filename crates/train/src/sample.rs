//! Text generation from a checkpoint through the models' cached decoding: one prefill of the
//! prompt, then one `step` per new token. Token choice happens on the host with a seeded
//! ChaCha generator, so a seed gives the same text on any device with the same logits.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use crate::boundary::catch_torch;
use crate::datasets::open_tokenizer_for_model;
use crate::error::TrainError;
use crate::eval::load_for_inference;

/// Picks the next token from `logits` (`[vocab]`): greedy when `temperature == 0`, otherwise
/// softmax of `logits / temperature` restricted to the `top_k` largest (`0` = all).
pub fn choose_token(logits: &[f32], temperature: f64, top_k: usize, rng: &mut ChaCha8Rng) -> u32 {
    let greedy = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                if v > best.1 {
                    (i, v)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if temperature <= 0.0 {
        return greedy();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    // Sorted by logit, highest first; ties by index so the order is deterministic.
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if top_k > 0 {
        order.truncate(top_k);
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    if !total.is_finite() || total <= 0.0 {
        return greedy();
    }
    let mut u = rng.random::<f64>() * total;
    for (&i, w) in order.iter().zip(&weights) {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    order[order.len() - 1] as u32
}

/// Generates `max_new_tokens` tokens after `prompt` with the checkpoint at `checkpoint` (a
/// `step-N` directory or a run directory) and returns the prompt followed by the generated
/// text, decoded by the run's tokenizer. `temperature` 0 decodes greedily; `top_k` 0 keeps
/// the whole vocabulary; tokens the tokenizer cannot decode are never chosen. The text is also
/// handed to `on_text` piece by piece as it is generated (the prompt first). A prompt and
/// generation longer than the context the model was trained on is warned about.
#[allow(clippy::too_many_arguments)]
pub fn sample(
    checkpoint: &Path,
    prompt: &str,
    max_new_tokens: usize,
    temperature: f64,
    top_k: usize,
    seed: u64,
    on_text: &mut dyn FnMut(&str),
) -> Result<String, TrainError> {
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(TrainError::BadArgument(format!(
            "--temperature {temperature}: must be a finite number >= 0"
        )));
    }
    let m = load_for_inference(checkpoint)?;
    let tokenizer = open_tokenizer_for_model(&m.cfg)?;
    let prompt_ids = tokenizer.encode(prompt)?;
    if prompt_ids.is_empty() {
        return Err(TrainError::BadArgument(
            "--prompt is empty: the models have no start token, give at least one character".into(),
        ));
    }
    let context = m.cfg.config.data.seq_len;
    let total = prompt_ids.len().saturating_add(max_new_tokens);
    if total > context {
        eprintln!(
            "warning: the prompt ({} tokens) and --max-tokens {max_new_tokens} make {total} \
             tokens, past the {context} the model was trained on (data.seq_len): text beyond \
             position {context} is untested territory for it",
            prompt_ids.len()
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let model = m.built.model.as_ref();
    let decodable = tokenizer.vocab_size() as usize;
    let mut ids = prompt_ids.clone();
    let mut stream = TextStream::default();
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(1);
    let prompt_tokens: Vec<i64> = prompt_ids.iter().map(|&t| i64::from(t)).collect();
    let prefill = format!("the prompt's forward pass ({} tokens)", prompt_tokens.len());
    let mut last = catch_torch(&prefill, || {
        let prompt_tensor = Tensor::f_from_slice(&prompt_tokens)?
            .f_view([1, -1])?
            .f_to_device(m.device)?;
        let logits = m
            .precision
            .run(|| model.forward_cached(&prompt_tensor, &mut cache)); // [1, P, V]
        logits.f_select(1, -1)?.f_squeeze_dim(0) // [V]
    })?;
    stream.show(&tokenizer.decode(&ids)?, on_text);
    for _ in 0..max_new_tokens {
        let host = catch_torch("reading the logits", || {
            Vec::<f32>::try_from(last.f_to_kind(Kind::Float)?.f_to_device(Device::Cpu)?)
        })?;
        let usable = decodable.min(host.len());
        let next = choose_token(&host[..usable], temperature, top_k, &mut rng);
        ids.push(next);
        stream.show(&tokenizer.decode(&ids)?, on_text);
        last = catch_torch("a decoding step", || {
            let input = Tensor::f_from_slice(&[i64::from(next)])?.f_to_device(m.device)?; // [1]
            m.precision
                .run(|| model.step(&input, &mut cache))
                .f_squeeze_dim(0) // [V]
        })?;
    }
    let text = tokenizer.decode(&ids)?;
    stream.finish(&text, on_text);
    Ok(text)
}

/// Hands out the text decoded so far as it grows, holding back a tail that is not whole yet (a
/// multi-byte character still missing bytes decodes to U+FFFD).
#[derive(Debug, Default)]
struct TextStream {
    shown: String,
}

impl TextStream {
    fn show(&mut self, text: &str, on_text: &mut dyn FnMut(&str)) {
        if text.ends_with('\u{FFFD}') {
            return;
        }
        if let Some(new) = text.strip_prefix(self.shown.as_str()) {
            if !new.is_empty() {
                on_text(new);
                self.shown = text.to_string();
            }
        }
    }

    /// The rest of the final `text`: whatever follows its longest common start with what was
    /// shown (a tokenizer that rewrites earlier text as more tokens come shows that part late).
    fn finish(&mut self, text: &str, on_text: &mut dyn FnMut(&str)) {
        let common = text
            .char_indices()
            .zip(self.shown.chars())
            .find(|((_, a), b)| a != b)
            .map_or(text.len().min(self.shown.len()), |((i, _), _)| i);
        if common < text.len() {
            on_text(&text[common..]);
        }
        self.shown = text.to_string();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(choose_token(&[0.1, 3.0, -1.0], 0.0, 0, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_k_limits_choices() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let logits = [1.0, 0.9, 0.8, -5.0];
        for _ in 0..50 {
            assert_eq!(choose_token(&logits, 1.0, 1, &mut rng), 0);
            assert!(choose_token(&logits, 5.0, 2, &mut rng) < 2);
        }
    }

    #[test]
    fn sampling_follows_the_softmax() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        // p = softmax([ln 3, 0]) = [0.75, 0.25].
        let logits = [3f32.ln(), 0.0];
        let n = 20_000;
        let ones = (0..n)
            .filter(|_| choose_token(&logits, 1.0, 0, &mut rng) == 1)
            .count();
        let p = ones as f64 / n as f64;
        assert!((p - 0.25).abs() < 0.015, "{p}");
    }

    #[test]
    fn streamed_text_holds_back_unfinished_characters() {
        let mut out = Vec::new();
        let mut on_text = |t: &str| out.push(t.to_string());
        let mut stream = TextStream::default();
        stream.show("The ", &mut on_text);
        stream.show("The c", &mut on_text);
        stream.show("The c\u{FFFD}", &mut on_text);
        stream.show("The c\u{e9}", &mut on_text);
        stream.finish("The c\u{e9}!", &mut on_text);
        assert_eq!(out, ["The ", "c", "\u{e9}", "!"]);
    }

    #[test]
    fn same_seed_same_choices() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            (0..20)
                .map(|_| choose_token(&logits, 0.8, 10, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }
}
