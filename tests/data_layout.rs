//! The split-test layout reader (src/data/layout.rs) on the bundled benchmark and on broken copies.

use attractor::data::{image::load_rgb, DataError, Dataset, Kind};
use std::path::{Path, PathBuf};

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dreambooth-split")
}

#[test]
fn bundled_benchmark_reads_and_every_image_decodes() {
    let ds = Dataset::open(bundled()).unwrap();
    assert_eq!(ds.subjects.len(), 22);
    assert_eq!(ds.prompts.object.len(), 25);
    assert_eq!(ds.prompts.live.len(), 25);
    let dog = ds.subject("dog").unwrap();
    assert_eq!(dog.kind, Kind::Live);
    assert_eq!(dog.class, "dog");
    let names = |v: &[PathBuf]| -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&dog.train_images), ["00.jpg", "01.jpg", "02.jpg"]);
    assert_eq!(names(&dog.test_images), ["03.jpg", "04.jpg"]);
    assert_eq!(
        dog.captions.keys().collect::<Vec<_>>(),
        ["03.jpg", "04.jpg"]
    );
    assert_eq!(dog.captions_for(&dog.test_images[0]).unwrap().len(), 10);
    assert_eq!(
        dog.mask_path(&dog.train_images[1]),
        bundled().join("dog/masks/01.png")
    );
    for s in ds.all_subjects().unwrap() {
        for img in s.train_images.iter().chain(&s.test_images) {
            let rgb = load_rgb(img).unwrap();
            assert_eq!(rgb.width().min(rgb.height()), 512, "{}", img.display());
        }
    }
}

#[test]
fn unknown_subject_lists_the_known_ones() {
    let ds = Dataset::open(bundled()).unwrap();
    let err = ds.subject("dgo").unwrap_err();
    assert!(matches!(err, DataError::UnknownSubject { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("`dgo`") && msg.contains("dog2") && msg.contains("backpack"),
        "{msg}"
    );
}

#[test]
fn default_dir_finds_the_bundled_benchmark() {
    // ATTRACTOR_DATA is not set in the test environment unless the user set it.
    if std::env::var_os("ATTRACTOR_DATA").is_none() {
        let d = Dataset::default_dir().unwrap();
        assert!(d.join("subjects.json").is_file());
        assert_eq!(d.file_name().unwrap(), "dreambooth-split");
    }
}

#[test]
fn broken_layouts_name_file_and_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let err = Dataset::open(d).unwrap_err().to_string();
    assert!(
        err.contains("subjects.json") && err.contains("Fix"),
        "{err}"
    );

    std::fs::write(
        d.join("subjects.json"),
        r#"[{"name": "a", "class": "cat", "kind": "alive"}]"#,
    )
    .unwrap();
    let err = Dataset::open(d).unwrap_err().to_string();
    assert!(
        err.contains("subjects.json") && err.contains("alive"),
        "{err}"
    );

    std::fs::write(
        d.join("subjects.json"),
        r#"[{"name": "a", "class": "cat", "kind": "live"}]"#,
    )
    .unwrap();
    std::fs::copy(bundled().join("prompts.json"), d.join("prompts.json")).unwrap();
    let ds = Dataset::open(d).unwrap();
    let err = ds.subject("a").unwrap_err().to_string();
    assert!(err.contains("no folder"), "{err}");

    std::fs::create_dir_all(d.join("a/train")).unwrap();
    let err = ds.subject("a").unwrap_err().to_string();
    assert!(
        err.contains("train") && err.contains("no training images"),
        "{err}"
    );

    std::fs::copy(bundled().join("cat/train/00.jpg"), d.join("a/train/00.jpg")).unwrap();
    let a = ds.subject("a").unwrap();
    assert!(a.test_images.is_empty() && a.captions.is_empty());

    std::fs::create_dir_all(d.join("a/test")).unwrap();
    std::fs::copy(bundled().join("cat/test/03.jpg"), d.join("a/test/03.jpg")).unwrap();
    let err = ds.subject("a").unwrap_err().to_string();
    assert!(
        err.contains("captions.json") && err.contains("dataset new"),
        "{err}"
    );

    std::fs::write(
        d.join("a/captions.json"),
        r#"{"04.jpg": ["{} on a table"]}"#,
    )
    .unwrap();
    let a = ds.subject("a").unwrap();
    let err = a.captions_for(&a.test_images[0]).unwrap_err().to_string();
    assert!(
        err.contains("03.jpg") && err.contains("captions.json"),
        "{err}"
    );
}
