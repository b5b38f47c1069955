//! The model in half precision (`--dtype`): frozen weights and activations in f16 or bf16,
//! learned tensors, optimizer state and losses in f32. On the tiny fixture model, one training
//! micro-batch of every method must give the f32 model's gradients, and sampling (TI rows and
//! NeTI mappers) the f32 model's images, within half precision's rounding.
//!
//! On the CPU the half type is f16 (candle's CPU matrix product has no bf16); on a GPU
//! (`ATTRACTOR_TEST_DEVICE=cuda:0`, scripts/gpu-check.sh) it is bf16, the `auto` choice there.
//! The code under test is the same: nothing in the model or the trainer branches on which half
//! type it runs in.

mod common;
use attractor::data::layout::Dataset;
use attractor::hub::{resolve_sd, ModelSource};
use attractor::personalize::generate::LearnedSubject;
use attractor::personalize::method::Method;
use attractor::personalize::settings::TrainSettings;
use attractor::personalize::trainer::Trainer;
use attractor::pipeline::{SampleSettings, StableDiffusion};
use attractor::sd::samplers::SamplerKind;
use candle_core::{DType, Tensor};
use common::*;
use std::path::Path;

/// The half type this device runs (see the module doc).
fn half() -> DType {
    if dev().is_cpu() {
        DType::F16
    } else {
        DType::BF16
    }
}

/// Relative L2 error allowed on a gradient. f16 measured 3e-3 (ti+) to 1.8e-2 (neti, every
/// mapper tensor alike: the word vector's gradient sums 16 layers' text-encoder gradients);
/// bf16 rounds 8 times coarser (2^-8 against 2^-11). A lost gradient path or a wrong cast is
/// off by far more: a gradient of the wrong scale, or none.
fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 0.2,
        _ => 0.03,
    }
}

fn open(dtype: DType) -> StableDiffusion {
    let files = resolve_sd(&ModelSource::Local(fixtures().join("tiny-sd")), true).unwrap();
    StableDiffusion::open(&files, &dev(), dtype).unwrap()
}

/// The common dataset with a subject mask per training image (the + methods need them).
fn dataset_with_masks(dir: &Path) -> Dataset {
    make_dataset(dir);
    for subject in ["dog", "candle"] {
        let masks = dir.join(subject).join("masks");
        std::fs::create_dir_all(&masks).unwrap();
        for i in 0..2 {
            let m = image::GrayImage::from_fn(80, 64, |x, y| {
                image::Luma([if (20..60).contains(&x) && y > 16 {
                    255
                } else {
                    0
                }])
            });
            m.save(masks.join(format!("0{i}.png"))).unwrap();
        }
    }
    Dataset::open(dir).unwrap()
}

fn settings(method: Method) -> attractor::personalize::settings::Resolved {
    TrainSettings {
        method,
        resolution: 128,
        batch: Some(2),
        grad_accum: Some(1),
        steps: Some(10),
        ..TrainSettings::default()
    }
    .resolve()
    .unwrap()
}

/// `|a - b| / |b|` over all elements, in f64.
fn relative_l2(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap();
    let d = norm(&(&a - &b).unwrap()).to_scalar::<f64>().unwrap();
    d / norm(&b).to_scalar::<f64>().unwrap()
}

#[test]
fn training_gradients_in_half_precision_follow_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset_with_masks(tmp.path());
    let subject = ds.subject("dog").unwrap();
    let (full, reduced) = (open(DType::F32), open(half()));
    let tol = tolerance(half());
    for method in Method::TOKEN_METHODS {
        let grads = |sd: &StableDiffusion| {
            Trainer::new(sd, settings(method), &subject, tmp.path())
                .unwrap()
                .gradients()
                .unwrap()
        };
        let (reference, ours) = (grads(&full), grads(&reduced));
        assert_eq!(reference.len(), ours.len());
        let mut worst = 0f64;
        for ((name, r), (_, o)) in reference.iter().zip(&ours) {
            let r = r
                .as_ref()
                .unwrap_or_else(|| panic!("{method}: f32 {name}: no gradient"));
            let o = o
                .as_ref()
                .unwrap_or_else(|| panic!("{method}: half {name}: no gradient"));
            assert_eq!(
                o.dtype(),
                DType::F32,
                "{method}: {name}: learned tensors stay f32"
            );
            let e = relative_l2(o, r);
            assert!(
                e < tol,
                "{method}: {name}: relative error {e} (tolerance {tol})"
            );
            worst = worst.max(e);
        }
        eprintln!(
            "{method}: worst relative gradient error in {:?}: {worst:.2e}",
            half()
        );
    }
}

#[test]
fn sampling_in_half_precision_follows_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let ds = dataset_with_masks(tmp.path());
    let subject = ds.subject("dog").unwrap();
    let s = SampleSettings {
        steps: 4,
        guidance: 7.5,
        sampler: SamplerKind::Ddim,
        height: 64,
        width: 64,
        negative_prompt: String::new(),
    };
    let (full, reduced) = (open(DType::F32), open(half()));
    for method in [Method::Ti, Method::Neti] {
        let image = |sd: &StableDiffusion| {
            let t = Trainer::new(sd, settings(method), &subject, tmp.path()).unwrap();
            LearnedSubject::from_trainer(&t)
                .generate(
                    sd,
                    &s,
                    "a photo of {} on a ledge",
                    None,
                    None,
                    3,
                    &mut |_, _| {},
                )
                .unwrap()
        };
        let (reference, ours) = (image(&full), image(&reduced));
        assert_eq!(ours.dimensions(), reference.dimensions());
        let diffs: Vec<f64> = ours
            .as_raw()
            .iter()
            .zip(reference.as_raw())
            .map(|(&a, &b)| (a as f64 - b as f64).abs())
            .collect();
        let mean = diffs.iter().sum::<f64>() / diffs.len() as f64;
        let max = diffs.iter().cloned().fold(0.0, f64::max);
        eprintln!("{method}: half vs f32 pixels: mean {mean:.3}, max {max}");
        // Out of 255: rounding moves a few pixels by a level or two, never the picture.
        assert!(mean < 2.0, "{method}: mean pixel difference {mean}");
        assert!(max < 40.0, "{method}: max pixel difference {max}");
    }
}
