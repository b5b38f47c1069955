//! Image and mask decoding (src/data/image.rs): EXIF orientation, colour types, CMYK JPEGs, bad
//! files, the training tensor, and the mask resize against the golden `mask.image -> mask.latent`.

mod common;
use common::{exif_orientation, max_abs};

use attractor::data::image::{
    check_mask_dims, hflip, load_mask, load_mask_for, load_rgb, mask_to_latent, to_tensor,
};
use attractor::data::DataError;
use candle_core::{Device, Tensor};
use image::{ImageBuffer, ImageEncoder, Luma, LumaA, Rgb, RgbImage, Rgba};
use std::path::{Path, PathBuf};

fn golden() -> std::collections::HashMap<String, Tensor> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden.safetensors");
    candle_core::safetensors::load(p, &Device::Cpu).unwrap()
}

#[test]
fn mask_latent_matches_golden_nearest_resize() {
    let g = golden();
    let img = &g["mask.image"]; // [1, 1, 128, 128]
    let want = &g["mask.latent"]; // [1, 1, 16, 16]
    let got = mask_to_latent(img, 16).unwrap();
    assert_eq!(got.dims(), want.dims());
    assert_eq!(max_abs(&(&got - want).unwrap()), 0.0);

    // The same mask through a PNG file and load_mask (binarised at 0.5) gives the same tensor.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    let v = img.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let grey: Vec<u8> = v.iter().map(|x| (x * 255.0).round() as u8).collect();
    image::GrayImage::from_raw(128, 128, grey)
        .unwrap()
        .save(&path)
        .unwrap();
    let loaded = load_mask(&path, 128).unwrap();
    assert_eq!(loaded.dims(), &[1, 128, 128]);
    assert_eq!(max_abs(&(&loaded - img.squeeze(0).unwrap()).unwrap()), 0.0);
    let lat = mask_to_latent(&loaded, 16).unwrap();
    assert_eq!(max_abs(&(&lat - want.squeeze(0).unwrap()).unwrap()), 0.0);
}

/// `vae.image` is dog/train/00.jpg as the reference preprocessed it (PIL bicubic resize to
/// 128 x 128, no crop, [-1, 1]): our decode + Catmull-Rom resize must agree within the pixel
/// tolerance of tests/fixtures/README.md (mean absolute difference < 0.02; measured 0.0015).
#[test]
fn training_tensor_matches_golden_vae_image() {
    let g = golden();
    let want = g["vae.image"].squeeze(0).unwrap(); // [3, 128, 128]
    let img = load_rgb(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("data/dreambooth-split/dog/train/00.jpg"),
    )
    .unwrap();
    let got = to_tensor(&img, 128).unwrap();
    assert_eq!(got.dims(), want.dims());
    let mad = (&got - &want)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mad < 0.02, "mean abs diff {mad}");
    // A mirrored input is far off: the comparison can fail.
    let flipped = hflip(&got).unwrap();
    let mad_flip = (&flipped - &want)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(mad_flip > 0.05, "{mad_flip}");
}

#[test]
fn mask_is_binarised_at_half_and_flips_with_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.png");
    // Left column 127 (below 0.5), right column 128 (above).
    let m = ImageBuffer::from_fn(2, 2, |x, _| Luma([if x == 0 { 127u8 } else { 128 }]));
    m.save(&path).unwrap();
    let t = load_mask(&path, 2).unwrap();
    assert_eq!(
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0., 1., 0., 1.]
    );
    let f = hflip(&t).unwrap();
    assert_eq!(
        f.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![1., 0., 1., 0.]
    );
}

#[test]
fn mask_of_wrong_size_names_file_and_fix() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dog/masks/02.png");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    image::GrayImage::new(8, 8).save(&path).unwrap();
    let err = load_mask_for(&path, (6, 8), 4).unwrap_err();
    assert!(matches!(err, DataError::BadMask { .. }));
    let msg = err.to_string();
    assert!(
        msg.contains("02.png") && msg.contains("8x8") && msg.contains("6x8"),
        "{msg}"
    );
    assert!(
        msg.contains("attractor masks --subject dog --force"),
        "{msg}"
    );
    assert!(check_mask_dims(&path, (6, 8), (6, 8)).is_ok());
    assert!(load_mask_for(&path, (8, 8), 4).is_ok());
}

/// An image whose left half is red and right half blue (blocks survive JPEG).
fn red_blue(w: u32, h: u32) -> RgbImage {
    ImageBuffer::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgb([230, 20, 20])
        } else {
            Rgb([20, 20, 230])
        }
    })
}

fn close(a: [u8; 3], b: [u8; 3], tol: i32) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (*x as i32 - y as i32).abs() <= tol)
}

#[test]
fn exif_orientation_is_applied() {
    let dir = tempfile::tempdir().unwrap();
    let img = red_blue(32, 16);
    // 6 = "rotate 90 clockwise to display": stored 32x16, shown 16x32 with red on top.
    for (value, dims, top_left) in [
        (1u16, (32, 16), [230, 20, 20]),
        (6, (16, 32), [230, 20, 20]),
        (8, (16, 32), [20, 20, 230]),
        (2, (32, 16), [20, 20, 230]),
    ] {
        let path = dir.path().join(format!("o{value}.jpg"));
        let mut bytes = Vec::new();
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95);
        enc.set_exif_metadata(exif_orientation(value)).unwrap();
        enc.write_image(img.as_raw(), 32, 16, image::ExtendedColorType::Rgb8)
            .unwrap();
        std::fs::write(&path, bytes).unwrap();
        let got = load_rgb(&path).unwrap();
        assert_eq!(got.dimensions(), dims, "orientation {value}");
        assert!(
            close(got.get_pixel(2, 2).0, top_left, 12),
            "orientation {value}: {:?}",
            got.get_pixel(2, 2)
        );
    }
}

#[test]
fn every_colour_type_becomes_rgb8() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let grey = ImageBuffer::from_fn(4, 4, |_, _| Luma([100u8]));
    grey.save(d.join("grey.png")).unwrap();
    let grey_alpha = ImageBuffer::from_fn(4, 4, |_, _| LumaA([100u8, 7]));
    grey_alpha.save(d.join("ga.png")).unwrap();
    let rgba = ImageBuffer::from_fn(4, 4, |_, _| Rgba([10u8, 20, 30, 0]));
    rgba.save(d.join("rgba.png")).unwrap();
    let rgb16 = ImageBuffer::from_fn(4, 4, |_, _| Rgb([65535u16, 32896, 0]));
    rgb16.save(d.join("rgb16.png")).unwrap();
    let grey16 = ImageBuffer::from_fn(4, 4, |_, _| Luma([25700u16]));
    grey16.save(d.join("grey16.png")).unwrap();
    grey.save(d.join("grey.jpg")).unwrap();
    for (name, want) in [
        ("grey.png", [100, 100, 100]),
        ("ga.png", [100, 100, 100]),
        ("rgba.png", [10, 20, 30]), // alpha dropped, as PIL convert("RGB")
        ("rgb16.png", [255, 128, 0]),
        ("grey16.png", [100, 100, 100]),
        ("grey.jpg", [100, 100, 100]),
    ] {
        let got = load_rgb(&d.join(name)).unwrap();
        assert_eq!(got.dimensions(), (4, 4));
        assert!(
            close(got.get_pixel(1, 1).0, want, 1),
            "{name}: {:?}",
            got.get_pixel(1, 1)
        );
    }
}

/// CMYK JPEGs as Photoshop writes them (Adobe APP14, inverted values; jpeg-encoder writes the
/// same) and the YCCK variant: zune-jpeg converts both to RGB.
#[test]
fn cmyk_jpeg_decodes_to_rgb() {
    let dir = tempfile::tempdir().unwrap();
    // Left half C=0 M=255 Y=255 K=0 (red), right half C=255 M=255 Y=0 K=0 (blue).
    let (w, h) = (32u16, 16u16);
    let mut cmyk = Vec::new();
    for _ in 0..h {
        for x in 0..w {
            if x < w / 2 {
                cmyk.extend_from_slice(&[0, 255, 255, 0]);
            } else {
                cmyk.extend_from_slice(&[255, 255, 0, 0]);
            }
        }
    }
    for (name, ct) in [
        ("cmyk.jpg", jpeg_encoder::ColorType::Cmyk),
        ("ycck.jpg", jpeg_encoder::ColorType::CmykAsYcck),
    ] {
        let path = dir.path().join(name);
        jpeg_encoder::Encoder::new_file(&path, 95)
            .unwrap()
            .encode(&cmyk, w, h, ct)
            .unwrap();
        let got = load_rgb(&path).unwrap();
        assert_eq!(got.dimensions(), (32, 16));
        assert!(
            close(got.get_pixel(3, 8).0, [255, 0, 0], 16),
            "{name} left: {:?}",
            got.get_pixel(3, 8)
        );
        assert!(
            close(got.get_pixel(28, 8).0, [0, 0, 255], 16),
            "{name} right: {:?}",
            got.get_pixel(28, 8)
        );
    }
}

fn write_jpeg(path: &Path, img: &RgbImage) {
    img.save(path).unwrap();
}

#[test]
fn bad_and_truncated_images_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.jpg");
    let noise = ImageBuffer::from_fn(64, 64, |x, y| {
        Rgb([(x * 7 + y * 13) as u8, (x * y) as u8, (x ^ y) as u8 * 4])
    });
    write_jpeg(&good, &noise);
    let bytes = std::fs::read(&good).unwrap();
    noise.save(dir.path().join("good.png")).unwrap();
    let png = std::fs::read(dir.path().join("good.png")).unwrap();
    // Complete files decode, including with bytes after the JPEG's end marker.
    assert!(load_rgb(&good).is_ok());
    let mut trailer = bytes.clone();
    trailer.extend_from_slice(b"camera trailer");
    std::fs::write(dir.path().join("trailer.jpg"), &trailer).unwrap();
    assert!(load_rgb(&dir.path().join("trailer.jpg")).is_ok());
    let cases: Vec<(PathBuf, Vec<u8>)> = vec![
        (
            dir.path().join("truncated.jpg"),
            bytes[..bytes.len() / 2].to_vec(),
        ),
        (dir.path().join("header_only.jpg"), bytes[..40].to_vec()),
        (dir.path().join("text.jpg"), b"not an image at all".to_vec()),
        (dir.path().join("empty.png"), Vec::new()),
        (
            dir.path().join("truncated.png"),
            png[..png.len() * 2 / 3].to_vec(),
        ),
        (
            dir.path().join("no_eoi.jpg"),
            bytes[..bytes.len() - 2].to_vec(),
        ),
    ];
    for (path, b) in &cases {
        std::fs::write(path, b).unwrap();
        let err = load_rgb(path).expect_err(&format!("{} should not decode", path.display()));
        assert!(matches!(err, DataError::BadImage { .. }), "{err}");
        let msg = err.to_string();
        assert!(
            msg.contains(&*path.file_name().unwrap().to_string_lossy()),
            "{msg}"
        );
        assert!(msg.contains("Fix"), "{msg}");
    }
    let missing = load_rgb(&dir.path().join("missing.jpg")).unwrap_err();
    assert!(missing.to_string().contains("missing.jpg"));
}

/// Progressive JPEGs have many scans with tables between them: the truncation check must walk
/// all of them, accept the complete file and reject a cut one.
#[test]
fn progressive_jpeg_complete_and_truncated() {
    let dir = tempfile::tempdir().unwrap();
    let img = ImageBuffer::from_fn(48, 40, |x, y| {
        Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 2) as u8])
    });
    let path = dir.path().join("progressive.jpg");
    let mut enc = jpeg_encoder::Encoder::new_file(&path, 90).unwrap();
    enc.set_progressive(true);
    enc.encode(img.as_raw(), 48, 40, jpeg_encoder::ColorType::Rgb)
        .unwrap();
    let got = load_rgb(&path).unwrap();
    assert_eq!(got.dimensions(), (48, 40));
    assert!(close(got.get_pixel(20, 20).0, img.get_pixel(20, 20).0, 12));
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.path().join("cut.jpg");
    std::fs::write(&cut, &bytes[..bytes.len() * 4 / 5]).unwrap();
    let err = load_rgb(&cut).unwrap_err().to_string();
    assert!(
        err.contains("cut.jpg") && err.contains("truncated"),
        "{err}"
    );
}

#[test]
fn training_tensor_is_bicubic_resized_chw_in_unit_range() {
    let img = red_blue(40, 20);
    let t = to_tensor(&img, 16).unwrap();
    assert_eq!(t.dims(), &[3, 16, 16]);
    let v = t.to_vec3::<f32>().unwrap();
    // Left quarter is red, right quarter blue: no crop, the whole width is kept.
    assert!((v[0][8][1] - (230.0 / 127.5 - 1.0)).abs() < 0.02);
    assert!((v[2][8][14] - (230.0 / 127.5 - 1.0)).abs() < 0.02);
    let min = t
        .flatten_all()
        .unwrap()
        .min(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let max = t
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(min >= -1.0 && max <= 1.0);
}
