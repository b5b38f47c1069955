//! `attractor masks --subject NAME | --all`: automatic subject masks (SAM candidates ranked by
//! CLIP), console front of [`crate::data::masks`].

use crate::cli::Common;
use crate::data::masks::{
    mask_subject, CandidateOptions, MaskOptions, SamSegmenter, SamVariant, SAM_REPO, SAM_REVISION,
};
use crate::data::Dataset;
use crate::eval::clip::ClipScorer;
use crate::eval::{CLIP_REPO, CLIP_REVISION};
use crate::hub::ModelSource;
use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use std::path::{Path, PathBuf};

#[derive(Args, Debug)]
pub struct MasksArgs {
    #[command(flatten)]
    pub common: Common,
    /// Mask every subject of the dataset (instead of --subject NAME[,NAME...]).
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub models: MaskModelArgs,
    /// The text candidates are ranked against; `{}` = the subject's class.
    #[arg(long, default_value = "a photo of a {}")]
    pub prompt: String,
    /// Overwrite existing masks.
    #[arg(long)]
    pub force: bool,
}

/// Which SAM and CLIP make masks: the flags `attractor masks` and `attractor train` (masks made
/// on demand) share.
#[derive(Args, Debug, Clone)]
pub struct MaskModelArgs {
    /// SAM weights: a safetensors file, or a folder holding the --sam-model file (default: the
    /// hub repo lmz/candle-sam, from the Hugging Face cache first).
    #[arg(long)]
    pub sam: Option<PathBuf>,
    /// Which SAM: `tiny` (MobileSAM, mobile_sam-tiny-vitt.safetensors) or `vit-b`
    /// (sam_vit_b_01ec64.safetensors; any ViT SAM file, its shape read from the file).
    #[arg(long, default_value = "tiny", value_parser = clap::value_parser!(SamVariantArg))]
    pub sam_model: SamVariantArg,
    /// CLIP that ranks SAM's candidate masks: a local folder or a hub repo id
    /// (`repo@revision`).
    #[arg(long, default_value = CLIP_REPO)]
    pub clip: String,
    /// SAM prompt grid: points per side (points_per_side^2 prompts per image; on a CPU each
    /// prompt costs ~0.5 s).
    #[arg(long, default_value_t = 8, value_parser = super::ranges::int(crate::ranges::Range::AtLeast(1)), allow_negative_numbers = true)]
    pub points_per_side: usize,
}

impl Default for MaskModelArgs {
    fn default() -> Self {
        Self {
            sam: None,
            sam_model: SamVariantArg(SamVariant::Tiny),
            clip: CLIP_REPO.into(),
            points_per_side: 8,
        }
    }
}

/// SAM and CLIP, loaded.
pub struct MaskModels {
    pub seg: SamSegmenter,
    pub clip: ClipScorer,
    /// `SAM <variant> from <file>, CLIP from <source>`, for the console.
    pub described: String,
}

impl MaskModelArgs {
    /// Load SAM and CLIP as the flags say, from the cache or the hub (never the network with
    /// --offline or HF_HUB_OFFLINE=1, the SD weights' rule).
    pub fn load(&self, common: &Common) -> Result<MaskModels> {
        let device = common.device()?;
        let offline = common.offline();
        let variant = self.sam_model.0;
        let sam_path = sam_weights(self.sam.as_deref(), variant, offline).context("--sam")?;
        let seg = SamSegmenter::load(&sam_path, variant, &device)?;
        let default_rev = if self.clip == CLIP_REPO {
            CLIP_REVISION
        } else {
            "main"
        };
        let clip_src = ModelSource::parse(&self.clip, default_rev)
            .map_err(|e| anyhow!(e))
            .context("--clip")?;
        let clip = ClipScorer::load(&clip_src, &device, offline)?;
        Ok(MaskModels {
            seg,
            clip,
            described: format!(
                "SAM {variant} from {}, CLIP from {clip_src}",
                sam_path.display()
            ),
        })
    }

    /// The pipeline's settings with these flags.
    pub fn options(&self, prompt: &str, force: bool) -> MaskOptions {
        MaskOptions {
            candidates: CandidateOptions {
                points_per_side: self.points_per_side,
                ..CandidateOptions::default()
            },
            prompt: prompt.to_string(),
            force,
            ..MaskOptions::default()
        }
    }
}

/// Mask `subject`'s training images (the missing ones unless `opts.force`), printing one line
/// per image with `rel` paths: what was made and its preview, or that an existing mask was kept
/// (only when `print_kept`). Returns how many masks came from low-confidence proposals.
pub fn make_masks(
    subject: &crate::data::Subject,
    models: &mut MaskModels,
    opts: &MaskOptions,
    rel: &dyn Fn(&Path) -> String,
    print_kept: bool,
) -> Result<usize> {
    let mut relaxed = 0;
    mask_subject(subject, &models.seg, &mut models.clip, opts, &mut |o| match &o.result {
        None if print_kept => println!("{}: exists, kept (--force redoes it)", rel(&o.mask_path)),
        None => {}
        Some(r) => {
            if r.relaxed {
                relaxed += 1;
            }
            println!(
                "{} -> {}: subject {:.1} % of the image, CLIP {:.3}, {} of {} candidates{}; preview {}",
                rel(&o.image),
                rel(&o.mask_path),
                r.coverage * 100.0,
                r.score,
                r.merged,
                r.candidates,
                if r.relaxed { " (low SAM confidence: check it)" } else { "" },
                rel(&o.preview_path)
            )
        }
    })
    .with_context(|| format!("masks for subject `{}`", subject.name))?;
    Ok(relaxed)
}

/// The closing advice after masks were made from low-confidence proposals.
pub fn relaxed_note(relaxed: usize) -> Option<String> {
    (relaxed > 0).then(|| format!("{relaxed} mask(s) came from low-confidence SAM proposals: look at their previews and repaint any that miss the subject"))
}

/// [`SamVariant`] for clap (the library stays free of clap).
#[derive(Debug, Clone, Copy)]
pub struct SamVariantArg(pub SamVariant);

impl std::str::FromStr for SamVariantArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        s.parse().map(SamVariantArg)
    }
}

/// Where the SAM weights are: `--sam FILE`, `--sam DIR/<variant file>`, or the hub cache /
/// download (never the network with --offline or HF_HUB_OFFLINE=1).
pub fn sam_weights(sam: Option<&Path>, variant: SamVariant, offline: bool) -> Result<PathBuf> {
    match sam {
        Some(p) if p.is_file() => Ok(p.to_path_buf()),
        Some(p) if p.is_dir() => {
            let f = p.join(variant.file_name());
            if f.is_file() {
                Ok(f)
            } else {
                bail!(
                    "--sam {}: the folder has no {}; download it with `huggingface-cli download {SAM_REPO} {}` or pass the weight file itself (and --sam-model vit-b for {})",
                    p.display(),
                    variant.file_name(),
                    variant.file_name(),
                    SamVariant::VitB.file_name()
                )
            }
        }
        Some(p) => bail!(
            "--sam {}: no such file or folder; pass a SAM safetensors file from {SAM_REPO} or leave the flag out to use the hub",
            p.display()
        ),
        None => Ok(crate::hub::resolve_file(
            SAM_REPO,
            SAM_REVISION,
            variant.file_name(),
            offline,
        )?),
    }
}

pub fn run(args: &MasksArgs) -> Result<()> {
    let ds = match &args.common.data {
        Some(d) => Dataset::open(d)?,
        None => Dataset::open_default()?,
    };
    let names: Vec<String> = match (&args.common.subject, args.all) {
        (Some(_), true) => bail!("pass either --subject NAME or --all, not both"),
        (None, false) => bail!(
            "which subject? pass --subject NAME (one of: {}) or --all",
            ds.subject_names().join(", ")
        ),
        (None, true) => ds.subject_names().iter().map(|s| s.to_string()).collect(),
        (Some(s), false) => s
            .split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect(),
    };
    let subjects = names
        .iter()
        .map(|n| ds.subject(n))
        .collect::<Result<Vec<_>, _>>()?;

    let todo: usize = subjects
        .iter()
        .flat_map(|s| s.train_images.iter().map(move |i| s.mask_path(i)))
        .filter(|m| args.force || !m.exists())
        .count();
    if todo == 0 {
        println!("every training image already has a mask; nothing to do (--force redoes them)");
        return Ok(());
    }

    let mut models = args.models.load(&args.common)?;
    println!("{}: {todo} image(s) to mask", models.described);
    let opts = args.models.options(&args.prompt, args.force);
    let rel = |p: &Path| p.strip_prefix(&ds.dir).unwrap_or(p).display().to_string();
    let mut relaxed = 0;
    for s in &subjects {
        let start = std::time::Instant::now();
        relaxed += make_masks(s, &mut models, &opts, &rel, true)?;
        println!("{}: done in {:.1} s", s.name, start.elapsed().as_secs_f64());
    }
    if let Some(note) = relaxed_note(relaxed) {
        println!("{note}");
    }
    println!("look through the previews (masks/preview/*.jpg), then run: attractor dataset check");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sam_weights_from_flag() {
        let dir = tempfile::tempdir().unwrap();
        let err = sam_weights(Some(dir.path()), SamVariant::Tiny, true)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mobile_sam-tiny-vitt.safetensors")
                && err.contains("huggingface-cli download lmz/candle-sam"),
            "{err}"
        );
        let f = dir.path().join(SamVariant::Tiny.file_name());
        std::fs::write(&f, b"x").unwrap();
        assert_eq!(
            sam_weights(Some(dir.path()), SamVariant::Tiny, true).unwrap(),
            f
        );
        assert_eq!(sam_weights(Some(&f), SamVariant::VitB, true).unwrap(), f);
        let err = sam_weights(Some(&dir.path().join("nope")), SamVariant::Tiny, true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no such file"), "{err}");
    }
}
