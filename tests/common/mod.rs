//! Shared test helpers: the bundled fixtures, the golden tensors' tolerance check, a small
//! dataset in the split-test layout, the tiny scorers, and deterministic fake generators.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::PathBuf;

use attractor::eval::{Generator, Scorers};
use attractor::hub::ModelSource;
use image::RgbImage;
use std::path::Path;

/// The device the parity suites run on: `ATTRACTOR_TEST_DEVICE` = `cpu` (the default) or
/// `cuda:N` (scripts/gpu-check.sh runs them on a GPU this way). One device per process: candle
/// tells CUDA devices apart by the context they were opened with.
pub fn dev() -> Device {
    static DEV: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
    DEV.get_or_init(|| match std::env::var("ATTRACTOR_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(s) => {
            let n: usize = s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("ATTRACTOR_TEST_DEVICE={s}: use cpu or cuda:N"));
            Device::new_cuda(n).unwrap_or_else(|e| panic!("ATTRACTOR_TEST_DEVICE={s}: {e}"))
        }
    })
    .clone()
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), &dev())
        .expect("golden.safetensors")
}

pub fn golden_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap()
}

pub fn vb(rel: &str) -> VarBuilder<'static> {
    let p = fixtures().join(rel);
    unsafe { VarBuilder::from_mmaped_safetensors(&[p], DType::F32, &dev()).unwrap() }
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max|ours - ref| <= atol + rtol * max|ref|` (fixtures README). Returns the max error.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, rtol: f32, atol: f32) -> f32 {
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let err = max_abs(&(&ours - &reference).unwrap());
    let scale = max_abs(&reference);
    let tol = atol + rtol * scale;
    eprintln!("{name}: max err {err:.3e} (tol {tol:.3e}, max|ref| {scale:.3e})");
    assert!(
        err.is_finite() && err <= tol,
        "{name}: max err {err} > tol {tol}"
    );
    err
}

pub const FWD_RTOL: f32 = 1e-4;
pub const GRAD_RTOL: f32 = 1e-3;

/// The repository: `ATTRACTOR_TEST_ROOT` when set (a test executable carried to another machine,
/// scripts/gpu-check.sh), else the checkout it was built in.
pub fn root() -> PathBuf {
    match std::env::var_os("ATTRACTOR_TEST_ROOT") {
        Some(r) if !r.is_empty() => PathBuf::from(r),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

pub fn tiny(dir: &str) -> ModelSource {
    ModelSource::Local(root().join("tests/fixtures").join(dir))
}

pub fn scorers() -> Scorers {
    Scorers::load(&tiny("tiny-clip"), &tiny("tiny-dino"), &dev(), true).unwrap()
}

/// A smooth, seed-dependent picture: different seeds give clearly different features.
pub fn picture(seed: u64, w: u32, h: u32) -> RgbImage {
    let a = (seed % 251) as u32;
    let b = ((seed >> 8) % 241) as u32;
    let c = ((seed >> 16) % 239) as u32;
    RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 255 / w + a) % 256) as u8,
            ((y * 255 / h + b) % 256) as u8,
            (((x + y) * 3 + c) % 256) as u8,
        ])
    })
}

fn save(path: &Path, img: &RgbImage) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
}

/// Two subjects (`dog`: live, `candle`: object), each with two training images, one test image
/// (`05.png`, `07.png`) with two captions; two classic prompts per kind.
pub fn make_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("subjects.json"),
        r#"[{"name": "dog", "class": "dog", "kind": "live"},
            {"name": "candle", "class": "candle", "kind": "object"}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("prompts.json"),
        r#"{"object": ["a {} in the jungle", "a {} on top of a wooden floor"],
            "live": ["a {} in the snow", "a {} wearing a red hat"]}"#,
    )
    .unwrap();
    for (k, (subject, test)) in [("dog", "05"), ("candle", "07")].iter().enumerate() {
        let sdir = dir.join(subject);
        for i in 0..2u64 {
            save(
                &sdir.join(format!("train/0{i}.png")),
                &picture(100 + 10 * k as u64 + i, 80, 64),
            );
        }
        save(
            &sdir.join(format!("test/{test}.png")),
            &picture(200 + k as u64, 64, 96),
        );
        std::fs::write(
            sdir.join("captions.json"),
            format!(
                r#"{{"{test}.png": ["a photo of {{}} on a ledge", "{{}} under blossoms in spring"]}}"#
            ),
        )
        .unwrap();
    }
}

/// Deterministic fake: the image depends on (subject, prompt, seed) only; counts calls; fails
/// (like a killed process) once `fail_after` images were made.
pub struct FakeGenerator {
    pub calls: usize,
    pub fail_after: Option<usize>,
    pub prompts: Vec<String>,
}

impl FakeGenerator {
    pub fn new() -> Self {
        Self {
            calls: 0,
            fail_after: None,
            prompts: Vec::new(),
        }
    }

    pub fn failing_after(k: usize) -> Self {
        Self {
            fail_after: Some(k),
            ..Self::new()
        }
    }
}

impl Generator for FakeGenerator {
    fn id(&self) -> String {
        "fake-generator/v1 steps=2".into()
    }

    fn generate(&mut self, subject: &str, prompt: &str, seed: u64) -> anyhow::Result<RgbImage> {
        if Some(self.calls) == self.fail_after {
            anyhow::bail!("simulated crash");
        }
        assert_eq!(prompt.matches("{}").count(), 1, "prompt {prompt:?}");
        self.calls += 1;
        self.prompts.push(prompt.to_string());
        let mix = attractor::rng::Rng::derive_seed(&[subject, prompt, &seed.to_string()]);
        Ok(picture(mix, 96, 96))
    }

    fn placeholder(&self, _subject: &str) -> Option<String> {
        Some("<v*>".into())
    }
}

/// The lines of a results file, sorted.
pub fn sorted_lines(path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.to_string())
        .collect();
    v.sort();
    v
}
