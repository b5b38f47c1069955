//! `attractor eval` as the command line drives it (parsed by clap, run by `cli::run`, the same
//! path as the binary, whose `main` turns an `Err` into exit code 1): `--images` scoring on the
//! tiny scorers (files, resume), `merge`, and the readable errors of the modes that need more.
//! In-process rather than through the executable: the build folder is shared, so
//! `target/debug/attractor` may belong to another checkout while the tests run.

mod common;

use attractor::cli::{run, Cli};
use attractor::files::save_png;
use clap::Parser;
use common::*;
use std::path::Path;

/// Run `attractor ARGS...`; an argument `@name` is the path `cwd/name`. `Err` holds the message
/// that `main` would print.
fn attractor(args: &[&str], cwd: &Path) -> Result<(), String> {
    let mut argv = vec!["attractor".to_string()];
    for a in args {
        argv.push(match a.strip_prefix('@') {
            Some(rel) => cwd.join(rel).display().to_string(),
            None => a.to_string(),
        });
    }
    let cli = Cli::try_parse_from(&argv).map_err(|e| e.to_string())?;
    run(cli).map_err(|e| format!("{e:#}"))
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
                    &picture((k * 100 + ci * 10 + s) as u64, 64, 64),
                    &dir.join(&rel),
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
            "@imgs".into(),
            "--data".into(),
            "@data".into(),
            "--out".into(),
            format!("@{out}"),
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
    let msg = run("out").unwrap_err();
    assert!(msg.contains("1 expected image(s) missing"), "{msg}");
    assert!(msg.contains("imgs"), "{msg}");
    let summary = std::fs::read_to_string(t.join("out/summary.json")).unwrap();
    assert!(
        summary.contains("classic_minus_test"),
        "--split both reports the difference"
    );
    let lines = std::fs::read_to_string(t.join("out/results.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 15);
    assert!(t.join("out/summary.csv").is_file());
    // The missing image appears; the rerun scores only it.
    save_png(&picture(7, 64, 64), &t.join("imgs/candle/07/1/1.png")).unwrap();
    run("out").unwrap();
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
        attractor(&refs, t).unwrap();
    }
    attractor(&["eval", "merge", "@s1", "@s2", "--out", "@merged"], t).unwrap();
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
    let msg = attractor(&["eval", "--run", "@some-run", "--data", "@data"], t).unwrap_err();
    // A folder that is not a training run: the error names its config.json and the fix.
    assert!(
        msg.contains("some-run/config.json") && msg.contains("attractor train"),
        "{msg}"
    );

    let msg = attractor(&["eval", "--images", "@imgs", "--data", "@data"], t).unwrap_err();
    assert!(msg.contains("--out"), "{msg}");

    let msg = attractor(&["eval", "--data", "@data"], t).unwrap_err();
    assert!(msg.contains("--images DIR"), "{msg}");

    // Offline and not cached (a repo no cache holds): the error names repo, revision and file.
    std::fs::create_dir_all(t.join("imgs")).unwrap();
    let msg = attractor(
        &[
            "eval",
            "--images",
            "@imgs",
            "--data",
            "@data",
            "--out",
            "@o",
            "--offline",
            "--clip",
            "attractor-tests/no-such-clip@v9",
        ],
        t,
    )
    .unwrap_err();
    for n in ["attractor-tests/no-such-clip", "v9", "config.json"] {
        assert!(msg.contains(n), "`{n}` not in: {msg}");
    }
    assert!(msg.contains("huggingface-cli download"), "{msg}");
}
