//! A plain folder of photos as training input (`attractor train --images DIR`): what a run
//! records about it ([`PhotoSource`]: the folder, the class word, the classic protocol's prompt
//! kind, the masks folder and a fingerprint of the photos), enough to open it again
//! ([`PhotoSource::open`]) and to tell whether it still holds the photos the run learned from
//! ([`PhotoSource::changes`]).
//!
//! The fingerprint is the FNV-1a 64 hash of each photo's bytes, by file name (the order the
//! trainer reads them in), and one hash over those lines: a renamed, edited, added or removed
//! photo changes it; touching a file or copying the folder elsewhere does not.

use super::layout::{file_name, Dataset, Kind, Subject};
use super::{io_err, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A run's record of its photo folder (`config.json` `images`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhotoSource {
    /// The folder, absolute.
    pub dir: String,
    /// The class word (`--class`).
    pub class: String,
    /// Which classic-protocol prompt list scores the run (`--kind`).
    pub kind: Kind,
    /// Where the masks are (default `<dir>/masks`), absolute.
    pub masks: String,
    /// Each photo's file name and the FNV-1a 64 hash of its bytes (hex), sorted by name.
    pub files: BTreeMap<String, String>,
    /// One hash over `files` (hex): equal fingerprints, equal photos.
    pub fingerprint: String,
    /// `train --holdout K`: the photos set aside as test images (file names; empty = none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub holdout: Vec<String>,
}

/// Every photo of the folder: the training images and those `--holdout` set aside.
fn photos_of(subject: &Subject) -> Vec<PathBuf> {
    let mut all: Vec<PathBuf> = subject
        .train_images
        .iter()
        .chain(&subject.test_images)
        .cloned()
        .collect();
    all.sort();
    all
}

fn absolute(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

/// Each photo's hash and the hash over all of them.
fn hashes(images: &[PathBuf]) -> Result<(BTreeMap<String, String>, String)> {
    let mut files = BTreeMap::new();
    for p in images {
        let bytes = std::fs::read(p).map_err(io_err(p))?;
        files.insert(
            file_name(p),
            format!("{:016x}", crate::files::fnv64(&bytes)),
        );
    }
    let lines: String = files.iter().map(|(n, h)| format!("{n}:{h}\n")).collect();
    let fingerprint = format!("{:016x}", crate::files::fnv64(lines.as_bytes()));
    Ok((files, fingerprint))
}

impl PhotoSource {
    /// The record of `subject`, the one subject of the photo folder `dataset`.
    pub fn record(dataset: &Dataset, subject: &Subject) -> Result<Self> {
        let (files, fingerprint) = hashes(&photos_of(subject))?;
        Ok(Self {
            dir: absolute(&dataset.dir).display().to_string(),
            class: subject.class.clone(),
            kind: subject.kind,
            masks: absolute(&subject.masks_dir).display().to_string(),
            files,
            fingerprint,
            holdout: subject.test_images.iter().map(|p| file_name(p)).collect(),
        })
    }

    /// The photo folder as a one-subject dataset ([`Dataset::from_photos`]).
    pub fn open(&self) -> Result<Dataset> {
        Ok(Dataset::from_photos(
            &self.dir,
            &self.class,
            self.kind,
            Some(PathBuf::from(&self.masks)),
        )?
        .holding_out(self.holdout.len()))
    }

    /// How the folder's photos differ from the recorded ones, one phrase per photo (`added
    /// 04.jpg`, `removed 01.png`, `changed 02.jpg`); empty when the fingerprint matches.
    pub fn changes(&self, subject: &Subject) -> Result<Vec<String>> {
        let (now, fingerprint) = hashes(&photos_of(subject))?;
        if fingerprint == self.fingerprint {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (name, h) in &now {
            match self.files.get(name) {
                None => out.push(format!("added {name}")),
                Some(old) if old != h => out.push(format!("changed {name}")),
                Some(_) => {}
            }
        }
        for name in self.files.keys().filter(|n| !now.contains_key(*n)) {
            out.push(format!("removed {name}"));
        }
        if out.is_empty() {
            // Same files, a record written differently: still not the recorded photos.
            out.push(format!(
                "fingerprint {fingerprint} instead of {}",
                self.fingerprint
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_follows_the_bytes_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("rex");
        std::fs::create_dir_all(&d).unwrap();
        for (i, c) in [10u8, 200].iter().enumerate() {
            image::RgbImage::from_pixel(8, 8, image::Rgb([*c, 0, 0]))
                .save(d.join(format!("0{i}.png")))
                .unwrap();
        }
        std::fs::write(d.join("notes.txt"), "not a photo").unwrap();
        let ds = Dataset::from_photos(&d, "dog", Kind::Live, None).unwrap();
        assert_eq!(ds.subject_names(), vec!["rex"]);
        let s = ds.subject("rex").unwrap();
        assert_eq!(s.train_images.len(), 2);
        assert!(s.test_images.is_empty() && s.photo_folder);
        assert_eq!(s.mask_path(&s.train_images[0]), d.join("masks/00.png"));
        let rec = PhotoSource::record(&ds, &s).unwrap();
        assert_eq!(rec.files.len(), 2);
        assert!(rec.changes(&s).unwrap().is_empty());
        // Reopened from the record: the same subject, still matching.
        let again = rec.open().unwrap().subject("rex").unwrap();
        assert!(rec.changes(&again).unwrap().is_empty());
        // An edited photo, a new one and a removed one are each named.
        image::RgbImage::from_pixel(8, 8, image::Rgb([0, 9, 0]))
            .save(d.join("00.png"))
            .unwrap();
        std::fs::rename(d.join("01.png"), d.join("02.png")).unwrap();
        let now = rec.open().unwrap().subject("rex").unwrap();
        assert_eq!(
            rec.changes(&now).unwrap(),
            vec!["changed 00.png", "added 02.png", "removed 01.png"]
        );
        // An empty folder and a missing class are refused with the fix.
        let empty = dir.path().join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let e = Dataset::from_photos(&empty, "dog", Kind::Live, None)
            .unwrap()
            .subject("empty")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no photos") && e.contains("Fix:"), "{e}");
        let e = Dataset::from_photos(&d, " ", Kind::Live, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--class") && e.contains("Fix:"), "{e}");
    }

    /// `--holdout K`: K spread-out photos become the test images, recorded by name; the
    /// fingerprint covers all photos; the record reopens with the same split; K >= the number of
    /// photos is refused with the fix.
    #[test]
    fn holdout_sets_photos_aside_and_reopens_the_same() {
        assert_eq!(crate::data::layout::holdout_indices(5, 1), vec![2]);
        assert_eq!(crate::data::layout::holdout_indices(5, 2), vec![1, 3]);
        assert_eq!(crate::data::layout::holdout_indices(4, 4), vec![0, 1, 2, 3]);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("rex");
        std::fs::create_dir_all(&d).unwrap();
        for i in 0..5u8 {
            image::RgbImage::from_pixel(8, 8, image::Rgb([40 * i, 0, 0]))
                .save(d.join(format!("0{i}.png")))
                .unwrap();
        }
        let ds = Dataset::from_photos(&d, "dog", Kind::Live, None)
            .unwrap()
            .holding_out(2);
        let s = ds.subject("rex").unwrap();
        let names = |v: &[PathBuf]| v.iter().map(|p| file_name(p)).collect::<Vec<_>>();
        assert_eq!(names(&s.test_images), vec!["01.png", "03.png"]);
        assert_eq!(names(&s.train_images), vec!["00.png", "02.png", "04.png"]);
        let rec = PhotoSource::record(&ds, &s).unwrap();
        assert_eq!(rec.holdout, vec!["01.png", "03.png"]);
        assert_eq!(rec.files.len(), 5);
        let plain = Dataset::from_photos(&d, "dog", Kind::Live, None).unwrap();
        let whole = PhotoSource::record(&plain, &plain.subject("rex").unwrap()).unwrap();
        assert_eq!(whole.fingerprint, rec.fingerprint);
        let again = rec.open().unwrap().subject("rex").unwrap();
        assert_eq!(names(&again.test_images), names(&s.test_images));
        assert!(rec.changes(&again).unwrap().is_empty());
        let e = plain.holding_out(5).subject("rex").unwrap_err().to_string();
        assert!(e.contains("--holdout 5") && e.contains("at most 4"), "{e}");
    }
}
