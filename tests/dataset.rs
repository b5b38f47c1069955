//! `attractor dataset check` / `dataset new` (src/data/check.rs, src/cli/dataset.rs): the bundled
//! benchmark passes, planted faults are each detected and named, `new` round-trips.

use attractor::assets::clip_tokenizer;
use attractor::data::check::{
    check_dataset, new_dataset, CheckOptions, CheckReport, ProblemKind, MAX_CAPTIONS,
};
use attractor::data::image::load_rgb;
use image::imageops::FilterType;
use std::path::{Path, PathBuf};

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dreambooth-split")
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let p = e.unwrap().path();
        let d = dst.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &d);
        } else {
            std::fs::copy(&p, &d).unwrap();
        }
    }
}

/// A copy of the bundled benchmark restricted to `names`.
fn subset(names: &[&str]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let all: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(bundled().join("subjects.json")).unwrap())
            .unwrap();
    let keep: Vec<_> = all
        .into_iter()
        .filter(|s| names.contains(&s["name"].as_str().unwrap()))
        .collect();
    std::fs::write(
        tmp.path().join("subjects.json"),
        serde_json::to_string(&keep).unwrap(),
    )
    .unwrap();
    std::fs::copy(
        bundled().join("prompts.json"),
        tmp.path().join("prompts.json"),
    )
    .unwrap();
    for n in names {
        copy_dir(&bundled().join(n), &tmp.path().join(n));
    }
    tmp
}

fn check(dir: &Path) -> CheckReport {
    check_dataset(dir, &clip_tokenizer().unwrap(), &CheckOptions::default())
}

fn list(r: &CheckReport) -> String {
    r.problems
        .iter()
        .map(|p| format!("{:?} {p}", p.kind))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn bundled_benchmark_passes_check() {
    let r = check(&bundled());
    eprintln!(
        "full bundled check: {} subjects, {} train + {} test images, {} captions in {:.2} s; closest pair {:?}",
        r.subjects,
        r.train_images,
        r.test_images,
        r.captions,
        r.elapsed.as_secs_f64(),
        r.closest
    );
    assert!(r.is_ok(), "{}", list(&r));
    assert_eq!(r.subjects, 22);
    assert_eq!(r.train_images + r.test_images, 114);
    assert_eq!(r.captions, r.test_images * 10);
    // The threshold has a margin to the closest genuine pair.
    assert!(r.closest.unwrap().distance >= CheckOptions::default().leak_threshold + 4);
}

#[test]
fn clean_subset_passes() {
    let tmp = subset(&["dog", "cat", "vase"]);
    let r = check(tmp.path());
    assert!(r.is_ok(), "{}", list(&r));
    assert_eq!(r.subjects, 3);
}

fn add_test_image(dir: &Path, subject: &str, name: &str, img: &image::RgbImage, quality: u8) {
    let path = dir.join(subject).join("test").join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, quality)
        .encode_image(img)
        .unwrap();
    add_captions(dir, subject, name, vec!["{} on a table".to_string()]);
}

fn add_captions(dir: &Path, subject: &str, name: &str, caps: Vec<String>) {
    let path = dir.join(subject).join("captions.json");
    let mut c: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c.insert(name.into(), serde_json::json!(caps));
    std::fs::write(&path, serde_json::to_string_pretty(&c).unwrap()).unwrap();
}

#[test]
fn planted_faults_are_each_detected_and_named() {
    let tmp = subset(&["dog", "cat"]);
    let d = tmp.path();

    // 1. A mirrored copy of a training image in test/.
    let t0 = load_rgb(&d.join("dog/train/00.jpg")).unwrap();
    add_test_image(
        d,
        "dog",
        "10.jpg",
        &image::imageops::flip_horizontal(&t0),
        90,
    );
    // 2. A resized (to 60 %) and recompressed (quality 50) copy.
    let t1 = load_rgb(&d.join("cat/train/01.jpg")).unwrap();
    let small = image::imageops::resize(
        &t1,
        t1.width() * 3 / 5,
        t1.height() * 3 / 5,
        FilterType::Triangle,
    );
    add_test_image(d, "cat", "11.jpg", &small, 50);
    // 3. A caption without {}.
    let cpath = d.join("dog/captions.json");
    let text = std::fs::read_to_string(&cpath).unwrap();
    let text = text.replacen(
        "{} on a white stone ledge",
        "a dog on a white stone ledge",
        1,
    );
    std::fs::write(&cpath, text).unwrap();
    // 4. A truncated JPEG among the training images.
    let bytes = std::fs::read(d.join("cat/train/00.jpg")).unwrap();
    std::fs::write(d.join("cat/train/00.jpg"), &bytes[..bytes.len() * 3 / 5]).unwrap();
    // 5. A mask of the wrong size.
    std::fs::create_dir_all(d.join("dog/masks")).unwrap();
    image::GrayImage::from_pixel(64, 64, image::Luma([255]))
        .save(d.join("dog/masks/01.png"))
        .unwrap();
    let dims = load_rgb(&d.join("dog/train/02.jpg")).unwrap().dimensions();
    let mut good = image::GrayImage::new(dims.0, dims.1);
    for y in dims.1 / 4..dims.1 * 3 / 4 {
        for x in dims.0 / 4..dims.0 * 3 / 4 {
            good.put_pixel(x, y, image::Luma([255]));
        }
    }
    good.save(d.join("dog/masks/02.png")).unwrap();

    let r = check(d);
    let all = list(&r);
    eprintln!("{all}");
    let leaks = r.of_kind(ProblemKind::Leak);
    assert_eq!(leaks.len(), 2, "{all}");
    let mirrored = leaks
        .iter()
        .find(|p| p.path == Path::new("dog/test/10.jpg"))
        .expect(&all);
    assert!(
        mirrored.what.contains("mirrored copy of dog/train/00.jpg"),
        "{all}"
    );
    let resized = leaks
        .iter()
        .find(|p| p.path == Path::new("cat/test/11.jpg"))
        .expect(&all);
    assert!(
        resized.what.contains("copy of cat/train/01.jpg") && !resized.what.contains("mirrored"),
        "{all}"
    );
    assert!(resized.fix.contains("cat/captions.json"), "{all}");

    let caps = r.of_kind(ProblemKind::Caption);
    assert_eq!(caps.len(), 1, "{all}");
    assert_eq!(caps[0].path, Path::new("dog/captions.json"));
    assert!(
        caps[0].what.contains("`03.jpg` caption 1") && caps[0].what.contains("no `{}`"),
        "{all}"
    );

    let imgs = r.of_kind(ProblemKind::Image);
    assert_eq!(imgs.len(), 1, "{all}");
    assert_eq!(imgs[0].path, Path::new("cat/train/00.jpg"));
    assert!(imgs[0].what.contains("truncated"), "{all}");

    let masks = r.of_kind(ProblemKind::Mask);
    assert_eq!(masks.len(), 1, "{all}");
    assert_eq!(masks[0].path, Path::new("dog/masks/01.png"));
    assert!(
        masks[0].what.contains("is 64x64")
            && masks[0]
                .fix
                .contains("attractor masks --subject dog --force"),
        "{all}"
    );
    assert_eq!(r.problems.len(), 5, "{all}");
    assert_eq!(r.masks, 2);
}

#[test]
fn layout_faults_are_named() {
    let tmp = subset(&["vase"]);
    let d = tmp.path();
    // A subject folder that subjects.json does not list, a HEIC photo, a caption key without an
    // image, an empty mask, an orphan mask.
    copy_dir(&bundled().join("candle"), &d.join("candle"));
    std::fs::write(d.join("vase/train/IMG_0001.HEIC"), b"heic").unwrap();
    add_captions(d, "vase", "99.jpg", vec!["{} on a shelf".into()]);
    std::fs::create_dir_all(d.join("vase/masks")).unwrap();
    let dims = load_rgb(&d.join("vase/train/00.jpg")).unwrap().dimensions();
    image::GrayImage::new(dims.0, dims.1)
        .save(d.join("vase/masks/00.png"))
        .unwrap();
    image::GrayImage::new(4, 4)
        .save(d.join("vase/masks/gone.png"))
        .unwrap();
    let long = vec!["{} ".to_string() + &"very ".repeat(80)];
    add_captions(d, "vase", "04.jpg", long);

    let r = check(d);
    let all = list(&r);
    let has = |kind: ProblemKind, path: &str, needle: &str| {
        r.problems
            .iter()
            .any(|p| p.kind == kind && p.path == Path::new(path) && p.to_string().contains(needle))
    };
    assert!(
        has(ProblemKind::Layout, "candle", "not listed in subjects.json"),
        "{all}"
    );
    assert!(
        has(
            ProblemKind::Layout,
            "vase/train/IMG_0001.HEIC",
            "convert it to JPEG"
        ),
        "{all}"
    );
    assert!(
        has(
            ProblemKind::Caption,
            "vase/captions.json",
            "`99.jpg`, which is not in test/"
        ),
        "{all}"
    );
    assert!(
        has(ProblemKind::Caption, "vase/captions.json", "CLIP tokens"),
        "{all}"
    );
    assert!(
        has(ProblemKind::Mask, "vase/masks/00.png", "all black"),
        "{all}"
    );
    assert!(
        has(
            ProblemKind::Mask,
            "vase/masks/gone.png",
            "belongs to no training image"
        ),
        "{all}"
    );
    assert_eq!(r.problems.len(), 6, "{all}");
}

#[test]
fn broken_subjects_json_is_one_problem() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("subjects.json"), "[{").unwrap();
    let r = check(tmp.path());
    assert_eq!(r.problems.len(), 1);
    assert!(
        r.problems[0].to_string().contains("subjects.json"),
        "{}",
        list(&r)
    );
}

#[test]
fn new_round_trip() {
    let src = tempfile::tempdir().unwrap();
    for (subject, from) in [("teddy", "bear_plushie"), ("mug", "berry_bowl")] {
        let d = src.path().join(subject);
        std::fs::create_dir_all(&d).unwrap();
        let b = bundled().join(from);
        for (i, p) in std::fs::read_dir(b.join("train"))
            .unwrap()
            .chain(std::fs::read_dir(b.join("test")).unwrap())
            .map(|e| e.unwrap().path())
            .enumerate()
        {
            std::fs::copy(
                &p,
                d.join(format!(
                    "photo_{}_{i}.jpg",
                    p.file_stem().unwrap().to_string_lossy()
                )),
            )
            .unwrap();
        }
        std::fs::write(d.join("notes.txt"), "not a photo").unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let out = out.path().join("mine");
    let rep = new_dataset(src.path(), &out, 1).unwrap();
    assert_eq!(rep.subjects.len(), 2);
    assert_eq!(rep.skipped.len(), 2);
    let mug = &rep.subjects[0];
    assert_eq!(mug.name, "mug");
    assert_eq!(mug.test.len(), 1);
    // The last photo by name is the test one.
    let mut all: Vec<_> = mug.train.iter().chain(&mug.test).cloned().collect();
    all.sort();
    assert_eq!(&mug.test[0], all.last().unwrap());

    // Fresh layout: only the placeholder captions are problems, 10 per test image.
    let r = check(&out);
    let all_p = list(&r);
    assert_eq!(r.problems.len(), 2 * MAX_CAPTIONS, "{all_p}");
    assert!(
        r.problems
            .iter()
            .all(|p| p.kind == ProblemKind::Caption && p.what.contains("unfilled placeholder")),
        "{all_p}"
    );

    // Write the captions: the dataset passes and reads back.
    for s in &rep.subjects {
        let caps: Vec<String> = (0..3).map(|i| format!("{{}} in scene {i}")).collect();
        let map = serde_json::json!({ s.test[0].clone(): caps });
        std::fs::write(out.join(&s.name).join("captions.json"), map.to_string()).unwrap();
    }
    let r = check(&out);
    assert!(r.is_ok(), "{}", list(&r));
    let ds = attractor::data::Dataset::open(&out).unwrap();
    let teddy = ds.subject("teddy").unwrap();
    assert_eq!(teddy.class, "teddy");
    assert_eq!(teddy.kind, attractor::data::Kind::Object);
    assert_eq!(ds.prompts.object.len(), 25);

    // Never overwrites.
    let err = new_dataset(src.path(), &out, 1).unwrap_err().to_string();
    assert!(
        err.contains("not empty") && err.contains("new output folder"),
        "{err}"
    );
    // Too few photos for the split.
    let err = new_dataset(src.path(), &out.with_file_name("other"), 50)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("--test 50") && err.contains("lower --test"),
        "{err}"
    );
}

#[test]
fn cli_check_exits_nonzero_and_names_the_file() {
    let tmp = subset(&["vase"]);
    let cpath = tmp.path().join("vase/captions.json");
    let text = std::fs::read_to_string(&cpath)
        .unwrap()
        .replacen("{}", "it", 1);
    std::fs::write(&cpath, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["dataset", "check"])
        .arg(tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("vase/captions.json") && stdout.contains("Fix:"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" s\n") || stdout.contains(" s;"),
        "reports its time: {stdout}"
    );
    assert!(stderr.contains("1 problem"), "{stderr}");

    let ok = std::process::Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["dataset", "check", "--data"])
        .arg(bundled())
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("no problems found"));
}

#[test]
fn cli_attractor_data_overrides_and_new_explains_next_steps() {
    let tmp = subset(&["vase"]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["dataset", "check"])
        .env("ATTRACTOR_DATA", tmp.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&*tmp.path().to_string_lossy()) && stdout.contains("1 subjects"),
        "{stdout}"
    );

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["dataset", "check"])
        .env("ATTRACTOR_DATA", tmp.path().join("missing"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success());
    assert!(
        stderr.contains("ATTRACTOR_DATA") && stderr.contains("missing"),
        "{stderr}"
    );

    // `dataset new` from a folder of photos per subject.
    let src = tempfile::tempdir().unwrap();
    copy_dir(&bundled().join("vase/train"), &src.path().join("vase"));
    let dst = tempfile::tempdir().unwrap();
    let dst = dst.path().join("new");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["dataset", "new"])
        .arg(src.path())
        .arg(&dst)
        .args(["--test", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("subjects.json") && stdout.contains("attractor dataset check"),
        "{stdout}"
    );
    assert!(dst.join("vase/captions.json").is_file());
}
