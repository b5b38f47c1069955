//! `attractor eval --runs` with the real generator: tiny-sd with trained subjects, scored by
//! tiny-clip and tiny-dino, on two subjects (split-test protocol).

mod common;
use common::fixtures;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_attractor"))
}

/// `attractor train ARGS` on tiny-sd (128 px, batch 1, offline) into `out`, which must succeed.
fn train_tiny(args: &[&str], data: Option<&Path>, out: &Path) {
    let mut c = bin();
    c.args(["train", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .args(["--resolution", "128", "--batch", "1", "--offline"])
        .args(args);
    if let Some(d) = data {
        c.arg("--data").arg(d);
    }
    let o = c.arg("--out").arg(out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// A small dataset in `dir/data` and a two-step `method` run on `subject` with a checkpoint at
/// every step in `dir/run`: `(data, run)`.
fn checkpointed_run(dir: &Path, subject: &str, method: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    common::make_dataset(&data);
    let run = dir.join("run");
    let args = [
        "--subject",
        subject,
        "--method",
        method,
        "--steps",
        "2",
        "--save-every",
        "1",
    ];
    train_tiny(&args, Some(&data), &run);
    (data, run)
}

/// `attractor eval MODE TARGET ARGS` with tiny-sd, tiny-clip and tiny-dino: 1 sample per
/// caption, 2 sampling steps, offline, into `out`.
fn eval_tiny(mode: &str, target: &Path, args: &[&str], data: Option<&Path>, out: &Path) -> Output {
    let mut c = bin();
    c.args(["eval", mode])
        .arg(target)
        .args(["--samples", "1", "--steps", "2", "--offline", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .arg("--clip")
        .arg(fixtures().join("tiny-clip"))
        .arg("--dino")
        .arg(fixtures().join("tiny-dino"))
        .args(args);
    if let Some(d) = data {
        c.arg("--data").arg(d);
    }
    c.arg("--out").arg(out).output().unwrap()
}

#[test]
fn eval_runs_two_trained_subjects_end_to_end() {
    let t = tempfile::tempdir().unwrap();
    let runs = t.path().join("runs");
    for subject in ["dog", "candle"] {
        let args = ["--subject", subject, "--method", "ti", "--steps", "1"];
        train_tiny(&args, None, &runs.join(subject));
    }
    let out = t.path().join("eval");
    let o = eval_tiny("--runs", &runs, &["--split", "test"], None, &out);
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

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
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

/// `eval --checkpoints`: every saved step of a run scored on both protocols, a step folder each,
/// the curves as CSV and PNG; a rerun scores nothing again; a run without checkpoints is named.
#[test]
fn eval_checkpoints_scores_every_saved_step() {
    let t = tempfile::tempdir().unwrap();
    let (data, run) = checkpointed_run(t.path(), "dog", "ti");
    let out = t.path().join("curves");
    let eval = |run: &Path| eval_tiny("--checkpoints", run, &[], Some(&data), &out);
    let o = eval(&run);
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(
        o.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout.contains("classic DINO"), "{stdout}");
    // One evaluation folder per saved step, both protocols: 1 test image x 2 captions and
    // 2 classic prompts, 1 sample each.
    let mut ids = Vec::new();
    for step in [1, 2] {
        let dir = out.join(format!("step-{step}"));
        let lines = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 4, "step {step}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("summary.json")).unwrap())
                .unwrap();
        assert!(summary["test"].is_object() && summary["train"].is_object());
        ids.push(summary["config"].to_string());
    }
    assert_ne!(
        ids[0], ids[1],
        "each step generates from its own learned files"
    );
    // The CSV carries each step's overall summary.
    let csv = std::fs::read_to_string(out.join("checkpoints.csv")).unwrap();
    let rows: Vec<Vec<&str>> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    let keys: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        keys,
        [
            ("1", "split-test"),
            ("1", "classic"),
            ("2", "split-test"),
            ("2", "classic")
        ]
    );
    let s2: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("step-2/summary.json")).unwrap())
            .unwrap();
    let dino_test: f64 = rows[2][7].parse().unwrap();
    let want = s2["test"]["overall"]["dino"]["mean"].as_f64().unwrap();
    assert!((dino_test - want).abs() < 1e-6, "{dino_test} vs {want}");
    let png = image::open(out.join("checkpoints.png")).unwrap();
    assert_eq!((png.width(), png.height()), (960, 1020));

    // A rerun resumes: nothing is generated again.
    let before = std::fs::read_to_string(out.join("step-1/results.jsonl")).unwrap();
    let o = eval(&run);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        std::fs::read_to_string(out.join("step-1/results.jsonl")).unwrap(),
        before
    );

    // A run folder without checkpoints: the error says how to keep them.
    let empty = t.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::copy(run.join("config.json"), empty.join("config.json")).unwrap();
    let o = eval(&empty);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--save-every") && e.contains("empty"), "{e}");
}

/// `eval --checkpoints` on a NeTI run: each step loads its own `mapper-steps-N` files (the last
/// step the final `mapper.safetensors`); `--split test` narrows it to the split-test protocol.
#[test]
fn eval_checkpoints_of_a_neti_run() {
    let t = tempfile::tempdir().unwrap();
    let (data, run) = checkpointed_run(t.path(), "candle", "neti");
    assert!(run.join("mapper-steps-1.safetensors").is_file());
    let out = t.path().join("curves");
    let o = eval_tiny(
        "--checkpoints",
        &run,
        &["--split", "test"],
        Some(&data),
        &out,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("checkpoints.csv")).unwrap();
    let keys: Vec<String> = csv
        .lines()
        .skip(1)
        .map(|l| l.split(',').take(3).collect::<Vec<_>>().join(","))
        .collect();
    assert_eq!(keys, ["1,split-test,2", "2,split-test,2"]);
    let config = |step: usize| {
        std::fs::read_to_string(out.join(format!("step-{step}/eval-config.json"))).unwrap()
    };
    assert!(
        config(1).contains("mapper-steps-1.safetensors"),
        "{}",
        config(1)
    );
    assert!(config(2).contains("mapper.safetensors"), "{}", config(2));
}

/// `eval --checkpoints` on a DreamBooth run (the paper's Fig. 1 tracks one): each saved step's
/// model folder (`model-steps-N/`, the last step's `model/`) is scored on both protocols.
#[test]
fn eval_checkpoints_of_a_dreambooth_run() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::make_dataset(&data);
    let run = t.path().join("run");
    let mut c = bin();
    c.env("ATTRACTOR_CACHE", t.path().join("cache"))
        .args(["train", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .args(["--resolution", "128", "--offline", "--subject", "dog"])
        .args([
            "--method",
            "dreambooth",
            "--steps",
            "2",
            "--save-every",
            "1",
        ])
        .args(["--prior-images", "1", "--prior-steps", "2", "--lr", "1e-3"])
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&run);
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(run
        .join("model-steps-1/unet/diffusion_pytorch_model.safetensors")
        .is_file());
    let out = t.path().join("curves");
    let o = eval_tiny("--checkpoints", &run, &[], Some(&data), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let csv = std::fs::read_to_string(out.join("checkpoints.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4, "2 steps x 2 protocols:\n{csv}");
    let config = |step: usize| {
        std::fs::read_to_string(out.join(format!("step-{step}/eval-config.json"))).unwrap()
    };
    assert!(config(1).contains("model-steps-1"), "{}", config(1));
    assert!(config(2).contains("model/unet"), "{}", config(2));
}

/// Issue 23: a 3-step ti run with `--heldout-every 1 --keep-best --save-every 1` keeps the
/// argmin step's learned files byte for byte in RUN/best/ (which `sample --run` takes), records
/// the step in config.json, and `eval --checkpoints` writes best.json with every metric's
/// choice under each protocol and the held-out loss's.
#[test]
fn keep_best_and_best_json_of_a_three_step_run() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    common::make_dataset(&data);
    let run = t.path().join("run");
    let args = [
        "--subject",
        "dog",
        "--method",
        "ti",
        "--steps",
        "3",
        "--save-every",
        "1",
        "--heldout-every",
        "1",
        "--keep-best",
        "--lr",
        "0.5",
    ];
    train_tiny(&args, Some(&data), &run);
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let losses: Vec<f64> = lines
        .iter()
        .map(|l| {
            l["heldout_loss"]
                .as_f64()
                .expect("heldout_loss at every step")
        })
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(lines
        .iter()
        .all(|l| l["train_ref_loss"].as_f64().unwrap().is_finite()));
    let argmin = 1
        + (0..3)
            .min_by(|&a, &b| losses[a].partial_cmp(&losses[b]).unwrap())
            .unwrap();
    let file = |step: usize| {
        if step == 3 {
            run.join("learned_embeds.safetensors")
        } else {
            run.join(format!("learned_embeds-steps-{step}.safetensors"))
        }
    };
    assert_eq!(
        std::fs::read(run.join("best/learned_embeds.safetensors")).unwrap(),
        std::fs::read(file(argmin)).unwrap(),
        "best/ holds step {argmin}'s embedding (losses {losses:?})"
    );
    for cfg in [run.join("config.json"), run.join("best/config.json")] {
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        assert_eq!(
            v["best"]["step"].as_u64(),
            Some(argmin as u64),
            "{}",
            cfg.display()
        );
    }
    let o = bin()
        .args(["sample", "--run"])
        .arg(run.join("best"))
        .args([
            "--prompt",
            "a photo of {}",
            "--steps",
            "2",
            "--offline",
            "--model",
        ])
        .arg(fixtures().join("tiny-sd"))
        .arg("--out")
        .arg(t.path().join("best-samples"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = t.path().join("curves");
    let o = eval_tiny("--checkpoints", &run, &[], Some(&data), &out);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let best: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("best.json")).unwrap()).unwrap();
    assert_eq!(best["heldout_loss_step"].as_u64(), Some(argmin as u64));
    let metrics = best["metrics"].as_array().unwrap();
    assert_eq!(metrics.len(), 3);
    for m in metrics {
        for k in ["split_test_step", "classic_step"] {
            let s = m[k].as_u64().unwrap();
            assert!((1..=3).contains(&s), "{k} = {s}");
        }
    }
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("split-test best") && stdout.contains("DINO"),
        "{stdout}"
    );
}

/// `eval --batch 3` (NeTI, 20 images: a ragged last batch of 2) scores as `--batch 1` within
/// 1e-4, and a folder begun with one batch size resumes with another without redoing anything.
#[test]
fn batched_eval_scores_as_unbatched_and_resumes_across_batch_sizes() {
    let t = tempfile::tempdir().unwrap();
    let run = t.path().join("run");
    let args = ["--subject", "dog", "--method", "neti", "--steps", "1"];
    train_tiny(&args, None, &run);
    let scores = |out: &Path| -> std::collections::BTreeMap<String, [f64; 3]> {
        std::fs::read_to_string(out.join("results.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                let s = |k: &str| v[k].as_f64().unwrap();
                (
                    v["key"].as_str().unwrap().to_string(),
                    [s("clip_t"), s("clip_i"), s("dino")],
                )
            })
            .collect()
    };
    let (one, three) = (t.path().join("b1"), t.path().join("b3"));
    for (out, batch) in [(&one, "1"), (&three, "3")] {
        let o = eval_tiny("--run", &run, &["--batch", batch], None, out);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let (a, b) = (scores(&one), scores(&three));
    assert_eq!(a.len(), 20);
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in &a {
        for (i, (p, q)) in x.iter().zip(&b[k]).enumerate() {
            assert!((p - q).abs() <= 1e-4, "{k} score {i}: {p} batched {q}");
        }
    }
    // The batch size is not part of the evaluation's identity: a rerun with another resumes.
    let before = std::fs::read(one.join("results.jsonl")).unwrap();
    let o = eval_tiny("--run", &run, &["--batch", "4"], None, &one);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(one.join("results.jsonl")).unwrap(), before);
}
