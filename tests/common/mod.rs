//! Shared test helpers: the bundled fixtures and the golden tensors' tolerance check.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden.safetensors"), &Device::Cpu)
        .expect("golden.safetensors")
}

pub fn golden_json() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("golden.json")).unwrap()).unwrap()
}

pub fn vb(rel: &str) -> VarBuilder<'static> {
    let p = fixtures().join(rel);
    unsafe { VarBuilder::from_mmaped_safetensors(&[p], DType::F32, &Device::Cpu).unwrap() }
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// `max|ours - ref| <= atol + rtol * max|ref|` (fixtures README). Returns the max error.
pub fn assert_close(name: &str, ours: &Tensor, reference: &Tensor, rtol: f32, atol: f32) -> f32 {
    let ours = ours.to_dtype(DType::F32).unwrap();
    let reference = reference.to_dtype(DType::F32).unwrap();
    assert_eq!(ours.dims(), reference.dims(), "{name}: shape");
    let err = max_abs(&(&ours - &reference).unwrap());
    let scale = max_abs(&reference);
    let tol = atol + rtol * scale;
    eprintln!("{name}: max err {err:.3e} (tol {tol:.3e}, max|ref| {scale:.3e})");
    assert!(
        err.is_finite() && err <= tol,
        "{name}: max err {err} > tol {tol}"
    );
    err
}

pub const FWD_RTOL: f32 = 1e-4;
pub const GRAD_RTOL: f32 = 1e-3;
