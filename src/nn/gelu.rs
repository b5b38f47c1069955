//! CLIP's quick GELU, `x * sigmoid(1.702 x)`, and SD's GEGLU, `a * gelu(gate)`, as ops with their
//! own backward on the CPU.
//!
//! Composed from candle ops it costs three passes over its input forward (scale, sigmoid,
//! product) and about ten backward (the product's two gradients, the sigmoid's, the scale's, the
//! sums), each into a freshly allocated buffer: for a NeTI step (48 prompts x 77 tokens x 3072
//! MLP features, 12 layers) those buffers are 45 MB each. Fused, the forward is one pass and the
//! backward one pass that recomputes the sigmoid from the input it keeps. Other dtypes and devices
//! keep the composition.
//!
//! The exponentials (the sigmoid's, and the `exp(-x^2 / 2)` from which GEGLU's erf and normal
//! density are made) go through the vector `exp` of [`super::softmax`], and the rest is plain
//! arithmetic over slices that the compiler vectorizes; libm's scalar `erff` and `expf` per element
//! took ten times as long for GEGLU's forward.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// GEGLU of `h = [a, gate]` split in halves along its last dimension: `a * gelu(gate)` with the
/// exact (erf) GELU, as diffusers' `GEGLU`. Composed from candle ops the forward keeps the GELU
/// output as well as `h` and the product, and the erf GELU's backward takes about ten passes over
/// its input; fused, the op keeps `h` alone and the backward is one pass that recomputes the GELU.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(candle_core::D::Minus1)? / 2;
    if super::is_cpu_f32(h) {
        h.contiguous()?.apply_op1(Geglu)
    } else {
        let a = h.narrow(candle_core::D::Minus1, 0, half)?;
        a * h.narrow(candle_core::D::Minus1, half, half)?.gelu_erf()?
    }
}

/// The sigmoid's slope in CLIP's approximation.
const K: f32 = 1.702;

/// `x * sigmoid(1.702 x)`, differentiable.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if super::is_cpu_f32(x) {
        x.contiguous()?.apply_op1(QuickGelu)
    } else {
        x * candle_nn::ops::sigmoid(&(x * K as f64)?)?
    }
}

/// The input gradient of [`quick_gelu`] at `x` given the output gradient `g`:
/// `g * (s + k x s (1 - s))` with `s = sigmoid(k x)`, for a caller that fuses it into a larger
/// graph node.
pub fn quick_gelu_grad(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    let (x, g) = (x.detach().contiguous()?, g.contiguous()?);
    if super::is_cpu_f32(&x) && super::is_cpu_f32(&g) {
        return x.apply_op2_no_bwd(&g, &QuickGeluGrad);
    }
    let s = candle_nn::ops::sigmoid(&(&x * K as f64)?)?;
    let ds = ((&x * K as f64)? * (&s * s.affine(-1.0, 1.0)?)?)?;
    g * (s + ds)?
}

/// Contiguous f32 data of a CPU tensor.
fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let s = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("quick_gelu: {what} has to be contiguous"),
    }
}

/// Elements per task of the pool loops below: small enough that a task's buffers stay in the
/// core's cache between its passes.
const CHUNK: usize = 1 << 12;

/// Fills `len` outputs in rows of `width` (the last one shorter where `width` does not divide
/// `len`) over candle's CPU thread pool, a few rows per task: `f(r, out)` writes row `r`.
fn par_rows(len: usize, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    let mut dst = vec![0f32; len];
    let width = width.max(1);
    let rows = len.div_ceil(width);
    let out = super::Shared(dst.as_mut_ptr());
    let per_task = (CHUNK / width).max(1);
    candle_core::utils::barrier_pool().execute_chunked(rows.div_ceil(per_task), |range| {
        #[allow(clippy::redundant_locals)]
        let out = out;
        for c in range {
            for r in c * per_task..((c + 1) * per_task).min(rows) {
                let n = width.min(len - r * width);
                // SAFETY: row r is written by this worker only; dst outlives the pool call.
                let row = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * width), n) };
                f(r, row);
            }
        }
    });
    dst
}

/// `1 - erf(|z|)` from `e = exp(-z^2)` (Abramowitz & Stegun 7.1.26: absolute error below
/// 1.5e-7, about one f32 step of `erf` near 1). It is a product with `e` rather than a
/// difference from 1, so the tail keeps its relative precision; and it is plain arithmetic, so
/// the loops that call it run on vectors, with `e` from the vector `exp` of
/// [`super::softmax::exp_in_place`].
#[inline(always)]
fn erfc_abs(z: f32, e: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.327_591_1 * z.abs());
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152 + t * 1.061_405_4))));
    poly * e
}

/// `Phi(x)`, the standard normal CDF, from `e = exp(-x^2 / 2)`.
#[inline(always)]
fn normal_cdf(x: f32, e: f32) -> f32 {
    let half_tail = 0.5 * erfc_abs(x * std::f32::consts::FRAC_1_SQRT_2, e);
    if x >= 0.0 {
        1.0 - half_tail
    } else {
        half_tail
    }
}

/// `1 / sqrt(2 pi)`: `phi(x) = e^(-x^2 / 2) / sqrt(2 pi)`.
const INV_SQRT_2PI: f32 = 0.398_942_3;

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = slice(storage, layout, "input")?;
        let mut dims = layout.dims().to_vec();
        let Some(last) = dims.last_mut() else {
            candle_core::bail!("geglu: a scalar input")
        };
        if *last % 2 != 0 {
            candle_core::bail!("geglu: last dimension {} is odd", *last);
        }
        let half = *last / 2;
        *last = half;
        let rows = h.len() / (2 * half).max(1);
        let y = par_rows(rows * half, half, |r, y| {
            let (a, gate) = h[r * 2 * half..(r + 1) * 2 * half].split_at(half);
            // y = exp(-gate^2 / 2) first, then a * gate * Phi(gate) in place.
            for (e, &x) in y.iter_mut().zip(gate) {
                *e = -0.5 * x * x;
            }
            super::softmax::exp_in_place(y);
            for ((e, &x), &a) in y.iter_mut().zip(gate).zip(a) {
                *e = a * x * normal_cdf(x, *e);
            }
        });
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    /// `d a = g gelu(gate)`, `d gate = g a gelu'(gate)`.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &GegluGrad)?))
    }
}

/// The backward of [`Geglu`]: `(h, g) -> dh`, with `gelu(x) = x Phi(x)` and
/// `gelu'(x) = Phi(x) + x phi(x)`.
struct GegluGrad;

impl CustomOp2 for GegluGrad {
    fn name(&self) -> &'static str {
        "geglu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let h = slice(s1, l1, "input")?;
        let g = slice(s2, l2, "gradient")?;
        let half = l2.dims().last().copied().unwrap_or(0);
        if 2 * g.len() != h.len() || l1.dims().last() != Some(&(2 * half)) {
            candle_core::bail!(
                "geglu backward: input {:?} and gradient {:?} do not match",
                l1.dims(),
                l2.dims()
            );
        }
        let rows = g.len() / half.max(1);
        let dh = par_rows(rows * 2 * half, 2 * half, |r, out| {
            let (a, gate) = h[r * 2 * half..(r + 1) * 2 * half].split_at(half);
            let gr = &g[r * half..(r + 1) * half];
            let (da, dgate) = out.split_at_mut(half);
            // dgate = exp(-gate^2 / 2) first; both halves are then filled from it.
            for (e, &x) in dgate.iter_mut().zip(gate) {
                *e = -0.5 * x * x;
            }
            super::softmax::exp_in_place(dgate);
            for (((da, dg), &x), (&a, &gv)) in da
                .iter_mut()
                .zip(dgate.iter_mut())
                .zip(gate)
                .zip(a.iter().zip(gr))
            {
                let e = *dg;
                let cdf = normal_cdf(x, e);
                *da = gv * x * cdf;
                *dg = gv * a * (cdf + x * e * INV_SQRT_2PI);
            }
        });
        Ok((CpuStorage::F32(dh), l1.shape().clone()))
    }
}

/// `exp(-K x)` of each `x` into `dst` (same length), by the vector `exp`.
fn exp_neg_kx(x: &[f32], dst: &mut [f32]) {
    for (d, &v) in dst.iter_mut().zip(x) {
        *d = -K * v;
    }
    super::softmax::exp_in_place(dst);
}

struct QuickGelu;

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "quick-gelu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(storage, layout, "input")?;
        let y = par_rows(x.len(), CHUNK, |c, y| {
            let xs = &x[c * CHUNK..][..y.len()];
            exp_neg_kx(xs, y);
            for (y, &v) in y.iter_mut().zip(xs) {
                *y = v / (1.0 + *y);
            }
        });
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    /// `d/dx [x s(kx)] = s + k x s (1 - s)`, times the incoming gradient.
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op2_no_bwd(&g, &QuickGeluGrad)?))
    }
}

/// The backward of [`QuickGelu`]: `(x, g) -> g * (s + k x s (1 - s))`.
struct QuickGeluGrad;

impl CustomOp2 for QuickGeluGrad {
    fn name(&self) -> &'static str {
        "quick-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(s1, l1, "input")?;
        let g = slice(s2, l2, "gradient")?;
        if x.len() != g.len() {
            candle_core::bail!(
                "quick_gelu backward: {} inputs but {} gradients",
                x.len(),
                g.len()
            );
        }
        let dx = par_rows(x.len(), CHUNK, |c, d| {
            let (xs, gs) = (&x[c * CHUNK..][..d.len()], &g[c * CHUNK..][..d.len()]);
            exp_neg_kx(xs, d);
            for ((d, &v), &gv) in d.iter_mut().zip(xs).zip(gs) {
                let s = 1.0 / (1.0 + *d);
                *d = gv * (s + K * v * s * (1.0 - s));
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// The fused GEGLU against candle's composition (narrow, erf GELU, product) in f64: values
    /// and gradients over several chunks of rows, from a non-contiguous input; and a point by
    /// hand.
    #[test]
    fn geglu_matches_the_composition_in_values_and_gradients() {
        let h64 = super::super::testing::randn(&[3, 700, 96], 7)
            .affine(2.5, 0.0)
            .unwrap();
        let w64 = super::super::testing::randn(&[3, 700, 48], 8);
        let composed = |h: &Tensor| {
            let a = h.narrow(2, 0, 48).unwrap();
            (a * h.narrow(2, 48, 48).unwrap().gelu_erf().unwrap()).unwrap()
        };
        let v64 = Var::from_tensor(&h64).unwrap();
        let y_ref = composed(v64.as_tensor());
        let g_ref = (&y_ref * &w64)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_ref = g_ref.get(v64.as_tensor()).unwrap();
        // The input arrives transposed in memory, as a strided view.
        let h32 = h64.to_dtype(DType::F32).unwrap();
        let v = Var::from_tensor(&h32.transpose(1, 2).unwrap().contiguous().unwrap()).unwrap();
        let y = geglu(&v.as_tensor().transpose(1, 2).unwrap()).unwrap();
        assert_eq!(y.dims(), &[3, 700, 48]);
        let loss = (&y * &w64.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().transpose(1, 2).unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            super::super::testing::max_diff(&a.to_dtype(DType::F64).unwrap(), b)
        };
        assert!(diff(&y, &y_ref) < 1e-5, "values {}", diff(&y, &y_ref));
        assert!(diff(&g, g_ref) < 1e-5, "gradients {}", diff(&g, g_ref));
        // By hand: a = 2, gate = 1: gelu(1) = Phi(1) = 0.841345, y = 1.682690;
        // d a = gelu(1) = 0.841345, d gate = a (Phi(1) + phi(1)) = 2 (0.841345 + 0.241971).
        let hv = Var::new(&[[2f32, 1.0]], &Device::Cpu).unwrap();
        let y1 = geglu(hv.as_tensor()).unwrap();
        let g1 = y1.sum_all().unwrap().backward().unwrap();
        let y1 = y1.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let d1 = g1
            .get(hv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((y1[0] - 1.68269).abs() < 1e-5, "{y1:?}");
        assert!((d1[0] - 0.841345).abs() < 1e-5, "{d1:?}");
        assert!((d1[1] - 2.166632).abs() < 1e-5, "{d1:?}");
    }

    /// The fused op against the composition in f64: values and input gradients, on a tensor big
    /// enough to span several chunks and with a non-contiguous input.
    #[test]
    fn matches_the_composition_in_values_and_gradients() {
        let x64 = super::super::testing::randn(&[3, 70_000], 5)
            .affine(4.0, 0.0)
            .unwrap();
        let w64 = super::super::testing::randn(&[3, 70_000], 6);
        let reference = |x: &Tensor| -> (Tensor, Tensor) {
            let v = Var::from_tensor(x).unwrap();
            let y = quick_gelu(v.as_tensor()).unwrap();
            let g = (&y * &w64).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g.get(v.as_tensor()).unwrap().clone())
        };
        let (y_ref, g_ref) = reference(&x64);
        let x32 = x64.to_dtype(DType::F32).unwrap();
        let v = Var::from_tensor(&x32.t().unwrap().contiguous().unwrap()).unwrap();
        let y = quick_gelu(&v.as_tensor().t().unwrap()).unwrap();
        let loss = (&y * &w64.to_dtype(DType::F32).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(v.as_tensor()).unwrap().t().unwrap();
        let diff = |a: &Tensor, b: &Tensor| {
            super::super::testing::max_diff(&a.to_dtype(DType::F64).unwrap(), b)
        };
        assert!(diff(&y, &y_ref) < 1e-5, "values {}", diff(&y, &y_ref));
        assert!(diff(&g, &g_ref) < 1e-5, "gradients {}", diff(&g, &g_ref));
        // A hand-checked point: x = 1 gives sigmoid(1.702) = 0.845796, y = 0.845796,
        // dy/dx = 0.845796 + 1.702 * 0.845796 * 0.154204 = 1.067780.
        let one = Var::new(&[1f32], &Device::Cpu).unwrap();
        let y1 = quick_gelu(one.as_tensor()).unwrap();
        let g1 = y1.sum_all().unwrap().backward().unwrap();
        let y1 = y1.to_vec1::<f32>().unwrap()[0];
        let d1 = g1.get(one.as_tensor()).unwrap().to_vec1::<f32>().unwrap()[0];
        assert!((y1 - 0.845796).abs() < 1e-5, "{y1}");
        assert!((d1 - 1.06778).abs() < 1e-5, "{d1}");
    }
}
