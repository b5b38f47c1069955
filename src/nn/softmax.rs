//! Softmax over the last dimension for the attention forward pass and its recomputation (no
//! graph: the attention op differentiates it by hand).
//!
//! candle's CPU softmax calls the scalar libm `expf` per element; at 512 px SD 1.5's 64 x 64
//! self-attention takes 16.7 M exponentials per head and batch element, a sixth of a sampling
//! step. On x86-64 with AVX2 + FMA this module computes the exponentials eight at a time (Cephes'
//! `expf`: range reduction by `ln 2` in two parts and a degree-5 polynomial, accurate to about one
//! ulp) and spreads the rows over candle's CPU thread pool. Everything else (other CPUs, other
//! dtypes, GPUs) goes to `candle_nn::ops::softmax_last_dim`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `softmax(x)` over the last dimension, without a backward pass.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if super::is_cpu_f32(x) && simd::available() {
        x.contiguous()?.apply_op1_no_bwd(&CpuSoftmax)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// True when the vector kernels ([`max_of`], [`exp_shifted_sum`], the softmax op) can run (x86-64
/// with AVX2 and FMA).
pub(super) fn simd_available() -> bool {
    simd::available()
}

/// The largest element of `xs` (`-inf` for an empty slice or one of `-inf`s). Only call when
/// [`simd_available`].
pub(super) fn max_of(xs: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked `simd_available()`: AVX2 and FMA are there.
    unsafe {
        simd::avx2::max_slice(xs)
    }
    #[cfg(not(target_arch = "x86_64"))]
    xs.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// `x <- e^(x - shift)` for every element, in place, returning their sum: one tile row of the
/// online softmax in the attention forward. Only call when [`simd_available`].
pub(super) fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller checked `simd_available()`: AVX2 and FMA are there.
    unsafe {
        simd::avx2::exp_shifted_sum(xs, shift)
    }
    #[cfg(not(target_arch = "x86_64"))]
    xs.iter_mut()
        .map(|x| {
            *x = (*x - shift).exp();
            *x
        })
        .sum()
}

/// `e^x` of every element, in place: eight at a time where [`simd_available`], else libm's.
/// Exact to a few ulp over `[-87, 88]`; below, about `1e-38` instead of smaller values or 0.
pub(super) fn exp_in_place(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: AVX2 and FMA are available (checked just above).
        unsafe { simd::avx2::exp_slice(xs) };
        return;
    }
    xs.iter_mut().for_each(|x| *x = x.exp());
}

struct CpuSoftmax;

impl CustomOp1 for CpuSoftmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim-simd"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = storage.as_slice::<f32>()?;
        let src = match layout.contiguous_offsets() {
            Some((a, b)) => &src[a..b],
            None => candle_core::bail!("softmax: input has to be contiguous"),
        };
        let shape = layout.shape().clone();
        let d = shape.dims().last().copied().unwrap_or(1).max(1);
        let rows = src.len() / d;
        let mut dst = vec![0f32; src.len()];
        // Each worker writes only its own rows.
        let out = super::Shared(dst.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            // Capture the whole (Sync) wrapper, not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let out = out;
            for r in range {
                let s = &src[r * d..(r + 1) * d];
                // SAFETY: row r of dst is written by this worker only; dst outlives the pool call.
                let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(r * d), d) };
                simd::softmax_row(s, o);
            }
        });
        Ok((CpuStorage::F32(dst), shape))
    }
}

mod simd {
    /// True when the vector path can run on this CPU.
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static OK: OnceLock<bool> = OnceLock::new();
            *OK.get_or_init(|| {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            })
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Softmax of one row into `dst` (same length). Only called when [`available`].
    pub fn softmax_row(src: &[f32], dst: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` checked AVX2 and FMA before any call reaches here.
        unsafe {
            avx2::softmax_row(src, dst)
        }
        #[cfg(not(target_arch = "x86_64"))]
        scalar_row(src, dst)
    }

    /// Reference path (and the row tail): scalar libm.
    #[allow(dead_code)]
    pub fn scalar_row(src: &[f32], dst: &mut [f32]) {
        let m = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = (s - m).exp();
            sum += *d;
        }
        let inv = 1.0 / sum;
        dst.iter_mut().for_each(|d| *d *= inv);
    }

    #[cfg(target_arch = "x86_64")]
    pub mod avx2 {
        use std::arch::x86_64::*;

        /// `exp(x)` of eight lanes (Cephes `expf`). Inputs below -87.34 give ~1e-38 instead of
        /// a smaller value or 0: negligible next to a softmax row sum, which is at least 1.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp8(x: __m256) -> __m256 {
            let x = _mm256_min_ps(_mm256_set1_ps(88.376_26), x);
            let x = _mm256_max_ps(_mm256_set1_ps(-87.336_55), x);
            // x = n ln2 + r, |r| <= ln2 / 2, with ln2 split in a short and a long part.
            let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm256_set1_ps(1.987_569_1e-4);
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.398_199_9e-3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.333_452e-3));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.166_579_6e-2));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.166_666_65));
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
            let r2 = _mm256_mul_ps(r, r);
            let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
            // 2^n through the exponent bits.
            let e = _mm256_slli_epi32::<23>(_mm256_add_epi32(
                _mm256_cvtps_epi32(n),
                _mm256_set1_epi32(127),
            ));
            _mm256_mul_ps(y, _mm256_castsi256_ps(e))
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hmax(v: __m256) -> f32 {
            let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
            _mm_cvtss_f32(m)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn hsum(v: __m256) -> f32 {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
            _mm_cvtss_f32(s)
        }

        /// The largest element (`-inf` when empty).
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn max_slice(xs: &[f32]) -> f32 {
            let full = xs.len() / 8 * 8;
            let p = xs.as_ptr();
            let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
            let mut i = 0;
            while i < full {
                vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
                i += 8;
            }
            xs[full..].iter().fold(hmax(vmax), |m, &x| m.max(x))
        }

        /// `x <- e^(x - shift)` in place; returns the sum of the results.
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp_shifted_sum(xs: &mut [f32], shift: f32) -> f32 {
            let p = xs.as_mut_ptr();
            exp_shifted_sum_raw(p, p, xs.len(), shift)
        }

        /// `dst[i] = e^(src[i] - shift)` for `i < n`; returns the sum of the results. The one
        /// loop behind [`exp_shifted_sum`] (in place, `src == dst`) and [`softmax_row`].
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA; `src` must be readable and `dst` writable for `n`
        /// elements, and the two either the same pointer or not overlapping.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn exp_shifted_sum_raw(src: *const f32, dst: *mut f32, n: usize, shift: f32) -> f32 {
            let full = n / 8 * 8;
            let vs = _mm256_set1_ps(shift);
            let mut vsum = _mm256_setzero_ps();
            let mut i = 0;
            while i < full {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(src.add(i)), vs));
                _mm256_storeu_ps(dst.add(i), e);
                vsum = _mm256_add_ps(vsum, e);
                i += 8;
            }
            let mut sum = hsum(vsum);
            for j in full..n {
                let e = (*src.add(j) - shift).exp();
                *dst.add(j) = e;
                sum += e;
            }
            sum
        }

        /// `e^x` of every element, in place.
        ///
        /// # Safety
        /// The CPU must support AVX2 and FMA.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn exp_slice(xs: &mut [f32]) {
            let full = xs.len() / 8 * 8;
            let p = xs.as_mut_ptr();
            let mut i = 0;
            while i < full {
                _mm256_storeu_ps(p.add(i), exp8(_mm256_loadu_ps(p.add(i))));
                i += 8;
            }
            xs[full..].iter_mut().for_each(|x| *x = x.exp());
        }

        /// # Safety
        /// The CPU must support AVX2 and FMA; `dst` must be as long as `src`.
        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn softmax_row(src: &[f32], dst: &mut [f32]) {
            let n = src.len().min(dst.len());
            let full = n / 8 * 8;
            let dp = dst.as_mut_ptr();
            let m = max_slice(&src[..n]);
            if m == f32::NEG_INFINITY {
                // Every score masked: what candle gives (0 / 0).
                dst[..n].iter_mut().for_each(|d| *d = f32::NAN);
                return;
            }
            let sum = exp_shifted_sum_raw(src.as_ptr(), dp, n, m);
            let inv = 1.0 / sum;
            let vinv = _mm256_set1_ps(inv);
            let mut i = 0;
            while i < full {
                _mm256_storeu_ps(dp.add(i), _mm256_mul_ps(_mm256_loadu_ps(dp.add(i)), vinv));
                i += 8;
            }
            for d in &mut dst[full..n] {
                *d *= inv;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Agrees with candle's softmax to float rounding on rows of every tail length, with masked
    /// (-inf) entries and a wide range of values.
    #[test]
    fn matches_candle_softmax() {
        let mut rng = crate::rng::Rng::new(3);
        for d in [1usize, 7, 8, 9, 77, 1024] {
            let x = (rng.randn((5, d), &Device::Cpu).unwrap() * 30.0).unwrap();
            let mut v: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
            if d > 2 {
                v[1] = f32::NEG_INFINITY;
                v[d + 2] = f32::NEG_INFINITY;
            }
            let x = Tensor::from_vec(v, (5, d), &Device::Cpu).unwrap();
            let ours = softmax_last_dim(&x).unwrap();
            let theirs = candle_nn::ops::softmax_last_dim(&x).unwrap();
            let err = (&ours - &theirs)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 1e-6, "d {d}: max error {err}");
            let sums: Vec<f32> = ours.sum(1).unwrap().to_vec1().unwrap();
            assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        }
    }

    /// The vector exponential is within a few ulp of libm's over the range of f32's, whole
    /// vectors and the tail alike.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_accurate() {
        if !simd::available() {
            return;
        }
        let xs: Vec<f32> = (0..8003).map(|i| -87.0 + i as f32 * 0.0218).collect();
        let mut all = xs.clone();
        exp_in_place(&mut all);
        for (&x, &e) in xs.iter().zip(&all) {
            let r = x.exp();
            assert!(
                (e - r).abs() <= 4.0 * f32::EPSILON * r,
                "exp({x}) = {e}, libm {r}"
            );
        }
        for c in xs.chunks_exact(8) {
            let mut out = [0f32; 8];
            // SAFETY: AVX2 and FMA are available (checked above).
            unsafe {
                use std::arch::x86_64::*;
                let v = simd::avx2::exp8(_mm256_loadu_ps(c.as_ptr()));
                _mm256_storeu_ps(out.as_mut_ptr(), v);
            }
            for (&x, &e) in c.iter().zip(&out) {
                let r = x.exp();
                assert!(
                    (e - r).abs() <= 4.0 * f32::EPSILON * r,
                    "exp({x}) = {e}, libm {r}"
                );
            }
        }
    }

    /// The online-softmax helpers: the maximum of slices of every tail length, with `-inf`s
    /// and all `-inf`; the shifted exponentials and their sum against f64.
    #[test]
    fn row_max_and_shifted_exp_sum() {
        if !simd_available() {
            return;
        }
        let mut rng = crate::rng::Rng::new(5);
        for n in [0usize, 1, 7, 8, 9, 77, 512] {
            let x = (rng.randn(n.max(1), &Device::Cpu).unwrap() * 10.0).unwrap();
            let mut v: Vec<f32> = x.to_vec1().unwrap();
            v.truncate(n);
            if n > 3 {
                v[n - 1] = 1e3;
                v[2] = f32::NEG_INFINITY;
            }
            let expect = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max_of(&v), expect, "max of {n}");
            // Large values capped below e^88's overflow; -inf gives 0 (about 1e-38 here).
            let shift = 3.0f32;
            let mut w: Vec<f32> = v.iter().map(|&x| x.min(shift + 80.0)).collect();
            let reference: Vec<f64> = w.iter().map(|&x| (x as f64 - shift as f64).exp()).collect();
            let sum = exp_shifted_sum(&mut w, shift);
            let total: f64 = reference.iter().sum();
            assert!(
                (sum as f64 - total).abs() <= 1e-5 * total.max(1e-30),
                "sum of {n}: {sum} against {total}"
            );
            for (a, e) in w.iter().zip(&reference) {
                assert!(
                    (*a as f64 - e).abs() <= 1e-5 * e.max(1e-30) + 1e-37,
                    "{a} against {e}"
                );
            }
        }
        assert_eq!(max_of(&[f32::NEG_INFINITY; 9]), f32::NEG_INFINITY);
    }
}
