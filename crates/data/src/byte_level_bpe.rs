//! A fast encoder for the most common Hugging Face tokenizer pipeline, GPT-2's byte-level BPE
//! (the kind `train_bpe` makes): no normalizer, the `ByteLevel` pre-tokenizer with its regex and
//! no prefix space, a BPE model without dropout.
//!
//! The general pipeline spends most of its time outside the BPE merges: Oniguruma's regex, a
//! string per pre-token, offsets, an `Encoding` per text. Here the same word split runs on the
//! `regex` crate's DFA, and a per-thread cache maps each word to its ids, so only words seen for
//! the first time reach the model (the tokenizer's own BPE, so merges are computed by the same
//! code). The ids are the same as the general pipeline's: tests compare the word split with the
//! pre-tokenizer's and the ids with `encode` on random and real text.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use ahash::AHashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{Model, ModelWrapper};

/// GPT-2's pre-tokenizer regex without its one lookahead, `\s+(?!\S)`, which `regex` cannot
/// express: a whitespace run followed by more text gives back its last character (see
/// [`ByteLevelBpe::encode`]). Alternation is leftmost-first in both engines.
const WORDS: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";

/// Words cached per thread before the cache starts over (about 20 MB per thread).
const CACHE_WORDS: usize = 1 << 17;

/// The byte-level BPE encoder of one tokenizer.
pub struct ByteLevelBpe {
    /// Tells this encoder's cache entries from another's on a shared thread.
    id: u64,
    words: regex::Regex,
    model: BPE,
    /// GPT-2's byte-to-character map: the alphabet the BPE vocabulary is written in.
    byte_chars: [char; 256],
    /// The tokenizer's added tokens, which the general pipeline cuts out of the text first;
    /// a text containing one is left to it.
    added: Option<regex::Regex>,
}

/// One thread's word -> ids cache, for the encoder `owner`.
#[derive(Default)]
struct WordCache {
    owner: u64,
    ids: AHashMap<Box<str>, Box<[u32]>>,
}

thread_local! {
    static CACHE: RefCell<WordCache> = RefCell::new(WordCache::default());
}

impl ByteLevelBpe {
    /// The fast encoder for `tokenizer` when its pipeline is the byte-level BPE this module
    /// reproduces (with any post-processor: encoding without special tokens ignores it), else
    /// `None`.
    pub(crate) fn for_tokenizer(tokenizer: &tokenizers::Tokenizer) -> Option<Self> {
        let ModelWrapper::BPE(model) = tokenizer.get_model() else {
            return None;
        };
        let Some(PreTokenizerWrapper::ByteLevel(byte_level)) = tokenizer.get_pre_tokenizer() else {
            return None;
        };
        let plain = tokenizer.get_normalizer().is_none()
            && !byte_level.add_prefix_space
            && byte_level.use_regex
            && model.dropout.is_none()
            && tokenizer.get_truncation().is_none()
            && tokenizer.get_padding().is_none();
        if !plain {
            return None;
        }
        let mut added: Vec<String> = tokenizer
            .get_added_tokens_decoder()
            .into_values()
            .map(|token| regex::escape(&token.content))
            .collect();
        added.sort();
        let added = if added.is_empty() {
            None
        } else {
            Some(regex::Regex::new(&added.join("|")).ok()?)
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Some(ByteLevelBpe {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            words: regex::Regex::new(WORDS).expect("the word regex parses"),
            model: model.clone(),
            byte_chars: byte_chars(),
            added,
        })
    }

    /// Whether `text` holds an added token, which only the general pipeline handles.
    pub(crate) fn needs_general_pipeline(&self, text: &str) -> bool {
        self.added
            .as_ref()
            .is_some_and(|added| added.is_match(text))
    }

    /// Calls `f` on each pre-token (word) of `text`, in order; together they cover `text`.
    fn for_each_word(&self, text: &str, mut f: impl FnMut(&str)) {
        let mut pos = 0;
        while let Some(found) = self.words.find_at(text, pos) {
            debug_assert_eq!(found.start(), pos, "every character belongs to a word");
            let mut end = found.end();
            let word = found.as_str();
            // `\s+(?!\S)`: a whitespace run followed by more text stops one character short;
            // that character starts the next word (" word", or itself alone).
            if end < text.len() && word.chars().all(char::is_whitespace) {
                let last = word.chars().next_back().expect("matches are not empty");
                if last.len_utf8() < word.len() {
                    end -= last.len_utf8();
                }
            }
            f(&text[pos..end]);
            pos = end;
        }
    }

    /// Appends the ids of `text` to `out`. The caller checks [`Self::needs_general_pipeline`]
    /// first.
    pub(crate) fn encode(&self, text: &str, out: &mut Vec<u32>) -> tokenizers::Result<()> {
        CACHE.with(|cache| {
            let mut cache = cache.borrow_mut();
            if cache.owner != self.id {
                cache.ids.clear();
                cache.owner = self.id;
            }
            let mut result = Ok(());
            let mut mapped = String::new();
            self.for_each_word(text, |word| {
                if result.is_err() {
                    return;
                }
                if let Some(ids) = cache.ids.get(word) {
                    out.extend_from_slice(ids);
                    return;
                }
                mapped.clear();
                mapped.extend(word.bytes().map(|b| self.byte_chars[usize::from(b)]));
                match self.model.tokenize(&mapped) {
                    Ok(tokens) => {
                        let ids: Box<[u32]> = tokens.iter().map(|t| t.id).collect();
                        out.extend_from_slice(&ids);
                        if cache.ids.len() >= CACHE_WORDS {
                            cache.ids.clear();
                        }
                        cache.ids.insert(word.into(), ids);
                    }
                    Err(e) => result = Err(e),
                }
            });
            result
        })
    }
}

/// GPT-2's `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes
/// for the characters from U+0100 up, in byte order.
fn byte_chars() -> [char; 256] {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut chars = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        chars[usize::from(b)] = if printable(b) {
            char::from(b)
        } else {
            next += 1;
            char::from_u32(next - 1).expect("U+0100..U+0143 are characters")
        };
    }
    chars
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::{train_bpe, Tokenizer};
    use tokenizers::PreTokenizer;

    fn trained(dir: &std::path::Path) -> tokenizers::Tokenizer {
        let text = crate::embedded::valid_text().unwrap();
        let docs = crate::documents::split_documents(&text);
        let path = dir.join("tokenizer.json");
        let Tokenizer::HuggingFace { inner, .. } = train_bpe(docs.iter(), 2000, &path).unwrap()
        else {
            panic!("train_bpe returns a Hugging Face tokenizer");
        };
        *inner
    }

    /// Random text over characters of every class the word regex tells apart: letters of
    /// several scripts, combining marks, digits and other numbers, punctuation, the
    /// contractions, and every kind of whitespace (Unicode's and ASCII's).
    fn random_texts(count: usize, seed: u64) -> Vec<String> {
        let palette: Vec<&str> = vec![
            "a", "Z", "é", "the", " the", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'", "'S",
            " ", "  ", "\t", "\n", "\r\n", "\u{a0}", "\u{2028}", "\u{3000}", "\u{85}", "\u{1680}",
            "\u{b}", "\u{c}", "\u{1c}", "\u{180e}", "\u{200b}", "\u{feff}", "\u{200d}", "\u{301}",
            "\u{93e}", "中文", "😀", "Ⅻ", "²", "٣", "7", "42", "Ω", "Жж", ".", ",", "!?", "-",
            "\"", "(", "$", "<s>", "\u{0}",
        ];
        let mut state = seed;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize
        };
        (0..count)
            .map(|_| {
                let len = 1 + next() % 40;
                (0..len).map(|_| palette[next() % palette.len()]).collect()
            })
            .collect()
    }

    #[test]
    fn words_are_the_pre_tokenizers_words() {
        let dir = tempfile::tempdir().unwrap();
        let inner = trained(dir.path());
        let fast = ByteLevelBpe::for_tokenizer(&inner).unwrap();
        let pre_tokenizer = inner.get_pre_tokenizer().unwrap();
        let mut texts = random_texts(3000, 7);
        texts.push(crate::embedded::valid_text().unwrap());
        // Every character up to U+FFFF and every 97th above, each after a letter, a digit, a
        // space and a tab, so that its class decides where words break. Their UTF-8 bytes are
        // every byte valid UTF-8 has, so this checks the byte map too.
        texts.push(
            (0u32..0x1_0000)
                .chain((0x1_0000..0x11_0000).step_by(97))
                .filter_map(char::from_u32)
                .flat_map(|c| ['a', c, '1', c, ' ', c, '\t', c, ' '])
                .collect(),
        );
        for text in &texts {
            let mut ours = Vec::new();
            fast.for_each_word(text, |w| {
                ours.push(
                    w.bytes()
                        .map(|b| fast.byte_chars[usize::from(b)])
                        .collect::<String>(),
                )
            });
            let mut pretok = tokenizers::PreTokenizedString::from(text.as_str());
            pre_tokenizer.pre_tokenize(&mut pretok).unwrap();
            let theirs: Vec<String> = pretok
                .get_splits(
                    tokenizers::OffsetReferential::Original,
                    tokenizers::OffsetType::Byte,
                )
                .into_iter()
                .map(|(s, _, _)| s.to_string())
                .collect();
            assert_eq!(ours, theirs, "{text:?}");
        }
        let distinct: std::collections::HashSet<char> = fast.byte_chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn ids_are_the_general_pipelines_ids() {
        let dir = tempfile::tempdir().unwrap();
        let mut inner = trained(dir.path());
        inner.add_special_tokens(&[tokenizers::AddedToken::from("<s>", true)]);
        let fast = ByteLevelBpe::for_tokenizer(&inner).unwrap();
        let mut texts = random_texts(3000, 11);
        texts.extend(crate::documents::split_documents(
            &crate::embedded::valid_text().unwrap(),
        ));
        let mut general = 0;
        for text in &texts {
            let expected = inner.encode_fast(text.as_str(), false).unwrap();
            if fast.needs_general_pipeline(text) {
                general += 1;
                continue;
            }
            let mut ids = Vec::new();
            // Twice: the second time every word comes from the cache.
            fast.encode(text, &mut ids).unwrap();
            assert_eq!(ids, expected.get_ids(), "{text:?}");
            ids.clear();
            fast.encode(text, &mut ids).unwrap();
            assert_eq!(ids, expected.get_ids(), "{text:?} (cached)");
        }
        assert!(general > 100 && general < texts.len() / 2, "{general}");
    }

    #[test]
    fn other_pipelines_are_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let mut inner = trained(dir.path());
        inner.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(true, true, true),
        ));
        assert!(ByteLevelBpe::for_tokenizer(&inner).is_none());
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::whitespace::Whitespace {}));
        assert!(ByteLevelBpe::for_tokenizer(&inner).is_none());
    }
}
