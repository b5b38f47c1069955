//! Writing files so that a crash never leaves a half-written one: every writer in the crate goes
//! through [`atomic_write`] (write a temporary file beside the target, fsync, rename).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: readers see the old file or the new one, never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "out".into());
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.sync_all().ok();
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// The `{"format": "pt"}` metadata that diffusers, A1111 and kohya write into the
/// safetensors files users share (loaders read it as "PyTorch tensors").
pub fn pt_format() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Save named tensors as safetensors with string metadata, atomically.
pub fn save_safetensors(
    path: &Path,
    tensors: &[(String, candle_core::Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(String, candle_core::Tensor)> = tensors
        .iter()
        .map(|(k, t)| {
            Ok((
                k.clone(),
                t.to_device(&candle_core::Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<Result<_>>()?;
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::tensor::serialize(views.iter().map(|(k, t)| (k.as_str(), t)), meta)
        .with_context(|| format!("cannot serialize tensors for {}", path.display()))?;
    atomic_write(path, &canonical_header(&bytes)?)
}

/// safetensors writes its metadata from a HashMap, in a different order each run. Rewrite the
/// JSON header with sorted keys (serde_json's map is ordered), padded with spaces to 8 bytes as
/// the format asks, so the same tensors give the same bytes.
fn canonical_header(bytes: &[u8]) -> Result<Vec<u8>> {
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| anyhow::anyhow!("safetensors buffer too short"))?,
    ) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n])?;
    let mut h = serde_json::to_vec(&header)?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Read the string metadata of a safetensors file.
pub fn read_safetensors_metadata(path: &Path) -> Result<HashMap<String, String>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Append one line to a file and flush it (results logs: a killed run loses at most the line
/// being written, and a torn last line is skipped by readers).
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    if let Some(d) = path.parent() {
        if !d.as_os_str().is_empty() {
            std::fs::create_dir_all(d)?;
        }
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {} for appending", path.display()))?;
    f.write_all(format!("{line}\n").as_bytes())
        .with_context(|| format!("cannot append to {}", path.display()))?;
    f.sync_data().ok();
    Ok(())
}

/// Save an 8-bit image (RGB samples, grey masks) as PNG, atomically (same image, same bytes).
pub fn save_png<P>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>, path: &Path) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    atomic_write(path, &buf.into_inner())
}

/// A stable 64-bit FNV-1a hash of a byte string (content fingerprints in results).
pub fn fnv64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}
