//! The split-test dataset layout (data/dreambooth-split/README.md):
//!
//! ```text
//! subjects.json            [{"name": "dog", "class": "dog", "kind": "live" | "object"}, ...]
//! prompts.json             {"object": [...], "live": [...]}   (classic protocol prompts)
//! <subject>/train/*.jpg    images to personalize on
//! <subject>/test/*.jpg     held-out reference images
//! <subject>/captions.json  {"<test image file>": [captions with one "{}"], ...}
//! <subject>/masks/<stem>.png   optional subject masks of the training images (white = subject)
//! ```
//!
//! [`Dataset::open`] reads the two top-level files; [`Dataset::subject`] lists one subject's
//! images (sorted by file name) and reads its captions. Deeper validation (every image decodes,
//! caption lengths, leaks) is [`crate::data::check`].

use super::{io_err, DataError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Environment variable that overrides [`Dataset::default_dir`].
pub const DATA_ENV: &str = "ATTRACTOR_DATA";
/// The bundled benchmark's folder, relative to the repository root.
pub const BUNDLED_REL: &str = "data/dreambooth-split";
/// File extensions (lower case) that count as images in `train/` and `test/`.
pub const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff"];

/// Whether a subject is a living thing or an object: picks the prompt list of the classic
/// protocol (`prompts.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Live,
    Object,
}

impl Kind {
    /// The spelling used in `subjects.json` and `prompts.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Live => "live",
            Kind::Object => "object",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One entry of `subjects.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubjectEntry {
    /// Folder name under the dataset root.
    pub name: String,
    /// Class word(s): fills `{}` for CLIP-T, initialises the placeholder token.
    pub class: String,
    pub kind: Kind,
}

/// `prompts.json`: the classic-protocol prompt lists, each prompt with one `{}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prompts {
    pub object: Vec<String>,
    pub live: Vec<String>,
}

impl Prompts {
    /// The prompt list for subjects of `kind`.
    pub fn for_kind(&self, kind: Kind) -> &[String] {
        match kind {
            Kind::Live => &self.live,
            Kind::Object => &self.object,
        }
    }
}

/// A dataset folder: its subject list and classic-protocol prompts.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub dir: PathBuf,
    pub subjects: Vec<SubjectEntry>,
    pub prompts: Prompts,
}

/// One subject: its images (sorted by file name) and test captions.
#[derive(Debug, Clone)]
pub struct Subject {
    pub name: String,
    pub class: String,
    pub kind: Kind,
    /// `<dataset>/<name>`.
    pub dir: PathBuf,
    pub train_images: Vec<PathBuf>,
    pub test_images: Vec<PathBuf>,
    /// Test image file name (e.g. `"03.jpg"`) -> its captions, as in `captions.json`.
    pub captions: BTreeMap<String, Vec<String>>,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path, fix: &str) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            DataError::Layout {
                path: path.to_path_buf(),
                reason: "file not found".into(),
                fix: fix.into(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        reason: e.to_string(),
        fix: fix.into(),
    })
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive) and is not a hidden file.
pub fn is_image_file(path: &Path) -> bool {
    let hidden = path
        .file_name()
        .map(|n| n.to_string_lossy().starts_with('.'))
        .unwrap_or(true);
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    !hidden && IMAGE_EXTENSIONS.contains(&ext.as_str())
}

/// The image files directly inside `dir`, sorted by file name; an absent folder gives none.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() && is_image_file(&path) {
            out.push(path);
        }
    }
    out.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    Ok(out)
}

/// The file name of `path` as a string (what `captions.json` keys on).
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl Dataset {
    /// Read `subjects.json` and `prompts.json` of the dataset at `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Dataset> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(DataError::Layout {
                path: dir,
                reason: "not a folder".into(),
                fix: "pass --data with a dataset folder in the split-test layout (see data/dreambooth-split/README.md), or build one with `attractor dataset new`".into(),
            });
        }
        let subjects: Vec<SubjectEntry> = read_json(
            &dir.join("subjects.json"),
            r#"write subjects.json as a list of {"name": <folder>, "class": <class word>, "kind": "live" or "object"}"#,
        )?;
        let mut seen = std::collections::BTreeSet::new();
        for s in &subjects {
            if !seen.insert(s.name.as_str()) {
                return Err(DataError::Layout {
                    path: dir.join("subjects.json"),
                    reason: format!("subject `{}` is listed twice", s.name),
                    fix: "keep one entry per subject folder".into(),
                });
            }
        }
        let prompts: Prompts = read_json(
            &dir.join("prompts.json"),
            r#"write prompts.json as {"object": [prompts with {}], "live": [prompts with {}]} (copy the bundled data/dreambooth-split/prompts.json)"#,
        )?;
        Ok(Dataset {
            dir,
            subjects,
            prompts,
        })
    }

    /// Open the bundled benchmark (see [`Dataset::default_dir`]).
    pub fn open_default() -> Result<Dataset> {
        Dataset::open(Dataset::default_dir()?)
    }

    /// Where the bundled benchmark lives. Search order, first hit wins:
    /// 1. `$ATTRACTOR_DATA` if set (an error if it is not a folder);
    /// 2. `data/dreambooth-split` under the current directory (running from a checkout);
    /// 3. `data/dreambooth-split` beside the executable or in any of its parent folders (a
    ///    binary shipped next to the data, or `target/debug/attractor` inside the repository);
    /// 4. `data/dreambooth-split` under the crate root recorded at build time
    ///    (`CARGO_MANIFEST_DIR`: a binary run from a checkout that has moved no longer finds it).
    pub fn default_dir() -> Result<PathBuf> {
        if let Some(v) = std::env::var_os(DATA_ENV) {
            let p = PathBuf::from(v);
            if p.is_dir() {
                return Ok(p);
            }
            return Err(DataError::Layout {
                path: p,
                reason: format!("{DATA_ENV} names no folder"),
                fix: format!(
                    "set {DATA_ENV} to a dataset folder, or unset it to use the bundled benchmark"
                ),
            });
        }
        let mut candidates = Vec::new();
        if let Ok(cwd) = std::env::current_dir() {
            candidates.push(cwd.join(BUNDLED_REL));
        }
        if let Ok(exe) = std::env::current_exe() {
            for dir in exe.ancestors().skip(1) {
                candidates.push(dir.join(BUNDLED_REL));
            }
        }
        candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(BUNDLED_REL));
        for c in &candidates {
            if c.join("subjects.json").is_file() {
                return Ok(c.clone());
            }
        }
        Err(DataError::NoDefaultDataset {
            searched: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Names of all subjects, in `subjects.json` order.
    pub fn subject_names(&self) -> Vec<&str> {
        self.subjects.iter().map(|s| s.name.as_str()).collect()
    }

    /// The `subjects.json` entry for `name`.
    pub fn entry(&self, name: &str) -> Result<&SubjectEntry> {
        self.subjects
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| DataError::UnknownSubject {
                name: name.into(),
                dataset: self.dir.clone(),
                known: self.subject_names().join(", "),
            })
    }

    /// Load one subject: list its train/test images and read `captions.json`.
    ///
    /// A subject without a `test/` folder has no test images; `captions.json` may then be absent.
    /// Captions are read as they are: [`crate::data::check`] validates them.
    pub fn subject(&self, name: &str) -> Result<Subject> {
        let entry = self.entry(name)?;
        let dir = self.dir.join(&entry.name);
        if !dir.is_dir() {
            return Err(DataError::Layout {
                path: dir,
                reason: format!("subject `{name}` is listed in subjects.json but has no folder"),
                fix: format!(
                    "create {name}/train/ with its photos, or remove the entry from subjects.json"
                ),
            });
        }
        let train_images = list_images(&dir.join("train"))?;
        if train_images.is_empty() {
            return Err(DataError::Layout {
                path: dir.join("train"),
                reason: "no training images (jpg, png, webp, bmp, tiff)".into(),
                fix: "put the photos to personalize on into this folder".into(),
            });
        }
        let test_images = list_images(&dir.join("test"))?;
        let captions_path = dir.join("captions.json");
        let captions = if captions_path.is_file() || !test_images.is_empty() {
            read_json(
                &captions_path,
                r#"write captions.json as {"<test image file>": ["caption with {} for the subject", ...]}; `attractor dataset new` writes a template"#,
            )?
        } else {
            BTreeMap::new()
        };
        Ok(Subject {
            name: entry.name.clone(),
            class: entry.class.clone(),
            kind: entry.kind,
            dir,
            train_images,
            test_images,
            captions,
        })
    }

    /// Load every subject, in `subjects.json` order.
    pub fn all_subjects(&self) -> Result<Vec<Subject>> {
        self.subjects
            .iter()
            .map(|s| self.subject(&s.name))
            .collect()
    }

    /// The classic-protocol prompts for subjects of `kind`.
    pub fn prompts_for(&self, kind: Kind) -> &[String] {
        self.prompts.for_kind(kind)
    }
}

impl Subject {
    /// `<subject>/masks`.
    pub fn masks_dir(&self) -> PathBuf {
        self.dir.join("masks")
    }

    /// Where the mask of a training image lives: `<subject>/masks/<image stem>.png`.
    pub fn mask_path(&self, train_image: &Path) -> PathBuf {
        let stem = train_image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.masks_dir().join(format!("{stem}.png"))
    }

    /// The masks of all training images, `None` where a mask file is absent.
    pub fn mask_paths(&self) -> Vec<(PathBuf, Option<PathBuf>)> {
        self.train_images
            .iter()
            .map(|img| {
                let m = self.mask_path(img);
                let present = m.is_file().then_some(m);
                (img.clone(), present)
            })
            .collect()
    }

    /// The captions of a test image (by path or file name).
    pub fn captions_for(&self, test_image: &Path) -> Result<&[String]> {
        let key = file_name(test_image);
        self.captions
            .get(&key)
            .map(|v| v.as_slice())
            .ok_or_else(|| DataError::Layout {
                path: self.dir.join("captions.json"),
                reason: format!("no captions for test image `{key}`"),
                fix: format!(r#"add "{key}": [10 captions with {{}}] to it, then run `attractor dataset check`"#),
            })
    }
}

/// Why a caption or prompt is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CaptionError {
    #[error("has no `{{}}` where the subject goes")]
    NoSlot,
    #[error("has {0} `{{}}` slots; exactly one is needed")]
    TooManySlots(usize),
    #[error("is empty")]
    Empty,
}

/// A caption must be non-empty and contain exactly one `{}` (the subject's place).
pub fn validate_caption(caption: &str) -> std::result::Result<(), CaptionError> {
    if caption.trim().is_empty() {
        return Err(CaptionError::Empty);
    }
    match caption.matches("{}").count() {
        0 => Err(CaptionError::NoSlot),
        1 => Ok(()),
        n => Err(CaptionError::TooManySlots(n)),
    }
}

/// Put `word` where the caption's `{}` is (every `{}`, should there be several).
pub fn fill(caption: &str, word: &str) -> String {
    caption.replace("{}", word)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caption_slots() {
        assert_eq!(validate_caption("a photo of {}"), Ok(()));
        assert_eq!(validate_caption("a photo"), Err(CaptionError::NoSlot));
        assert_eq!(
            validate_caption("{} and {}"),
            Err(CaptionError::TooManySlots(2))
        );
        assert_eq!(validate_caption("  "), Err(CaptionError::Empty));
        assert_eq!(fill("a {} on the beach", "<v*>"), "a <v*> on the beach");
    }

    #[test]
    fn image_extensions() {
        assert!(is_image_file(Path::new("a/01.JPG")));
        assert!(is_image_file(Path::new("a/01.png")));
        assert!(!is_image_file(Path::new("a/.01.jpg")));
        assert!(!is_image_file(Path::new("a/notes.txt")));
    }
}
