//! The evaluation engine end to end on the tiny CLIP and DINO fixtures with a deterministic fake
//! generator: values, resume after a crash, shards + merge, `--images` mode, and bad input.

mod common;

use attractor::data::layout::Dataset;
use attractor::eval::protocol::{
    build_jobs, job_seed, score_image_dir, ClipTSubject, Shard, Split,
};
use attractor::eval::store::{merge, read_results, Record, RESULTS_FILE};
use attractor::eval::{cosine, run_protocol, EvalSettings};
use common::*;
use std::path::Path;

fn settings(split: Split, samples: usize) -> EvalSettings {
    EvalSettings {
        split,
        samples,
        clip_t_subject: ClipTSubject::Class,
        shard: None,
    }
}

fn subjects() -> Vec<String> {
    vec!["dog".into(), "candle".into()]
}

fn records(out: &Path) -> Vec<Record> {
    read_results(&out.join(RESULTS_FILE)).unwrap().0
}

#[test]
fn end_to_end_values_both_splits() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let out = tmp.path().join("out");
    let mut gen = FakeGenerator::new();
    let mut sc = scorers();
    let s = settings(Split::Both, 2);
    let summary = run_protocol(&s, &ds, &subjects(), &mut gen, &mut sc, &out).unwrap();

    // 2 subjects x (1 test image x 2 captions + 2 classic prompts) x 2 samples.
    let recs = records(&out);
    assert_eq!(recs.len(), 16);
    assert_eq!(gen.calls, 16);
    assert!(gen.prompts.iter().all(|p| p.contains("{}")));

    // Every record: seed, texts, image file, and scores recomputed independently.
    for r in &recs {
        assert_eq!(
            r.seed,
            job_seed(
                &r.subject,
                r.test_image.as_deref(),
                r.caption_index,
                r.sample
            )
        );
        assert!(r.clip_t_text.contains(&r.subject), "{}", r.clip_t_text);
        assert!(!r.clip_t_text.contains("{}"));
        let img = image::open(out.join(&r.image)).unwrap().to_rgb8();
        let f = sc
            .image_features(std::slice::from_ref(&img))
            .unwrap()
            .remove(0);
        let t = sc.text_features(&r.clip_t_text).unwrap();
        assert!((cosine(&t, &f.clip) - r.clip_t).abs() < 1e-6);
        let refs: Vec<_> = match &r.test_image {
            Some(name) => vec![data.join(&r.subject).join("test").join(name)],
            None => (0..2)
                .map(|i| data.join(&r.subject).join(format!("train/0{i}.png")))
                .collect(),
        };
        let (mut ci, mut di) = (0.0, 0.0);
        for p in &refs {
            let rf = sc
                .image_features(&[image::open(p).unwrap().to_rgb8()])
                .unwrap()
                .remove(0);
            ci += cosine(&f.clip, &rf.clip) / refs.len() as f64;
            di += cosine(&f.dino, &rf.dino) / refs.len() as f64;
        }
        assert!(
            (ci - r.clip_i).abs() < 1e-6,
            "{}: {ci} vs {}",
            r.key,
            r.clip_i
        );
        assert!((di - r.dino).abs() < 1e-6, "{}: {di} vs {}", r.key, r.dino);
        assert!(r.clip_i.abs() <= 1.0 && r.dino.abs() <= 1.0 && r.clip_t.abs() <= 1.0);
    }
    // The split-test records point at that caption's own test image, classic at none.
    assert!(recs
        .iter()
        .filter(|r| r.split == Split::Test)
        .all(|r| r.test_image.is_some()));
    assert!(recs
        .iter()
        .filter(|r| r.split == Split::Train)
        .all(|r| r.test_image.is_none()));

    // Summary: means over all images and the classic-minus-test difference.
    let test = summary.test.as_ref().unwrap();
    let train = summary.train.as_ref().unwrap();
    assert_eq!(test.overall.n, 8);
    assert_eq!(train.overall.n, 8);
    assert_eq!(test.subjects.len(), 2);
    let mean = |split: Split, f: fn(&Record) -> f64| {
        let v: Vec<f64> = recs.iter().filter(|r| r.split == split).map(f).collect();
        v.iter().sum::<f64>() / v.len() as f64
    };
    assert!((test.overall.dino.mean - mean(Split::Test, |r| r.dino)).abs() < 1e-12);
    let d = summary.classic_minus_test.as_ref().unwrap();
    assert!(
        (d.overall.clip_i - (mean(Split::Train, |r| r.clip_i) - mean(Split::Test, |r| r.clip_i)))
            .abs()
            < 1e-12
    );
    let csv = std::fs::read_to_string(out.join("summary.csv")).unwrap();
    assert!(csv.starts_with("split,subject,n,clip_t,clip_t_se"));
    assert!(csv.contains("test,ALL,8,"));
    assert!(csv.contains("classic-minus-test,ALL"));
    assert!(out.join("summary.json").is_file());

    // Running again finds everything done: nothing is generated, the lines stay.
    let mut again = FakeGenerator::new();
    run_protocol(&s, &ds, &subjects(), &mut again, &mut sc, &out).unwrap();
    assert_eq!(again.calls, 0);
    assert_eq!(records(&out).len(), 16);
}

#[test]
fn kill_and_resume_loses_and_repeats_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let s = settings(Split::Test, 2);
    let mut sc = scorers();

    let full = tmp.path().join("full");
    run_protocol(
        &s,
        &ds,
        &subjects(),
        &mut FakeGenerator::new(),
        &mut sc,
        &full,
    )
    .unwrap();

    let out = tmp.path().join("resumed");
    let mut crashing = FakeGenerator::failing_after(3);
    let err = run_protocol(&s, &ds, &subjects(), &mut crashing, &mut sc, &out).unwrap_err();
    assert!(
        format!("{err:#}").contains("rerun the same command"),
        "{err:#}"
    );
    assert_eq!(records(&out).len(), 3);
    // A kill in the middle of a write leaves a torn last line.
    std::fs::OpenOptions::new()
        .append(true)
        .open(out.join(RESULTS_FILE))
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"{\"key\":\"dog/test/05.p"))
        .unwrap();

    let mut second = FakeGenerator::new();
    run_protocol(&s, &ds, &subjects(), &mut second, &mut sc, &out).unwrap();
    assert_eq!(
        crashing.calls + second.calls,
        8,
        "every image generated exactly once"
    );
    assert_eq!(
        sorted_lines(&out.join(RESULTS_FILE)),
        sorted_lines(&full.join(RESULTS_FILE))
    );
}

/// Batched generation (`eval --batch 3`): batches never mix subjects, the last one of a subject
/// is ragged, a crash mid-batch keeps the images scored before it, and the resumed run
/// generates only the rest; the results equal an unbatched run's line for line.
#[test]
fn batched_kill_and_resume_loses_and_repeats_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let s = settings(Split::Both, 2);
    let mut sc = scorers();

    let full = tmp.path().join("full");
    let mut one = FakeGenerator::new();
    run_protocol(&s, &ds, &subjects(), &mut one, &mut sc, &full).unwrap();
    let total = records(&full).len();
    assert!(one.batches.iter().all(|b| b.1 == 1));

    let out = tmp.path().join("batched");
    let mut crashing = FakeGenerator::failing_after(4);
    crashing.batch = 3;
    run_protocol(&s, &ds, &subjects(), &mut crashing, &mut sc, &out).unwrap_err();
    // The first batch of 3 was scored; the second failed at its second image.
    assert_eq!(records(&out).len(), 3);
    assert_eq!(crashing.batches.len(), 2);

    let mut second = FakeGenerator::new();
    second.batch = 3;
    run_protocol(&s, &ds, &subjects(), &mut second, &mut sc, &out).unwrap();
    assert_eq!(
        second.calls,
        total - 3,
        "only the unscored images are generated again"
    );
    let mut per_subject = std::collections::BTreeMap::new();
    for (subject, n) in &second.batches {
        assert!(*n >= 1 && *n <= 3, "batch of {n}");
        *per_subject.entry(subject.clone()).or_insert(0) += n;
    }
    assert_eq!(per_subject.values().sum::<usize>(), total - 3);
    assert!(
        second.batches.iter().any(|b| b.1 < 3),
        "a ragged last batch: {:?}",
        second.batches
    );
    assert_eq!(
        sorted_lines(&out.join(RESULTS_FILE)),
        sorted_lines(&full.join(RESULTS_FILE))
    );
}

#[test]
fn two_shards_merged_equal_one_run() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let mut sc = scorers();
    let s = settings(Split::Both, 2);
    let full = tmp.path().join("full");
    run_protocol(
        &s,
        &ds,
        &subjects(),
        &mut FakeGenerator::new(),
        &mut sc,
        &full,
    )
    .unwrap();

    let mut shard_dirs = Vec::new();
    let mut calls = 0;
    for i in 1..=2 {
        let dir = tmp.path().join(format!("shard{i}"));
        let mut ss = s.clone();
        ss.shard = Some(Shard { index: i, count: 2 });
        let mut g = FakeGenerator::new();
        run_protocol(&ss, &ds, &subjects(), &mut g, &mut sc, &dir).unwrap();
        assert!(
            g.calls > 0,
            "shard {i} is empty: the split is too unbalanced"
        );
        calls += g.calls;
        shard_dirs.push(dir);
    }
    assert_eq!(calls, 16, "the shards partition the jobs");
    let merged = tmp.path().join("merged");
    let outcome = merge(&shard_dirs, &merged).unwrap();
    assert_eq!(outcome.records, 16);
    assert_eq!(outcome.duplicates, 0);
    assert!(outcome.conflicts.is_empty());
    assert_eq!(
        sorted_lines(&merged.join(RESULTS_FILE)),
        sorted_lines(&full.join(RESULTS_FILE))
    );
    for r in records(&merged) {
        assert!(merged.join(&r.image).is_file(), "{} not copied", r.image);
    }
    // Same summary as the single run (the config differs in nothing: the merged one has no shard).
    let a: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("summary.json")).unwrap())
            .unwrap();
    let b: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(full.join("summary.json")).unwrap()).unwrap();
    assert_eq!(a, b);
    // Merging again (idempotent) and merging a folder of other settings.
    assert_eq!(merge(&shard_dirs, &merged).unwrap().records, 16);
    let other = tmp.path().join("other");
    run_protocol(
        &settings(Split::Test, 1),
        &ds,
        &subjects(),
        &mut FakeGenerator::new(),
        &mut sc,
        &other,
    )
    .unwrap();
    let err = merge(&[shard_dirs[0].clone(), other], &tmp.path().join("m2")).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("samples") && msg.contains("split"), "{msg}");
}

#[test]
fn image_folder_mode_scores_like_the_engine_and_reports_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let mut sc = scorers();
    let s = settings(Split::Both, 2);
    let gen_out = tmp.path().join("gen");
    run_protocol(
        &s,
        &ds,
        &subjects(),
        &mut FakeGenerator::new(),
        &mut sc,
        &gen_out,
    )
    .unwrap();
    let generated = records(&gen_out);

    // The engine's images/ folder is in the --images layout.
    std::fs::remove_file(gen_out.join("images/candle/classic/1/0.png")).unwrap();
    let out = tmp.path().join("scored");
    let start = std::time::Instant::now();
    let outcome = score_image_dir(
        &s,
        &ds,
        &subjects(),
        &gen_out.join("images"),
        &mut sc,
        &out,
        &mut |_| {},
    )
    .unwrap();
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "scored 15 images (+4 references) with tiny CLIP + DINO in {secs:.2} s: {:.1} images/s",
        15.0 / secs
    );
    assert_eq!(outcome.missing.len(), 1);
    assert!(outcome.missing[0].ends_with("candle/classic/1/0.png"));
    assert!(outcome.unreadable.is_empty());
    let scored = records(&out);
    assert_eq!(scored.len(), 15);
    for r in &scored {
        let g = generated.iter().find(|g| g.key == r.key).unwrap();
        assert_eq!((g.seed, &g.prompt), (r.seed, &r.prompt));
        assert!((g.clip_t - r.clip_t).abs() < 1e-9);
        assert!((g.clip_i - r.clip_i).abs() < 1e-9);
        assert!((g.dino - r.dino).abs() < 1e-9);
    }
    // `keep` needs a placeholder that an image folder does not have.
    let mut keep = s.clone();
    keep.clip_t_subject = ClipTSubject::Keep;
    let err = score_image_dir(
        &keep,
        &ds,
        &subjects(),
        &gen_out.join("images"),
        &mut sc,
        &tmp.path().join("keep"),
        &mut |_| {},
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("--clip-t-subject"));
}

/// Throughput of scoring alone (CLIP image + DINO + CLIP text cached) on the tiny models.
#[test]
fn scoring_throughput_on_tiny_models() {
    let mut sc = scorers();
    let imgs: Vec<_> = (0..32).map(|i| picture(i, 512, 512)).collect();
    sc.image_features(&imgs[..2]).unwrap(); // warm-up
    let start = std::time::Instant::now();
    let f = sc.image_features(&imgs).unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(f.len(), 32);
    eprintln!(
        "tiny CLIP + DINO features of 512x512 images: {:.1} images/s",
        32.0 / secs
    );
}

fn expect_input_error(setup: impl FnOnce(&Path), subjects: &[&str], needles: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    setup(&data);
    let ds = Dataset::open(&data).unwrap();
    let mut gen = FakeGenerator::new();
    let mut sc = scorers();
    let subjects: Vec<String> = subjects.iter().map(|s| s.to_string()).collect();
    let err = run_protocol(
        &settings(Split::Both, 1),
        &ds,
        &subjects,
        &mut gen,
        &mut sc,
        &tmp.path().join("out"),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    for n in needles {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
    assert_eq!(gen.calls, 0, "nothing may be generated from bad input");
}

#[test]
fn test_image_without_captions_is_refused() {
    expect_input_error(
        |d| std::fs::write(d.join("dog/captions.json"), "{}").unwrap(),
        &["dog"],
        &["05.png", "has no captions", "captions.json"],
    );
}

#[test]
fn caption_without_or_with_two_slots_is_refused() {
    expect_input_error(
        |d| {
            std::fs::write(
                d.join("dog/captions.json"),
                r#"{"05.png": ["a photo on a ledge", "{} and {} in spring"]}"#,
            )
            .unwrap()
        },
        &["dog"],
        &[
            "caption 0",
            "has no `{}`",
            "caption 1",
            "2 `{}` slots",
            "2 problem(s)",
        ],
    );
}

#[test]
fn missing_reference_image_is_refused() {
    expect_input_error(
        |d| {
            std::fs::write(
                d.join("candle/captions.json"),
                r#"{"07.png": ["a {} on a table"], "09.png": ["a {} on a shelf"]}"#,
            )
            .unwrap()
        },
        &["candle"],
        &["09.png", "does not exist"],
    );
}

#[test]
fn unknown_subject_is_refused() {
    expect_input_error(
        |_| {},
        &["dog", "unicorn"],
        &["unknown subject `unicorn`", "dog, candle"],
    );
}

#[test]
fn folder_of_other_settings_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    make_dataset(&data);
    let ds = Dataset::open(&data).unwrap();
    let mut sc = scorers();
    let out = tmp.path().join("out");
    run_protocol(
        &settings(Split::Test, 1),
        &ds,
        &subjects(),
        &mut FakeGenerator::new(),
        &mut sc,
        &out,
    )
    .unwrap();
    let mut gen = FakeGenerator::new();
    let mut s = settings(Split::Test, 2);
    s.clip_t_subject = ClipTSubject::Remove;
    let err = run_protocol(&s, &ds, &subjects(), &mut gen, &mut sc, &out).unwrap_err();
    let msg = format!("{err:#}");
    for n in ["samples: 2 vs 1", "clip_t_subject", "new --out"] {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
    assert_eq!(gen.calls, 0);
    assert_eq!(records(&out).len(), 4, "the folder's results are untouched");
}

#[test]
fn jobs_cover_the_protocols() {
    let tmp = tempfile::tempdir().unwrap();
    make_dataset(tmp.path());
    let ds = Dataset::open(tmp.path()).unwrap();
    let jobs = build_jobs(&settings(Split::Both, 3), &ds, &subjects(), &|_| None).unwrap();
    assert_eq!(jobs.len(), 2 * (2 + 2) * 3);
    let keys: std::collections::BTreeSet<String> = jobs.iter().map(|j| j.key()).collect();
    assert_eq!(keys.len(), jobs.len(), "keys are unique");
    let dog_test: Vec<_> = jobs
        .iter()
        .filter(|j| j.subject == "dog" && j.split == Split::Test)
        .collect();
    assert_eq!(dog_test[0].clip_t_text, "a photo of dog on a ledge");
    assert_eq!(
        dog_test[0].references,
        vec![tmp.path().join("dog/test/05.png")]
    );
    let candle_classic: Vec<_> = jobs
        .iter()
        .filter(|j| j.subject == "candle" && j.split == Split::Train)
        .collect();
    assert_eq!(candle_classic[0].prompt, "a {} in the jungle"); // object list
    assert_eq!(candle_classic[0].references.len(), 2);
    assert_eq!(
        candle_classic[0].image_rel_path(),
        Path::new("candle/classic/0/0.png")
    );
    let removed = build_jobs(
        &EvalSettings {
            clip_t_subject: ClipTSubject::Remove,
            ..settings(Split::Test, 1)
        },
        &ds,
        &["dog".to_string()],
        &|_| None,
    )
    .unwrap();
    assert_eq!(removed[0].clip_t_text, "a photo of on a ledge");
}

/// A split-test dataset without prompts.json opens, checks clean of it, trains and runs the
/// split-test protocol; only the classic protocol refuses, naming the missing file.
#[test]
fn prompts_json_is_needed_by_the_classic_protocol_only() {
    let tmp = tempfile::tempdir().unwrap();
    make_dataset(tmp.path());
    std::fs::remove_file(tmp.path().join("prompts.json")).unwrap();
    let ds = Dataset::open(tmp.path()).unwrap();
    assert!(ds.subject("dog").is_ok());
    let tok = attractor::assets::clip_tokenizer().unwrap();
    let report = attractor::data::check::check_dataset(
        tmp.path(),
        &tok,
        &attractor::data::check::CheckOptions::default(),
    );
    assert!(
        report
            .problems
            .iter()
            .all(|p| !p.to_string().contains("prompts.json")),
        "{:?}",
        report.problems
    );
    let jobs = build_jobs(&settings(Split::Test, 1), &ds, &subjects(), &|_| None).unwrap();
    assert_eq!(jobs.len(), 4);
    for split in [Split::Train, Split::Both] {
        let err = build_jobs(&settings(split, 1), &ds, &subjects(), &|_| None)
            .unwrap_err()
            .to_string();
        let missing = tmp.path().join("prompts.json").display().to_string();
        assert!(
            err.contains(&format!("{missing}: file not found"))
                && err.contains("classic protocol")
                && err.contains("Fix: write prompts.json"),
            "{err}"
        );
    }
}
