//! The split-test dataset layout (data/dreambooth-split/README.md):
//!
//! ```text
//! subjects.json            [{"name": "dog", "class": "dog", "kind": "live" | "object"}, ...]
//! prompts.json             {"object": [...], "live": [...]}   (classic protocol prompts; optional:
//!                          only the classic protocol needs it)
//! <subject>/train/*.jpg    images to personalize on
//! <subject>/test/*.jpg     held-out reference images
//! <subject>/captions.json  {"<test image file>": [captions with one "{}"], ...}
//! <subject>/masks/<stem>.png   optional subject masks of the training images (white = subject)
//! ```
//!
//! [`Dataset::open`] reads the two top-level files; [`Dataset::subject`] lists one subject's
//! images (sorted by file name) and reads its captions. Deeper validation (every image decodes,
//! caption lengths, leaks) is [`crate::data::check`].
//!
//! [`Dataset::from_photos`] takes a plain folder of photos instead (`train --images DIR`): one
//! subject named after the folder, the photos as its training images, masks in `DIR/masks/`, no
//! test split, and the DreamBooth prompt lists built into the binary for the classic protocol.

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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
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

impl Kind {
    /// The kind of a class word when nobody said: live for the DreamBooth benchmark's live
    /// classes (cat, dog), object for everything else.
    pub fn guess(class: &str) -> Kind {
        match class.trim().to_ascii_lowercase().as_str() {
            "cat" | "dog" => Kind::Live,
            _ => Kind::Object,
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
    /// The classic protocol's prompt lists (empty when `prompts.json` is absent: see
    /// [`Dataset::prompts_for`]).
    pub prompts: Prompts,
    /// Where [`Dataset::prompts`] came from.
    pub prompts_from: PromptsFrom,
    /// `Some` for a plain folder of photos ([`Dataset::from_photos`]) instead of the split-test
    /// layout.
    pub photos: Option<PhotoFolder>,
}

/// Where a dataset's classic-protocol prompts come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptsFrom {
    /// The dataset's `prompts.json`.
    File(PathBuf),
    /// The dataset has no `prompts.json` (this path): everything but the classic protocol works.
    Missing(PathBuf),
    /// The DreamBooth lists built into the binary ([`crate::assets::DREAMBOOTH_PROMPTS_JSON`]):
    /// a photo folder's.
    Bundled,
}

/// A plain folder of photos as a one-subject dataset (`train --images DIR`): the photos are the
/// training images, and there are no captions. `train --holdout K` sets K of them aside as the
/// test split of the held-out loss ([`holdout_indices`] says which).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PhotoFolder {
    /// Where the photos' masks are (`DIR/masks` unless `--masks` says otherwise).
    pub masks_dir: PathBuf,
    /// How many photos are held out as test images (`--holdout`; 0 = none).
    pub holdout: usize,
}

/// Which of `n` photos (sorted by name) `--holdout k` sets aside: the middles of `k` equal
/// stretches of the sorted list. Photos are usually named in shooting order, where neighbours
/// are near-duplicates; spreading the held-out ones over the list keeps each of them away from
/// its nearest twin less often than taking the last `k` would. Deterministic, so a resumed run
/// holds out the same photos.
pub fn holdout_indices(n: usize, k: usize) -> Vec<usize> {
    (0..k.min(n)).map(|i| (2 * i + 1) * n / (2 * k)).collect()
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
    /// Where the masks of the training images are: `<subject>/masks`, or a photo folder's.
    pub masks_dir: PathBuf,
    /// True for the one subject of a plain photo folder ([`Dataset::from_photos`]).
    pub photo_folder: bool,
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
        // prompts.json serves the classic protocol only: without it, training and the
        // split-test protocol still work, and the classic protocol names the missing file.
        let prompts_path = dir.join("prompts.json");
        let (prompts, prompts_from) = if prompts_path.exists() {
            let p: Prompts = read_json(&prompts_path, PROMPTS_FIX)?;
            (p, PromptsFrom::File(prompts_path))
        } else {
            (Prompts::default(), PromptsFrom::Missing(prompts_path))
        };
        Ok(Dataset {
            dir,
            subjects,
            prompts,
            prompts_from,
            photos: None,
        })
    }

    /// A plain folder of photos as a one-subject dataset: the subject is named after the
    /// folder, its training images are the folder's images (sorted by file name), it has no
    /// test split, and the classic protocol uses the DreamBooth prompt lists built into the
    /// binary. Masks are looked for in `masks_dir` (default `dir/masks`).
    pub fn from_photos(
        dir: impl AsRef<Path>,
        class: &str,
        kind: Kind,
        masks_dir: Option<PathBuf>,
    ) -> Result<Dataset> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(DataError::Layout {
                path: dir,
                reason: "not a folder".into(),
                fix: "pass --images with the folder that holds your photos (jpg, png, webp, bmp, tiff)".into(),
            });
        }
        if class.trim().is_empty() || class.contains('{') {
            return Err(DataError::Layout {
                path: dir,
                reason: format!("--class {class:?} is not a class word"),
                fix: "name what the photos show, e.g. --class dog or --class backpack".into(),
            });
        }
        let name = std::fs::canonicalize(&dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .or_else(|| dir.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "photos".into());
        let prompts: Prompts = serde_json::from_str(crate::assets::DREAMBOOTH_PROMPTS_JSON)
            .map_err(|e| DataError::Json {
                path: PathBuf::from("data/dreambooth-split/prompts.json (built in)"),
                reason: e.to_string(),
                fix: "rebuild attractor from an intact checkout".into(),
            })?;
        Ok(Dataset {
            dir: dir.clone(),
            subjects: vec![SubjectEntry {
                name,
                class: class.trim().to_string(),
                kind,
            }],
            prompts,
            prompts_from: PromptsFrom::Bundled,
            photos: Some(PhotoFolder {
                masks_dir: masks_dir.unwrap_or_else(|| dir.join("masks")),
                holdout: 0,
            }),
        })
    }

    /// The photo folder with `k` of its photos held out as test images (`train --holdout K`);
    /// a split-test dataset is returned unchanged (its test split is its own).
    pub fn holding_out(mut self, k: usize) -> Dataset {
        if let Some(p) = &mut self.photos {
            p.holdout = k;
        }
        self
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
        if let Some(photos) = &self.photos {
            let all = list_images(&self.dir)?;
            if all.is_empty() {
                return Err(DataError::Layout {
                    path: self.dir.clone(),
                    reason: "no photos (jpg, png, webp, bmp, tiff) directly in this folder".into(),
                    fix: "put the photos to personalize on into it (3-5 of the subject, as varied as you have)".into(),
                });
            }
            if photos.holdout >= all.len() {
                return Err(DataError::Layout {
                    path: self.dir.clone(),
                    reason: format!(
                        "--holdout {} leaves no photo to train on: the folder has {}",
                        photos.holdout,
                        all.len()
                    ),
                    fix: format!(
                        "hold out fewer (at most {}; 1 of 5 is typical), or add photos",
                        all.len() - 1
                    ),
                });
            }
            let held = holdout_indices(all.len(), photos.holdout);
            let (test_images, train_images): (Vec<_>, Vec<_>) = all
                .into_iter()
                .enumerate()
                .partition(|(i, _)| held.contains(i));
            let train_images = train_images.into_iter().map(|(_, p)| p).collect();
            let test_images = test_images.into_iter().map(|(_, p)| p).collect();
            return Ok(Subject {
                name: entry.name.clone(),
                class: entry.class.clone(),
                kind: entry.kind,
                dir: self.dir.clone(),
                train_images,
                test_images,
                captions: BTreeMap::new(),
                masks_dir: photos.masks_dir.clone(),
                photo_folder: true,
            });
        }
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
            masks_dir: dir.join("masks"),
            dir,
            train_images,
            test_images,
            captions,
            photo_folder: false,
        })
    }

    /// Load every subject, in `subjects.json` order.
    pub fn all_subjects(&self) -> Result<Vec<Subject>> {
        self.subjects
            .iter()
            .map(|s| self.subject(&s.name))
            .collect()
    }

    /// The classic-protocol prompts for subjects of `kind`; an error naming `prompts.json` when
    /// the dataset has none.
    pub fn prompts_for(&self, kind: Kind) -> Result<&[String]> {
        if let PromptsFrom::Missing(path) = &self.prompts_from {
            return Err(DataError::Layout {
                path: path.clone(),
                reason: "file not found: the classic protocol (--split train or both) takes its prompts from it".into(),
                fix: PROMPTS_FIX.into(),
            });
        }
        Ok(self.prompts.for_kind(kind))
    }

    /// What identifies the dataset in an evaluation's config: its canonical folder, prefixed
    /// with `photos:` for a plain photo folder (whose classic scores are labelled
    /// training-reference scores).
    pub fn id(&self) -> String {
        let dir = std::fs::canonicalize(&self.dir)
            .unwrap_or_else(|_| self.dir.clone())
            .display()
            .to_string();
        match self.photos {
            Some(_) => format!("{PHOTOS_ID_PREFIX}{dir}"),
            None => dir,
        }
    }
}

/// [`Dataset::id`]'s prefix for a plain photo folder.
pub const PHOTOS_ID_PREFIX: &str = "photos:";

const PROMPTS_FIX: &str = r#"write prompts.json as {"object": [prompts with {}], "live": [prompts with {}]} (copy the bundled data/dreambooth-split/prompts.json)"#;

impl Subject {
    /// `<subject>/masks`, or a photo folder's masks folder.
    pub fn masks_dir(&self) -> PathBuf {
        self.masks_dir.clone()
    }

    /// The fix for a mask that is unusable: remake it with `attractor masks --force` (a
    /// dataset), or delete it so that `train` makes it again (a photo folder, whose missing
    /// masks `train` makes on demand).
    pub fn remake_mask_fix(&self) -> String {
        if self.photo_folder {
            "delete it and run the same `attractor train --images` command again (missing masks are made anew)".into()
        } else {
            format!("rerun: attractor masks --subject {} --force", self.name)
        }
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
