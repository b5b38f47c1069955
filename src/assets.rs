//! Files compiled into the binary, so that it works without the repository checkout or a download:
//! the CLIP BPE tokenizer (`assets/clip-tokenizer.json`, the `tokenizer.json` of
//! `openai/clip-vit-base-patch32`, which is SD 1.5's tokenizer too: SPEC.md §1) and the DreamBooth
//! classic-protocol prompt lists (`data/dreambooth-split/prompts.json`).

use anyhow::{anyhow, Result};
use tokenizers::Tokenizer;

/// The CLIP BPE tokenizer as `tokenizer.json` bytes (49408 tokens, BOS 49406, EOS = pad 49407).
pub const CLIP_TOKENIZER_JSON: &[u8] = include_bytes!("../assets/clip-tokenizer.json");

/// The bundled benchmark's `prompts.json` (25 object and 25 live prompts, each with one `{}`).
pub const DREAMBOOTH_PROMPTS_JSON: &str = include_str!("../data/dreambooth-split/prompts.json");

/// CLIP's context length: BOS + 75 tokens + EOS.
pub const CLIP_MAX_TOKENS: usize = 77;

/// Parse the bundled CLIP tokenizer (no truncation or padding configured: counts are exact).
pub fn clip_tokenizer() -> Result<Tokenizer> {
    Tokenizer::from_bytes(CLIP_TOKENIZER_JSON)
        .map_err(|e| anyhow!("the bundled CLIP tokenizer does not parse: {e}"))
}

/// The number of CLIP tokens of `text`, BOS and EOS included (compare with [`CLIP_MAX_TOKENS`]).
pub fn clip_token_count(tok: &Tokenizer, text: &str) -> Result<usize> {
    let enc = tok
        .encode(text, true)
        .map_err(|e| anyhow!("cannot tokenize {text:?}: {e}"))?;
    Ok(enc.get_ids().len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_tokenizer_counts_bos_and_eos() {
        let tok = clip_tokenizer().unwrap();
        let enc = tok.encode("a photo of a dog", true).unwrap();
        let ids = enc.get_ids();
        assert_eq!(ids.first(), Some(&49406));
        assert_eq!(ids.last(), Some(&49407));
        assert_eq!(clip_token_count(&tok, "a photo of a dog").unwrap(), 7);
        assert_eq!(tok.get_vocab_size(true), 49408);
    }

    #[test]
    fn bundled_prompts_parse() {
        let p: crate::data::Prompts = serde_json::from_str(DREAMBOOTH_PROMPTS_JSON).unwrap();
        assert_eq!(p.object.len(), 25);
        assert_eq!(p.live.len(), 25);
    }
}
