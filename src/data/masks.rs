//! Automatic subject masks for the attractor's masked losses (SPEC.md §5: one binary mask per
//! training image, white = subject), written to `<subject>/masks/<stem>.png`.
//!
//! Pipeline per training image:
//! 1. candidates ([`SamSegmenter::candidates`]): Segment Anything (candle-transformers'
//!    `segment_anything`, MobileSAM or ViT-B weights from `lmz/candle-sam`) is prompted with one
//!    foreground point at a time on a regular grid, as SAM's automatic mask generator does
//!    (`segment_anything/automatic_mask_generator.py`); each point gives 3 masks with predicted
//!    IoUs. Kept: predicted IoU and stability score above their thresholds, area between 0.5 % and
//!    95 % of the image, then non-maximum suppression by mask IoU.
//! 2. ranking ([`select_mask`]): every candidate's masked crop (the subject on grey, squared) is
//!    scored by a [`CropScorer`] against "a photo of a <class>"; the best is kept, and the next
//!    best candidates whose boxes touch it are merged in one by one while the union scores higher
//!    (a dog whose head and body came out as two segments becomes one mask).
//!
//! The scorer is a trait so the ranking is testable with synthetic candidates; the real one is
//! CLIP ([`crate::eval::clip::ClipScorer`]).

use crate::eval::clip::ClipScorer;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::segment_anything::sam::{self, Sam};
use image::imageops::FilterType;
use image::{GrayImage, ImageBuffer, Luma, Rgb, RgbImage};
use std::path::{Path, PathBuf};

/// The hub repo with candle-ready SAM weights.
pub const SAM_REPO: &str = "lmz/candle-sam";
/// Its revision.
pub const SAM_REVISION: &str = "main";

/// Which SAM image encoder the weights are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SamVariant {
    /// MobileSAM (TinyViT-5M encoder): ~10x faster on a CPU, slightly coarser masks.
    Tiny,
    /// The original SAM ViT-B (or any ViT SAM: see [`vit_shape`]).
    VitB,
}

impl SamVariant {
    /// The weight file of this variant in [`SAM_REPO`].
    pub fn file_name(self) -> &'static str {
        match self {
            SamVariant::Tiny => "mobile_sam-tiny-vitt.safetensors",
            SamVariant::VitB => "sam_vit_b_01ec64.safetensors",
        }
    }
}

impl std::str::FromStr for SamVariant {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" | "mobile-sam" => Ok(Self::Tiny),
            "vit-b" | "vit_b" => Ok(Self::VitB),
            other => Err(format!(
                "unknown SAM model `{other}`: expected tiny (MobileSAM) or vit-b"
            )),
        }
    }
}

impl std::fmt::Display for SamVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tiny => "tiny",
            Self::VitB => "vit-b",
        })
    }
}

/// The ViT image encoder's shape, as a weight file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VitShape {
    pub width: usize,
    pub depth: usize,
    pub heads: usize,
    /// Blocks with global attention (the others attend within 14 x 14 windows).
    pub global_blocks: Vec<usize>,
}

/// Read the ViT encoder's shape from a SAM weight file, so one loader takes ViT-B (768 wide,
/// 12 blocks, 12 heads, global attention in blocks 2, 5, 8, 11), ViT-L and ViT-H, and the
/// small random-weight SAMs of the tests: the width is the patch embedding's output, each
/// block's relative-position table has `2 * size - 1` rows of one head's width, and `size` is
/// the 64-patch grid for global attention and the 14-patch window otherwise.
pub fn vit_shape(weights: &Path) -> Result<VitShape> {
    // SAFETY: the file is memory-mapped read-only and not modified while mapped.
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(weights) }
        .with_context(|| format!("cannot read SAM weights {}", weights.display()))?;
    let mut width = None;
    let mut blocks = std::collections::BTreeMap::new();
    for (name, view) in st.tensors() {
        if name == "image_encoder.patch_embed.proj.weight" {
            width = view.shape().first().copied();
        } else if let Some(i) = name
            .strip_prefix("image_encoder.blocks.")
            .and_then(|r| r.strip_suffix(".attn.rel_pos_h"))
            .and_then(|i| i.parse::<usize>().ok())
        {
            if let [rows, head_dim] = view.shape() {
                blocks.insert(i, (*rows, *head_dim));
            }
        }
    }
    let grid = sam::IMAGE_SIZE / 16;
    let not_vit = || {
        anyhow::anyhow!(
            "{} holds no ViT SAM image encoder (image_encoder.patch_embed.proj.weight and \
             image_encoder.blocks.N.attn.rel_pos_h); for MobileSAM pass --sam-model tiny",
            weights.display()
        )
    };
    let width = width.ok_or_else(not_vit)?;
    let head_dim = blocks.values().next().map(|b| b.1).ok_or_else(not_vit)?;
    if head_dim == 0 || width % head_dim != 0 || blocks.keys().copied().ne(0..blocks.len()) {
        return Err(not_vit());
    }
    Ok(VitShape {
        width,
        depth: blocks.len(),
        heads: width / head_dim,
        global_blocks: blocks
            .iter()
            .filter(|(_, (rows, _))| *rows == 2 * grid - 1)
            .map(|(i, _)| *i)
            .collect(),
    })
}

/// Scores image crops against a text: higher = the crop shows the text better.
pub trait CropScorer {
    fn score(&mut self, crops: &[RgbImage], text: &str) -> Result<Vec<f32>>;
}

/// CLIP cosine similarity between each crop and the text (projected, normalised embeddings).
impl CropScorer for ClipScorer {
    fn score(&mut self, crops: &[RgbImage], text: &str) -> Result<Vec<f32>> {
        if crops.is_empty() {
            return Ok(Vec::new());
        }
        let norm = |t: Tensor| -> Result<Tensor> {
            let n = t.sqr()?.sum_keepdim(1)?.sqrt()?;
            Ok(t.broadcast_div(&n)?)
        };
        let text = norm(self.embed_texts(&[text])?)?; // [1, d]
        let mut out = Vec::with_capacity(crops.len());
        // Small batches bound memory on large candidate sets.
        for chunk in crops.chunks(16) {
            let img = norm(self.embed_images(chunk)?)?; // [n, d]
            let s = img.matmul(&text.t()?)?.squeeze(1)?.to_dtype(DType::F32)?;
            out.extend(s.to_vec1::<f32>()?);
        }
        Ok(out)
    }
}

/// Settings of candidate generation. Defaults follow SAM's automatic mask generator where it
/// has one (IoU 0.88, stability 0.95 at offset 1, NMS 0.7), with a coarser point grid for speed.
#[derive(Debug, Clone)]
pub struct CandidateOptions {
    /// Grid points per side (SAM: 32). 8 x 8 = 64 prompts: the mask decoder costs ~0.5 s per
    /// prompt on a CPU (its transposed convolutions), ~30 s per image.
    pub points_per_side: usize,
    /// Minimum predicted IoU of a kept mask.
    pub min_pred_iou: f32,
    /// Minimum stability score (IoU of the mask thresholded at +1 and at -1).
    pub min_stability: f32,
    /// Kept masks cover at least this share of the image...
    pub min_area: f64,
    /// ...and at most this share.
    pub max_area: f64,
    /// Mask IoU above which the lower-ranked of two masks is dropped.
    pub nms_iou: f64,
    /// At most this many candidates go on to ranking.
    pub max_candidates: usize,
}

impl Default for CandidateOptions {
    fn default() -> Self {
        Self {
            points_per_side: 8,
            min_pred_iou: 0.88,
            min_stability: 0.95,
            min_area: 0.005,
            max_area: 0.95,
            nms_iou: 0.7,
            max_candidates: 24,
        }
    }
}

/// One candidate mask at the image's size (0 or 255).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub mask: GrayImage,
    pub pred_iou: f32,
    pub stability: f32,
    /// The prompt point, in [0, 1] image coordinates.
    pub point: (f64, f64),
}

/// The candidates of one image, and whether the thresholds had to be relaxed to find any.
#[derive(Debug, Clone)]
pub struct Candidates {
    pub masks: Vec<Candidate>,
    /// True when no mask met the IoU/stability thresholds and the best ones by those were kept.
    pub relaxed: bool,
}

/// SAM on a device, ready to propose masks.
pub struct SamSegmenter {
    sam: Sam,
    device: Device,
}

impl SamSegmenter {
    /// Wrap a built model (tests build a small random one).
    pub fn new(sam: Sam, device: &Device) -> Self {
        Self {
            sam,
            device: device.clone(),
        }
    }

    /// Load weights of `variant` from a safetensors file.
    pub fn load(weights: &Path, variant: SamVariant, device: &Device) -> Result<Self> {
        // SAFETY: the file is memory-mapped read-only and not modified while mapped.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&[weights], DType::F32, device) }
            .with_context(|| format!("cannot read SAM weights {}", weights.display()))?;
        let sam = match variant {
            SamVariant::Tiny => Sam::new_tiny(vb),
            SamVariant::VitB => {
                let v = vit_shape(weights)?;
                Sam::new(v.width, v.depth, v.heads, &v.global_blocks, vb)
            }
        }
        .with_context(|| {
            format!(
                "{} does not hold SAM {variant:?} weights in candle's layout; pass the file of \
                 {SAM_REPO} that matches --sam-model ({})",
                weights.display(),
                variant.file_name()
            )
        })?;
        Ok(Self::new(sam, device))
    }

    /// Propose candidate masks for `img` (see the module docs).
    pub fn candidates(&self, img: &RgbImage, opts: &CandidateOptions) -> Result<Candidates> {
        let (w0, h0) = img.dimensions();
        // SAM's ResizeLongestSide: the long side to 1024, the rest padded by `preprocess`.
        let scale = sam::IMAGE_SIZE as f64 / w0.max(h0) as f64;
        let (w, h) = (
            ((w0 as f64 * scale).round() as u32).clamp(1, sam::IMAGE_SIZE as u32),
            ((h0 as f64 * scale).round() as u32).clamp(1, sam::IMAGE_SIZE as u32),
        );
        let resized = image::imageops::resize(img, w, h, FilterType::Triangle);
        let pixels = Tensor::from_vec(
            resized.into_raw(),
            (h as usize, w as usize, 3),
            &self.device,
        )?
        .permute((2, 0, 1))?
        .to_dtype(DType::F32)?;
        let emb = self.sam.embeddings(&pixels).context("SAM image encoder")?;
        // Low-resolution logits cover the padded 1024 square at 1/4 scale.
        let (lh, lw) = ((h as usize).div_ceil(4), (w as usize).div_ceil(4));
        let n = opts.points_per_side.max(1);
        let mut raw: Vec<RawMask> = Vec::new();
        for iy in 0..n {
            for ix in 0..n {
                let p = ((ix as f64 + 0.5) / n as f64, (iy as f64 + 0.5) / n as f64);
                let (masks, iou) = self
                    .sam
                    .forward_for_embeddings(&emb, h as usize, w as usize, &[(p.0, p.1, true)], true)
                    .context("SAM mask decoder")?;
                let masks = masks.i(0)?.i((.., ..lh, ..lw))?.to_dtype(DType::F32)?; // [3, lh, lw]
                let iou = iou.i(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                for (k, &pi) in iou.iter().enumerate() {
                    let logits = masks.i(k)?.flatten_all()?.to_vec1::<f32>()?;
                    let stab = stability(&logits);
                    raw.push(RawMask {
                        logits,
                        pred_iou: pi,
                        stability: stab,
                        point: p,
                    });
                }
            }
        }
        let area = |r: &RawMask| {
            r.logits.iter().filter(|&&v| v > 0.0).count() as f64 / r.logits.len().max(1) as f64
        };
        let sized = |r: &RawMask| (opts.min_area..=opts.max_area).contains(&area(r));
        let confident =
            |r: &RawMask| r.pred_iou >= opts.min_pred_iou && r.stability >= opts.min_stability;
        let mut keep: Vec<usize> = (0..raw.len())
            .filter(|&i| sized(&raw[i]) && confident(&raw[i]))
            .collect();
        let mut relaxed = false;
        if keep.is_empty() {
            relaxed = true;
            keep = (0..raw.len()).filter(|&i| sized(&raw[i])).collect();
        }
        // Best first by predicted IoU x stability, then NMS by mask IoU at low resolution.
        let quality = |i: usize| raw[i].pred_iou * raw[i].stability;
        keep.sort_by(|&a, &b| {
            quality(b)
                .partial_cmp(&quality(a))
                .unwrap_or(std::cmp::Ordering::Equal)
        });
        let bins: Vec<Vec<bool>> = raw
            .iter()
            .map(|r| r.logits.iter().map(|&v| v > 0.0).collect())
            .collect();
        let mut chosen: Vec<usize> = Vec::new();
        for i in keep {
            if chosen
                .iter()
                .all(|&c| bool_iou(&bins[c], &bins[i]) <= opts.nms_iou)
            {
                chosen.push(i);
                if chosen.len() >= opts.max_candidates {
                    break;
                }
            }
        }
        let masks = chosen
            .into_iter()
            .map(|i| {
                let r = &raw[i];
                Candidate {
                    mask: upsample_logits(&r.logits, lw as u32, lh as u32, w0, h0),
                    pred_iou: r.pred_iou,
                    stability: r.stability,
                    point: r.point,
                }
            })
            .collect();
        Ok(Candidates { masks, relaxed })
    }
}

/// One decoder output at low resolution (the 1/4-scale grid of the resized image).
struct RawMask {
    logits: Vec<f32>,
    pred_iou: f32,
    stability: f32,
    point: (f64, f64),
}

/// SAM's stability score: |logits > +1| / |logits > -1|.
fn stability(logits: &[f32]) -> f32 {
    let hi = logits.iter().filter(|&&v| v > 1.0).count();
    let lo = logits.iter().filter(|&&v| v > -1.0).count();
    if lo == 0 {
        0.0
    } else {
        hi as f32 / lo as f32
    }
}

fn bool_iou(a: &[bool], b: &[bool]) -> f64 {
    let (mut i, mut u) = (0usize, 0usize);
    for (&x, &y) in a.iter().zip(b) {
        i += (x && y) as usize;
        u += (x || y) as usize;
    }
    if u == 0 {
        0.0
    } else {
        i as f64 / u as f64
    }
}

/// Bilinear upsampling of low-resolution logits to the image size, thresholded at 0.
fn upsample_logits(logits: &[f32], lw: u32, lh: u32, w: u32, h: u32) -> GrayImage {
    let buf: ImageBuffer<Luma<f32>, Vec<f32>> =
        ImageBuffer::from_raw(lw, lh, logits.to_vec()).unwrap_or_else(|| ImageBuffer::new(lw, lh));
    let up = image::imageops::resize(&buf, w, h, FilterType::Triangle);
    GrayImage::from_fn(w, h, |x, y| {
        Luma([if up.get_pixel(x, y).0[0] > 0.0 {
            255
        } else {
            0
        }])
    })
}

/// Settings of [`select_mask`].
#[derive(Debug, Clone)]
pub struct SelectOptions {
    /// How many of the best-scoring candidates may be merged into the best one.
    pub merge_top_k: usize,
}

impl Default for SelectOptions {
    fn default() -> Self {
        Self { merge_top_k: 4 }
    }
}

/// The chosen mask of one image.
#[derive(Debug, Clone)]
pub struct Selection {
    pub mask: GrayImage,
    /// The scorer's score of the chosen (possibly merged) mask.
    pub score: f32,
    /// Indices of the candidates in the mask (first = the best single one).
    pub picked: Vec<usize>,
    /// Every candidate's own score.
    pub scores: Vec<f32>,
}

/// The bounding box `(x0, y0, x1, y1)` (exclusive end) of a mask's white pixels.
pub fn bbox(mask: &GrayImage) -> Option<(u32, u32, u32, u32)> {
    let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] >= 128 {
            x0 = x0.min(x);
            y0 = y0.min(y);
            x1 = x1.max(x + 1);
            y1 = y1.max(y + 1);
        }
    }
    (x1 > 0).then_some((x0, y0, x1, y1))
}

/// The subject as CLIP should see it: the mask's bounding box (plus a 5 % margin), pixels outside
/// the mask grey, padded with grey to a square (CLIP centre-crops, which would cut a wide crop).
pub fn masked_crop(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    const GREY: Rgb<u8> = Rgb([127, 127, 127]);
    let Some((x0, y0, x1, y1)) = bbox(mask) else {
        return RgbImage::from_pixel(8, 8, GREY);
    };
    let (w, h) = img.dimensions();
    let m = ((x1 - x0).max(y1 - y0) as f64 * 0.05) as u32;
    let (x0, y0) = (x0.saturating_sub(m), y0.saturating_sub(m));
    let (x1, y1) = ((x1 + m).min(w), (y1 + m).min(h));
    let (cw, ch) = (x1 - x0, y1 - y0);
    let side = cw.max(ch);
    let (ox, oy) = ((side - cw) / 2, (side - ch) / 2);
    let mut out = RgbImage::from_pixel(side, side, GREY);
    for y in 0..ch {
        for x in 0..cw {
            if mask.get_pixel(x0 + x, y0 + y).0[0] >= 128 {
                out.put_pixel(ox + x, oy + y, *img.get_pixel(x0 + x, y0 + y));
            }
        }
    }
    out
}

fn boxes_touch(a: (u32, u32, u32, u32), b: (u32, u32, u32, u32)) -> bool {
    a.0 <= b.2 && b.0 <= a.2 && a.1 <= b.3 && b.1 <= a.3
}

fn union(a: &GrayImage, b: &GrayImage) -> GrayImage {
    let mut out = a.clone();
    for (o, p) in out.pixels_mut().zip(b.pixels()) {
        o.0[0] = o.0[0].max(p.0[0]);
    }
    out
}

/// Rank candidate masks by `scorer` against `text` and keep the best, merging in the next best
/// (up to `merge_top_k`) whose boxes touch it while the union scores higher.
pub fn select_mask(
    img: &RgbImage,
    candidates: &[GrayImage],
    scorer: &mut dyn CropScorer,
    text: &str,
    opts: &SelectOptions,
) -> Result<Selection> {
    if candidates.is_empty() {
        bail!("no candidate masks to choose from");
    }
    for (i, c) in candidates.iter().enumerate() {
        if c.dimensions() != img.dimensions() {
            bail!(
                "candidate {i} is {:?}, the image {:?}",
                c.dimensions(),
                img.dimensions()
            );
        }
    }
    let crops: Vec<RgbImage> = candidates.iter().map(|m| masked_crop(img, m)).collect();
    let scores = scorer.score(&crops, text)?;
    if scores.len() != candidates.len() {
        bail!(
            "the crop scorer returned {} scores for {} crops",
            scores.len(),
            candidates.len()
        );
    }
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| {
        scores[b]
            .partial_cmp(&scores[a])
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let best = order[0];
    let mut mask = candidates[best].clone();
    let mut score = scores[best];
    let mut picked = vec![best];
    for &j in order.iter().skip(1).take(opts.merge_top_k) {
        let (Some(a), Some(b)) = (bbox(&mask), bbox(&candidates[j])) else {
            continue;
        };
        if !boxes_touch(a, b) {
            continue;
        }
        let merged = union(&mask, &candidates[j]);
        let s = scorer.score(&[masked_crop(img, &merged)], text)?;
        if let Some(&s) = s.first() {
            if s > score {
                mask = merged;
                score = s;
                picked.push(j);
            }
        }
    }
    Ok(Selection {
        mask,
        score,
        picked,
        scores,
    })
}

/// The preview: the image with the background darkened and tinted blue, the subject as is.
pub fn preview(img: &RgbImage, mask: &GrayImage) -> RgbImage {
    let mut out = img.clone();
    for (p, m) in out.pixels_mut().zip(mask.pixels()) {
        if m.0[0] < 128 {
            let [r, g, b] = p.0;
            p.0 = [r / 3, g / 3, (b / 3).saturating_add(90)];
        }
    }
    out
}

/// Settings of [`mask_subject`].
#[derive(Debug, Clone)]
pub struct MaskOptions {
    pub candidates: CandidateOptions,
    pub select: SelectOptions,
    /// The text candidates are ranked against; `{}` = the subject's class.
    pub prompt: String,
    /// Overwrite existing masks.
    pub force: bool,
}

impl Default for MaskOptions {
    fn default() -> Self {
        Self {
            candidates: CandidateOptions::default(),
            select: SelectOptions::default(),
            prompt: "a photo of a {}".into(),
            force: false,
        }
    }
}

/// What happened to one training image.
#[derive(Debug, Clone)]
pub struct MaskOutcome {
    pub image: PathBuf,
    pub mask_path: PathBuf,
    pub preview_path: PathBuf,
    /// `None` when an existing mask was kept (no `force`).
    pub result: Option<MaskResult>,
}

/// A mask that was written.
#[derive(Debug, Clone)]
pub struct MaskResult {
    pub score: f32,
    /// Share of the image that is subject.
    pub coverage: f64,
    pub candidates: usize,
    /// Candidates merged into the mask.
    pub merged: usize,
    pub relaxed: bool,
}

/// `<subject>/masks/preview/<stem>.jpg`.
pub fn preview_path(subject: &super::Subject, train_image: &Path) -> PathBuf {
    let stem = train_image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    subject
        .masks_dir()
        .join("preview")
        .join(format!("{stem}.jpg"))
}

/// Mask every training image of `subject`; existing masks are kept unless `opts.force` (and,
/// without it, a mask that appears while this one is computed is kept too: the write never
/// replaces a file). `progress` is called after each image.
pub fn mask_subject(
    subject: &super::Subject,
    seg: &SamSegmenter,
    scorer: &mut dyn CropScorer,
    opts: &MaskOptions,
    progress: &mut dyn FnMut(&MaskOutcome),
) -> Result<Vec<MaskOutcome>> {
    let text = super::fill(&opts.prompt, &subject.class);
    let mut out = Vec::new();
    for img_path in &subject.train_images {
        let mask_path = subject.mask_path(img_path);
        let preview_path = preview_path(subject, img_path);
        let mut outcome = MaskOutcome {
            image: img_path.clone(),
            mask_path: mask_path.clone(),
            preview_path: preview_path.clone(),
            result: None,
        };
        if mask_path.exists() && !opts.force {
            progress(&outcome);
            out.push(outcome);
            continue;
        }
        let img = super::image::load_rgb(img_path)?;
        let cands = seg
            .candidates(&img, &opts.candidates)
            .with_context(|| format!("SAM on {}", img_path.display()))?;
        if cands.masks.is_empty() {
            bail!(
                "SAM proposed no mask covering 0.5-95 % of {}; paint {} by hand (white = subject, the image's size)",
                img_path.display(),
                mask_path.display()
            );
        }
        let masks: Vec<GrayImage> = cands.masks.iter().map(|c| c.mask.clone()).collect();
        let sel = select_mask(&img, &masks, scorer, &text, &opts.select)
            .with_context(|| format!("ranking the masks of {}", img_path.display()))?;
        if opts.force {
            crate::files::save_png(&sel.mask, &mask_path)?;
        } else if !crate::files::save_png_new(&sel.mask, &mask_path)? {
            // Another process (a parallel sweep job on the same subject) wrote it meanwhile:
            // a mask that exists is never replaced.
            progress(&outcome);
            out.push(outcome);
            continue;
        }
        write_jpeg(&preview_path, &preview(&img, &sel.mask))?;
        let white = sel.mask.as_raw().iter().filter(|&&v| v >= 128).count();
        outcome.result = Some(MaskResult {
            score: sel.score,
            coverage: white as f64 / sel.mask.as_raw().len().max(1) as f64,
            candidates: masks.len(),
            merged: sel.picked.len(),
            relaxed: cands.relaxed,
        });
        progress(&outcome);
        out.push(outcome);
    }
    Ok(out)
}

fn write_jpeg(path: &Path, img: &RgbImage) -> Result<()> {
    let mut bytes = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 90)
        .encode_image(img)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    crate::files::atomic_write(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stability_and_iou() {
        assert_eq!(stability(&[2.0, 0.5, -0.5, -2.0]), 1.0 / 3.0);
        assert_eq!(bool_iou(&[true, true, false], &[true, false, false]), 0.5);
    }

    #[test]
    fn crop_is_square_and_grey_outside() {
        let img = RgbImage::from_pixel(40, 20, Rgb([200, 10, 10]));
        // A triangle in the box x 10..20, y 5..15 (subject below the diagonal).
        let m = GrayImage::from_fn(40, 20, |x, y| {
            let inside = (10..20).contains(&x) && (5..15).contains(&y) && x - 10 <= y - 5;
            Luma([if inside { 255 } else { 0 }])
        });
        let c = masked_crop(&img, &m);
        assert_eq!(c.dimensions(), (10, 10));
        assert_eq!(c.get_pixel(9, 0).0, [127, 127, 127]);
        assert_eq!(c.get_pixel(5, 5).0, [200, 10, 10]);
        // A wide mask is padded to a square with grey.
        let wide = GrayImage::from_fn(40, 20, |x, y| {
            Luma([if (0..40).contains(&x) && (8..12).contains(&y) {
                255
            } else {
                0
            }])
        });
        let c = masked_crop(&img, &wide);
        assert_eq!(c.width(), c.height());
        assert_eq!(c.get_pixel(20, 0).0, [127, 127, 127]);
        assert_eq!(c.get_pixel(20, c.height() / 2).0, [200, 10, 10]);
        assert_eq!(bbox(&m), Some((10, 5, 20, 15)));
    }
}
