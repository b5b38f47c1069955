//! Image preprocessing for the scorers (SPEC.md §6): resize the short side (bicubic), centre crop,
//! scale to [0, 1], normalise per channel, CHW.
//!
//! Follows transformers' `CLIPImageProcessor` (short side 224, crop 224, CLIP mean/std from
//! `preprocessor_config.json`) and the DINO evaluation transform (`Resize(256, bicubic)`,
//! `CenterCrop(224)`, ImageNet mean/std). The long side is `floor(short_target * long / short)`
//! as in both references; the crop offset is `floor((size - crop) / 2)` (transformers' `center_crop`).
//! The bicubic kernel is Catmull-Rom (a = -0.5, PIL's), widened when downscaling as PIL does;
//! pixel values stay within the tolerance of tests/fixtures/README.md of PIL's.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use image::imageops::FilterType;
use image::RgbImage;
use serde::Deserialize;
use std::path::Path;

/// CLIP's normalisation (openai/clip-vit-base-patch32 `preprocessor_config.json`).
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)] // the published digits
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];
/// ImageNet normalisation (DINO's evaluation transform).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// One preprocessing recipe.
#[derive(Clone, Debug, PartialEq)]
pub struct Preprocess {
    /// The short side is resized to this many pixels.
    pub resize_short: u32,
    /// Then a centred square of this size is cropped.
    pub crop: u32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

#[derive(Deserialize)]
struct HfSize {
    shortest_edge: Option<u32>,
    height: Option<u32>,
}

#[derive(Deserialize)]
struct HfPreprocessorConfig {
    size: Option<HfSize>,
    crop_size: Option<HfSize>,
    image_mean: Option<[f32; 3]>,
    image_std: Option<[f32; 3]>,
}

impl Preprocess {
    /// CLIP ViT-B/32's recipe: short side 224, crop 224, CLIP mean/std.
    pub fn clip() -> Self {
        Self {
            resize_short: 224,
            crop: 224,
            mean: CLIP_MEAN,
            std: CLIP_STD,
        }
    }

    /// DINO's recipe: short side 256, crop 224, ImageNet mean/std.
    pub fn dino() -> Self {
        Self {
            resize_short: 256,
            crop: 224,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }

    /// The CLIP recipe as a transformers `preprocessor_config.json` states it (missing keys keep
    /// CLIP's defaults).
    pub fn from_clip_config(path: &Path) -> Result<Self> {
        Self::from_config(path, Self::clip())
    }

    /// The recipe a transformers `preprocessor_config.json` states (`CLIPImageProcessor`,
    /// `BitImageProcessor`: `size.shortest_edge`, `crop_size`, `image_mean`, `image_std`); keys
    /// it lacks keep `defaults`.
    pub fn from_config(path: &Path, defaults: Self) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: HfPreprocessorConfig = serde_json::from_str(&text).with_context(|| {
            format!("{} is not a valid preprocessor_config.json", path.display())
        })?;
        let mut p = defaults;
        if let Some(s) = cfg.size.and_then(|s| s.shortest_edge.or(s.height)) {
            p.resize_short = s;
        }
        if let Some(c) = cfg.crop_size.and_then(|s| s.height.or(s.shortest_edge)) {
            p.crop = c;
        }
        if let Some(m) = cfg.image_mean {
            p.mean = m;
        }
        if let Some(s) = cfg.image_std {
            p.std = s;
        }
        anyhow::ensure!(
            p.crop > 0 && p.resize_short >= p.crop && p.std.iter().all(|s| *s > 0.0),
            "{}: crop {} must be positive and at most the resize size {}, std positive",
            path.display(),
            p.crop,
            p.resize_short
        );
        Ok(p)
    }

    /// The resized (not yet cropped) size of a `w` x `h` image.
    pub fn resized_size(&self, w: u32, h: u32) -> (u32, u32) {
        let s = self.resize_short as u64;
        let (w64, h64) = (w.max(1) as u64, h.max(1) as u64);
        if w <= h {
            (self.resize_short, ((s * h64) / w64).max(1) as u32)
        } else {
            (((s * w64) / h64).max(1) as u32, self.resize_short)
        }
    }

    /// Preprocess one image into CHW f32 values (`3 * crop * crop`).
    pub fn apply(&self, img: &RgbImage) -> Result<Vec<f32>> {
        anyhow::ensure!(
            img.width() > 0 && img.height() > 0,
            "cannot score an empty (0-pixel) image"
        );
        anyhow::ensure!(
            self.crop > 0 && self.resize_short >= self.crop,
            "preprocessing: crop {} must be positive and at most the resize size {}",
            self.crop,
            self.resize_short
        );
        let (rw, rh) = self.resized_size(img.width(), img.height());
        let resized = if (rw, rh) == img.dimensions() {
            img.clone()
        } else {
            // Through `DynamicImage`: its non-generic method is compiled (optimised) in the image
            // crate, while a generic `imageops::resize` call would be compiled here, ~10x slower
            // in the dev profile.
            image::DynamicImage::ImageRgb8(img.clone())
                .resize_exact(rw, rh, FilterType::CatmullRom)
                .into_rgb8()
        };
        let c = self.crop;
        let left = (rw - c) / 2;
        let top = (rh - c) / 2;
        let n = (c * c) as usize;
        let mut out = vec![0f32; 3 * n];
        for y in 0..c {
            for x in 0..c {
                let p = resized.get_pixel(left + x, top + y);
                let i = (y * c + x) as usize;
                for ch in 0..3 {
                    let v = p[ch] as f32 / 255.0;
                    out[ch * n + i] = (v - self.mean[ch]) / self.std[ch];
                }
            }
        }
        Ok(out)
    }

    /// Preprocess a batch into a `[batch, 3, crop, crop]` tensor.
    pub fn batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let mut data = Vec::with_capacity(images.len() * 3 * (self.crop * self.crop) as usize);
        for img in images {
            data.extend(self.apply(img)?);
        }
        let c = self.crop as usize;
        Ok(Tensor::from_vec(data, (images.len(), 3, c, c), device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_follow_the_short_side() {
        let p = Preprocess::clip();
        assert_eq!(p.resized_size(512, 683), (224, 298));
        assert_eq!(p.resized_size(683, 512), (298, 224));
        assert_eq!(Preprocess::dino().resized_size(512, 512), (256, 256));
    }

    #[test]
    fn constant_image_normalises_to_known_values() {
        let img = RgbImage::from_pixel(300, 400, image::Rgb([255, 0, 128]));
        let p = Preprocess::dino();
        let v = p.apply(&img).unwrap();
        assert_eq!(v.len(), 3 * 224 * 224);
        let n = 224 * 224;
        assert!((v[0] - (1.0 - 0.485) / 0.229).abs() < 1e-5);
        assert!((v[n] - (0.0 - 0.456) / 0.224).abs() < 1e-5);
        assert!((v[2 * n + 17] - (128.0 / 255.0 - 0.406) / 0.225).abs() < 1e-5);
    }
}
