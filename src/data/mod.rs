//! Everything the project reads from a dataset folder: the split-test layout ([`layout`]), image
//! and mask decoding into tensors ([`image`]), the dataset checks and the builder behind
//! `attractor dataset check|new` ([`check`]), automatic subject masks ([`masks`]), and a plain
//! folder of photos as training input ([`photos`]).
//!
//! The layout is the one described in `data/dreambooth-split/README.md` (the PDST-style split-test
//! benchmark). Nothing here knows about the command line; errors that callers branch on are
//! [`DataError`], and every message names the file and the fix.

pub mod check;
pub mod image;
pub mod layout;
pub mod masks;
pub mod photos;

pub use layout::{
    fill, validate_caption, CaptionError, Dataset, Kind, Prompts, Subject, SubjectEntry,
};

use std::path::PathBuf;

/// Errors of the data layer. Each message names the file (or folder) and says how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON file of the layout is malformed.
    #[error("{path} is not valid: {reason}. Fix: {fix}")]
    Json {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    /// A part of the layout is missing or inconsistent.
    #[error("{path}: {reason}. Fix: {fix}")]
    Layout {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    /// `--subject` names no subject of the dataset.
    #[error("unknown subject `{name}` in {dataset}; known subjects: {known}. Fix: pass one of these to --subject, or add an entry for `{name}` to {dataset}/subjects.json")]
    UnknownSubject {
        name: String,
        dataset: PathBuf,
        known: String,
    },
    /// No dataset folder could be located.
    #[error("cannot find the bundled dataset data/dreambooth-split (looked in: {searched}). Fix: pass --data DIR or set ATTRACTOR_DATA=DIR")]
    NoDefaultDataset { searched: String },
    /// An image file does not decode (unsupported, corrupt or truncated).
    #[error("cannot decode image {path}: {reason}. Fix: re-export it as JPEG or PNG (or delete it from the dataset)")]
    BadImage { path: PathBuf, reason: String },
    /// A mask does not fit its image.
    #[error("mask {path}: {reason}. Fix: {fix}")]
    BadMask {
        path: PathBuf,
        reason: String,
        fix: String,
    },
    /// Several problems at once, one line each (with its file and fix).
    #[error("{} problems:\n  {}", lines.len(), lines.join("\n  "))]
    Problems { lines: Vec<String> },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias of the data layer.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub(crate) fn io_err(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> DataError {
    let path = path.into();
    move |source| DataError::Io { path, source }
}
