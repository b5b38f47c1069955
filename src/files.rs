//! Writing files so that a crash never leaves a half-written one: every writer in the crate goes
//! through [`atomic_write`] (write a temporary file beside the target, fsync, rename).

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Write `bytes` to `path` atomically: readers see the old file or the new one, never a torn one.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = write_temp(path, bytes)?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Write `bytes` to `path` atomically unless `path` exists, which is then left as it is, even
/// when another process creates it meanwhile (the temporary file is hard-linked into place,
/// which fails on an existing name, where a rename would replace it). Returns whether this
/// call wrote the file. On a file system without hard links, falls back to check-then-rename.
pub fn atomic_write_new(path: &Path, bytes: &[u8]) -> Result<bool> {
    if path.exists() {
        return Ok(false);
    }
    let tmp = write_temp(path, bytes)?;
    let linked = std::fs::hard_link(&tmp, path);
    let written = match linked {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
        Err(_) if !path.exists() => {
            return std::fs::rename(&tmp, path)
                .map(|()| true)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()));
        }
        Err(_) => false,
    };
    std::fs::remove_file(&tmp).ok();
    Ok(written)
}

/// The complete, fsynced temporary file beside `path` that [`atomic_write`] moves into place.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf> {
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
    Ok(tmp)
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
    atomic_write(path, &png_bytes(img, path)?)
}

/// [`save_png`] unless `path` exists (see [`atomic_write_new`]); returns whether it wrote.
pub fn save_png_new<P>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>, path: &Path) -> Result<bool>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    atomic_write_new(path, &png_bytes(img, path)?)
}

fn png_bytes<P>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>, path: &Path) -> Result<Vec<u8>>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
{
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, image::ImageFormat::Png)
        .with_context(|| format!("cannot encode {}", path.display()))?;
    Ok(buf.into_inner())
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
