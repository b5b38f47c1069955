//! Layers with a correct backward pass.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels have no backward: a graph
//! through them silently drops gradients (SPEC.md §1). Every model in this crate builds its layers
//! from this module, which composes them from ops whose backward candle implements (matmul, conv2d,
//! exp, sum, sqrt, ...). It is the only place that calls candle's raw layers, so one change here
//! (a custom op for frozen weights, a chunked attention) swaps the layer everywhere.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// A dense layer `y = x W^T + b`, weights in the PyTorch `[out, in]` layout.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // candle's CPU matmul is wrong for some non-contiguous batched inputs (SPEC.md §1).
        let x = x.contiguous()?;
        let w = self.weight.t()?;
        let y = match x.dims() {
            [b1, b2, m, k] => {
                x.reshape((b1 * b2 * m, *k))?
                    .matmul(&w)?
                    .reshape((*b1, *b2, *m, ()))?
            }
            [b, m, k] => x.reshape((b * m, *k))?.matmul(&w)?.reshape((*b, *m, ()))?,
            _ => x.matmul(&w)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

/// 2-D convolution (NCHW), PyTorch weight layout `[out, in, kh, kw]`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_c: usize,
        out_c: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = vb.get((out_c, in_c, kernel, kernel), "weight")?;
        let bias = Some(vb.get(out_c, "bias")?);
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, (), 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Group normalisation composed from differentiable ops (statistics in f32).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if channels % groups != 0 {
            candle_core::bail!(
                "group norm {}: {channels} channels do not split into {groups} groups",
                vb.prefix()
            );
        }
        Ok(Self {
            weight: vb.get(channels, "weight")?,
            bias: vb.get(channels, "bias")?,
            groups,
            eps,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (b, c) = (dims[0], dims[1]);
        let dtype = x.dtype();
        let xg = x.reshape((b, self.groups, ()))?.to_dtype(DType::F32)?;
        let mean = xg.mean_keepdim(2)?;
        let xc = xg.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(2)?;
        let xn = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let mut wd = vec![1usize; dims.len()];
        wd[1] = c;
        xn.to_dtype(dtype)?
            .reshape(dims)?
            .broadcast_mul(&self.weight.reshape(wd.clone())?)?
            .broadcast_add(&self.bias.reshape(wd)?)
    }
}

/// Layer normalisation over the last dimension, composed from differentiable ops.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }

    pub fn from_tensors(weight: Tensor, bias: Tensor, eps: f64) -> Self {
        Self { weight, bias, eps }
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    xn.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension with a backward pass. The max is detached: it only shifts the
/// exponent for stability and the result does not depend on it.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&s)
}

/// Scaled dot-product attention on `[batch, heads, seq, head_dim]` tensors, with an optional
/// additive mask broadcastable to `[batch, heads, q_len, k_len]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let q = q.contiguous()?;
    let kt = k.transpose(D::Minus2, D::Minus1)?.contiguous()?;
    let mut w = (q.matmul(&kt)? * scale)?;
    if let Some(m) = mask {
        w = w.broadcast_add(m)?;
    }
    softmax_last(&w)?.matmul(&v.contiguous()?)
}

/// Split `[b, n, heads * d]` into `[b, heads, n, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Merge `[b, heads, n, d]` back into `[b, n, heads * d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))
}

/// `x * sigmoid(1.702 x)`: CLIP's quick GELU.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Nearest-neighbour ×2 upsampling. candle's `upsample_nearest2d` backward overwrites instead of
/// adding when its input fans out (SPEC.md §1); this composition has a plain backward.
pub fn upsample_nearest2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .contiguous()?
        .reshape((b, c, h * 2, w * 2))
}
