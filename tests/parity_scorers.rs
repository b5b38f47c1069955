//! Parity of the CLIP and DINO scorers with transformers 5.24 (tests/fixtures/README.md):
//! `clip.*` come from `CLIPImageProcessor` + `CLIPModel.get_image_features/get_text_features`,
//! `dino.*` from the DINO eval transform + `ViTModel(...).last_hidden_state[:, 0]`, all on the
//! tiny fixtures. Images are `golden.json` `score.images` (relative to data/dreambooth-split/),
//! texts `score.texts`.

mod common;
use common::{assert_close, dev, golden_json, root};

use attractor::eval::clip::ClipScorer;
use attractor::eval::dino::DinoScorer;
use attractor::eval::{cosine, Scorers};
use attractor::hub::ModelSource;
use candle_core::Tensor;
use std::path::Path;

fn golden(key: &str) -> Tensor {
    common::golden()
        .remove(key)
        .unwrap_or_else(|| panic!("{key} missing from golden.safetensors"))
}

fn score_images() -> Vec<image::RgbImage> {
    let g = golden_json();
    g["score.images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let path = root()
                .join("data/dreambooth-split")
                .join(p.as_str().unwrap());
            image::open(&path).unwrap().to_rgb8()
        })
        .collect()
}

fn score_texts() -> Vec<String> {
    golden_json()["score.texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .collect()
}

fn local(dir: &str) -> ModelSource {
    ModelSource::Local(root().join("tests/fixtures").join(dir))
}

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn clip_pixels_match_clip_image_processor() {
    let clip = ClipScorer::load(&local("tiny-clip"), &dev(), true).unwrap();
    let ours = clip.preprocess.batch(&score_images(), &dev()).unwrap();
    let d = mean_abs_diff(&ours, &golden("clip.pixel_values"));
    eprintln!("clip pixel mean abs diff {d:.4}");
    assert!(d < 0.02, "clip pixel mean abs diff {d}");
}

#[test]
fn clip_image_embeds_match_transformers() {
    let clip = ClipScorer::load(&local("tiny-clip"), &dev(), true).unwrap();
    let ours = clip
        .model
        .image_embeds(&golden("clip.pixel_values"))
        .unwrap();
    assert_close(
        "clip.image_embeds",
        &ours,
        &golden("clip.image_embeds"),
        1e-4,
        0.0,
    );
}

#[test]
fn clip_text_embeds_match_transformers() {
    let clip = ClipScorer::load(&local("tiny-clip"), &dev(), true).unwrap();
    let texts = score_texts();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let ours = clip.embed_texts(&refs).unwrap();
    assert_close(
        "clip.text_embeds",
        &ours,
        &golden("clip.text_embeds"),
        1e-4,
        0.0,
    );
}

#[test]
fn clip_tokenizer_matches_golden_ids() {
    // tok.ids: the same BPE as SD's tokenizer, padded with <|endoftext|> to 77.
    let clip = ClipScorer::load(&local("tiny-clip"), &dev(), true).unwrap();
    let ids = golden("tok.ids").to_vec2::<i64>().unwrap();
    let prompts = golden_json()["tok.prompts"].clone();
    for (row, p) in ids.iter().zip(prompts.as_array().unwrap()) {
        let ours: Vec<i64> = clip
            .tokenizer
            .encode(p.as_str().unwrap())
            .unwrap()
            .into_iter()
            .map(|x| x as i64)
            .collect();
        assert_eq!(&ours, row);
    }
    // Truncation keeps BOS ... EOS within 77 tokens.
    let long = "a photo of a dog ".repeat(40);
    let ours = clip.tokenizer.encode(&long).unwrap();
    assert_eq!(ours.len(), 77);
    assert_eq!(ours[0], 49406);
    assert_eq!(ours[76], 49407);
    assert_ne!(ours[75], 49407);
}

#[test]
fn dino_pixels_match_reference_transform() {
    let dino = DinoScorer::load(&local("tiny-dino"), &dev(), true).unwrap();
    let ours = dino.preprocess.batch(&score_images(), &dev()).unwrap();
    let d = mean_abs_diff(&ours, &golden("dino.pixel_values"));
    eprintln!("dino pixel mean abs diff {d:.4}");
    assert!(d < 0.02, "dino pixel mean abs diff {d}");
}

#[test]
fn dino_cls_matches_transformers() {
    let dino = DinoScorer::load(&local("tiny-dino"), &dev(), true).unwrap();
    let ours = dino.model.cls(&golden("dino.pixel_values")).unwrap();
    assert_close("dino.cls", &ours, &golden("dino.cls"), 1e-4, 0.0);
}

/// End to end from image files: our preprocessing + models, scores within 2e-3.
#[test]
fn scores_match_within_tolerance() {
    let mut s = Scorers::load(&local("tiny-clip"), &local("tiny-dino"), &dev(), true).unwrap();
    let feats = s.image_features(&score_images()).unwrap();
    let texts = score_texts();
    let t_ref = golden("clip.t_scores").to_vec1::<f32>().unwrap();
    let i_ref = golden("clip.i_scores").to_vec2::<f32>().unwrap();
    let d_ref = golden("dino.scores").to_vec2::<f32>().unwrap();
    for (k, text) in texts.iter().enumerate() {
        let t = s.text_features(text).unwrap();
        let ours = cosine(&t, &feats[k].clip);
        assert!(
            (ours - t_ref[k] as f64).abs() < 2e-3,
            "CLIP-T {k}: {ours} vs {}",
            t_ref[k]
        );
    }
    for i in 0..3 {
        for j in 0..3 {
            let ci = cosine(&feats[i].clip, &feats[j].clip);
            let di = cosine(&feats[i].dino, &feats[j].dino);
            assert!(
                (ci - i_ref[i][j] as f64).abs() < 2e-3,
                "CLIP-I {i},{j}: {ci}"
            );
            assert!((di - d_ref[i][j] as f64).abs() < 2e-3, "DINO {i},{j}: {di}");
        }
    }
}

#[test]
fn missing_local_file_names_folder_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = match DinoScorer::load(&ModelSource::Local(dir.path().to_path_buf()), &dev(), true) {
        Ok(_) => panic!("an empty folder must not load"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("config.json"), "{err}");
    assert!(
        err.contains(&Path::new(dir.path()).display().to_string()),
        "{err}"
    );
}

/// DINOv2 (tests/fixtures/tiny-dinov2, golden-dinov2.*, scripts/fixtures/make-dinov2.py):
/// `BitImageProcessor` pixels from the image file, and `Dinov2Model(...).last_hidden_state[:, 0]`
/// of a batch of those pixels and their mirror image. The fixture keeps the real patch 14 and
/// image size 518, so its 37 x 37 position grid is resized to the crop's 16 x 16 as for
/// facebook/dinov2-small; every weight is random, layer scales included.
#[test]
fn dinov2_pixels_and_cls_match_transformers() {
    let golden = candle_core::safetensors::load(
        common::fixtures().join("golden-dinov2.safetensors"),
        &dev(),
    )
    .unwrap();
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("golden-dinov2.json")).unwrap(),
    )
    .unwrap();
    let dino = DinoScorer::load(&local("tiny-dinov2"), &dev(), true).unwrap();
    assert!(
        dino.model.architecture().starts_with("Dinov2Model"),
        "{}",
        dino.model.architecture()
    );
    let image = image::open(
        root()
            .join("data/dreambooth-split")
            .join(meta["image"].as_str().unwrap()),
    )
    .unwrap()
    .to_rgb8();
    let pixels = &golden["dinov2.pixel_values"];
    let ours = dino.preprocess.batch(&[image], &dev()).unwrap();
    let d = mean_abs_diff(&ours, pixels);
    eprintln!("dinov2 pixel mean abs diff {d:.4}");
    assert!(d < 0.02, "dinov2 pixel mean abs diff {d}");

    let w = pixels.dim(3).unwrap();
    let rev = Tensor::arange(0u32, w as u32, &dev())
        .unwrap()
        .to_vec1::<u32>()
        .unwrap()
        .into_iter()
        .rev()
        .collect::<Vec<_>>();
    let rev = Tensor::new(rev.as_slice(), &dev()).unwrap();
    let flipped = pixels.index_select(&rev, 3).unwrap();
    let batch = Tensor::cat(&[pixels, &flipped], 0).unwrap();
    let cls = dino.model.cls(&batch).unwrap();
    let err = common::max_abs(&(&cls - &golden["dinov2.cls"]).unwrap());
    eprintln!("dinov2 cls max abs error {err:.2e}");
    assert!(err < 1e-4, "dinov2 cls max abs error {err}");
}

fn scorer_golden(key: &str) -> Tensor {
    candle_core::safetensors::load(
        common::fixtures().join("golden-scorers.safetensors"),
        &dev(),
    )
    .unwrap()
    .remove(key)
    .unwrap_or_else(|| panic!("{key} missing from golden-scorers.safetensors"))
}

/// DINO ViT-S/8 (`--dino facebook/dino-vits8`): the same ViTModel with 8-pixel patches, a
/// 28 x 28 grid at 224 (tests/fixtures/tiny-dino-s8, scripts/fixtures/make-scorers.py).
#[test]
fn dino_vits8_cls_matches_transformers() {
    let dino = DinoScorer::load(&local("tiny-dino-s8"), &dev(), true).unwrap();
    let arch = dino.model.architecture();
    assert!(arch.starts_with("ViTModel (DINO): patch 8,"), "{arch}");
    let cls = dino
        .model
        .cls(&scorer_golden("dino_s8.pixel_values"))
        .unwrap();
    assert_close(
        "dino_s8.cls",
        &cls,
        &scorer_golden("dino_s8.cls"),
        1e-4,
        0.0,
    );
}

/// CLIP ViT-L/14 (`--clip openai/clip-vit-large-patch14`): 14-pixel patches and vision and text
/// towers of different widths (tests/fixtures/tiny-clip-l14).
#[test]
fn clip_vitl14_embeds_match_transformers() {
    let clip = ClipScorer::load(&local("tiny-clip-l14"), &dev(), true).unwrap();
    let ours = clip
        .model
        .image_embeds(&scorer_golden("clip_l14.pixel_values"))
        .unwrap();
    assert_close(
        "clip_l14.image_embeds",
        &ours,
        &scorer_golden("clip_l14.image_embeds"),
        1e-4,
        0.0,
    );
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("golden-scorers.json")).unwrap(),
    )
    .unwrap();
    let texts: Vec<&str> = meta["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let ours = clip.embed_texts(&texts).unwrap();
    assert_close(
        "clip_l14.text_embeds",
        &ours,
        &scorer_golden("clip_l14.text_embeds"),
        1e-4,
        0.0,
    );
}
