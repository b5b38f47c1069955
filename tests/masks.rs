//! Subject masks (src/data/masks.rs): the CLIP ranking logic on synthetic candidates, the CLIP
//! implementation of the scorer on the tiny fixture, and the whole SAM -> rank -> write pipeline
//! on a small SAM with random weights.

mod common;

use attractor::data::check::{check_dataset, CheckOptions, ProblemKind};
use attractor::data::masks::{
    mask_subject, masked_crop, select_mask, CandidateOptions, CropScorer, MaskOptions,
    SamSegmenter, SelectOptions,
};
use attractor::data::Dataset;
use attractor::eval::clip::ClipScorer;
use attractor::hub::ModelSource;
use candle_core::Device;
use image::{GrayImage, Luma, Rgb, RgbImage};
use std::path::PathBuf;

fn manifest() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Scores a crop by its share of pure-red pixels; records what it was asked.
struct Redness {
    calls: usize,
    texts: Vec<String>,
}

impl CropScorer for Redness {
    fn score(&mut self, crops: &[RgbImage], text: &str) -> anyhow::Result<Vec<f32>> {
        self.calls += 1;
        self.texts.push(text.to_string());
        Ok(crops
            .iter()
            .map(|c| {
                let red = c.pixels().filter(|p| p.0 == [255, 0, 0]).count();
                red as f32 / (c.width() * c.height()) as f32
            })
            .collect())
    }
}

fn rect(w: u32, h: u32, x0: u32, y0: u32, x1: u32, y1: u32, inside: bool) -> GrayImage {
    GrayImage::from_fn(w, h, |x, y| {
        let r = x >= x0 && x < x1 && y >= y0 && y < y1;
        Luma([if r == inside { 255 } else { 0 }])
    })
}

#[test]
fn ranking_picks_the_subject_and_merges_its_parts() {
    // A red square (the subject) at 16..48 on grey, a blue patch elsewhere.
    let mut img = RgbImage::from_pixel(64, 64, Rgb([90, 90, 90]));
    for y in 16..48 {
        for x in 16..48 {
            img.put_pixel(x, y, Rgb([255, 0, 0]));
        }
    }
    for y in 54..62 {
        for x in 2..10 {
            img.put_pixel(x, y, Rgb([0, 0, 255]));
        }
    }
    let left = rect(64, 64, 16, 16, 32, 48, true);
    let right = rect(64, 64, 32, 16, 48, 48, true);
    let background = rect(64, 64, 16, 16, 48, 48, false);
    let blue = rect(64, 64, 2, 54, 10, 62, true);
    let cands = vec![background.clone(), left.clone(), blue, right.clone()];
    let mut scorer = Redness {
        calls: 0,
        texts: vec![],
    };
    let sel = select_mask(
        &img,
        &cands,
        &mut scorer,
        "a photo of a cube",
        &SelectOptions::default(),
    )
    .unwrap();
    // Each half alone scores below their union, the background and the blue patch score 0.
    assert_eq!(sel.scores[0], 0.0);
    assert_eq!(sel.scores[2], 0.0);
    assert!(sel.scores[1] > 0.3 && sel.scores[3] > 0.3);
    assert_eq!(
        sel.picked.len(),
        2,
        "the two halves merge: {:?}",
        sel.picked
    );
    assert!(sel.picked.contains(&1) && sel.picked.contains(&3));
    assert!(sel.score > sel.scores[1].max(sel.scores[3]));
    let whole = rect(64, 64, 16, 16, 48, 48, true);
    assert_eq!(sel.mask, whole);
    // Merging the background in (touching, but it lowers the score) was tried and refused; the
    // blue patch does not touch the subject and was never tried.
    assert!(scorer.texts.iter().all(|t| t == "a photo of a cube"));
    assert_eq!(
        scorer.calls,
        1 + 2,
        "one batch + the right half + the background: {}",
        scorer.calls
    );

    // Without merging, the best single candidate.
    let sel = select_mask(
        &img,
        &cands,
        &mut scorer,
        "x",
        &SelectOptions { merge_top_k: 0 },
    )
    .unwrap();
    assert_eq!(sel.picked.len(), 1);
    assert!(sel.mask == left || sel.mask == right);

    // Candidates of the wrong size are an error, not a panic.
    let err = select_mask(
        &img,
        &[GrayImage::new(8, 8)],
        &mut scorer,
        "x",
        &SelectOptions::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("candidate 0"), "{err}");
}

fn tiny_clip() -> ClipScorer {
    ClipScorer::load(
        &ModelSource::Local(manifest().join("tests/fixtures/tiny-clip")),
        &Device::Cpu,
        true,
    )
    .unwrap()
}

#[test]
fn clip_crop_scorer_is_the_cosine_of_projected_embeddings() {
    let mut clip = tiny_clip();
    let a = RgbImage::from_fn(50, 40, |x, y| Rgb([(x * 5) as u8, (y * 6) as u8, 100]));
    let b = RgbImage::from_pixel(30, 30, Rgb([10, 200, 30]));
    let s = clip
        .score(&[a.clone(), b.clone()], "a photo of a dog")
        .unwrap();
    assert_eq!(s.len(), 2);
    let t = clip
        .embed_texts(&["a photo of a dog"])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let i = clip
        .embed_images(&[a, b])
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for k in 0..2 {
        let want = attractor::eval::cosine(&i[k], &t[0]) as f32;
        assert!((s[k] - want).abs() < 1e-5, "{} vs {want}", s[k]);
    }
    assert!(s[0] != s[1]);
}

fn copy_subject(name: &str, n_train: usize) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let src = manifest().join("data/dreambooth-split");
    let entry: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(src.join("subjects.json")).unwrap()).unwrap();
    let entry: Vec<_> = entry.into_iter().filter(|e| e["name"] == name).collect();
    std::fs::write(
        tmp.path().join("subjects.json"),
        serde_json::to_string(&entry).unwrap(),
    )
    .unwrap();
    std::fs::copy(src.join("prompts.json"), tmp.path().join("prompts.json")).unwrap();
    let d = tmp.path().join(name);
    std::fs::create_dir_all(d.join("train")).unwrap();
    std::fs::create_dir_all(d.join("test")).unwrap();
    let mut train: Vec<_> = std::fs::read_dir(src.join(name).join("train"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    train.sort();
    for p in train.iter().take(n_train) {
        std::fs::copy(p, d.join("train").join(p.file_name().unwrap())).unwrap();
    }
    for e in std::fs::read_dir(src.join(name).join("test")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, d.join("test").join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(
        src.join(name).join("captions.json"),
        d.join("captions.json"),
    )
    .unwrap();
    tmp
}

#[test]
fn sam_pipeline_end_to_end_on_random_weights() {
    let dev = Device::Cpu;
    let seg = SamSegmenter::new(common::random_sam(&dev).1, &dev);
    let tmp = copy_subject("cat", 1);
    let ds = Dataset::open(tmp.path()).unwrap();
    let subject = ds.subject("cat").unwrap();
    let mut clip = tiny_clip();
    let opts = MaskOptions {
        candidates: CandidateOptions {
            points_per_side: 1,
            ..CandidateOptions::default()
        },
        ..MaskOptions::default()
    };

    // The candidates themselves: image-sized binary masks within the area limits.
    let img = attractor::data::image::load_rgb(&subject.train_images[0]).unwrap();
    let cands = seg.candidates(&img, &opts.candidates).unwrap();
    assert!(!cands.masks.is_empty());
    for c in &cands.masks {
        assert_eq!(c.mask.dimensions(), img.dimensions());
        assert!(c.mask.pixels().all(|p| p.0[0] == 0 || p.0[0] == 255));
        let share = c.mask.pixels().filter(|p| p.0[0] == 255).count() as f64 / c.mask.len() as f64;
        assert!((0.005..=0.95).contains(&share), "{share}");
        assert_eq!(
            masked_crop(&img, &c.mask).width(),
            masked_crop(&img, &c.mask).height()
        );
    }

    let mut seen = 0;
    let out = mask_subject(&subject, &seg, &mut clip, &opts, &mut |_| seen += 1).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(seen, 1);
    let o = &out[0];
    let r = o.result.as_ref().expect("a mask was written");
    assert!(r.score.is_finite() && r.candidates >= 1 && r.merged >= 1);
    assert_eq!(o.mask_path, tmp.path().join("cat/masks/00.png"));
    let mask = image::open(&o.mask_path).unwrap().to_luma8();
    assert_eq!(mask.dimensions(), img.dimensions());
    let preview = image::open(&o.preview_path).unwrap();
    assert_eq!((preview.width(), preview.height()), img.dimensions());
    assert!(o
        .preview_path
        .starts_with(tmp.path().join("cat/masks/preview")));

    // The dataset check accepts the mask (size, not empty, preview folder ignored).
    let tok = attractor::assets::clip_tokenizer().unwrap();
    let rep = check_dataset(tmp.path(), &tok, &CheckOptions::default());
    assert!(
        rep.of_kind(ProblemKind::Mask).is_empty(),
        "{:?}",
        rep.problems
    );
    assert_eq!(rep.masks, 1);

    // An existing mask is never overwritten without force...
    std::fs::write(&o.mask_path, b"sentinel").unwrap();
    let again = mask_subject(&subject, &seg, &mut clip, &opts, &mut |_| {}).unwrap();
    assert!(again[0].result.is_none());
    assert_eq!(std::fs::read(&o.mask_path).unwrap(), b"sentinel");
    // ...and is with it.
    let forced = MaskOptions {
        force: true,
        ..opts
    };
    let again = mask_subject(&subject, &seg, &mut clip, &forced, &mut |_| {}).unwrap();
    assert!(again[0].result.is_some());
    assert_eq!(
        image::open(&o.mask_path).unwrap().to_luma8(),
        mask,
        "same weights, same mask"
    );
}
