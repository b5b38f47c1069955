//! 2-D convolution with frozen weights: forward as one matrix product over an im2col buffer,
//! backward to the input only (no weight gradient is ever formed).
//!
//! On the CPU in f32, the 3 x 3 padding-1 convolutions of maps 16 x 16 and larger (most of SD's
//! convolution time), and their input gradients, go through Winograd's F(2 x 2, 3 x 3)
//! ([`super::winograd`]) instead, which needs 2.25x fewer multiplies; everything below is the
//! general path (other dtypes and devices, other kernels, small maps).
//!
//! im2col uses flat windows: with the input zero-padded to `Hp x Wp` and flattened per channel,
//! the kernel tap `(kh, kw)` of a stride-1 convolution reads the contiguous run
//! `[kh * Wp + kw, kh * Wp + kw + Ho * Wp)`, so every tap is one contiguous copy and the product
//! yields the output on a `Ho x Wp` grid whose last `Wp - Wo` columns are dropped (large maps go
//! in bands of rows, to keep each buffer small). The input
//! gradient of a stride-1 convolution is either the same computation with the kernel flipped and
//! transposed (cheap when the kernel is small next to the activation), or one product with the
//! transposed kernel followed by col2im: nine shifted adds on the flat grid (cheap when the kernel
//! is large next to the activation, as in SD's 8 x 8 and 4 x 4 levels). Strided convolutions (SD's
//! three downsamplers) use candle's convolution forward and its transposed convolution for the
//! input gradient, computed with the larger output padding and cropped, which also sidesteps
//! candle's stride-2 backward bug for heights and widths of different parity (SPEC.md §1).

use super::attach::{attach, Value};
use candle_core::{Result, Tensor};

/// Geometry of one convolution call.
#[derive(Clone, Copy, Debug)]
struct Geom {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    k: usize,
    pad: usize,
}

impl Geom {
    fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }
    fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }
    fn ho(&self) -> usize {
        self.hp() + 1 - self.k
    }
    fn wo(&self) -> usize {
        self.wp() + 1 - self.k
    }
}

/// Elements of one im2col buffer: 4 M f32 = 16 MB (larger maps are done in bands of rows), so
/// the allocator recycles the buffers instead of mapping fresh pages for each.
const COLS_ELEMS: usize = 1 << 22;

/// A stride-1 `k x k` correlation of `x` `[B, C, H, W]`, zero-padded by `pad` on every side, with
/// the matrix `w2` `[O, C * k * k]` (taps in row-major `(kh, kw)` order, reversed when `flip`):
/// `[B, O, Ho * Wp]` on the padded-width output grid (`Wp = W + 2 pad`; the last `k - 1` columns
/// of every row are junk, see [`crop_grid`]).
///
/// im2col with flat windows: with the padded input flattened per channel, tap `(kh, kw)` of
/// output rows `[r0, r1)` reads the contiguous run starting at `(r0 + kh) * Wp + kw`, so each
/// tap is one contiguous copy. Bands of output rows keep each buffer under [`COLS_ELEMS`].
fn correlate_flat(
    x: &Tensor,
    w2: &Tensor,
    k: usize,
    pad: usize,
    flip: bool,
    budget: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (hp, wp) = (h + 2 * pad, w + 2 * pad);
    let ho = hp + 1 - k;
    // One extra zero row keeps the last taps' runs (which reach k - 1 past the grid) in range.
    let xp = x
        .pad_with_zeros(2, pad, pad + 1)?
        .pad_with_zeros(3, pad, pad)?
        .reshape((b, c, (hp + 1) * wp))?;
    let band = (budget / (b * c * k * k * wp).max(1)).clamp(1, ho);
    let mut outs = Vec::with_capacity(ho.div_ceil(band));
    let mut r0 = 0;
    while r0 < ho {
        let rows = band.min(ho - r0);
        let len = rows * wp;
        let mut taps = Vec::with_capacity(k * k);
        for t in 0..k * k {
            let t = if flip { k * k - 1 - t } else { t };
            let (kh, kw) = (t / k, t % k);
            taps.push(xp.narrow(2, (r0 + kh) * wp + kw, len)?.unsqueeze(2)?);
        }
        let cols = Tensor::cat(&taps, 2)?.reshape((b, c * k * k, len))?;
        outs.push(batched_left(w2, &cols)?);
        r0 += rows;
    }
    Tensor::cat(&outs, 2)
}

/// `w2 [O, K] @ cols [B, K, L]` -> `[B, O, L]`.
fn batched_left(w2: &Tensor, cols: &Tensor) -> Result<Tensor> {
    let b = cols.dim(0)?;
    if b == 1 {
        return w2.matmul(&cols.squeeze(0)?)?.unsqueeze(0);
    }
    let (o, kk) = w2.dims2()?;
    w2.unsqueeze(0)?.broadcast_as((b, o, kk))?.matmul(cols)
}

/// Drop the padded-width grid's extra columns: `[B, O, Ho * Wp]` -> `[B, O, Ho, Wo]`.
fn crop_grid(y: &Tensor, ho: usize, wp: usize, wo: usize) -> Result<Tensor> {
    let (b, o, _) = y.dims3()?;
    y.reshape((b, o, ho, wp))?.narrow(3, 0, wo)
}

/// [`correlate_flat`] wastes `(k - 1) / Wo` of its products on junk columns; below this width
/// (12 % waste for 3 x 3 kernels and more, as in SD's 16 x 16 and smaller maps at 256 px) the
/// exact im2col is cheaper, although every tap then takes a strided copy.
fn exact_is_cheaper(wo: usize, k: usize) -> bool {
    wo < 24 * (k - 1)
}

/// [`correlate_flat`] on the exact output grid: `[B, O, Ho * Wo]`; taps are 2-D windows copied
/// out row by row.
fn correlate_exact(
    x: &Tensor,
    w2: &Tensor,
    k: usize,
    pad: usize,
    flip: bool,
    budget: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let xp = x.pad_with_zeros(2, pad, pad)?.pad_with_zeros(3, pad, pad)?;
    let (ho, wo) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
    let band = (budget / (b * c * k * k * wo).max(1)).clamp(1, ho);
    let mut outs = Vec::with_capacity(ho.div_ceil(band));
    let mut r0 = 0;
    while r0 < ho {
        let rows = band.min(ho - r0);
        let mut taps = Vec::with_capacity(k * k);
        for t in 0..k * k {
            let t = if flip { k * k - 1 - t } else { t };
            let (kh, kw) = (t / k, t % k);
            taps.push(
                xp.narrow(2, r0 + kh, rows)?
                    .narrow(3, kw, wo)?
                    .contiguous()?
                    .reshape((b, c, 1, rows * wo))?,
            );
        }
        let cols = Tensor::cat(&taps, 2)?.reshape((b, c * k * k, rows * wo))?;
        outs.push(batched_left(w2, &cols)?);
        r0 += rows;
    }
    Tensor::cat(&outs, 2)
}

/// The stride-1 correlation of `x` with `w2` (see [`correlate_flat`]) as `[B, O, Ho, Wo]`, by
/// whichever im2col is cheaper for the width.
fn correlate(x: &Tensor, w2: &Tensor, k: usize, pad: usize, flip: bool) -> Result<Tensor> {
    let (b, _, h, w) = x.dims4()?;
    let o = w2.dim(0)?;
    let (ho, wo) = (h + 2 * pad + 1 - k, w + 2 * pad + 1 - k);
    let budget = super::block_budget(x, COLS_ELEMS);
    if exact_is_cheaper(wo, k) {
        correlate_exact(x, w2, k, pad, flip, budget)?.reshape((b, o, ho, wo))
    } else {
        let y = correlate_flat(x, w2, k, pad, flip, budget)?;
        crop_grid(&y, ho, w + 2 * pad, wo)
    }
}

/// Stride-1 `k x k` convolution of `x` (no graph) with `weight` `[O, C, k, k]` and an optional
/// bias, as im2col + one matrix product.
fn conv_s1(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, pad: usize) -> Result<Value> {
    let (b, c, h, w) = x.dims4()?;
    let (o, _, k, _) = weight.dims4()?;
    if k == 3 && pad == 1 && super::winograd::pays_off(h, w) {
        if let Some(y) = super::winograd::conv3x3(x, weight, bias, false)? {
            return Ok(y);
        }
    }
    let y = if k == 1 && pad == 0 {
        let y = batched_left(&weight.reshape((o, c))?, &x.reshape((b, c, h * w))?)?;
        y.reshape((b, o, h, w))?
    } else {
        correlate(x, &weight.reshape((o, c * k * k))?, k, pad, false)?
    };
    Ok(match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?)?,
        None => y.contiguous()?,
    }
    .into())
}

/// Input gradient of a stride-1 convolution: `g` `[B, O, Ho, Wo]` -> `[B, C, H, W]`.
fn conv_s1_input_grad(g: &Tensor, weight: &Tensor, gm: Geom) -> Result<Tensor> {
    let Geom {
        b,
        c,
        h,
        w,
        o,
        k,
        pad,
    } = gm;
    if k == 1 && pad == 0 {
        let wt = weight.reshape((o, c))?.t()?;
        let g = g.contiguous()?.reshape((b, o, h * w))?;
        return batched_left(&wt, &g)?.reshape((b, c, h, w));
    }
    if k == 3 && pad == 1 && super::winograd::pays_off(h, w) {
        if let Some(dx) = super::winograd::conv3x3(g, weight, None, true)? {
            return dx.into_tensor();
        }
    }
    let (ho, wo) = (gm.ho(), gm.wo());
    let cols_len = c * k * k * ho * wo;
    let weight_len = o * c * k * k;
    let g = g.contiguous()?;
    if pad < k && weight_len <= cols_len {
        // The gradient is the correlation of g, padded by k - 1 - pad, with the kernel flipped
        // and transposed to [C, O, k, k]; the flip is folded into the order of the taps.
        let wt = weight
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c, o * k * k))?;
        return correlate(&g, &wt, k, k - 1 - pad, true)?.contiguous();
    }
    // col2im: dcols = W^T g, then every tap adds its window back at its offset in the padded
    // input (cheap where the kernel is large next to the map, as in SD's deep levels).
    let wt = weight.reshape((o, c * k * k))?.t()?;
    let dcols = batched_left(&wt, &g.reshape((b, o, ho * wo))?)?.reshape((b, c, k * k, ho, wo))?;
    let (hp, wp) = (gm.hp(), gm.wp());
    let mut acc: Option<Tensor> = None;
    for t in 0..k * k {
        let (kh, kw) = (t / k, t % k);
        let placed = dcols
            .narrow(2, t, 1)?
            .squeeze(2)?
            .pad_with_zeros(2, kh, hp - ho - kh)?
            .pad_with_zeros(3, kw, wp - wo - kw)?;
        acc = Some(match acc {
            None => placed,
            Some(a) => (a + placed)?,
        });
    }
    let acc = acc.ok_or_else(|| candle_core::Error::Msg("conv: empty kernel".into()))?;
    acc.narrow(2, pad, h)?.narrow(3, pad, w)?.contiguous()
}

/// The rows and columns at the bottom and right of the padded `x_dims` input that a strided
/// `k x k` convolution with output `g` never reached (the floor division of its output size):
/// their input gradient is zero, and the transposed convolution must add them back.
fn unreached(
    g: &Tensor,
    x_dims: (usize, usize),
    k: usize,
    stride: usize,
    pad: usize,
) -> Result<(usize, usize)> {
    let (_, _, gh, gw) = g.dims4()?;
    let full = |gi: usize| (gi - 1) * stride + k;
    Ok((
        (x_dims.0 + 2 * pad).saturating_sub(full(gh)),
        (x_dims.1 + 2 * pad).saturating_sub(full(gw)),
    ))
}

/// Input gradient of a strided convolution through candle's transposed convolution. The output
/// padding differs per axis when H and W have different parity; candle takes one value for
/// both, so use the larger one and crop.
fn conv_strided_input_grad(
    g: &Tensor,
    weight: &Tensor,
    x_dims: (usize, usize),
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (h, w) = x_dims;
    let (op_h, op_w) = unreached(g, x_dims, weight.dim(2)?, stride, pad)?;
    let out_pad = op_h.max(op_w);
    let dx = g
        .contiguous()?
        .conv_transpose2d(weight, pad, out_pad, stride, 1)?;
    let (_, _, dh, dw) = dx.dims4()?;
    if dh == h && dw == w {
        Ok(dx)
    } else {
        dx.narrow(2, 0, h)?.narrow(3, 0, w)?.contiguous()
    }
}

/// `g` `[B, O, H, W]` with `s - 1` zeros between neighbours along H and W:
/// `[B, O, (H - 1) s + 1, (W - 1) s + 1]`.
fn dilate(g: &Tensor, s: usize) -> Result<Tensor> {
    let (b, o, h, w) = g.dims4()?;
    if s == 1 {
        return Ok(g.clone());
    }
    let (hd, wd) = ((h - 1) * s + 1, (w - 1) * s + 1);
    let zeros_w = Tensor::zeros((b, o, h, w, s - 1), g.dtype(), g.device())?;
    let along_w = Tensor::cat(&[&g.unsqueeze(4)?, &zeros_w], 4)?
        .reshape((b, o, h, w * s))?
        .narrow(3, 0, wd)?;
    let zeros_h = Tensor::zeros((b, o, h, s - 1, wd), g.dtype(), g.device())?;
    Tensor::cat(&[&along_w.unsqueeze(3)?, &zeros_h], 3)?
        .reshape((b, o, h * s, wd))?
        .narrow(2, 0, hd)
}

/// Input gradient of a strided convolution as a stride-1 correlation with the kernel flipped
/// and transposed, over `g` dilated by the stride (zeros between its values) and padded at the
/// bottom and right by what the forward's floor division dropped. It wastes the products with
/// the zeros, but it runs on the im2col + matrix product path, where candle's CUDA transposed
/// convolution is a naive kernel. Needs `pad < k`.
fn conv_strided_input_grad_dilated(
    g: &Tensor,
    weight: &Tensor,
    x_dims: (usize, usize),
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (o, c, k, _) = weight.dims4()?;
    let (op_h, op_w) = unreached(g, x_dims, k, stride, pad)?;
    let gd = dilate(&g.contiguous()?, stride)?
        .pad_with_zeros(2, 0, op_h)?
        .pad_with_zeros(3, 0, op_w)?;
    let wt = weight
        .transpose(0, 1)?
        .contiguous()?
        .reshape((c, o * k * k))?;
    correlate(&gd, &wt, k, k - 1 - pad, true)?.contiguous()
}

/// `conv2d(x, weight) + bias` with a frozen `weight` `[O, C, k, k]` (square kernel, square
/// padding, dilation 1, one group); differentiable in `x` only.
pub fn conv2d_frozen(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (o, ci, k, kw) = weight.dims4()?;
    if ci != c || kw != k {
        candle_core::bail!(
            "conv2d: input has {c} channels, kernel is {:?} (square kernels only)",
            weight.dims()
        );
    }
    let xd = x.detach();
    let y = if stride == 1 {
        conv_s1(&xd, weight, bias, pad)?
    } else {
        let y = xd.conv2d(weight, pad, stride, 1, 1)?;
        match bias {
            Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?)?,
            None => y,
        }
        .into()
    };
    let weight = weight.clone();
    let gm = Geom {
        b,
        c,
        h,
        w,
        o,
        k,
        pad,
    };
    attach(
        "conv2d-frozen",
        &[x],
        y,
        Box::new(move |_, _, g| Ok(vec![Some(input_grad(g, &weight, gm, stride)?)])),
    )
}

/// The input gradient of a convolution of geometry `gm` with `weight` and `stride`, by the
/// cheapest path for its stride and device.
fn input_grad(g: &Tensor, weight: &Tensor, gm: Geom, stride: usize) -> Result<Tensor> {
    let (h, w, k, pad) = (gm.h, gm.w, gm.k, gm.pad);
    if stride == 1 {
        conv_s1_input_grad(g, weight, gm)
    } else if g.device().is_cpu() || pad >= k {
        conv_strided_input_grad(g, weight, (h, w), stride, pad)
    } else {
        conv_strided_input_grad_dilated(g, weight, (h, w), stride, pad)
    }
}

/// A convolution whose weight (and bias) train: the forward and the input gradient of
/// [`conv2d_frozen`], plus the weight gradient (the correlation of the input with the output
/// gradient, dilated by the stride: PyTorch's `conv2d_weight`) and the bias gradient (the
/// output gradient summed over batch and space). Only `x` and the weights are kept for the
/// backward pass, where candle's composed convolution also keeps its pre-bias output.
pub fn conv2d_trainable(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    pad: usize,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let (o, _, k, _) = weight.dims4()?;
    let value = conv2d_frozen(
        &x.detach(),
        &weight.detach(),
        bias.map(|b| b.detach()).as_ref(),
        stride,
        pad,
    )?;
    let mut inputs = vec![x, weight];
    inputs.extend(bias);
    let has_bias = bias.is_some();
    attach(
        "conv2d-trainable",
        &inputs,
        value,
        Box::new(move |args, _, g| {
            let (x, weight) = (args[0], args[1].detach());
            let (b, c, _, _) = x.dims4()?;
            let gm = Geom {
                b,
                c,
                h,
                w,
                o,
                k,
                pad,
            };
            let dx = if x.track_op() {
                Some(input_grad(g, &weight, gm, stride)?)
            } else {
                None
            };
            // dW[o, c, i, j] = sum_{b, y, x} g[b, o, y, x] x_pad[b, c, s y + i, s x + j]: the
            // input's channels as a batch, the gradient's as the kernels, dilated by the stride.
            let xt = x.detach().transpose(0, 1)?.contiguous()?;
            let gt = g.transpose(0, 1)?.contiguous()?;
            let dw = xt
                .conv2d(&gt, pad, 1, stride, 1)?
                .transpose(0, 1)?
                .narrow(2, 0, k)?
                .narrow(3, 0, k)?
                .contiguous()?;
            let mut out = vec![dx, Some(dw)];
            if has_bias {
                out.push(Some(g.sum(3)?.sum(2)?.sum(0)?));
            }
            Ok(out)
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::{max_diff, randn};
    use candle_core::{Device, Var};

    /// Forward and input gradient agree with candle's own conv2d (whose backward is right for
    /// these shapes) for every code path: 1x1, 3x3 with both gradient strategies, stride 2 with
    /// H and W of the same and of different parity.
    #[test]
    fn matches_candle_conv2d() {
        // (b, c, o, h, w, k, stride, pad)
        let cases = [
            (2, 3, 5, 6, 7, 1, 1, 0),
            (1, 4, 3, 9, 8, 3, 1, 1), // small kernel, big map: flipped-kernel gradient
            (2, 6, 40, 3, 4, 3, 1, 1), // big kernel, small map: col2im gradient
            (1, 3, 4, 8, 8, 3, 2, 1), // stride 2, even
            (1, 3, 4, 7, 7, 3, 2, 1), // stride 2, odd
            (2, 2, 3, 7, 8, 3, 2, 1), // stride 2, mixed parity
            (1, 2, 2, 6, 5, 3, 1, 0), // no padding
            (1, 2, 3, 3, 50, 3, 1, 1), // wide map: flat im2col
        ];
        for (i, &(b, c, o, h, w, k, stride, pad)) in cases.iter().enumerate() {
            let x0 = randn(&[b, c, h, w], 10 + i as u64);
            let wgt = randn(&[o, c, k, k], 20 + i as u64);
            let bias = randn(&[o], 30 + i as u64);
            let x = Var::from_tensor(&x0).unwrap();
            let y = conv2d_frozen(x.as_tensor(), &wgt, Some(&bias), stride, pad).unwrap();
            let y_ref = x0
                .conv2d(&wgt, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            assert_eq!(y.dims(), y_ref.dims(), "case {i}");
            assert!(max_diff(&y, &y_ref) < 1e-10, "case {i}: forward");
            let r = randn(y.dims(), 40 + i as u64);
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = g.get(x.as_tensor()).unwrap();
            // Reference input gradient: candle's own backward, except for a stride-2 kernel on H
            // and W of different parity, where candle's is wrong (SPEC.md §1): there, central
            // finite differences (exact up to rounding: the loss is linear in x).
            if h % 2 == w % 2 || stride == 1 {
                let xr = Var::from_tensor(&x0).unwrap();
                let yr = xr.as_tensor().conv2d(&wgt, pad, stride, 1, 1).unwrap();
                let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
                let dx_ref = gr.get(xr.as_tensor()).unwrap();
                assert!(max_diff(dx, dx_ref) < 1e-10, "case {i}: gradient");
            } else {
                let base: Vec<f64> = x0.flatten_all().unwrap().to_vec1().unwrap();
                let dxv: Vec<f64> = dx.flatten_all().unwrap().to_vec1().unwrap();
                for j in [0, base.len() / 2, base.len() - 1] {
                    let f = |d: f64| {
                        let mut v = base.clone();
                        v[j] += d;
                        let t = Tensor::from_vec(v, x0.dims(), &Device::Cpu).unwrap();
                        (t.conv2d(&wgt, pad, stride, 1, 1).unwrap() * &r)
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .to_scalar::<f64>()
                            .unwrap()
                    };
                    let fd = (f(1e-6) - f(-1e-6)) / 2e-6;
                    assert!(
                        (fd - dxv[j]).abs() < 1e-6,
                        "case {i} elem {j}: {fd} vs {}",
                        dxv[j]
                    );
                }
            }
        }
    }

    /// The dilated strided gradient (the GPU's) equals the transposed convolution's (the CPU's)
    /// for strides 2 and 3, paddings 0 and 1, and H and W of either parity.
    #[test]
    fn dilated_strided_gradient_matches_transposed_convolution() {
        // (b, c, o, h, w, k, stride, pad)
        let cases = [
            (1, 3, 4, 8, 8, 3, 2, 1),
            (2, 2, 3, 7, 8, 3, 2, 1),
            (1, 2, 5, 9, 6, 3, 2, 0),
            (1, 3, 2, 10, 11, 3, 3, 1),
            (2, 4, 3, 6, 6, 1, 2, 0),
        ];
        for (i, &(b, c, o, h, w, k, stride, pad)) in cases.iter().enumerate() {
            let wgt = randn(&[o, c, k, k], 50 + i as u64);
            let (gh, gw) = (
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            );
            let g = randn(&[b, o, gh, gw], 60 + i as u64);
            let dilated = conv_strided_input_grad_dilated(&g, &wgt, (h, w), stride, pad).unwrap();
            let transposed = conv_strided_input_grad(&g, &wgt, (h, w), stride, pad).unwrap();
            assert_eq!(dilated.dims(), &[b, c, h, w], "case {i}");
            assert!(max_diff(&dilated, &transposed) < 1e-12, "case {i}");
        }
        let g = randn(&[1, 1, 2, 3], 1);
        let d: Vec<f64> = dilate(&g, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let v: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(
            d,
            [v[0], 0., v[1], 0., v[2], 0., 0., 0., 0., 0., v[3], 0., v[4], 0., v[5]]
        );
    }

    /// Bands of rows give the same result as one pass over the whole map.
    #[test]
    fn banded_correlation_matches_single_pass() {
        let x = randn(&[2, 3, 7, 5], 3);
        let w2 = randn(&[4, 27], 4);
        for flip in [false, true] {
            let whole = correlate_flat(&x, &w2, 3, 1, flip, usize::MAX).unwrap();
            for budget in [1, 2 * 27 * 7 * 2, 2 * 27 * 7 * 3] {
                let banded = correlate_flat(&x, &w2, 3, 1, flip, budget).unwrap();
                assert!(max_diff(&whole, &banded) < 1e-12, "budget {budget}");
            }
        }
    }

    /// The exact im2col gives the same correlation as the flat one (cropped).
    #[test]
    fn exact_correlation_matches_flat() {
        let x = randn(&[2, 3, 5, 6], 5);
        let w2 = randn(&[4, 27], 6);
        for flip in [false, true] {
            let flat = crop_grid(
                &correlate_flat(&x, &w2, 3, 1, flip, usize::MAX).unwrap(),
                5,
                8,
                6,
            )
            .unwrap();
            for budget in [1, usize::MAX] {
                let exact = correlate_exact(&x, &w2, 3, 1, flip, budget)
                    .unwrap()
                    .reshape((2, 4, 5, 6))
                    .unwrap();
                assert!(max_diff(&flat, &exact) < 1e-12, "budget {budget}");
            }
        }
    }

    /// An f32 3 x 3 convolution on a map of 16 x 16 or more takes the Winograd path, for the
    /// value and the input gradient, and agrees with candle's f64 convolution.
    #[test]
    fn winograd_path_matches_candle_conv2d() {
        let (b, c, o, h, w) = (2, 5, 6, 17, 16);
        assert!(super::super::winograd::pays_off(h, w));
        let x0 = randn(&[b, c, h, w], 1);
        let wgt = randn(&[o, c, 3, 3], 2);
        let bias = randn(&[o], 3);
        let r = randn(&[b, o, h, w], 4);
        let f32s = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let x = Var::from_tensor(&f32s(&x0)).unwrap();
        let y = conv2d_frozen(x.as_tensor(), &f32s(&wgt), Some(&f32s(&bias)), 1, 1).unwrap();
        let dx = (&y * f32s(&r))
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
            .get(x.as_tensor())
            .unwrap()
            .clone();
        let xr = Var::from_tensor(&x0).unwrap();
        let yr = xr
            .as_tensor()
            .conv2d(&wgt, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
            .unwrap();
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dxr = gr.get(xr.as_tensor()).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        // Both are O(10); f32 rounding leaves ~1e-6 of that.
        assert!(max_diff(&f64s(&y), &yr) < 1e-4, "forward");
        assert!(max_diff(&f64s(&dx), dxr) < 1e-4, "gradient");
    }

    /// With no tracked input the layer records nothing.
    #[test]
    fn untracked_input_records_no_op() {
        let x = randn(&[1, 2, 4, 4], 1);
        let wgt = randn(&[3, 2, 3, 3], 2);
        let y = conv2d_frozen(&x, &wgt, None, 1, 1).unwrap();
        assert!(!y.track_op());
    }
}
