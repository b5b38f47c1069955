//! `attractor eval --runs` with the real generator: tiny-sd with trained subjects, scored by
//! tiny-clip and tiny-dino, on two subjects (split-test protocol).

mod common;
use common::fixtures;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractor"))
}

#[test]
fn eval_runs_two_trained_subjects_end_to_end() {
    let t = tempfile::tempdir().unwrap();
    let runs = t.path().join("runs");
    for subject in ["dog", "candle"] {
        let o = bin()
            .args(["train", "--model"])
            .arg(fixtures().join("tiny-sd"))
            .args([
                "--subject",
                subject,
                "--method",
                "ti",
                "--steps",
                "1",
                "--resolution",
                "128",
            ])
            .args(["--batch", "1", "--offline", "--out"])
            .arg(runs.join(subject))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let out = t.path().join("eval");
    let o = bin()
        .args(["eval", "--runs"])
        .arg(&runs)
        .args([
            "--split",
            "test",
            "--samples",
            "1",
            "--steps",
            "2",
            "--offline",
            "--model",
        ])
        .arg(fixtures().join("tiny-sd"))
        .arg("--clip")
        .arg(fixtures().join("tiny-clip"))
        .arg("--dino")
        .arg(fixtures().join("tiny-dino"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    // Each subject's test images x 10 captions x 1 sample, every score finite.
    let mut lines = 0;
    for e in walk(&out) {
        if e.file_name().is_some_and(|n| n == "results.jsonl") {
            for l in std::fs::read_to_string(&e).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                for k in ["clip_t", "clip_i", "dino"] {
                    assert!(v[k].as_f64().unwrap().is_finite(), "{k} in {l}");
                }
                lines += 1;
            }
        }
    }
    assert_eq!(
        lines,
        2 * 10 + 2 * 10,
        "dog and candle have 2 test images each"
    );
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}
