//! Image and mask decoding into tensors, shared by training, evaluation and the dataset checks.
//!
//! - [`load_rgb`]: any JPEG/PNG/WebP/BMP/TIFF to 8-bit RGB, EXIF orientation applied (as PIL's
//!   `ImageOps.exif_transpose` + `convert("RGB")`: alpha is dropped, grey is replicated, 16-bit is
//!   scaled to 8-bit, CMYK JPEGs are converted to RGB by zune-jpeg).
//! - [`to_tensor`]: the training preprocessing of SPEC.md §3 (original Textual Inversion): resize to
//!   `size x size` with a bicubic (Catmull-Rom, PIL's `BICUBIC`) filter, no centre crop, values in
//!   [-1, 1], layout `[3, H, W]`.
//! - [`load_mask`] / [`mask_to_latent`]: subject masks (white = subject) binarised at 0.5, and their
//!   nearest-neighbour resize to the latent grid with PyTorch `F.interpolate(mode="nearest")`
//!   index semantics (`src = floor(dst * in / out)`), as the reference computes `mask.latent`.
//! - [`hflip_image`] / [`hflip`]: the horizontal flip augmentation, applied to image and mask alike.
//!
//! Tensors are created on the CPU; callers move them to their device.

use super::{io_err, DataError, Result};
use candle_core::{DType, Device, Tensor};
use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};
use std::path::Path;

/// Decode any supported image file with its EXIF orientation applied.
pub fn load_dynamic(path: &Path) -> Result<DynamicImage> {
    let bad = |e: image::ImageError| DataError::BadImage {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    // zune-jpeg fills the missing part of a truncated JPEG with grey instead of failing, so a
    // half-copied photo would train silently: check the marker structure first.
    if let Some(reason) = jpeg_truncation(&bytes) {
        return Err(DataError::BadImage {
            path: path.to_path_buf(),
            reason,
        });
    }
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(io_err(path))?;
    let mut decoder = reader.into_decoder().map_err(bad)?;
    // A broken EXIF block must not make a good photo unusable: fall back to "as stored".
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut img = DynamicImage::from_decoder(decoder).map_err(bad)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// For a JPEG (starts with SOI), why it is incomplete: the segment structure is walked from SOI
/// through every scan's entropy-coded data to the EOI marker. `None` for complete JPEGs and for
/// other formats (whose decoders report truncation themselves). Bytes after EOI are allowed
/// (some cameras append data there).
pub fn jpeg_truncation(b: &[u8]) -> Option<String> {
    if b.len() < 2 || b[0] != 0xFF || b[1] != 0xD8 {
        return None;
    }
    let truncated = |at: usize| {
        Some(format!(
            "the JPEG ends at byte {} before its end-of-image marker (file truncated, e.g. an interrupted copy or download)",
            at
        ))
    };
    let n = b.len();
    let mut i = 2;
    loop {
        // Find the next marker: 0xFF (possibly repeated as fill) followed by its code.
        while i < n && b[i] != 0xFF {
            i += 1; // tolerate junk between segments, as decoders do
        }
        while i < n && b[i] == 0xFF {
            i += 1;
        }
        if i >= n {
            return truncated(n);
        }
        let marker = b[i];
        i += 1;
        match marker {
            0xD9 => return None,                   // EOI
            0x01 | 0xD0..=0xD7 | 0xD8 => continue, // markers without a length
            _ => {
                if i + 2 > n {
                    return truncated(n);
                }
                let len = u16::from_be_bytes([b[i], b[i + 1]]) as usize;
                i += len;
                if i > n {
                    return truncated(n);
                }
                if marker == 0xDA {
                    // SOS: entropy-coded data runs to the next marker that is neither a stuffed
                    // 0xFF00 nor a restart marker.
                    loop {
                        if i + 1 >= n {
                            return truncated(n);
                        }
                        if b[i] == 0xFF {
                            match b[i + 1] {
                                0x00 | 0xD0..=0xD7 => i += 2,
                                0xFF => i += 1,
                                _ => break,
                            }
                        } else {
                            i += 1;
                        }
                    }
                }
            }
        }
    }
}

/// Decode an image as 8-bit RGB, EXIF orientation applied (grey, grey+alpha, RGBA, 16-bit and
/// CMYK JPEG all end up RGB8; alpha is dropped as PIL's `convert("RGB")` does).
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    Ok(load_dynamic(path)?.to_rgb8())
}

/// Resize to `size x size` (bicubic, no crop) and convert to a `[3, size, size]` f32 tensor in
/// [-1, 1] on the CPU.
pub fn to_tensor(img: &RgbImage, size: u32) -> Result<Tensor> {
    let resized;
    let img = if img.dimensions() == (size, size) {
        img
    } else {
        resized = image::imageops::resize(img, size, size, FilterType::CatmullRom);
        &resized
    };
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let raw = img.as_raw();
    let mut data = vec![0f32; 3 * h * w];
    for (i, px) in raw.chunks_exact(3).enumerate() {
        for c in 0..3 {
            data[c * h * w + i] = px[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(data, (3, h, w), &Device::Cpu)?)
}

/// The inverse of [`to_tensor`] without the resize: a `[3, H, W]` tensor in [-1, 1] to RGB8.
pub fn from_tensor(t: &Tensor) -> Result<RgbImage> {
    let (c, h, w) = t.dims3()?;
    if c != 3 {
        return Err(
            candle_core::Error::Msg(format!("from_tensor: expected 3 channels, got {c}")).into(),
        );
    }
    let v = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let bytes = v
        .iter()
        .map(|x| ((x + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8)
        .collect();
    RgbImage::from_raw(w as u32, h as u32, bytes)
        .ok_or_else(|| candle_core::Error::Msg("from_tensor: bad buffer size".into()).into())
}

/// Mirror an image left-right.
pub fn hflip_image(img: &RgbImage) -> RgbImage {
    image::imageops::flip_horizontal(img)
}

/// Mirror a tensor left-right (its last dimension): image tensors `[3, H, W]`, masks `[1, H, W]`,
/// batches `[B, C, H, W]` alike.
pub fn hflip(t: &Tensor) -> Result<Tensor> {
    let w = t.dim(candle_core::D::Minus1)?;
    let idx: Vec<u32> = (0..w as u32).rev().collect();
    let idx = Tensor::from_vec(idx, w, t.device())?;
    Ok(t.index_select(&idx, t.rank() - 1)?)
}

/// Decode a mask file as 8-bit grey (EXIF orientation applied; RGB masks are converted to luma,
/// alpha is dropped).
pub fn load_mask_image(path: &Path) -> Result<GrayImage> {
    Ok(load_dynamic(path)?.to_luma8())
}

/// A grey mask resized to `size x size` (bilinear, the same geometry as [`to_tensor`]'s resize)
/// and binarised at 0.5: a `[1, size, size]` f32 tensor of 0 (background) and 1 (subject).
pub fn mask_to_tensor(mask: &GrayImage, size: u32) -> Result<Tensor> {
    let resized;
    let m = if mask.dimensions() == (size, size) {
        mask
    } else {
        resized = image::imageops::resize(mask, size, size, FilterType::Triangle);
        &resized
    };
    let data: Vec<f32> = m
        .as_raw()
        .iter()
        .map(|&v| if v as f32 / 255.0 >= 0.5 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(
        data,
        (1, size as usize, size as usize),
        &Device::Cpu,
    )?)
}

/// Load a mask (white = subject) as a `[1, size, size]` tensor of 0/1, see [`mask_to_tensor`].
pub fn load_mask(path: &Path, size: u32) -> Result<Tensor> {
    mask_to_tensor(&load_mask_image(path)?, size)
}

/// Load a mask and require it to have its image's size (`image_dims` = (width, height) of the
/// decoded, orientation-applied image): a mask of another size would be stretched out of place.
pub fn load_mask_for(path: &Path, image_dims: (u32, u32), size: u32) -> Result<Tensor> {
    let m = load_mask_image(path)?;
    check_mask_dims(path, m.dimensions(), image_dims)?;
    mask_to_tensor(&m, size)
}

/// The error for a mask whose size differs from its image's.
pub fn check_mask_dims(path: &Path, mask_dims: (u32, u32), image_dims: (u32, u32)) -> Result<()> {
    if mask_dims == image_dims {
        return Ok(());
    }
    let subject = path
        .parent()
        .and_then(|p| p.parent())
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "<subject>".into());
    Err(DataError::BadMask {
        path: path.to_path_buf(),
        reason: format!(
            "is {}x{}, its image {}x{}",
            mask_dims.0, mask_dims.1, image_dims.0, image_dims.1
        ),
        fix: format!("rerun: attractor masks --subject {subject} --force"),
    })
}

/// PyTorch's `nearest` source index: `min(floor(dst * (in / out)), in - 1)` with the scale in f32,
/// as `aten/src/ATen/native/UpSample.h` `nearest_idx` computes it.
fn nearest_indices(input: usize, output: usize) -> Vec<u32> {
    if input == output {
        return (0..output as u32).collect();
    }
    if output == 2 * input {
        return (0..output as u32).map(|i| i >> 1).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|d| (((d as f32) * scale) as usize).min(input - 1) as u32)
        .collect()
}

/// Nearest-neighbour resize of a mask's last two dimensions to `latent_size x latent_size`
/// (`[1, H, W]`, `[B, 1, H, W]`, any rank >= 2), `F.interpolate(mode="nearest")` semantics.
pub fn mask_to_latent(mask: &Tensor, latent_size: usize) -> Result<Tensor> {
    let rank = mask.rank();
    if rank < 2 {
        return Err(candle_core::Error::Msg(format!(
            "mask_to_latent: expected a mask of rank >= 2, got shape {:?}",
            mask.dims()
        ))
        .into());
    }
    let (h, w) = (mask.dim(rank - 2)?, mask.dim(rank - 1)?);
    let rows = Tensor::from_vec(nearest_indices(h, latent_size), latent_size, mask.device())?;
    let cols = Tensor::from_vec(nearest_indices(w, latent_size), latent_size, mask.device())?;
    Ok(mask
        .index_select(&rows, rank - 2)?
        .index_select(&cols, rank - 1)?)
}

/// Custom Diffusion's random-rescale view of a `size x size` image (diffusers'
/// `train_custom_diffusion.py`, `CustomDiffusionDataset.preprocess`): the image resized
/// (bilinear, as its `Image.BILINEAR`) to `scale x scale`; when `scale <= size` it is pasted at
/// `(top, left)` on a zero (mid-grey in [-1, 1]: 0) canvas and the mask marks the pasted area on
/// the `latent x latent` grid shrunk by one latent pixel on each side; when `scale > size` the
/// `size x size` window at `(top, left)` is cut out and the mask is all ones. Returns the image
/// `[3, size, size]` in [-1, 1] and the mask `[1, 1, latent, latent]`, both on the CPU.
pub fn rescaled_view(
    img: &RgbImage,
    size: u32,
    scale: u32,
    (top, left): (u32, u32),
    latent: usize,
) -> Result<(Tensor, Tensor)> {
    let resized = image::imageops::resize(img, scale, scale, FilterType::Triangle);
    let s = size as usize;
    let mut data = vec![0f32; 3 * s * s];
    let mut mask = vec![0f32; latent * latent];
    let f = (size as usize / latent.max(1)).max(1);
    if scale > size {
        for y in 0..s {
            for x in 0..s {
                let px = resized.get_pixel(left + x as u32, top + y as u32);
                for c in 0..3 {
                    data[c * s * s + y * s + x] = px[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        mask.iter_mut().for_each(|m| *m = 1.0);
    } else {
        let sc = scale as usize;
        let (t, l) = (top as usize, left as usize);
        for y in 0..sc {
            for x in 0..sc {
                let px = resized.get_pixel(x as u32, y as u32);
                for c in 0..3 {
                    data[c * s * s + (t + y) * s + (l + x)] = px[c] as f32 / 127.5 - 1.0;
                }
            }
        }
        // mask[top // f + 1 : (top + scale) // f - 1, left // f + 1 : (left + scale) // f - 1]
        let (r0, r1) = (t / f + 1, ((t + sc) / f).saturating_sub(1).min(latent));
        let (c0, c1) = (l / f + 1, ((l + sc) / f).saturating_sub(1).min(latent));
        for r in r0..r1 {
            for c in c0..c1 {
                mask[r * latent + c] = 1.0;
            }
        }
    }
    Ok((
        Tensor::from_vec(data, (3, s, s), &Device::Cpu)?,
        Tensor::from_vec(mask, (1, 1, latent, latent), &Device::Cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_matches_pytorch_rule() {
        assert_eq!(nearest_indices(8, 4), vec![0, 2, 4, 6]);
        assert_eq!(nearest_indices(4, 8), vec![0, 0, 1, 1, 2, 2, 3, 3]);
        // in=10, out=3: scale 3.333: floor(0), floor(3.33), floor(6.67)
        assert_eq!(nearest_indices(10, 3), vec![0, 3, 6]);
        assert_eq!(nearest_indices(3, 3), vec![0, 1, 2]);
    }

    #[test]
    fn tensor_round_trip_and_flip() -> Result<()> {
        let mut img = RgbImage::new(4, 4);
        img.put_pixel(0, 1, image::Rgb([255, 0, 10]));
        let t = to_tensor(&img, 4)?;
        assert_eq!(t.dims(), &[3, 4, 4]);
        assert_eq!(from_tensor(&t)?, img);
        let f = from_tensor(&hflip(&t)?)?;
        assert_eq!(f, hflip_image(&img));
        assert_eq!(f.get_pixel(3, 1).0, [255, 0, 10]);
        Ok(())
    }
}
