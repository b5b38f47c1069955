//! A complete diffusers-layout Stable Diffusion folder (what `StableDiffusionPipeline.
//! from_pretrained` and `attractor --model` load): the fine-tuned parts written from their
//! trained tensors, the unchanged parts hard-linked (or copied, across file systems) from the
//! base model's files. DreamBooth's output.

use crate::hub::SdFiles;
use anyhow::{Context, Result};
use candle_core::Tensor;
use std::path::{Path, PathBuf};

/// diffusers' `model_index.json` for SD 1.5 without the safety checker (written when the base
/// model's folder has none to link).
const MODEL_INDEX: &str = r#"{
  "_class_name": "StableDiffusionPipeline",
  "feature_extractor": [null, null],
  "requires_safety_checker": false,
  "safety_checker": [null, null],
  "scheduler": ["diffusers", "PNDMScheduler"],
  "text_encoder": ["transformers", "CLIPTextModel"],
  "tokenizer": ["transformers", "CLIPTokenizer"],
  "unet": ["diffusers", "UNet2DConditionModel"],
  "vae": ["diffusers", "AutoencoderKL"]
}
"#;

/// Link `from` to `to` (hard link, else a copy), replacing `to`.
fn link_or_copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(d) = to.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let _ = std::fs::remove_file(to);
    // The HF cache's files are symbolic links into its blobs: link the blob itself.
    let from =
        std::fs::canonicalize(from).with_context(|| format!("cannot read {}", from.display()))?;
    if std::fs::hard_link(&from, to).is_err() {
        std::fs::copy(&from, to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
    }
    Ok(())
}

/// Every file of the folder holding `file` (a model part's folder) linked into `dest`.
fn link_folder_of(file: &Path, dest: &Path) -> Result<()> {
    let dir = file.parent().unwrap_or(Path::new("."));
    for e in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let p = e?.path();
        if p.is_file() {
            if let Some(n) = p.file_name() {
                link_or_copy(&p, &dest.join(n))?;
            }
        }
    }
    Ok(())
}

/// Write the folder `dest`: `unet/` from `unet` (diffusers keys; `None` links the base's),
/// `text_encoder/` from `text` (transformers keys with `text_model.`; `None` links the base's),
/// and the VAE, scheduler, tokenizer and `model_index.json` linked from `base`. Each weights
/// file is written atomically; returns the files written.
pub fn save(
    dest: &Path,
    base: &SdFiles,
    unet: Option<&[(String, Tensor)]>,
    text: Option<&[(String, Tensor)]>,
) -> Result<Vec<PathBuf>> {
    let meta = crate::files::pt_format();
    let mut written = Vec::new();
    let part = |name: &str,
                weights_file: &str,
                config: &Path,
                own: Option<&[(String, Tensor)]>,
                base_weights: &Path|
     -> Result<PathBuf> {
        let d = dest.join(name);
        link_or_copy(config, &d.join("config.json"))?;
        let w = d.join(weights_file);
        match own {
            Some(t) => crate::files::save_safetensors(&w, t, &meta)?,
            None => link_or_copy(base_weights, &w)?,
        }
        Ok(w)
    };
    written.push(part(
        "unet",
        "diffusion_pytorch_model.safetensors",
        &base.unet_config,
        unet,
        &base.unet_weights,
    )?);
    written.push(part(
        "text_encoder",
        "model.safetensors",
        &base.text_config,
        text,
        &base.text_weights,
    )?);
    part(
        "vae",
        "diffusion_pytorch_model.safetensors",
        &base.vae_config,
        None,
        &base.vae_weights,
    )?;
    link_or_copy(
        &base.scheduler_config,
        &dest.join("scheduler").join("scheduler_config.json"),
    )?;
    match &base.tokenizer {
        Some(t) => link_folder_of(t, &dest.join("tokenizer"))?,
        None => crate::files::atomic_write(
            &dest.join("tokenizer").join("tokenizer.json"),
            crate::pipeline::BUNDLED_TOKENIZER,
        )?,
    }
    let index = base
        .unet_config
        .parent()
        .and_then(|u| u.parent())
        .map(|root| root.join("model_index.json"))
        .filter(|p| p.is_file());
    match index {
        Some(p) => link_or_copy(&p, &dest.join("model_index.json"))?,
        None => crate::files::atomic_write(&dest.join("model_index.json"), MODEL_INDEX.as_bytes())?,
    }
    Ok(written)
}
