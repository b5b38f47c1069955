//! The sweep scripts and `attractor report`, end to end on the tiny fixture models:
//!
//! - `scripts/sweep-schedules.sh` trains and evaluates 2 subjects x 2 schedules of neti+, writes
//!   the report; a rerun does no work (prints skip, touches no run file); a run whose training
//!   lost its `train.done` is resumed, nothing else redone;
//! - `attractor report` (in-process) on that sweep writes the tables, plots and page;
//! - a sweep of all eight methods (one subject, one schedule) reports every method, with the
//!   method bubble chart;
//! - `scripts/slurm/submit.sh --dry-run` prints the three sbatch commands with the right array
//!   sizes, resources and dependencies, and leaves finished work out of the task lists;
//! - with `ATTRACTOR_TEST_SLURM=1` and a running cluster (`scripts/slurm/local-cluster.sh`),
//!   the same sweep through real Slurm job arrays gives the local sweep's numbers.
//!
//! The scripts run the executable named by ATTRACTOR_BIN: a private copy of this build's
//! binary (the shared build folder's `target/debug/attractor` may be replaced by another
//! checkout's build while tests run).

mod common;

use attractor::cli::{run, Cli};
use clap::Parser;
use common::{fixtures, root};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Instant, SystemTime};

const SUBJECTS: [&str; 2] = ["dog", "cat"];

/// A two-subject copy of the bundled benchmark, cut down to one caption per test image and two
/// classic prompts per kind (4 images per run and sample), with elliptical subject masks.
fn dataset(dir: &Path) -> PathBuf {
    let src = root().join("data/dreambooth-split");
    let dst = dir.join("data");
    let subjects: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("subjects.json")).unwrap()).unwrap();
    let mine: Vec<&serde_json::Value> = subjects
        .iter()
        .filter(|s| SUBJECTS.contains(&s["name"].as_str().unwrap()))
        .collect();
    assert_eq!(mine.len(), 2);
    std::fs::create_dir_all(&dst).unwrap();
    std::fs::write(
        dst.join("subjects.json"),
        serde_json::to_string(&mine).unwrap(),
    )
    .unwrap();
    let prompts: BTreeMap<String, Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(src.join("prompts.json")).unwrap()).unwrap();
    let prompts: BTreeMap<_, _> = prompts
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().take(2).collect::<Vec<_>>()))
        .collect();
    std::fs::write(
        dst.join("prompts.json"),
        serde_json::to_string(&prompts).unwrap(),
    )
    .unwrap();
    for subject in SUBJECTS {
        let (s, d) = (src.join(subject), dst.join(subject));
        let captions: BTreeMap<String, Vec<String>> =
            serde_json::from_str(&std::fs::read_to_string(s.join("captions.json")).unwrap())
                .unwrap();
        let captions: BTreeMap<_, _> = captions
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().take(1).collect::<Vec<_>>()))
            .collect();
        std::fs::create_dir_all(d.join("masks")).unwrap();
        std::fs::write(
            d.join("captions.json"),
            serde_json::to_string(&captions).unwrap(),
        )
        .unwrap();
        for split in ["train", "test"] {
            std::fs::create_dir_all(d.join(split)).unwrap();
            for e in std::fs::read_dir(s.join(split)).unwrap() {
                let p = e.unwrap().path();
                std::fs::copy(&p, d.join(split).join(p.file_name().unwrap())).unwrap();
                if split == "train" {
                    let (w, h) = image::image_dimensions(&p).unwrap();
                    let m = image::GrayImage::from_fn(w, h, |x, y| {
                        let dx = (x as f32 - w as f32 / 2.0) / (w as f32 / 3.0);
                        let dy = (y as f32 - h as f32 / 2.0) / (h as f32 / 3.0);
                        image::Luma([if dx * dx + dy * dy < 1.0 { 255 } else { 0 }])
                    });
                    let stem = p.file_stem().unwrap().to_string_lossy().to_string();
                    m.save(d.join("masks").join(format!("{stem}.png"))).unwrap();
                }
            }
        }
    }
    dst
}

/// A private copy of this build's executable (checked to be this checkout's: it has `report`).
fn private_binary(dir: &Path) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_attractor"));
    let copy = dir.join("attractor");
    std::fs::copy(&built, &copy).unwrap();
    // Running a file just written can fail with ETXTBSY while a test running in parallel forks:
    // its child holds a copy of the write descriptor until it execs. Wait for that and retry.
    let help = (0..50)
        .find_map(|_| match Command::new(&copy).arg("--help").output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(100));
                None
            }
            r => Some(r.unwrap()),
        })
        .unwrap_or_else(|| panic!("{} stayed busy (ETXTBSY) for 5 s", copy.display()));
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("report") && help.contains("train"),
        "{} is not this checkout's build (another checkout sharing the build folder replaced it); \
         rerun the test",
        built.display()
    );
    copy
}

/// The sweep flags for the tiny models (2 training steps at 128 px, 2 sampling steps).
fn sweep_flags(data: &Path, out: &Path) -> Vec<String> {
    let f = fixtures();
    let mut v: Vec<String> = vec!["--out".into(), out.display().to_string()];
    v.extend(["--data".into(), data.display().to_string()]);
    v.extend(["--model".into(), f.join("tiny-sd").display().to_string()]);
    v.extend(["--clip".into(), f.join("tiny-clip").display().to_string()]);
    v.extend(["--dino".into(), f.join("tiny-dino").display().to_string()]);
    for a in [
        "--subjects",
        "dog,cat",
        "--schedules",
        "zero,cosine",
        "--steps",
        "2",
        "--samples",
        "1",
        "--eval-steps",
        "2",
        "--offline",
        "--",
        "--resolution",
        "128",
        "--batch",
        "1",
        "--grad-accum",
        "1",
    ] {
        v.push(a.into());
    }
    v
}

fn script(name: &str) -> PathBuf {
    root().join("scripts").join(name)
}

fn bash(script: &Path, args: &[String], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new("bash");
    c.arg(script).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

fn ok(o: &Output) -> String {
    let (out, err) = text(o);
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    out
}

/// Modification times of every file below `dir`.
fn mtimes(dir: &Path) -> BTreeMap<PathBuf, SystemTime> {
    let mut m = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                stack.push(e.path());
            } else {
                m.insert(e.path(), md.modified().unwrap());
            }
        }
    }
    m
}

fn run_dirs(sweep: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    for s in SUBJECTS {
        for sch in ["zero", "cosine"] {
            v.push(sweep.join("runs").join(s).join("neti+").join(sch));
        }
    }
    v
}

fn check_report_folder(dir: &Path) {
    for f in [
        "report.html",
        "report.json",
        "table.md",
        "table-test.csv",
        "table-train.csv",
        "schedules-netiplus-test.png",
        "schedules-netiplus-train.png",
        "methods-test.png",
        "methods-train.png",
    ] {
        assert!(dir.join(f).is_file(), "{} missing", dir.join(f).display());
    }
    for split in ["test", "train"] {
        let csv = std::fs::read_to_string(dir.join(format!("table-{split}.csv"))).unwrap();
        let rows: Vec<Vec<&str>> = csv
            .lines()
            .skip(1)
            .map(|l| l.split(',').collect())
            .collect();
        assert_eq!(rows.len(), 2, "{csv}");
        // neti+ zero, then cosine; 2 subjects x 2 images (split-test: 2 test images x 1
        // caption; classic: 2 prompts) x 1 sample each.
        assert_eq!(rows[0][..4], ["neti+", "zero", "2", "4"], "{csv}");
        assert_eq!(rows[1][..4], ["neti+", "cosine", "2", "4"], "{csv}");
        for r in &rows {
            for v in &r[4..] {
                assert!(v.parse::<f64>().unwrap().is_finite(), "{csv}");
            }
        }
        for png in [
            format!("methods-{split}.png"),
            format!("schedules-netiplus-{split}.png"),
        ] {
            let img = image::open(dir.join(&png)).unwrap();
            assert!(img.width() > 500 && img.height() > 500, "{png}");
        }
    }
    // The qualitative grid: one row per subject (dog, cat), the two neti+ schedules as columns.
    let grid = image::open(dir.join("qualitative.png")).unwrap();
    let layout = attractor::report::qualitative::Layout {
        cell: 160,
        columns: 2,
        rows: 2,
    };
    assert_eq!((grid.width(), grid.height()), layout.size());
    // No base method to pair neti+ with, no held-out losses logged: neither file.
    assert!(!dir.join("paired.csv").exists() && !dir.join("losses.png").exists());
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    // Self-contained: 4 plots and the grid, 2 references x 2 subjects, 4 runs x 4 samples, all
    // inline.
    let plots = html.matches("src=\"data:image/png;base64,").count();
    let thumbs = html.matches("src=\"data:image/jpeg;base64,").count();
    assert_eq!((plots, thumbs), (5, 4 + 16), "inline images");
    assert!(!html.contains("src=\"http") && !html.contains("src=\"/"));
    for needle in [
        "split-test protocol",
        "classic protocol",
        "CLIP-T",
        "DINO",
        "held-out test images",
        "cosine",
    ] {
        assert!(html.contains(needle), "report.html lacks {needle}");
    }
}

/// The local sweep end to end, a rerun that does nothing, a resumed run, and `attractor
/// report` on the result.
#[test]
fn local_sweep_runs_skips_resumes_and_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = dataset(t);
    let bin = private_binary(t);
    let sweep = t.join("sweep");
    let env = [("ATTRACTOR_BIN", bin.to_str().unwrap())];
    let mut args = sweep_flags(&data, &sweep);
    args.splice(0..0, ["--jobs".to_string(), "2".to_string()]);

    let t0 = Instant::now();
    let out = ok(&bash(&script("sweep-schedules.sh"), &args, &env));
    eprintln!("first sweep: {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(out.matches(": train (new)").count(), 4, "{out}");
    assert_eq!(out.matches(": evaluated in").count(), 4, "{out}");
    for run in run_dirs(&sweep) {
        assert!(run.join("train.done").is_file(), "{}", run.display());
        assert!(run.join("mapper.safetensors").is_file());
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("eval/summary.json")).unwrap())
                .unwrap();
        assert_eq!(summary["config"]["split"], "both");
        assert_eq!(summary["test"]["overall"]["n"], 2);
        assert_eq!(summary["train"]["overall"]["n"], 2);
    }
    check_report_folder(&sweep.join("report"));

    // A rerun does no work: everything is skipped and no file below runs/ changes.
    let before = mtimes(&sweep.join("runs"));
    let report_before = mtimes(&sweep.join("report"));
    let t1 = Instant::now();
    let out = ok(&bash(&script("sweep-schedules.sh"), &args, &env));
    eprintln!("rerun: {:.1} s", t1.elapsed().as_secs_f64());
    assert_eq!(out.matches("skip train (done)").count(), 4, "{out}");
    assert_eq!(out.matches("skip eval (done)").count(), 4, "{out}");
    assert!(out.contains("skip report"), "{out}");
    assert!(
        !out.contains(": train (") && !out.contains(": eval\n"),
        "{out}"
    );
    assert_eq!(mtimes(&sweep.join("runs")), before);
    assert_eq!(mtimes(&sweep.join("report")), report_before);

    // A run that was interrupted after its last checkpoint is resumed, nothing else redone.
    let cut = &run_dirs(&sweep)[1];
    std::fs::remove_file(cut.join("train.done")).unwrap();
    let out = ok(&bash(&script("sweep-schedules.sh"), &args, &env));
    assert_eq!(out.matches(": train (resume)").count(), 1, "{out}");
    assert_eq!(out.matches("skip train (done)").count(), 3, "{out}");
    assert_eq!(out.matches("skip eval (done)").count(), 4, "{out}");
    assert!(cut.join("train.done").is_file());
    let log = std::fs::read_to_string(sweep.join("logs").join("dog__netiplus__cosine.train.log"))
        .unwrap();
    assert!(log.contains("train --resume"), "{log}");

    // `attractor report` on the sweep, into another folder.
    let other = t.join("report2");
    let argv = [
        "attractor",
        "report",
        sweep.to_str().unwrap(),
        "--out",
        other.to_str().unwrap(),
    ];
    run(Cli::try_parse_from(argv).unwrap()).unwrap();
    check_report_folder(&other);
    assert_eq!(
        std::fs::read(other.join("table-test.csv")).unwrap(),
        std::fs::read(sweep.join("report/table-test.csv")).unwrap()
    );
}

/// Every method, in the order users would type them.
const ALL_METHODS: [&str; 8] = [
    "ti",
    "ti+",
    "neti",
    "neti+",
    "dreambooth",
    "dreambooth-lora",
    "custom-diffusion",
    "dreambooth-lora+",
];

/// The methods with an attractor: one run per schedule.
fn is_attractor(method: &str) -> bool {
    method.ends_with('+')
}

/// All eight methods in one tiny sweep: one subject, the + methods with the cosine schedule
/// only, 2 training steps (the weight-training methods with one class image of two sampling
/// steps, cached in the ATTRACTOR_CACHE given to the script), split-test evaluation only. The
/// report lists every method in report.json (runs and table, in the paper's order) and draws
/// the method bubble chart with the four families' colours.
///
/// By hand: `ATTRACTOR_TEST_SWEEP8_DIR=/tmp/sweep8 cargo test --test sweep every_method --
/// --nocapture` keeps everything (data, cache, sweep, report) in that folder.
#[test]
fn sweep_of_every_method_reports_all_eight() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = std::env::var_os("ATTRACTOR_TEST_SWEEP8_DIR").map(PathBuf::from);
    let t = keep.as_deref().unwrap_or(tmp.path());
    if keep.is_some() {
        let _ = std::fs::remove_dir_all(t);
        std::fs::create_dir_all(t).unwrap();
    }
    let data = dataset(t);
    let bin = private_binary(t);
    let sweep = t.join("sweep");
    let cache = t.join("cache");
    let mut args = sweep_flags(&data, &sweep);
    // Later options win: these go just before the `--` of the train flags.
    let dashes = args.iter().position(|a| a == "--").unwrap();
    let methods = ALL_METHODS.join(",");
    let mine = [
        "--jobs",
        "2",
        "--subjects",
        "dog",
        "--schedules",
        "cosine",
        "--split",
        "test",
        "--methods",
        &methods,
    ];
    args.splice(dashes..dashes, mine.iter().map(|s| s.to_string()));
    // The held-out loss at both steps, for the report's loss panel.
    args.extend(
        [
            "--prior-images",
            "1",
            "--prior-steps",
            "2",
            "--heldout-every",
            "1",
        ]
        .map(String::from),
    );
    let env = [
        ("ATTRACTOR_BIN", bin.to_str().unwrap()),
        ("ATTRACTOR_CACHE", cache.to_str().unwrap()),
    ];
    let t0 = Instant::now();
    let out = ok(&bash(&script("sweep-schedules.sh"), &args, &env));
    eprintln!("8-method sweep: {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(out.matches(": train (new)").count(), 8, "{out}");
    assert_eq!(out.matches(": evaluated in").count(), 8, "{out}");
    let schedule = |m: &str| if is_attractor(m) { "cosine" } else { "none" };
    for m in ALL_METHODS {
        let run = sweep.join("runs/dog").join(m).join(schedule(m));
        assert!(run.join("train.done").is_file(), "{}", run.display());
        assert!(run.join("eval/summary.json").is_file(), "{}", run.display());
        let log = format!("dog__{}__{}.train.log", m.replace('+', "plus"), schedule(m));
        assert!(sweep.join("logs").join(&log).is_file(), "{log}");
    }
    // The baselines' class images went to the script's ATTRACTOR_CACHE: one image, one key
    // (same model, prompt, sampler and size for every method).
    let keys: Vec<PathBuf> = std::fs::read_dir(cache.join("class-images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(keys.len(), 1, "{keys:?}");
    assert!(keys[0].join("0000.png").is_file());
    assert!(!keys[0].join("0001.png").exists());

    let report = sweep.join("report");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap())
            .unwrap();
    let mut runs: Vec<(String, String)> = json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["subject"], "dog");
            (
                r["method"].as_str().unwrap().to_string(),
                r["schedule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    runs.sort();
    let mut want: Vec<(String, String)> = ALL_METHODS
        .iter()
        .map(|m| {
            let s = if is_attractor(m) { "cosine" } else { "-" };
            (m.to_string(), s.to_string())
        })
        .collect();
    want.sort();
    assert_eq!(runs, want);
    assert_eq!(json["skipped"].as_array().unwrap().len(), 0, "{json}");
    let tables = json["tables"].as_array().unwrap();
    assert_eq!(tables.len(), 1, "split-test only");
    assert_eq!(tables[0]["split"], "test");
    let rows: Vec<&str> = tables[0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            assert_eq!(r["metrics"]["n"], 2, "{r}");
            for k in ["clip_t", "clip_i", "dino"] {
                assert!(r["metrics"][k]["mean"].as_f64().unwrap().is_finite(), "{r}");
            }
            r["method"].as_str().unwrap()
        })
        .collect();
    // The paper's table order: the base methods, then the + variants.
    assert_eq!(
        rows,
        [
            "ti",
            "neti",
            "dreambooth",
            "dreambooth-lora",
            "custom-diffusion",
            "ti+",
            "neti+",
            "dreambooth-lora+"
        ]
    );
    let csv = std::fs::read_to_string(report.join("table-test.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 8, "{csv}");
    assert!(!report.join("table-train.csv").exists());
    // The bubble chart, with each family's colour (at least its legend dot).
    let png = report.join("methods-test.png");
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (960, 800));
    for f in attractor::report::plot::Family::ALL {
        let c = f.color();
        let n = img.pixels().filter(|p| p.0 == [c.0, c.1, c.2]).count();
        assert!(
            n > 100,
            "{}: {n} pixels of its colour in {}",
            f.name(),
            png.display()
        );
    }
    for tag in ["tiplus", "netiplus", "dreambooth-loraplus"] {
        let f = report.join(format!("schedules-{tag}-test.png"));
        assert!(f.is_file(), "{} missing", f.display());
    }
    let html = std::fs::read_to_string(report.join("report.html")).unwrap();
    for m in ALL_METHODS {
        assert!(
            html.contains(&format!("<td class=l>{m}</td>")),
            "report.html lacks {m}"
        );
    }

    // Paired comparisons: each + variant against its base, split-test only, 3 metrics each;
    // the 2 generated images of each run pair up (same keys and seeds in every method).
    let paired = std::fs::read_to_string(report.join("paired.csv")).unwrap();
    let rows: Vec<Vec<&str>> = paired
        .lines()
        .skip(1)
        .map(|l| l.split(',').collect())
        .collect();
    assert_eq!(rows.len(), 3 * 3, "{paired}");
    for (i, (a, b)) in [
        ("ti", "ti+"),
        ("neti", "neti+"),
        ("dreambooth-lora", "dreambooth-lora+"),
    ]
    .iter()
    .enumerate()
    {
        for (k, metric) in ["clip_t", "clip_i", "dino"].iter().enumerate() {
            let r = &rows[3 * i + k];
            assert_eq!(
                r[..9],
                [*a, "-", *b, "cosine", "split-test", *metric, "1", "2", "0"],
                "{paired}"
            );
            let (mean, lo, hi): (f64, f64, f64) = (
                r[9].parse().unwrap(),
                r[10].parse().unwrap(),
                r[11].parse().unwrap(),
            );
            assert!(lo <= mean && mean <= hi, "{paired}");
        }
    }
    // The means are the differences of the table's rows (both pool the same 2 images).
    let mean_of = |m: &str| -> f64 {
        let row = json["tables"][0]["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["method"] == m)
            .unwrap();
        row["metrics"]["dino"]["mean"].as_f64().unwrap()
    };
    let dino: f64 = rows[2][9].parse().unwrap();
    assert!(
        (dino - (mean_of("ti+") - mean_of("ti"))).abs() < 1e-5,
        "{paired}"
    );
    let subjects = std::fs::read_to_string(report.join("paired-subjects.csv")).unwrap();
    assert_eq!(subjects.lines().count(), 1 + 3, "{subjects}");
    assert!(
        html.contains("ti+ cosine − ti"),
        "report.html lacks the paired table"
    );

    // The qualitative grid: one subject, one row, all eight methods as columns.
    let grid = image::open(report.join("qualitative.png")).unwrap();
    let layout = attractor::report::qualitative::Layout {
        cell: 160,
        columns: 8,
        rows: 1,
    };
    assert_eq!((grid.width(), grid.height()), layout.size());

    // The loss panel, from every run's metrics.jsonl (held-out and training-reference loss at
    // steps 1 and 2).
    for m in ALL_METHODS {
        let run = sweep.join("runs/dog").join(m).join(schedule(m));
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let points = attractor::report::losses::parse_metrics(&text);
        assert_eq!(points.len(), 2, "{m}: {text}");
        assert!(points
            .iter()
            .all(|p| p.heldout.is_some() && p.train_ref.is_some()));
    }
    let losses = image::open(report.join("losses.png")).unwrap();
    assert!(losses.width() > 500 && losses.height() > 300);
    assert!(html.contains("Held-out and training-reference loss"));
}

/// Usage errors name the fix; the help lists the knobs.
#[test]
fn sweep_script_usage() {
    let o = bash(&script("sweep-schedules.sh"), &["--help".into()], &[]);
    let out = ok(&o);
    for k in [
        "--jobs",
        "--samples",
        "--steps",
        "--model",
        "--data",
        "ATTRACTOR_BIN",
    ] {
        assert!(out.contains(k), "help lacks {k}");
    }
    let tmp = tempfile::tempdir().unwrap();
    let o = bash(
        &script("sweep-schedules.sh"),
        &[
            "--out".into(),
            tmp.path().display().to_string(),
            "--schedules".into(),
            "cosin".into(),
        ],
        &[("ATTRACTOR_BIN", "/bin/true")],
    );
    assert!(!o.status.success());
    assert!(
        text(&o).1.contains("unknown schedule 'cosin'"),
        "{:?}",
        text(&o)
    );
    // Every method is accepted; an unknown one is named with the choices.
    let o = bash(
        &script("sweep-schedules.sh"),
        &[
            "--out".into(),
            tmp.path().display().to_string(),
            "--methods".into(),
            "ti,dreambooth-lora+,dreambooth-lor".into(),
        ],
        &[("ATTRACTOR_BIN", "/bin/true")],
    );
    assert!(!o.status.success());
    let err = text(&o).1;
    assert!(err.contains("unknown method 'dreambooth-lor'"), "{err}");
    assert!(
        err.contains(&format!("choose from: {}", ALL_METHODS.join(" "))),
        "{err}"
    );
    for m in ALL_METHODS {
        assert!(out.contains(m), "help lacks {m}");
    }
    assert!(
        out.contains("ATTRACTOR_CACHE"),
        "help lacks ATTRACTOR_CACHE"
    );
    let o = bash(
        &script("sweep-schedules.sh"),
        &["--jobs".into(), "0".into()],
        &[],
    );
    assert!(!o.status.success());
    assert!(text(&o).1.contains("--jobs 0"));
}

/// The sbatch lines of a dry run, keyed by job kind.
fn sbatch_lines(stdout: &str) -> BTreeMap<String, Vec<String>> {
    let mut m = BTreeMap::new();
    for l in stdout.lines().filter(|l| l.starts_with("sbatch ")) {
        let words: Vec<String> = l.split_whitespace().map(String::from).collect();
        let kind = words
            .iter()
            .find_map(|w| w.strip_prefix("--job-name=attractor-"))
            .unwrap()
            .to_string();
        m.insert(kind, words);
    }
    m
}

fn flag<'a>(words: &'a [String], name: &str) -> Option<&'a str> {
    words
        .iter()
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
}

/// `submit.sh --dry-run`: three sbatch commands, arrays sized by the task lists, afterok
/// dependencies, resources from the environment; finished work is left out.
#[test]
fn slurm_dry_run_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tmp.path().join("sweep");
    let data = root().join("data/dreambooth-split");
    let n_subjects = serde_json::from_str::<Vec<serde_json::Value>>(
        &std::fs::read_to_string(data.join("subjects.json")).unwrap(),
    )
    .unwrap()
    .len();
    let env = [
        ("SLURM_PARTITION", "gpu-part"),
        ("SLURM_REPORT_PARTITION", "cpu-part"),
        ("SLURM_GPUS", "2"),
        ("SLURM_GPU_TYPE", "a100"),
        ("SLURM_TIME_TRAIN", "02:00:00"),
        ("SLURM_ARRAY_LIMIT", "16"),
        ("SLURM_ACCOUNT", "proj42"),
        ("SLURM_EXTRA_ARGS", "--constraint=fast --nice=5"),
        ("ATTRACTOR_BIN", "/opt/attractor/bin/attractor"),
    ];
    let args: Vec<String> = [
        "--dry-run",
        "--out",
        sweep.to_str().unwrap(),
        "--methods",
        "ti,neti+",
        "--shards",
        "3",
        "--steps",
        "500",
        "--samples",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = ok(&bash(&script("slurm/submit.sh"), &args, &env));
    let jobs = sbatch_lines(&out);
    assert_eq!(jobs.len(), 3, "{out}");
    // ti: one run per subject; neti+: six schedules.
    let runs = n_subjects * (1 + 6);
    let (train, eval, report) = (&jobs["train"], &jobs["eval"], &jobs["report"]);
    assert_eq!(
        flag(train, "--array"),
        Some(format!("0-{}%16", runs - 1).as_str())
    );
    assert_eq!(
        flag(eval, "--array"),
        Some(format!("0-{}%16", runs * 3 - 1).as_str())
    );
    assert_eq!(flag(train, "--dependency"), None);
    assert_eq!(flag(eval, "--dependency"), Some("afterok:DRYRUN-train"));
    assert_eq!(flag(report, "--dependency"), Some("afterok:DRYRUN-eval"));
    assert_eq!(flag(report, "--array"), None);
    for j in [train, eval] {
        assert_eq!(flag(j, "--partition"), Some("gpu-part"));
        assert_eq!(flag(j, "--gres"), Some("gpu:a100:2"));
        assert_eq!(flag(j, "--account"), Some("proj42"));
        assert!(
            j.contains(&"--constraint=fast".to_string()) && j.contains(&"--nice=5".to_string())
        );
    }
    assert_eq!(flag(train, "--time"), Some("02:00:00"));
    assert_eq!(flag(eval, "--time"), Some("04:00:00"));
    assert_eq!(flag(report, "--partition"), Some("cpu-part"));
    assert_eq!(flag(report, "--gres"), None);
    assert!(train.last().unwrap().ends_with("slurm/submit-1"));
    assert!(train[train.len() - 2].ends_with("scripts/slurm/train-task.sh"));
    assert!(eval[eval.len() - 2].ends_with("scripts/slurm/eval-task.sh"));
    assert!(report[report.len() - 2].ends_with("scripts/slurm/report-task.sh"));

    let sub = sweep.join("slurm/submit-1");
    let lines = |f: &str| -> Vec<String> {
        std::fs::read_to_string(sub.join(f))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    };
    let train_tasks = lines("train-tasks.tsv");
    assert_eq!(train_tasks.len(), runs);
    assert_eq!(lines("runs.tsv"), train_tasks);
    assert!(train_tasks.contains(&"dog\tti\tnone".to_string()));
    assert!(train_tasks.contains(&"dog\tneti+\tsigmoid".to_string()));
    let eval_tasks = lines("eval-tasks.tsv");
    assert_eq!(eval_tasks.len(), runs * 3);
    assert!(eval_tasks.contains(&"dog\tneti+\tsigmoid\t2/3".to_string()));
    // The jobs get the settings through sweep.env: the device defaults to cuda with GPUs.
    let env_file = std::fs::read_to_string(sub.join("sweep.env")).unwrap();
    assert!(
        env_file.contains("/opt/attractor/bin/attractor"),
        "{env_file}"
    );
    assert!(env_file.contains("\"--device\" [3]=\"cuda\""), "{env_file}");
    assert!(env_file.contains("\"--samples\" [3]=\"2\""), "{env_file}");

    // Finished work is left out: one run trained, another trained and evaluated, one shard
    // of a third done.
    let run = |sch: &str| sweep.join("runs/dog/neti+").join(sch);
    std::fs::create_dir_all(run("zero")).unwrap();
    std::fs::write(run("zero").join("train.done"), "").unwrap();
    std::fs::create_dir_all(run("one").join("eval")).unwrap();
    std::fs::write(run("one").join("train.done"), "").unwrap();
    std::fs::write(run("one").join("eval/summary.json"), "{}").unwrap();
    std::fs::create_dir_all(run("linear").join("eval-shards/2-of-3")).unwrap();
    std::fs::write(run("linear").join("eval-shards/2-of-3/summary.json"), "{}").unwrap();
    let out = ok(&bash(&script("slurm/submit.sh"), &args, &env));
    let jobs = sbatch_lines(&out);
    assert_eq!(
        flag(&jobs["train"], "--array"),
        Some(format!("0-{}%16", runs - 3).as_str())
    );
    assert_eq!(
        flag(&jobs["eval"], "--array"),
        Some(format!("0-{}%16", (runs - 1) * 3 - 1 - 1).as_str())
    );
    assert!(jobs["train"].last().unwrap().ends_with("slurm/submit-2"));

    // Everything done: no arrays, only the report job, without dependencies.
    let args1: Vec<String> = [
        "--dry-run",
        "--out",
        sweep.to_str().unwrap(),
        "--subjects",
        "dog",
        "--schedules",
        "one",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let jobs = sbatch_lines(&ok(&bash(&script("slurm/submit.sh"), &args1, &env)));
    assert_eq!(jobs.keys().collect::<Vec<_>>(), ["report"]);
    assert_eq!(flag(&jobs["report"], "--dependency"), None);
}

/// `submit.sh --dry-run --methods <all eight>`: one run per subject for the methods without
/// an attractor, one per schedule for ti+, neti+ and dreambooth-lora+.
#[test]
fn slurm_dry_run_every_method() {
    let tmp = tempfile::tempdir().unwrap();
    let sweep = tmp.path().join("sweep");
    let methods = ALL_METHODS.join(",");
    let args: Vec<String> = [
        "--dry-run",
        "--out",
        sweep.to_str().unwrap(),
        "--subjects",
        "dog,cat",
        "--schedules",
        "zero,cosine",
        "--methods",
        &methods,
        "--shards",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let env = [("ATTRACTOR_BIN", "/opt/attractor"), ("SLURM_GPUS", "0")];
    let out = ok(&bash(&script("slurm/submit.sh"), &args, &env));
    let jobs = sbatch_lines(&out);
    // 2 subjects x (5 methods x 1 run + 3 methods x 2 schedules).
    let runs = 2 * (5 + 3 * 2);
    assert_eq!(
        flag(&jobs["train"], "--array"),
        Some(format!("0-{}", runs - 1).as_str())
    );
    assert_eq!(
        flag(&jobs["eval"], "--array"),
        Some(format!("0-{}", runs - 1).as_str())
    );
    let tasks = std::fs::read_to_string(sweep.join("slurm/submit-1/train-tasks.tsv")).unwrap();
    for line in [
        "dog\tdreambooth\tnone",
        "dog\tdreambooth-lora\tnone",
        "cat\tcustom-diffusion\tnone",
        "dog\tdreambooth-lora+\tzero",
        "cat\tdreambooth-lora+\tcosine",
        "dog\tti+\tcosine",
    ] {
        assert!(tasks.lines().any(|l| l == line), "{line:?} not in\n{tasks}");
    }
    assert!(!tasks.contains("dreambooth\tzero") && !tasks.contains("custom-diffusion\tcosine"));
}

/// The sweep through real Slurm job arrays on a running cluster (opt-in: ATTRACTOR_TEST_SLURM=1
/// with SLURM_CONF pointing at e.g. `scripts/slurm/local-cluster.sh start DIR`): same results
/// as the local sweep, shards merged.
#[test]
fn slurm_cluster_sweep() {
    if std::env::var("ATTRACTOR_TEST_SLURM").as_deref() != Ok("1") {
        eprintln!("skipped: set ATTRACTOR_TEST_SLURM=1 with a running Slurm cluster (scripts/slurm/local-cluster.sh)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let data = dataset(t);
    let bin = private_binary(t);
    let sweep = t.join("sweep");
    let mut args = sweep_flags(&data, &sweep);
    args.splice(0..0, ["--shards".to_string(), "2".to_string()]);
    let env = [
        ("ATTRACTOR_BIN", bin.to_str().unwrap()),
        ("SLURM_GPUS", "0"),
        ("SLURM_CPUS", "1"),
        ("SLURM_MEM", "1500M"),
        ("SLURM_REPORT_CPUS", "1"),
        ("SLURM_REPORT_MEM", "500M"),
        ("SLURM_TIME_TRAIN", "00:10:00"),
        ("SLURM_TIME_EVAL", "00:10:00"),
        ("SLURM_TIME_REPORT", "00:10:00"),
    ];
    let t0 = Instant::now();
    let o = bash(&script("slurm/submit.sh"), &args, &env);
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let report_job = err
        .lines()
        .find_map(|l| l.strip_prefix("# merge + report: job "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    // Wait for the report job to leave the queue.
    loop {
        let q = Command::new("squeue")
            .args(["-h", "-j", &report_job])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&q.stdout).trim().is_empty() {
            break;
        }
        assert!(
            t0.elapsed().as_secs() < 900,
            "the Slurm sweep did not finish in 15 minutes"
        );
        std::thread::sleep(std::time::Duration::from_secs(3));
    }
    eprintln!("Slurm sweep: {:.1} s", t0.elapsed().as_secs_f64());
    let logs = sweep.join("slurm/submit-1/logs");
    let report_log = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("report-")
        })
        .map(|p| std::fs::read_to_string(p).unwrap())
        .unwrap_or_default();
    assert!(
        sweep.join("report/report.html").is_file(),
        "no report; report job log:\n{report_log}"
    );
    check_report_folder(&sweep.join("report"));
    for run in run_dirs(&sweep) {
        assert!(run.join("eval-shards/1-of-2/summary.json").is_file());
        assert!(run.join("eval-shards/2-of-2/summary.json").is_file());
    }

    // The same sweep locally: identical tables.
    let local = t.join("local");
    ok(&bash(
        &script("sweep-schedules.sh"),
        &sweep_flags(&data, &local),
        &[("ATTRACTOR_BIN", bin.to_str().unwrap())],
    ));
    for f in ["table-test.csv", "table-train.csv"] {
        assert_eq!(
            std::fs::read_to_string(sweep.join("report").join(f)).unwrap(),
            std::fs::read_to_string(local.join("report").join(f)).unwrap(),
            "{f}"
        );
    }
}
