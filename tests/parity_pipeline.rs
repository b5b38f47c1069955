//! Parity of the whole text-to-image pipeline with diffusers' `StableDiffusionPipeline` on the
//! tiny-sd fixture (golden tensors `pipe.*`, `pipe_dpm.*`: 10 steps, guidance 7.5, empty negative
//! prompt, fixed initial latents), and the determinism of `StableDiffusion::generate`.
//! Tolerance (tests/fixtures/README.md): the 10-step pipeline `rtol = 1e-3`.

mod common;
use attractor::hub::{resolve_sd, ModelSource};
use attractor::pipeline::{SampleSettings, StableDiffusion};
use attractor::sd::samplers::SamplerKind;
use attractor::sd::unet::Conditioning;
use candle_core::{DType, Tensor};
use common::*;

const PIPE_RTOL: f32 = 1e-3;
const ATOL: f32 = 1e-6;

fn open_tiny_sd() -> StableDiffusion {
    let files = resolve_sd(&ModelSource::Local(fixtures().join("tiny-sd")), true)
        .expect("tests/fixtures/tiny-sd resolves as a local diffusers folder");
    StableDiffusion::open(&files, &dev(), DType::F32).expect("tiny-sd opens")
}

/// The settings of golden.json `pipe` with the given sampler, at the fixture's 128 x 128.
fn golden_settings(sampler: SamplerKind) -> (SampleSettings, String) {
    let j = golden_json();
    let p = &j["pipe"];
    assert_eq!(p["scheduler"], "DDIM");
    assert_eq!(p["eta"].as_f64(), Some(0.0), "our DDIM is eta 0 only");
    let s = SampleSettings {
        steps: p["steps"].as_u64().unwrap() as usize,
        guidance: p["guidance"].as_f64().unwrap(),
        sampler,
        height: 128,
        width: 128,
        negative_prompt: p["negative_prompt"].as_str().unwrap().to_string(),
    };
    (s, p["prompt"].as_str().unwrap().to_string())
}

/// Denoise `pipe.latents_init` with the golden prompt; returns the final latents.
fn run_pipeline(sd: &StableDiffusion, sampler: SamplerKind) -> Tensor {
    let g = golden();
    let (s, prompt) = golden_settings(sampler);
    let uncond = sd.encode_prompt(&s.negative_prompt, None).unwrap();
    let cond = Conditioning::Shared(sd.encode_prompt(&prompt, None).unwrap());
    let mut steps_seen = Vec::new();
    let out = sd
        .denoise(
            &s,
            g["pipe.latents_init"].clone(),
            &uncond,
            &mut |_| Ok(cond.clone()),
            &mut |i, n| steps_seen.push((i, n)),
        )
        .unwrap();
    let want: Vec<(usize, usize)> = (1..=s.steps).map(|i| (i, s.steps)).collect();
    assert_eq!(steps_seen, want, "on_step is called once per step");
    out
}

/// diffusers DDIM (eta 0), 10 steps: final latents and the decoded image in [0, 1], HWC.
#[test]
fn ddim_pipeline_matches_diffusers() {
    let g = golden();
    let sd = open_tiny_sd();
    let latents = run_pipeline(&sd, SamplerKind::Ddim);
    assert_close(
        "pipe.latents_out",
        &latents,
        &g["pipe.latents_out"],
        PIPE_RTOL,
        ATOL,
    );
    let img = sd.decode(&latents).unwrap().permute((0, 2, 3, 1)).unwrap();
    assert_close("pipe.image", &img, &g["pipe.image"], PIPE_RTOL, ATOL);
}

/// diffusers `DPMSolverMultistepScheduler` (DPM-Solver++ 2M), 10 steps: final latents.
#[test]
fn dpm_solver_pipeline_matches_diffusers() {
    let g = golden();
    let sd = open_tiny_sd();
    let latents = run_pipeline(&sd, SamplerKind::Dpmpp2m);
    assert_close(
        "pipe_dpm.latents_out",
        &latents,
        &g["pipe_dpm.latents_out"],
        PIPE_RTOL,
        ATOL,
    );
}

/// `generate` with one seed twice gives the same bytes (10 DDIM steps at 128 x 128, timed);
/// another seed starts from other latents.
#[test]
fn generate_is_deterministic() {
    let sd = open_tiny_sd();
    let (s, prompt) = golden_settings(SamplerKind::Ddim);
    let gen = |seed: u64| {
        let t0 = std::time::Instant::now();
        let img = sd
            .generate(&s, &prompt, None, seed, &mut |_, _| {})
            .unwrap();
        eprintln!(
            "generate ({} DDIM steps, {}x{}, CPU, dev profile): {:.2} s",
            s.steps,
            s.width,
            s.height,
            t0.elapsed().as_secs_f64()
        );
        img
    };
    let a = gen(1234);
    let b = gen(1234);
    assert_eq!(a.dimensions(), (128, 128));
    assert!(a.as_raw() == b.as_raw(), "same seed, different bytes");
    let distinct = a
        .as_raw()
        .iter()
        .collect::<std::collections::HashSet<_>>()
        .len();
    assert!(
        distinct > 16,
        "the image is (nearly) constant: {distinct} byte values"
    );
    let l0 = sd.initial_latents(&s, 1234).unwrap();
    let l1 = sd.initial_latents(&s, 1235).unwrap();
    assert_eq!(l0.dims(), &[1, 4, 16, 16]);
    assert!(
        max_abs(&(&l0 - &l1).unwrap()) > 0.1,
        "another seed gave the same initial latents"
    );
}

/// Batched generation (`eval/sample --batch`) equals unbatched: four images of two prompts in
/// batches of 3 (a ragged last batch of 1) against each image alone, with DDIM and DPM-Solver++,
/// for the plain model and for TI and NeTI subjects (NeTI's conditioning per step and layer).
/// Within 1/255 per pixel: the UNet's matrix products on 2N rows may round differently.
#[test]
fn batched_generation_equals_unbatched() {
    use attractor::personalize::generate::LearnedSubject;
    use attractor::personalize::method::Method;
    use attractor::personalize::settings::TrainSettings;
    use attractor::personalize::trainer::Trainer;
    let tmp = tempfile::tempdir().unwrap();
    make_dataset(tmp.path());
    let ds = attractor::data::layout::Dataset::open(tmp.path()).unwrap();
    let subject = ds.subject("dog").unwrap();
    let sd = open_tiny_sd();
    let templates = ["a photo of {} on a ledge", "a {} in the snow"];
    let requests: Vec<(&str, u64)> = (0..4).map(|i| (templates[i % 2], 11 + i as u64)).collect();
    let max_diff = |a: &[image::RgbImage], b: &[image::RgbImage]| {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| {
                assert_eq!(x.dimensions(), y.dimensions());
                x.as_raw()
                    .iter()
                    .zip(y.as_raw())
                    .map(|(&p, &q)| (p as i32 - q as i32).abs())
                    .collect::<Vec<_>>()
            })
            .max()
            .unwrap()
    };
    for sampler in [SamplerKind::Ddim, SamplerKind::Dpmpp2m] {
        let s = SampleSettings {
            steps: 4,
            guidance: 7.5,
            sampler,
            height: 64,
            width: 64,
            negative_prompt: String::new(),
        };
        // The plain model: `{}` filled by hand.
        let plain: Vec<(String, u64)> = requests
            .iter()
            .map(|(t, seed)| (t.replace("{}", "dog"), *seed))
            .collect();
        let alone: Vec<image::RgbImage> = plain
            .iter()
            .map(|(p, seed)| sd.generate(&s, p, None, *seed, &mut |_, _| {}).unwrap())
            .collect();
        let mut batched = Vec::new();
        for chunk in plain.chunks(3) {
            let r: Vec<(&str, u64)> = chunk.iter().map(|(p, s)| (p.as_str(), *s)).collect();
            batched.extend(sd.generate_batch(&s, &r, None, &mut |_, _| {}).unwrap());
        }
        let d = max_diff(&batched, &alone);
        eprintln!("plain, {sampler:?}: max pixel difference {d}");
        assert!(d <= 1, "plain {sampler:?}: {d}/255");
        assert_ne!(
            alone[0].as_raw(),
            alone[2].as_raw(),
            "seeds give different images"
        );

        for method in [Method::Ti, Method::Neti] {
            let settings = TrainSettings {
                method,
                resolution: 64,
                batch: Some(2),
                grad_accum: Some(1),
                steps: Some(10),
                ..TrainSettings::default()
            }
            .resolve()
            .unwrap();
            let t = Trainer::new(&sd, settings, &subject, tmp.path()).unwrap();
            let learned = LearnedSubject::from_trainer(&t);
            let alone: Vec<image::RgbImage> = requests
                .iter()
                .map(|(p, seed)| {
                    learned
                        .generate(&sd, &s, p, None, None, *seed, &mut |_, _| {})
                        .unwrap()
                })
                .collect();
            let mut steps = 0;
            let mut batched = Vec::new();
            for chunk in requests.chunks(3) {
                batched.extend(
                    learned
                        .generate_batch(&sd, &s, chunk, None, None, &mut |_, _| steps += 1)
                        .unwrap(),
                );
            }
            assert_eq!(steps, 2 * s.steps, "one UNet call per step per batch");
            let d = max_diff(&batched, &alone);
            eprintln!("{method}, {sampler:?}: max pixel difference {d}");
            assert!(d <= 1, "{method} {sampler:?}: {d}/255");
        }
    }
}
