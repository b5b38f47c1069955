//! Custom Diffusion's files, exactly as diffusers' `train_custom_diffusion.py` writes them
//! (`unet.save_attn_procs` and the modifier token's embedding): a
//! `pytorch_custom_diffusion_weights.safetensors` keyed
//! `<block>.attn2.processor.to_k_custom_diffusion.weight` / `...to_v_custom_diffusion.weight`
//! (`<block>` = `down_blocks.0.attentions.0.transformer_blocks.0`, ...), and
//! `<new1>.safetensors` holding `{"<new1>": [1, D]}` (textual-inversion layout). Only the file
//! layout lives here; the trainer and the sampler map the keys to the UNet's layers.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// The weights file's name in a Custom Diffusion folder.
pub const WEIGHTS_FILE: &str = "pytorch_custom_diffusion_weights.safetensors";

/// True for a cross-attention key or value projection's module path (`...attn2.to_k`,
/// `...attn2.to_v`): the layers Custom Diffusion trains and its file holds.
pub fn is_kv_module(path: &str) -> bool {
    path.ends_with("attn2.to_k") || path.ends_with("attn2.to_v")
}

/// diffusers' key of the custom K or V weight of a cross-attention projection given by its
/// module path (`down_blocks.0...transformer_blocks.0.attn2.to_k` ->
/// `down_blocks.0...transformer_blocks.0.attn2.processor.to_k_custom_diffusion.weight`).
pub fn file_key(module: &str) -> Result<String> {
    let (block, proj) = match module.rsplit_once('.') {
        Some(parts) if is_kv_module(module) => parts,
        _ => bail!("{module} is not a cross-attention key or value projection"),
    };
    Ok(format!("{block}.processor.{proj}_custom_diffusion.weight"))
}

/// The module path of a file key (the inverse of [`file_key`]); `None` for other keys.
pub fn module_of(key: &str) -> Option<String> {
    let rest = key.strip_suffix("_custom_diffusion.weight")?;
    let (block, proj) = rest.rsplit_once(".processor.")?;
    matches!(proj, "to_k" | "to_v").then(|| format!("{block}.{proj}"))
}

/// Write the K/V weights (`module path -> [out, in]`) in diffusers' layout.
pub fn save_weights(path: &Path, kv: &BTreeMap<String, Tensor>) -> Result<()> {
    let tensors = kv
        .iter()
        .map(|(m, t)| Ok((file_key(m)?, t.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<Vec<_>>>()?;
    crate::files::save_safetensors(path, &tensors, &crate::files::pt_format())
}

/// Write the modifier token's row `[1, D]` as `{token: row}`.
pub fn save_token(path: &Path, token: &str, row: &Tensor) -> Result<()> {
    crate::files::save_safetensors(
        path,
        &[(token.to_string(), row.to_dtype(candle_core::DType::F32)?)],
        &crate::files::pt_format(),
    )
}

/// A Custom Diffusion folder: the K/V weights by module path, and the modifier tokens with
/// their rows (one per `<token>.safetensors` file beside the weights).
pub struct CustomDiffusion {
    pub kv: BTreeMap<String, Tensor>,
    pub tokens: Vec<(String, Tensor)>,
}

/// Read a Custom Diffusion folder written by diffusers or attractor (`suffix` = `""`, or
/// `-steps-N` for attractor's intermediate saves): `pytorch_custom_diffusion_weights{suffix}
/// .safetensors` and every other `*{suffix}.safetensors` as a token file.
pub fn read_folder(dir: &Path, suffix: &str, device: &Device) -> Result<CustomDiffusion> {
    let wname = WEIGHTS_FILE.replace(".safetensors", &format!("{suffix}.safetensors"));
    let wpath = dir.join(&wname);
    if !wpath.is_file() {
        bail!(
            "{} is missing: a Custom Diffusion folder holds {WEIGHTS_FILE} (diffusers' save_attn_procs) and a <token>.safetensors",
            wpath.display()
        );
    }
    let raw = candle_core::safetensors::load(&wpath, device)
        .with_context(|| format!("cannot read {}", wpath.display()))?;
    let mut kv = BTreeMap::new();
    for (k, t) in raw {
        let Some(m) = module_of(&k) else {
            bail!(
                "{}: key {k} is not a Custom Diffusion K/V weight (expected `<block>.attn2.processor.to_k_custom_diffusion.weight`)",
                wpath.display()
            );
        };
        kv.insert(m, t.to_dtype(candle_core::DType::F32)?);
    }
    let mut tokens = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for p in entries {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        if name.starts_with("pytorch_custom_diffusion_weights")
            || !name.ends_with(&format!("{suffix}.safetensors"))
        {
            continue;
        }
        // Skip other steps' token files (`<new1>-steps-N.safetensors`) of the final folder.
        if suffix.is_empty() && name.contains("-steps-") {
            continue;
        }
        let t = candle_core::safetensors::load(&p, device)
            .with_context(|| format!("cannot read {}", p.display()))?;
        for (k, v) in t {
            let row = if v.rank() == 1 { v.unsqueeze(0)? } else { v };
            tokens.push((k, row.to_dtype(candle_core::DType::F32)?));
        }
    }
    if tokens.is_empty() {
        bail!(
            "{} has no modifier-token file (<new1>.safetensors beside {wname})",
            dir.display()
        );
    }
    Ok(CustomDiffusion { kv, tokens })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let m = "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v";
        let k = file_key(m).unwrap();
        assert_eq!(
            k,
            "down_blocks.0.attentions.1.transformer_blocks.0.attn2.processor.to_v_custom_diffusion.weight"
        );
        assert_eq!(module_of(&k).unwrap(), m);
        assert!(file_key("down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v").is_err());
        assert!(module_of("unet.conv_in.weight").is_none());
    }
}
