//! Shared test helpers: the bundled fixtures, the golden tensors' tolerance check, a small
//! dataset in the split-test layout, the tiny scorers, deterministic fake generators, photos in
//! the formats users have (EXIF-rotated, CMYK JPEG), and a small random-weight SAM.
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
    /// Images per `generate_batch` call asked for (`Generator::batch_size`).
    pub batch: usize,
    /// Each `generate_batch` call: its subject and how many images it asked for.
    pub batches: Vec<(String, usize)>,
}

impl FakeGenerator {
    pub fn new() -> Self {
        Self {
            calls: 0,
            fail_after: None,
            prompts: Vec::new(),
            batch: 1,
            batches: Vec::new(),
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

    fn generate_batch(
        &mut self,
        subject: &str,
        requests: &[(&str, u64)],
    ) -> anyhow::Result<Vec<RgbImage>> {
        self.batches.push((subject.to_string(), requests.len()));
        requests
            .iter()
            .map(|(p, seed)| self.generate(subject, p, *seed))
            .collect()
    }

    fn batch_size(&self) -> usize {
        self.batch
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

/// A little-endian TIFF/Exif block holding one Orientation (0x0112) entry.
pub fn exif_orientation(value: u16) -> Vec<u8> {
    let mut b = vec![0x49, 0x49, 42, 0, 8, 0, 0, 0];
    b.extend_from_slice(&1u16.to_le_bytes()); // one IFD entry
    b.extend_from_slice(&0x0112u16.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    b.extend_from_slice(&1u32.to_le_bytes()); // count
    b.extend_from_slice(&value.to_le_bytes());
    b.extend_from_slice(&[0, 0]);
    b.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    b
}

/// A folder `dir/<name>` of three photos cut from the bundled benchmark's dog photos, in the
/// formats users have: `a.jpg` a CMYK JPEG (96x96), `b.jpg` a JPEG stored 96x72 with EXIF
/// orientation 6 (shown 72x96), `c.png` a PNG (80x64).
pub fn photo_folder(dir: &Path, name: &str) -> PathBuf {
    use image::ImageEncoder;
    let src = root().join("data/dreambooth-split/dog/train");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let load = |i: usize, w: u32, h: u32| {
        let img = image::open(&files[i]).unwrap().to_rgb8();
        image::imageops::resize(&img, w, h, image::imageops::FilterType::Triangle)
    };
    let d = dir.join(name);
    std::fs::create_dir_all(&d).unwrap();
    let a = load(0, 96, 96);
    let cmyk: Vec<u8> = a
        .pixels()
        .flat_map(|p| [255 - p[0], 255 - p[1], 255 - p[2], 0])
        .collect();
    jpeg_encoder::Encoder::new_file(d.join("a.jpg"), 92)
        .unwrap()
        .encode(&cmyk, 96, 96, jpeg_encoder::ColorType::Cmyk)
        .unwrap();
    let b = load(1, 96, 72);
    let mut bytes = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 92);
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    enc.write_image(b.as_raw(), 96, 72, image::ExtendedColorType::Rgb8)
        .unwrap();
    std::fs::write(d.join("b.jpg"), bytes).unwrap();
    load(2, 80, 64).save(d.join("c.png")).unwrap();
    d
}

/// A SAM with the real topology but a 16-wide, 1-block image encoder and random weights, and
/// the variables it was built from (`VarMap::save` writes them as a weight file that
/// `--sam FILE --sam-model vit-b` loads).
pub fn random_sam(
    dev: &Device,
) -> (
    candle_nn::VarMap,
    candle_transformers::models::segment_anything::sam::Sam,
) {
    let vm = candle_nn::VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let sam =
        candle_transformers::models::segment_anything::sam::Sam::new(16, 1, 1, &[], vb).unwrap();
    // Layer norms and some tables start at zero in a VarMap: give every weight a random value so
    // the masks vary over the image.
    let mut vars = vm
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<Vec<_>>();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let mut rng = attractor::rng::Rng::new(7);
    for (_, v) in vars.iter() {
        let r = (rng.randn(v.shape(), dev).unwrap() * 0.3).unwrap();
        v.set(&r.to_dtype(DType::F32).unwrap()).unwrap();
    }
    (vm, sam)
}
