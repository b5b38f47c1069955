//! `attractor eval` through the binary: `--images` scoring on the tiny scorers (exit codes,
//! files, resume), `merge`, and the readable errors of the modes that need more.

mod common;

use attractor::eval::protocol::save_png;
use common::*;
use std::path::Path;
use std::process::{Command, Output};

fn attractor(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(args)
        .current_dir(cwd)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Write `DIR/<subject>/<stem|classic>/<index>/<sample>.png` for the test dataset.
fn make_images(dir: &Path, samples: usize, skip: Option<&str>) {
    let layout = [
        ("dog", "05"),
        ("dog", "classic"),
        ("candle", "07"),
        ("candle", "classic"),
    ];
    for (k, (subject, folder)) in layout.iter().enumerate() {
        for ci in 0..2 {
            for s in 0..samples {
                let rel = format!("{subject}/{folder}/{ci}/{s}.png");
                if Some(rel.as_str()) == skip {
                    continue;
                }
                save_png(
                    &dir.join(&rel),
                    &picture((k * 100 + ci * 10 + s) as u64, 64, 64),
                )
                .unwrap();
            }
        }
    }
}

#[test]
fn images_mode_scores_resumes_and_fails_on_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    make_dataset(&t.join("data"));
    make_images(&t.join("imgs"), 2, Some("candle/07/1/1.png"));
    let clip = root().join("tests/fixtures/tiny-clip");
    let dino = root().join("tests/fixtures/tiny-dino");
    let args = |out: &str| {
        vec![
            "eval".to_string(),
            "--images".into(),
            "imgs".into(),
            "--data".into(),
            "data".into(),
            "--out".into(),
            out.into(),
            "--split".into(),
            "both".into(),
            "--samples".into(),
            "2".into(),
            "--clip".into(),
            clip.display().to_string(),
            "--dino".into(),
            dino.display().to_string(),
        ]
    };
    let run = |out: &str| {
        let a = args(out);
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        attractor(&refs, t)
    };
    // One image missing: the rest is scored, the summary written, the exit code non-zero.
    let o = run("out");
    assert!(!o.status.success());
    let msg = text(&o);
    assert!(msg.contains("candle/07/1/1.png"), "{msg}");
    assert!(msg.contains("1 expected image(s) missing"), "{msg}");
    assert!(
        msg.contains("overestimates"),
        "--split both prints the difference: {msg}"
    );
    let lines = std::fs::read_to_string(t.join("out/results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 15);
    assert!(t.join("out/summary.csv").is_file());
    // The missing image appears; the rerun scores only it.
    save_png(&t.join("imgs/candle/07/1/1.png"), &picture(7, 64, 64)).unwrap();
    let o = run("out");
    assert!(o.status.success(), "{}", text(&o));
    let after = std::fs::read_to_string(t.join("out/results.jsonl")).unwrap();
    assert_eq!(after.lines().count(), 16);
    assert!(
        after.starts_with(&lines),
        "earlier lines are kept as they were"
    );

    // Two shards through the CLI, merged.
    for i in 1..=2 {
        let mut a = args(&format!("s{i}"));
        a.extend(["--shard".to_string(), format!("{i}/2")]);
        let refs: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let o = attractor(&refs, t);
        assert!(o.status.success(), "{}", text(&o));
    }
    let o = attractor(&["eval", "merge", "s1", "s2", "--out", "merged"], t);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("16 images"), "{}", text(&o));
    assert_eq!(
        sorted_lines(&t.join("merged/results.jsonl")),
        sorted_lines(&t.join("out/results.jsonl"))
    );
}

#[test]
fn readable_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    make_dataset(&t.join("data"));
    let o = attractor(&["eval", "--run", "some-run", "--data", "data"], t);
    assert!(!o.status.success());
    assert!(text(&o).contains("not wired yet"), "{}", text(&o));

    let o = attractor(&["eval", "--images", "imgs", "--data", "data"], t);
    assert!(!o.status.success());
    assert!(text(&o).contains("--out"), "{}", text(&o));

    let o = attractor(&["eval", "--data", "data"], t);
    assert!(!o.status.success());
    assert!(text(&o).contains("--images DIR"), "{}", text(&o));

    // Offline and not cached: the error names the repo, revision and file.
    std::fs::create_dir_all(t.join("imgs")).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args([
            "eval",
            "--images",
            "imgs",
            "--data",
            "data",
            "--out",
            "o",
            "--offline",
        ])
        .current_dir(t)
        .env("HF_HUB_CACHE", t.join("empty-cache"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let msg = text(&o);
    for n in ["openai/clip-vit-base-patch32", "refs/pr/15", "config.json"] {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
    assert!(msg.contains("huggingface-cli download"), "{msg}");
}
