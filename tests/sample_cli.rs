//! `attractor sample` end to end on the tiny fixture model, and the errors a user meets.

mod common;
use common::fixtures;
use std::process::Command;

fn sample(out: &std::path::Path, extra: &[&str]) -> std::process::Output {
    sample_with(&fixtures().join("tiny-sd"), out, extra)
}

fn sample_with(
    model: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["sample", "--model"])
        .arg(model)
        .args(["--steps", "3", "--seed", "7", "--offline", "--out"])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// Same seed, same bytes (CPU); `--num-images 2` uses seeds 7 and 8.
#[test]
fn same_seed_gives_identical_files() {
    let t = tempfile::tempdir().unwrap();
    let (a, b) = (t.path().join("a"), t.path().join("b"));
    for out in [&a, &b] {
        let o = sample(out, &["--prompt", "a photo of a cat", "--num-images", "2"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    for f in ["000-seed7.png", "001-seed8.png"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_ne!(
        std::fs::read(a.join("000-seed7.png")).unwrap(),
        std::fs::read(a.join("001-seed8.png")).unwrap()
    );
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("sample.json")).unwrap()).unwrap();
    assert_eq!(meta["settings"]["steps"], 3);
}

/// `--dtype f16` samples on the CPU and records it; bf16 (no CPU matrix product in candle) and
/// unknown names are refused with the flag named.
#[test]
fn dtype_flag() {
    let t = tempfile::tempdir().unwrap();
    let o = sample(
        t.path(),
        &["--prompt", "a photo of a cat", "--dtype", "f16"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("sample.json")).unwrap())
            .unwrap();
    assert_eq!(meta["dtype"], "f16");
    assert!(t.path().join("000-seed7.png").is_file());
    for (flag, says) in [
        ("bf16", "needs a CUDA device"),
        ("f64", "expected auto, f32"),
    ] {
        let o = sample(&t.path().join(flag), &["--prompt", "x", "--dtype", flag]);
        assert!(!o.status.success(), "--dtype {flag} was accepted");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--dtype") && err.contains(says), "{err}");
    }
}

#[test]
fn dpm_sampler_and_long_prompt_warning() {
    let t = tempfile::tempdir().unwrap();
    let long = "a very long prompt about a cat ".repeat(20);
    let o = sample(t.path(), &["--prompt", &long, "--sampler", "dpmpp2m"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("truncated"));
}

#[test]
fn missing_model_folder_and_file_are_named() {
    let t = tempfile::tempdir().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args([
            "sample",
            "--prompt",
            "x",
            "--model",
            "./no/such/model",
            "--offline",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/model"));
    // A folder without unet/config.json.
    let o = Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args(["sample", "--prompt", "x", "--offline", "--model"])
        .arg(t.path())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unet/config.json"));
    // Offline with nothing cached: names the repo, the file and the fix.
    let o = Command::new(env!("CARGO_BIN_EXE_attractor"))
        .args([
            "fetch",
            "--offline",
            "--model",
            "stable-diffusion-v1-5/stable-diffusion-v1-5",
        ])
        .env("HF_HUB_CACHE", t.path().join("empty"))
        .env("HF_HOME", t.path().join("empty"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.contains("stable-diffusion-v1-5/stable-diffusion-v1-5") && e.contains("unet/config.json"),
        "{e}"
    );
}

/// A weight file with a tensor of the wrong shape names the key and both shapes, and that
/// error from candle prints its message alone: no stack, with or without `RUST_BACKTRACE`.
#[test]
fn wrong_shape_names_the_key_without_a_backtrace() {
    let t = tempfile::tempdir().unwrap();
    let src = fixtures().join("tiny-sd");
    let dst = t.path().join("m");
    for sub in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        std::fs::create_dir_all(dst.join(sub)).unwrap();
        for e in std::fs::read_dir(src.join(sub)).unwrap() {
            let p = e.unwrap().path();
            std::fs::copy(&p, dst.join(sub).join(p.file_name().unwrap())).unwrap();
        }
    }
    let cfg = dst.join("text_encoder/config.json");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"intermediate_size\": 64", "\"intermediate_size\": 65");
    std::fs::write(&cfg, text).unwrap();
    for bt in ["1", "0"] {
        let o = Command::new(env!("CARGO_BIN_EXE_attractor"))
            .env("RUST_BACKTRACE", bt)
            .args([
                "sample",
                "--prompt",
                "x",
                "--steps",
                "3",
                "--offline",
                "--model",
            ])
            .arg(&dst)
            .arg("--out")
            .arg(t.path().join("o"))
            .output()
            .unwrap();
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("fc1") && e.contains("65"), "{e}");
        assert!(!e.contains("backtrace") && !e.contains("  0: "), "{e}");
    }
}
