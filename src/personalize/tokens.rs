//! Tokenisation as `CLIPTokenizer` does it for SD 1.5 (BOS 49406, text, EOS 49407, padded with
//! EOS to 77, truncated to 75 text tokens), plus the new tokens a run adds (`<v*>`, `<v*>_1`,
//! `<a{k}*>`): single tokens with ids after the 49408-token vocabulary, as diffusers'
//! `textual_inversion.py` adds them with `tokenizer.add_tokens`.

use candle_core::{Device, Tensor};
use std::path::Path;
use tokenizers::{AddedToken, Tokenizer};

/// Errors a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the tokenizer {path}: {msg}; pass --model pointing at an SD 1.5 folder whose tokenizer/ holds tokenizer.json")]
    Load { path: String, msg: String },
    #[error("the tokenizer has no {0} token: it is not CLIP's BPE tokenizer")]
    MissingSpecial(&'static str),
    #[error(
        "the token {0:?} is already in the tokenizer's vocabulary: pick another placeholder name"
    )]
    AlreadyInVocab(String),
    #[error("the initializer word {word:?} is {} tokens ({}): a new token's row is copied from exactly one token; pass a one-token word with --init-word (e.g. --init-word object)", pieces.len(), pieces.join(" "))]
    NotSingleToken { word: String, pieces: Vec<String> },
    #[error("the tokenizer did not take the new token {0:?}")]
    NotAdded(String),
    #[error("cannot tokenize {text:?}: {msg}")]
    Encode { text: String, msg: String },
}

/// One tokenised prompt: exactly [`ClipTokenizer::MAX_LEN`] ids.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    /// True when text tokens were cut to fit (the caller warns once).
    pub truncated: bool,
}

impl Tokens {
    /// Positions of `id` in the sequence.
    pub fn positions(&self, id: u32) -> Vec<usize> {
        self.ids
            .iter()
            .enumerate()
            .filter(|(_, &x)| x == id)
            .map(|(i, _)| i)
            .collect()
    }
}

/// CLIP's BPE tokenizer with SD's fixed-length padding.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos: u32,
    eos: u32,
}

impl ClipTokenizer {
    /// Sequence length of SD 1.5's text encoder.
    pub const MAX_LEN: usize = 77;

    /// Wrap a loaded `tokenizer.json` (the one of `openai/clip-vit-base-patch32`).
    pub fn new(inner: Tokenizer) -> Result<Self, TokenError> {
        let bos = inner
            .token_to_id("<|startoftext|>")
            .ok_or(TokenError::MissingSpecial("<|startoftext|>"))?;
        let eos = inner
            .token_to_id("<|endoftext|>")
            .ok_or(TokenError::MissingSpecial("<|endoftext|>"))?;
        Ok(Self { inner, bos, eos })
    }

    /// Load a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let inner = Tokenizer::from_file(path).map_err(|e| TokenError::Load {
            path: path.display().to_string(),
            msg: e.to_string(),
        })?;
        Self::new(inner)
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }

    /// EOS, also the padding id.
    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// Number of ids, added tokens included (rows the embedding table needs).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Add new tokens, each matched as a whole wherever it appears in a prompt; returns their ids
    /// (consecutive after the current vocabulary, in the order given). Refuses a token that exists.
    pub fn add_tokens<S: AsRef<str>>(&mut self, tokens: &[S]) -> Result<Vec<u32>, TokenError> {
        for t in tokens {
            if self.inner.token_to_id(t.as_ref()).is_some() {
                return Err(TokenError::AlreadyInVocab(t.as_ref().to_string()));
            }
        }
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.as_ref().to_string(), false))
            .collect();
        self.inner.add_tokens(added).map_err(|e| {
            let names: Vec<&str> = tokens.iter().map(|t| t.as_ref()).collect();
            TokenError::NotAdded(format!("{} ({e})", names.join(", ")))
        })?;
        tokens
            .iter()
            .map(|t| {
                self.inner
                    .token_to_id(t.as_ref())
                    .ok_or_else(|| TokenError::NotAdded(t.as_ref().to_string()))
            })
            .collect()
    }

    /// The text tokens of `text` (no BOS/EOS, no padding).
    pub fn text_ids(&self, text: &str) -> Result<Vec<u32>, TokenError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenError::Encode {
                text: text.to_string(),
                msg: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// The id of a word that must be one token (the initializer of a new token's row).
    pub fn single_token_id(&self, word: &str) -> Result<u32, TokenError> {
        let ids = self.text_ids(word)?;
        match ids.as_slice() {
            [id] => Ok(*id),
            _ => Err(TokenError::NotSingleToken {
                word: word.to_string(),
                pieces: ids
                    .iter()
                    .map(|&i| {
                        self.inner
                            .id_to_token(i)
                            .map(|s| s.trim_end_matches("</w>").to_string())
                            .unwrap_or_else(|| i.to_string())
                    })
                    .collect(),
            }),
        }
    }

    /// SPEC.md §3's default initializer: the class word if it is one token, else "object".
    pub fn default_init_word(&self, class_word: &str) -> String {
        match self.single_token_id(class_word) {
            Ok(_) => class_word.to_string(),
            Err(_) => "object".to_string(),
        }
    }

    /// `[BOS, text..., EOS, EOS...]` of length 77; text beyond 75 tokens is cut (flagged).
    pub fn encode(&self, text: &str) -> Result<Tokens, TokenError> {
        let mut text_ids = self.text_ids(text)?;
        let room = Self::MAX_LEN - 2;
        let truncated = text_ids.len() > room;
        text_ids.truncate(room);
        let mut ids = Vec::with_capacity(Self::MAX_LEN);
        ids.push(self.bos);
        ids.extend(text_ids);
        ids.resize(Self::MAX_LEN, self.eos);
        Ok(Tokens { ids, truncated })
    }

    /// [`encode`](Self::encode) each prompt.
    pub fn encode_batch<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<Tokens>, TokenError> {
        texts.iter().map(|t| self.encode(t.as_ref())).collect()
    }
}

/// Stack tokenised prompts into a `[B, 77]` u32 tensor.
pub fn ids_tensor(batch: &[Tokens], device: &Device) -> candle_core::Result<Tensor> {
    let flat: Vec<u32> = batch.iter().flat_map(|t| t.ids.iter().copied()).collect();
    Tensor::from_vec(flat, (batch.len(), ClipTokenizer::MAX_LEN), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> ClipTokenizer {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tiny-sd/tokenizer/tokenizer.json");
        ClipTokenizer::from_file(&p).unwrap()
    }

    #[test]
    fn new_tokens_are_single_and_consecutive() {
        let mut t = tok();
        assert_eq!(t.vocab_size(), 49408);
        let ids = t.add_tokens(&["<v*>", "<v*>_1", "<a0*>"]).unwrap();
        assert_eq!(ids, vec![49408, 49409, 49410]);
        assert_eq!(t.vocab_size(), 49411);
        let e = t.encode("a <v*> <v*>_1 on the <a0*>, <V*>").unwrap();
        assert_eq!(
            &e.ids[..9],
            &[49406, 320, 49408, 49409, 525, 518, 49410, 267, 49408]
        );
        assert_eq!(e.positions(49408), vec![2, 8]);
        assert!(matches!(
            t.add_tokens(&["<v*>"]),
            Err(TokenError::AlreadyInVocab(_))
        ));
        assert!(matches!(
            t.add_tokens(&["dog</w>"]),
            Err(TokenError::AlreadyInVocab(_))
        ));
    }

    #[test]
    fn truncation_keeps_bos_and_eos() {
        let t = tok();
        let long = "a photo of a dog ".repeat(30);
        let e = t.encode(&long).unwrap();
        assert!(e.truncated);
        assert_eq!(e.ids.len(), 77);
        assert_eq!(e.ids[0], 49406);
        assert_eq!(e.ids[76], 49407);
        assert!(e.ids[1..76].iter().all(|&i| i != 49407));
        let short = t.encode("a photo of a dog").unwrap();
        assert!(!short.truncated);
        // Exactly 75 text tokens fit without truncation.
        let exact = "dog ".repeat(75);
        let e = t.encode(&exact).unwrap();
        assert!(!e.truncated && e.ids[75] != 49407 && e.ids[76] == 49407);
        assert!(t.encode(&"dog ".repeat(76)).unwrap().truncated);
        let x = ids_tensor(&[short.clone(), short], &Device::Cpu).unwrap();
        assert_eq!(x.dims(), &[2, 77]);
    }

    #[test]
    fn initializer_words() {
        let t = tok();
        assert!(t.single_token_id("dog").is_ok());
        assert_eq!(
            t.single_token_id("object").unwrap(),
            t.text_ids("object").unwrap()[0]
        );
        let err = t.single_token_id("backpackish thing").unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, TokenError::NotSingleToken { .. }));
        assert!(
            msg.contains("backpackish thing") && msg.contains("--init-word"),
            "{msg}"
        );
        assert_eq!(t.default_init_word("dog"), "dog");
        assert_eq!(t.default_init_word("teddy bear"), "object");
    }
}
