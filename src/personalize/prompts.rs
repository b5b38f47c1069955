//! Training prompts: Textual Inversion's 27 "object" templates (diffusers
//! `examples/textual_inversion/textual_inversion.py`, `imagenet_templates_small`), the attractor
//! paper's three pools (SPEC.md §5: subject, background and joint), the names of the new tokens,
//! and a seeded sampler that draws one template per pool per image.

use crate::rng::Rng;

/// Textual Inversion's "object" templates (SPEC.md §3).
pub const TI_OBJECT_TEMPLATES: [&str; 27] = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// The subject pool (one slot: the subject placeholder).
pub const SUBJECT_TEMPLATES: [&str; 15] = [
    "a photo of a {}",
    "a rendering of a {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of a nice {}",
];

/// The two-slot pool: (class word, attractor) for the background prompts, (subject, attractor)
/// for the joint prompts.
pub const TWO_SLOT_TEMPLATES: [&str; 15] = [
    "a photo of a {} in the {}",
    "a rendering of a {} in the {}",
    "a cropped photo of the {} in the {}",
    "the photo of a {} in the {}",
    "a photo of a clean {} in the {}",
    "a photo of my {} in the {}",
    "a photo of the nice {} in the {}",
    "a good photo of a {} in the {}",
    "a rendition of a {} in the {}",
    "a photo of the clean {} in the {}",
    "a photo of a cool {} in the {}",
    "a close-up photo of a {} in the {}",
    "a photo of the cool {} in the {}",
    "a cropped photo of a {} in the {}",
    "a photo of one {} in the {}",
];

/// The subject placeholder.
pub const PLACEHOLDER: &str = "<v*>";

/// The initializer word of every attractor token (our choice, SPEC.md §5).
pub const ATTRACTOR_INIT_WORD: &str = "background";

/// Fill the `{}` slots of `template` in order with `words`. Extra `{}` (more slots than words)
/// are left as they are; extra words are ignored.
pub fn fill(template: &str, words: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    let mut words = words.iter();
    while let Some(i) = rest.find("{}") {
        match words.next() {
            Some(w) => {
                out.push_str(&rest[..i]);
                out.push_str(w);
            }
            None => out.push_str(&rest[..i + 2]),
        }
        rest = &rest[i + 2..];
    }
    out.push_str(rest);
    out
}

/// The `n` subject tokens of a run with `--num-vectors n`: `<v*>`, `<v*>_1`, ..., `<v*>_{n-1}`.
pub fn placeholder_tokens(n: usize) -> Vec<String> {
    (0..n.max(1))
        .map(|i| {
            if i == 0 {
                PLACEHOLDER.to_string()
            } else {
                format!("{PLACEHOLDER}_{i}")
            }
        })
        .collect()
}

/// What a prompt writes for the subject: the tokens space-joined.
pub fn placeholder_text(n: usize) -> String {
    placeholder_tokens(n).join(" ")
}

/// The attractor token of training image `k`: `<a{k}*>`.
pub fn attractor_token(k: usize) -> String {
    format!("<a{k}*>")
}

/// The three prompts of one training image in one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromptTriple {
    /// Subject pool with the subject placeholder.
    pub subject: String,
    /// Two-slot pool with (class word, attractor).
    pub background: String,
    /// Two-slot pool with (subject placeholder, attractor).
    pub joint: String,
}

/// Draws training prompts from our seeded RNG.
#[derive(Clone, Debug)]
pub struct PromptSampler {
    /// The subject text in prompts (`<v*>` or `<v*> <v*>_1 ...`).
    pub subject: String,
    /// The subject's class word (fills background prompts).
    pub class_word: String,
}

impl PromptSampler {
    pub fn new(subject: impl Into<String>, class_word: impl Into<String>) -> Self {
        Self {
            subject: subject.into(),
            class_word: class_word.into(),
        }
    }

    /// A TI / NeTI prompt: one of the 27 object templates with the subject.
    pub fn object(&self, rng: &mut Rng) -> String {
        let t = TI_OBJECT_TEMPLATES[rng.range(0, TI_OBJECT_TEMPLATES.len())];
        fill(t, &[&self.subject])
    }

    /// The attractor prompts of one image whose attractor token is `attractor`: one template per
    /// pool, drawn independently (subject, then background, then joint).
    pub fn triple(&self, rng: &mut Rng, attractor: &str) -> PromptTriple {
        let s = SUBJECT_TEMPLATES[rng.range(0, SUBJECT_TEMPLATES.len())];
        let b = TWO_SLOT_TEMPLATES[rng.range(0, TWO_SLOT_TEMPLATES.len())];
        let j = TWO_SLOT_TEMPLATES[rng.range(0, TWO_SLOT_TEMPLATES.len())];
        PromptTriple {
            subject: fill(s, &[&self.subject]),
            background: fill(b, &[&self.class_word, attractor]),
            joint: fill(j, &[&self.subject, attractor]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn templates_are_distinct_with_the_right_slots() {
        for (pool, slots) in [
            (&TI_OBJECT_TEMPLATES[..], 1),
            (&SUBJECT_TEMPLATES[..], 1),
            (&TWO_SLOT_TEMPLATES[..], 2),
        ] {
            let set: HashSet<_> = pool.iter().collect();
            assert_eq!(set.len(), pool.len());
            for t in pool {
                assert_eq!(t.matches("{}").count(), slots, "{t}");
            }
        }
        assert_eq!(TI_OBJECT_TEMPLATES[0], "a photo of a {}");
        assert_eq!(TI_OBJECT_TEMPLATES[26], "a photo of a small {}");
        // Every subject template is also a TI object template.
        for t in SUBJECT_TEMPLATES {
            assert!(TI_OBJECT_TEMPLATES.contains(&t), "{t}");
        }
    }

    #[test]
    fn fill_and_names() {
        assert_eq!(fill("a photo of a {}", &["<v*>"]), "a photo of a <v*>");
        assert_eq!(
            fill("a photo of a {} in the {}", &["dog", "<a3*>"]),
            "a photo of a dog in the <a3*>"
        );
        assert_eq!(fill("a {} and {}", &["x"]), "a x and {}");
        assert_eq!(fill("no slot", &["x"]), "no slot");
        assert_eq!(placeholder_tokens(1), vec!["<v*>"]);
        assert_eq!(placeholder_tokens(3), vec!["<v*>", "<v*>_1", "<v*>_2"]);
        assert_eq!(placeholder_text(2), "<v*> <v*>_1");
        assert_eq!(attractor_token(0), "<a0*>");
        assert_eq!(attractor_token(12), "<a12*>");
    }

    #[test]
    fn sampler_is_seeded_and_covers_the_pools() {
        let s = PromptSampler::new("<v*>", "dog");
        let a: Vec<_> = (0..5)
            .map(|_| s.triple(&mut Rng::new(3), "<a1*>"))
            .collect();
        assert!(a.windows(2).all(|w| w[0] == w[1]));
        let mut rng = Rng::new(4);
        let mut seen = HashSet::new();
        for _ in 0..2000 {
            let p = s.triple(&mut rng, "<a1*>");
            assert!(p.subject.ends_with("<v*>") && !p.subject.contains("<a1*>"));
            assert!(p.background.contains("dog") && p.background.ends_with("in the <a1*>"));
            assert!(!p.background.contains("<v*>"));
            assert!(p.joint.contains("<v*> in the <a1*>"));
            seen.insert(p.subject);
            seen.insert(p.background);
            seen.insert(p.joint);
        }
        assert_eq!(seen.len(), 15 + 15 + 15);
        let objects: HashSet<_> = (0..2000).map(|_| s.object(&mut rng)).collect();
        assert_eq!(objects.len(), 27);
    }
}
