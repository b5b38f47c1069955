//! Frozen group normalisation, optionally followed by SiLU, as one CPU kernel in f32 each way.
//!
//! Composed from tensor ops, the normalisation takes about ten passes over the activation
//! forward and twelve backward, each writing a fresh tensor, and SiLU a few more; SD's ResNet
//! blocks run it twice per block on their largest maps. Here the forward reads `x` twice
//! (statistics, then the output) and the backward three times (statistics are kept from the
//! forward: two floats per group), parallel over (image, group). Layer norm is the case of one
//! value per channel (`hw == 1`, a group per row), which has its own vectorised row loops.
//!
//! With `xhat = (x - mean) * rstd`, `z = xhat * w + b` and `y = silu(z)` (or `y = z`):
//! `dz = g * s * (1 + z * (1 - s))` with `s = sigmoid(z)` (or `dz = g`), `gw = dz * w`, and
//! `dx = (gw - mean(gw) - xhat * mean(gw * xhat)) * rstd` over each group.

use super::Shared;

/// Sizes: `x` is `[b, c, hw]` in `groups` groups of `c / groups` channels.
#[derive(Clone, Copy, Debug)]
pub(super) struct Dims {
    pub b: usize,
    pub c: usize,
    pub hw: usize,
    pub groups: usize,
}

impl Dims {
    fn per_group(&self) -> usize {
        self.c / self.groups
    }
}

/// `(mean, rstd)` of each (image, group), `b * groups` pairs.
pub(super) type Stats = Vec<(f32, f32)>;

/// `e^-z` of `z = x * a + s` for each `x` of `xs`, into `out`.
fn exp_neg_affine(xs: &[f32], a: f32, s: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(xs) {
        *o = -(v * a + s);
    }
    super::softmax::exp_in_place(out);
}

/// `(mean, rstd)` of one group's values (two passes, sums per channel in f32 then in f64).
fn group_stats(xs: &[f32], hw: usize, eps: f64) -> (f32, f32) {
    let n = xs.len() as f64;
    let sum: f64 = xs.chunks(hw).map(|r| r.iter().sum::<f32>() as f64).sum();
    let mean = (sum / n) as f32;
    let ss: f64 = xs
        .chunks(hw)
        .map(|r| r.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() as f64)
        .sum();
    (mean, (1.0 / (ss / n + eps).sqrt()) as f32)
}

/// Lanes of the vectorised sums in [`layer_norm_row`] and [`layer_norm_row_backward`].
const LANES: usize = 16;

/// Sum of `f` over `xs` in [`LANES`] f32 partial sums (one vector register), added in f64.
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut acc = [0f32; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail: f64 = chunks.remainder().iter().map(|&v| f(v) as f64).sum();
    for c in chunks {
        let c: &[f32; LANES] = c.try_into().expect("chunks_exact gives LANES values");
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v);
        }
    }
    acc.iter().map(|&a| a as f64).sum::<f64>() + tail
}

/// One group of one value per channel (a layer norm's row, `hw == 1`): `y = xhat * w + b` and
/// `(mean, rstd)`. The general loop would treat each value as a one-value channel (its own
/// affine map, its sum converted to f64 one value at a time); here every pass is a vector loop.
fn layer_norm_row(x: &[f32], w: &[f32], b: &[f32], eps: f64, y: &mut [f32]) -> (f32, f32) {
    let n = x.len() as f64;
    let mean = (lane_sum(x, |v| v) / n) as f32;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    let rstd = (1.0 / (var + eps).sqrt()) as f32;
    for (((o, &v), &wv), &bv) in y.iter_mut().zip(x).zip(w).zip(b) {
        *o = (v - mean) * rstd * wv + bv;
    }
    (mean, rstd)
}

/// `dx` of [`layer_norm_row`] into `out`: `gw = g * w`, then
/// `dx = (gw - mean(gw) - xhat * mean(gw * xhat)) * rstd`.
fn layer_norm_row_backward(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    (mean, rstd): (f32, f32),
    out: &mut [f32],
) {
    let n = x.len();
    let (mut a1, mut a2) = ([0f32; LANES], [0f32; LANES]);
    let full = n - n % LANES;
    for (((o, xc), gc), wc) in out[..full]
        .chunks_exact_mut(LANES)
        .zip(x[..full].chunks_exact(LANES))
        .zip(g[..full].chunks_exact(LANES))
        .zip(w[..full].chunks_exact(LANES))
    {
        for l in 0..LANES {
            let gw = gc[l] * wc[l];
            o[l] = gw;
            a1[l] += gw;
            a2[l] += gw * (xc[l] - mean) * rstd;
        }
    }
    let (mut s1, mut s2) = (
        a1.iter().map(|&a| a as f64).sum::<f64>(),
        a2.iter().map(|&a| a as f64).sum::<f64>(),
    );
    for i in full..n {
        let gw = g[i] * w[i];
        out[i] = gw;
        s1 += gw as f64;
        s2 += (gw * (x[i] - mean) * rstd) as f64;
    }
    let (m1, m2) = ((s1 / n as f64) as f32, (s2 / n as f64) as f32);
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (*o - m1 - (v - mean) * rstd * m2) * rstd;
    }
}

/// `y = act(xhat * w + b)` and the statistics. `x` holds `b * c * hw` values; `w` and `bias`
/// `c` each.
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    d: Dims,
    eps: f64,
    silu: bool,
) -> (Vec<f32>, Stats) {
    let cg = d.per_group();
    let glen = cg * d.hw;
    let mut y = vec![0f32; x.len()];
    let mut stats = vec![(0f32, 0f32); d.b * d.groups];
    let (ys, ss) = (Shared(y.as_mut_ptr()), Shared(stats.as_mut_ptr()));
    candle_core::utils::barrier_pool().execute_chunked(d.b * d.groups, |tasks| {
        #[allow(clippy::redundant_locals)]
        let (ys, ss) = (ys, ss);
        for t in tasks {
            let xs = &x[t * glen..(t + 1) * glen];
            let c0 = (t % d.groups) * cg;
            if d.hw == 1 && !silu {
                // SAFETY: group `t`'s output values and its statistics belong to this task alone.
                let out = unsafe { std::slice::from_raw_parts_mut(ys.0.add(t * glen), glen) };
                let st = layer_norm_row(xs, &w[c0..c0 + cg], &bias[c0..c0 + cg], eps, out);
                unsafe { *ss.0.add(t) = st };
                continue;
            }
            let (mean, rstd) = group_stats(xs, d.hw, eps);
            // SAFETY: group `t`'s output values and its statistics belong to this task alone.
            let out = unsafe {
                *ss.0.add(t) = (mean, rstd);
                std::slice::from_raw_parts_mut(ys.0.add(t * glen), glen)
            };
            for (j, (xr, yr)) in xs.chunks(d.hw).zip(out.chunks_mut(d.hw)).enumerate() {
                // z = x * a + s with the normalisation folded into the affine map.
                let a = rstd * w[c0 + j];
                let s = bias[c0 + j] - mean * a;
                if silu {
                    // y = z / (1 + e^-z), the exponentials eight at a time.
                    exp_neg_affine(xr, a, s, yr);
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = (v * a + s) / (1.0 + *o);
                    }
                } else {
                    for (o, &v) in yr.iter_mut().zip(xr) {
                        *o = v * a + s;
                    }
                }
            }
        }
    });
    (y, stats)
}

/// `dx` given the output gradient `g` and the forward's statistics.
pub(super) fn backward(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    bias: &[f32],
    stats: &[(f32, f32)],
    d: Dims,
    silu: bool,
) -> Vec<f32> {
    let cg = d.per_group();
    let glen = cg * d.hw;
    let mut dx = vec![0f32; x.len()];
    let ds = Shared(dx.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(d.b * d.groups, |tasks| {
        #[allow(clippy::redundant_locals)]
        let ds = ds;
        let mut e = vec![0f32; if silu { d.hw } else { 0 }];
        for t in tasks {
            let (xs, gs) = (&x[t * glen..(t + 1) * glen], &g[t * glen..(t + 1) * glen]);
            // SAFETY: group `t`'s gradient values belong to this task alone.
            let out = unsafe { std::slice::from_raw_parts_mut(ds.0.add(t * glen), glen) };
            let (mean, rstd) = stats[t];
            let c0 = (t % d.groups) * cg;
            if d.hw == 1 && !silu {
                layer_norm_row_backward(xs, gs, &w[c0..c0 + cg], (mean, rstd), out);
                continue;
            }
            // Pass 1: gw = dz * w into `out`, and the sums of gw and gw * xhat.
            let (mut sum_gw, mut sum_gwx) = (0f64, 0f64);
            for (j, ((xr, gr), or)) in xs
                .chunks(d.hw)
                .zip(gs.chunks(d.hw))
                .zip(out.chunks_mut(d.hw))
                .enumerate()
            {
                let (wc, bc) = (w[c0 + j], bias[c0 + j]);
                if silu {
                    exp_neg_affine(xr, rstd * wc, bc - mean * rstd * wc, &mut e);
                }
                let (mut s1, mut s2) = (0f32, 0f32);
                for (i, ((o, &v), &gv)) in or.iter_mut().zip(xr).zip(gr).enumerate() {
                    let xhat = (v - mean) * rstd;
                    let dz = if silu {
                        let z = xhat * wc + bc;
                        let s = 1.0 / (1.0 + e[i]);
                        gv * s * (1.0 + z * (1.0 - s))
                    } else {
                        gv
                    };
                    let gw = dz * wc;
                    *o = gw;
                    s1 += gw;
                    s2 += gw * xhat;
                }
                sum_gw += s1 as f64;
                sum_gwx += s2 as f64;
            }
            let n = glen as f64;
            let (m1, m2) = ((sum_gw / n) as f32, (sum_gwx / n) as f32);
            // Pass 2: dx = (gw - m1 - xhat * m2) * rstd.
            for (o, &v) in out.iter_mut().zip(xs) {
                let xhat = (v - mean) * rstd;
                *o = (*o - m1 - xhat * m2) * rstd;
            }
        }
    });
    dx
}

/// The affine parameters' gradients `(dw, db)` of `y = act(xhat * w + b)` given the output
/// gradient `g` and the forward's statistics: `db[c] = sum g'`, `dw[c] = sum g' xhat` over the
/// batch and the positions of channel `c`, where `g' = g act'(xhat w + b)` (sums in f64).
pub(super) fn affine_grads(
    x: &[f32],
    g: &[f32],
    w: &[f32],
    bias: &[f32],
    stats: &[(f32, f32)],
    d: Dims,
    silu: bool,
) -> (Vec<f32>, Vec<f32>) {
    let cg = d.per_group();
    let (mut dw, mut db) = (vec![0f64; d.c], vec![0f64; d.c]);
    for b in 0..d.b {
        for c in 0..d.c {
            let (mean, rstd) = stats[b * d.groups + c / cg];
            let at = (b * d.c + c) * d.hw;
            let (xs, gs) = (&x[at..at + d.hw], &g[at..at + d.hw]);
            let (mut sw, mut sb) = (0f64, 0f64);
            for (&xv, &gv) in xs.iter().zip(gs) {
                let xhat = (xv - mean) * rstd;
                let gz = if silu {
                    let z = xhat * w[c] + bias[c];
                    let s = 1.0 / (1.0 + (-z).exp());
                    gv * s * (1.0 + z * (1.0 - s))
                } else {
                    gv
                };
                sw += (gz * xhat) as f64;
                sb += gz as f64;
            }
            dw[c] += sw;
            db[c] += sb;
        }
    }
    (
        dw.into_iter().map(|v| v as f32).collect(),
        db.into_iter().map(|v| v as f32).collect(),
    )
}
