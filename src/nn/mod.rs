//! Layers with a correct backward pass.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` kernels have no backward: a graph
//! through them silently drops gradients (SPEC.md §1). Every model in this crate builds its layers
//! from this module, which composes them from ops whose backward candle implements (matmul, conv2d,
//! exp, sum, sqrt, ...). It is the only place that calls candle's raw layers, so one change here
//! swaps the layer everywhere.
//!
//! Frozen weights (plain tensors, as loaded from a checkpoint) take a faster path: the layer
//! computes its output without a graph and attaches a hand-written backward that returns the
//! input gradient only ([`attach`]), so candle never forms, nor keeps, a gradient for a weight
//! (SPEC.md §1: that cost SD 1.5 3x the backward time and 2.4x the memory). Attention recomputes
//! its softmax in the backward pass block by block instead of keeping it ([`attention`]).
//! Trainable weights (`Var`s, e.g. the NeTI mapper's) keep the plain composition, whose candle
//! backward covers the weights too.

mod attach;
mod attention;
pub mod checkpoint;
mod conv;
mod gelu;
mod linear;
mod norm_act;
mod softmax;
mod winograd;

pub use attention::attention_merged;
pub use gelu::{geglu, quick_gelu, quick_gelu_grad};

/// Whether `t` is f32 on the CPU: what the hand-written kernels of this module take (other
/// dtypes and devices keep candle's ops).
fn is_cpu_f32(t: &Tensor) -> bool {
    matches!(t.device(), Device::Cpu) && t.dtype() == DType::F32
}

/// Elements of one transient block (attention scores, an im2col buffer) off the CPU: 128 M, 512 MB
/// in f32. The CPU's budgets (attention's `BLOCK_ELEMS`, conv's `COLS_ELEMS`) are small for
/// glibc's sake; on a GPU, a loop over small blocks is a string of small kernel launches that
/// leave the device idle, so it takes a few large ones. The results do not depend on the budget
/// (blocks split rows that are computed independently).
const GPU_BLOCK_ELEMS: usize = 1 << 27;

/// The block budget for work on `t`'s device: `cpu` on the CPU, [`GPU_BLOCK_ELEMS`] elsewhere.
fn block_budget(t: &Tensor, cpu: usize) -> usize {
    if t.device().is_cpu() {
        cpu
    } else {
        GPU_BLOCK_ELEMS
    }
}

/// A raw pointer handed to the workers of candle's CPU thread pool
/// (`barrier_pool().execute_chunked`), which need `Send + Sync` captures. Whoever makes one
/// upholds what the compiler cannot check: through a `*mut`, workers write disjoint parts; behind
/// a `*const`, the data is only read; and the owner outlives the pool call.
struct Shared<P>(P);

impl<P: Copy> Clone for Shared<P> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<P: Copy> Copy for Shared<P> {}
// SAFETY: the disjoint-writes / read-only contract above, stated again at each use.
unsafe impl<P> Send for Shared<P> {}
unsafe impl<P> Sync for Shared<P> {}

/// The f32 elements of a contiguous CPU tensor's storage (from `storage_and_layout`), for the
/// fused CPU kernels; `op` names the caller in the error.
fn cpu_f32<'a>(
    st: &'a candle_core::Storage,
    l: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match (st, l.contiguous_offsets()) {
        (candle_core::Storage::Cpu(s), Some((a, z))) => Ok(&s.as_slice::<f32>()?[a..z]),
        _ => candle_core::bail!("{op}: inputs have to be contiguous CPU tensors"),
    }
}

/// Helpers shared by the crate's unit tests (gradient checks run in f64).
#[cfg(test)]
pub(crate) mod testing {
    use candle_core::{DType, Device, Tensor};

    /// Standard normal values from our seeded RNG, as f64.
    pub fn randn(shape: &[usize], seed: u64) -> Tensor {
        crate::rng::Rng::new(seed)
            .randn(shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    }

    /// `max |t|` of a float tensor, as f64.
    pub fn max_abs(t: &Tensor) -> f64 {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    /// `max |a - b|` of two tensors of one float dtype, as f64 (exact for f32).
    pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }
}

pub use attach::{attach, Backward, Value};

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

/// True when a weight needs a gradient (a `Var`, or computed from one).
fn trainable(w: &Tensor, b: Option<&Tensor>) -> bool {
    w.track_op() || b.is_some_and(|b| b.track_op())
}

/// A dense layer `y = x W^T + b`, weights in the PyTorch `[out, in]` layout.
///
/// `weight` is always `[out, in]`, but a frozen f32 CPU weight that narrows its input
/// (`in > out`: CLIP's `fc2`, the UNet's `ff.net.2`, cross-attention keys and values) is stored
/// as its `[in, out]` transpose and `weight` is the transposed view of that buffer. gemm packs
/// the operand it reads against its memory order, and a weight packed that way each call costs
/// more than the product when the rows are few: CLIP's `fc2` on 77 rows takes 10.5 ms from
/// `[out, in]` and 2.6 ms from `[in, out]`. The input gradient reads the weight the other way
/// round, so the layout that speeds one pass slows the other; measured over both passes
/// (forward + input gradient), `[in, out]` wins where `in > out` (77 rows 3072 -> 768: 5.4 ms
/// against 12.9; 1024 rows 2560 -> 640: 32.5 against 46.3), `[out, in]` wins where `in < out`
/// (77 rows 768 -> 3072: 4.7 against 11.3), and square layers are even. One buffer either
/// way: no extra memory.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    /// A low-rank adapter added to the output (DreamBooth-LoRA); the base weight stays frozen
    /// and keeps its fast path.
    pub lora: Option<LoraAdapter>,
}

/// A LoRA adapter `y += scale * (x A^T) B^T` (peft's `W' = W + (alpha / r) B A`), `down` = A
/// `[r, in]`, `up` = B `[out, r]`, `scale` = alpha / r (times a user's strength when sampling).
/// Both factors are usually `Var`s; they may be f32 while the model runs in half precision
/// (they are cast to the activations' dtype in the graph, so their gradients stay f32).
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
}

/// `t` in `dtype` (a graph op when it changes anything, so a trainable f32 master weight used by
/// a half-precision model keeps an f32 gradient).
fn cast_to(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if t.dtype() == dtype {
        Ok(t.clone())
    } else {
        t.to_dtype(dtype)
    }
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let mut weight = vb.get((out_dim, in_dim), "weight")?;
        if in_dim > out_dim && is_cpu_f32(&weight) && !weight.track_op() {
            weight = weight.t()?.contiguous()?.t()?;
        }
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    /// Input and output widths `(in, out)`.
    pub fn dims(&self) -> Result<(usize, usize)> {
        let (o, i) = self.weight.dims2()?;
        Ok((i, o))
    }

    /// Replace the weight by `w` `[out, in]` (a `Var` to train it, or a frozen tensor), in the
    /// storage order [`Linear::new`] would give it.
    pub fn set_weight(&mut self, w: Tensor) -> Result<()> {
        let (o, i) = w.dims2()?;
        self.weight = if i > o && is_cpu_f32(&w) && !w.track_op() {
            w.t()?.contiguous()?.t()?
        } else {
            w
        };
        Ok(())
    }

    /// Fold a LoRA into the frozen weight: `W <- W + scale * up @ down` (computed in f32), so
    /// sampling with a merged LoRA costs no extra products.
    pub fn merge_lora(&mut self, down: &Tensor, up: &Tensor, scale: f64) -> Result<()> {
        let dtype = self.weight.dtype();
        let delta = (up
            .to_dtype(DType::F32)?
            .matmul(&down.to_dtype(DType::F32)?)?
            * scale)?;
        let w = (self.weight.to_dtype(DType::F32)? + delta.to_device(self.weight.device())?)?
            .to_dtype(dtype)?
            .contiguous()?;
        self.set_weight(w)
    }
}

/// `x W^T (+ b)` over the last dimension of `x` (contiguous), as one matrix product.
fn linear_plain(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let wt = w.t()?;
    let y = match x.dims() {
        [b1, b2, m, k] => x
            .reshape((b1 * b2 * m, *k))?
            .matmul(&wt)?
            .reshape((*b1, *b2, *m, ()))?,
        [b, m, k] => x.reshape((b * m, *k))?.matmul(&wt)?.reshape((*b, *m, ()))?,
        _ => x.matmul(&wt)?,
    };
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, None)
    }
}

impl Linear {
    /// `x W^T + b + residual`: the output projections that a residual sum follows. With frozen
    /// weights on the CPU the sum is part of the layer's one output buffer, so the graph keeps
    /// no separate projection output for it.
    pub fn forward_residual(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.apply(x, Some(residual))
    }

    fn apply(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        // candle's CPU matmul is wrong for some non-contiguous batched inputs (SPEC.md §1).
        let x = x.contiguous()?;
        let Some(lora) = &self.lora else {
            return self.apply_base(&x, residual);
        };
        if trainable(&self.weight, self.bias.as_ref()) {
            // A trained base weight under an adapter (no method does this): plain composition.
            let base = self.apply_base(&x, residual)?;
            let dt = x.dtype();
            let mid = linear_plain(&x, &cast_to(&lora.down, dt)?, None)?;
            let delta = linear_plain(&mid, &cast_to(&lora.up, dt)?, None)?;
            return base + (delta * lora.scale)?;
        }
        let y = lora_frozen_base(&x, &self.weight, self.bias.as_ref(), lora)?;
        match residual {
            Some(r) => y + r,
            None => Ok(y),
        }
    }

    fn apply_base(&self, x: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        if trainable(&self.weight, self.bias.as_ref()) {
            let dt = x.dtype();
            let w = cast_to(&self.weight, dt)?;
            let b = self.bias.as_ref().map(|b| cast_to(b, dt)).transpose()?;
            let y = linear_trainable(x, &w, b.as_ref())?;
            return match residual {
                Some(r) => y + r,
                None => Ok(y),
            };
        }
        let value = match linear::forward(&x.detach(), &self.weight, self.bias.as_ref(), residual)?
        {
            Some(v) => v,
            None => {
                let y = linear_plain(&x.detach(), &self.weight, self.bias.as_ref())?;
                match residual {
                    Some(r) => (y + r.detach())?.into(),
                    None => y.into(),
                }
            }
        };
        let w = self.weight.clone();
        // dL/dx = g W; dL/dr = g.
        let input_grad = move |x: &Tensor, g: &Tensor| linear_input_grad(&w, g, x.dims());
        match residual {
            None => attach(
                "linear-frozen",
                &[x],
                value,
                Box::new(move |args, _, g| Ok(vec![Some(input_grad(args[0], g)?)])),
            ),
            Some(r) => attach(
                "linear-frozen-residual",
                &[x, r],
                value,
                Box::new(move |args, _, g| {
                    Ok(vec![
                        Some(input_grad(args[0], g)?),
                        args[1].track_op().then(|| g.clone()),
                    ])
                }),
            ),
        }
    }
}

/// `x W^T + b` with `W` (and `b`) trained: one attached node that keeps only `x` and the
/// weights, whose backward gives `dx = g W`, `dW = g^T x` and `db = sum(g)` over the rows (the
/// composition would also keep the product before the bias).
fn linear_trainable(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let (xd, wd, bd) = (x.detach(), w.detach(), b.map(|b| b.detach()));
    let value = match linear::forward(&xd, &wd, bd.as_ref(), None)? {
        Some(v) => v,
        None => linear_plain(&xd, &wd, bd.as_ref())?.into(),
    };
    let mut inputs = vec![x, w];
    inputs.extend(b);
    let has_bias = b.is_some();
    attach(
        "linear-trainable",
        &inputs,
        value,
        Box::new(move |args, _, g| {
            let (x, w) = (args[0], args[1].detach());
            let (out, inp) = w.dims2()?;
            let rows = g.elem_count() / out.max(1);
            let g2 = g.contiguous()?.reshape((rows, out))?;
            let dx = if x.track_op() {
                Some(linear_input_grad(&w, g, x.dims())?)
            } else {
                None
            };
            let x2 = x.detach().contiguous()?.reshape((rows, inp))?;
            let dw = g2.t()?.matmul(&x2)?;
            let mut grads = vec![dx, Some(dw)];
            if has_bias {
                grads.push(Some(g2.sum(0)?));
            }
            Ok(grads)
        }),
    )
}

/// `x W^T + b + s (x A^T) B^T` with the base frozen and the LoRA factors trained, as one node on
/// `x`, A and B that keeps only those (the composition would keep the base output, the rank-r
/// middle, the adapter's output and its scaled copy). Backward, on the rows of `g`:
/// `dx = g W + s (g B) A`, `dA = s (g B)^T x`, `dB = s g^T (x A^T)`.
fn lora_frozen_base(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    lora: &LoraAdapter,
) -> Result<Tensor> {
    let dt = x.dtype();
    let (down, up) = (cast_to(&lora.down, dt)?, cast_to(&lora.up, dt)?);
    let scale = lora.scale;
    let xd = x.detach();
    let base = match linear::forward(&xd, w, b, None)? {
        Some(v) => v.into_tensor()?,
        None => linear_plain(&xd, w, b)?,
    };
    let delta = linear_plain(
        &linear_plain(&xd, &down.detach(), None)?,
        &up.detach(),
        None,
    )?;
    let value = (base + (delta * scale)?)?;
    let w = w.clone();
    attach(
        "linear-lora",
        &[x, &down, &up],
        value,
        Box::new(move |args, _, g| {
            let (x, a, bm) = (args[0], args[1].detach(), args[2].detach());
            let (out, inp) = w.dims2()?;
            let rows = g.elem_count() / out.max(1);
            let g2 = g.contiguous()?.reshape((rows, out))?;
            let x2 = x.detach().contiguous()?.reshape((rows, inp))?;
            let gb = g2.matmul(&bm)?; // [rows, r]
            let dx = if x.track_op() {
                let d = (g2.matmul(&w)? + (gb.matmul(&a)? * scale)?)?;
                Some(d.reshape(x.dims())?)
            } else {
                None
            };
            let da = (gb.t()?.matmul(&x2)? * scale)?;
            let mid = x2.matmul(&a.t()?)?; // [rows, r]
            let db = (g2.t()?.matmul(&mid)? * scale)?;
            Ok(vec![dx, Some(da), Some(db)])
        }),
    )
}

/// The input gradient `g W` of a linear layer with weight `w` `[out, in]`, on the rows of `g`
/// `[..., out]` flattened to a matrix, shaped as the input (`dims`).
fn linear_input_grad(w: &Tensor, g: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let out = w.dim(0)?;
    let rows = g.elem_count() / out;
    g.contiguous()?
        .reshape((rows, out))?
        .matmul(w)?
        .reshape(dims)
}

impl Linear {
    /// The layer's tensors (weight, bias, LoRA factors): what a checkpointed segment holding it
    /// may have to differentiate.
    pub fn params(&self) -> Vec<Tensor> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        if let Some(l) = &self.lora {
            v.push(l.down.clone());
            v.push(l.up.clone());
        }
        v
    }

    /// True when neither the weight nor the bias needs a gradient.
    pub fn is_frozen(&self) -> bool {
        !trainable(&self.weight, self.bias.as_ref()) && self.lora.is_none()
    }

    /// The gradient with respect to the input of `x -> x W^T + b` given the output gradient `g`
    /// `[..., out]`, for a caller that fuses layers into one graph node (the weight gets none).
    pub fn input_grad(&self, g: &Tensor) -> Result<Tensor> {
        let mut dims = g.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.weight.dim(1)?;
        }
        linear_input_grad(&self.weight, g, &dims)
    }
}

impl Conv2d {
    /// The layer's tensors (weight, bias).
    pub fn params(&self) -> Vec<Tensor> {
        let mut v = vec![self.weight.clone()];
        v.extend(self.bias.clone());
        v
    }
}

impl GroupNorm {
    /// The layer's tensors (weight, bias).
    pub fn params(&self) -> Vec<Tensor> {
        vec![self.weight.clone(), self.bias.clone()]
    }
}

impl LayerNorm {
    /// The layer's tensors (weight, bias).
    pub fn params(&self) -> Vec<Tensor> {
        vec![self.weight.clone(), self.bias.clone()]
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
        if trainable(&self.weight, self.bias.as_ref()) {
            let w = cast_to(&self.weight, x.dtype())?;
            let b = self
                .bias
                .as_ref()
                .map(|b| cast_to(b, x.dtype()))
                .transpose()?;
            return conv::conv2d_trainable(x, &w, b.as_ref(), self.stride, self.padding);
        }
        conv::conv2d_frozen(
            x,
            &self.weight,
            self.bias.as_ref(),
            self.stride,
            self.padding,
        )
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
        if !channels.is_multiple_of(groups) {
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

/// `(x - mean) / sqrt(var + eps)` and `1 / sqrt(var + eps)` over the last dimension of `x`
/// (biased variance, as PyTorch).
fn normalize_last(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let rstd = (var + eps)?.sqrt()?.recip()?;
    Ok((xc.broadcast_mul(&rstd)?, rstd))
}

/// Input gradient of `y = xhat * w + b` with `xhat` normalised over the last dimension:
/// `(gw - mean(gw) - xhat * mean(gw * xhat)) * rstd` with `gw = g * w`, all `[rows, n]`.
fn normalize_last_backward(gw: &Tensor, xhat: &Tensor, rstd: &Tensor) -> Result<Tensor> {
    let m1 = gw.mean_keepdim(D::Minus1)?;
    let m2 = (gw * xhat)?.mean_keepdim(D::Minus1)?;
    gw.broadcast_sub(&m1)?
        .sub(&xhat.broadcast_mul(&m2)?)?
        .broadcast_mul(rstd)
}

impl GroupNorm {
    /// The per-channel affine parameters shaped to broadcast over `[B, C, ...]` of rank `rank`.
    fn affine_shape(&self, rank: usize, c: usize) -> Vec<usize> {
        let mut wd = vec![1usize; rank];
        wd[1] = c;
        wd
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

impl GroupNorm {
    /// `silu(group_norm(x))`, the ResNet blocks' pre-activation, in one kernel where it can.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        if let Some(y) = self.fused_cpu(x, silu)? {
            return Ok(y);
        }
        let y = self.composed(x)?;
        if silu {
            y.silu()
        } else {
            Ok(y)
        }
    }

    /// Frozen weights, f32 on the CPU: [`norm_act`]'s kernels. `None` elsewhere.
    fn fused_cpu(&self, x: &Tensor, silu: bool) -> Result<Option<Tensor>> {
        if x.rank() < 2 {
            return Ok(None);
        }
        let (b, c) = (x.dim(0)?, x.dim(1)?);
        let d = norm_act::Dims {
            b,
            c,
            hw: x.elem_count() / (b * c).max(1),
            groups: self.groups,
        };
        let name = if silu {
            "group-norm-silu-frozen"
        } else {
            "group-norm-frozen"
        };
        if trainable(&self.weight, Some(&self.bias)) {
            return fused_norm_trainable(
                "group-norm-trainable",
                x,
                (&self.weight, &self.bias),
                d,
                self.eps,
                silu,
            );
        }
        fused_norm(name, x, &self.weight, &self.bias, d, self.eps, silu)
    }

    /// The composition of tensor ops (any device and dtype; trainable weights).
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let c = dims[1];
        let dtype = x.dtype();
        let wd = self.affine_shape(dims.len(), c);
        let (w, bias) = (
            cast_to(&self.weight, dtype)?.reshape(wd.clone())?,
            cast_to(&self.bias, dtype)?.reshape(wd)?,
        );
        let groups = self.groups;
        let eps = self.eps;
        let grouped = move |x: &Tensor| {
            x.reshape((x.dim(0)?, groups, ()))?
                .to_dtype(stat_dtype(x.dtype()))
        };
        if trainable(&self.weight, Some(&self.bias)) {
            let xg = grouped(x)?;
            let mean = xg.mean_keepdim(2)?;
            let xc = xg.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(2)?;
            let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
            return xn
                .to_dtype(dtype)?
                .reshape(dims)?
                .broadcast_mul(&w)?
                .broadcast_add(&bias);
        }
        let (xn, _) = normalize_last(&grouped(&x.detach())?, eps)?;
        let y = xn
            .to_dtype(dtype)?
            .reshape(dims.clone())?
            .broadcast_mul(&w)?
            .broadcast_add(&bias)?;
        attach(
            "group-norm-frozen",
            &[x],
            y,
            Box::new(move |args, _, g| {
                let (xhat, rstd) = normalize_last(&grouped(&args[0].detach())?, eps)?;
                let gw = grouped(&g.broadcast_mul(&w)?)?;
                let dx = normalize_last_backward(&gw, &xhat, &rstd)?;
                Ok(vec![Some(dx.to_dtype(dtype)?.reshape(dims.clone())?)])
            }),
        )
    }
}

/// A frozen normalisation (and SiLU) of `x` over the groups of `d`, f32 on the CPU, by
/// [`norm_act`]'s kernels: the output buffer goes to the graph as it is, and the backward keeps
/// `x` and two floats per group. `None` where it does not apply.
fn fused_norm(
    name: &'static str,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    d: norm_act::Dims,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && is_cpu_f32(bias)) {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let (x, w, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let (y, stats) = norm_forward_cpu(name, &x, (&w, &bias), d, eps, silu)?;
    let y = attach(
        name,
        &[&x],
        Value::Cpu(y, dims.clone().into()),
        Box::new(move |args, _, g| {
            let (x, g) = (args[0].contiguous()?, g.contiguous()?);
            let dx =
                fused_norm_input_grad(name, (&x, &g), (&w, &bias), Some(&stats), d, eps, silu)?;
            Ok(vec![Some(Tensor::from_vec(dx, dims.clone(), x.device())?)])
        }),
    )?;
    Ok(Some(y))
}

/// [`norm_act`]'s forward on contiguous f32 CPU tensors: the output values and the per-group
/// statistics.
fn norm_forward_cpu(
    name: &'static str,
    x: &Tensor,
    (w, b): (&Tensor, &Tensor),
    d: norm_act::Dims,
    eps: f64,
    silu: bool,
) -> Result<(Vec<f32>, norm_act::Stats)> {
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = b.storage_and_layout();
    Ok(norm_act::forward(
        cpu_f32(&xs, xl, name)?,
        cpu_f32(&ws, wl, name)?,
        cpu_f32(&bs, bl, name)?,
        d,
        eps,
        silu,
    ))
}

/// [`fused_norm`] with trainable affine parameters (f32 on the CPU): one node on `x`, the
/// weight and the bias that keeps `x` and two floats per group, whose backward gives the input
/// gradient by [`norm_act`]'s kernel and the weight and bias gradients by
/// `norm_act::affine_grads`. `None` where it does not apply.
fn fused_norm_trainable(
    name: &'static str,
    x: &Tensor,
    (weight, bias): (&Tensor, &Tensor),
    d: norm_act::Dims,
    eps: f64,
    silu: bool,
) -> Result<Option<Tensor>> {
    if !(is_cpu_f32(x) && is_cpu_f32(weight) && is_cpu_f32(bias)) {
        return Ok(None);
    }
    let dims = x.dims().to_vec();
    let xc = x.contiguous()?;
    let (w, b) = (weight.detach().contiguous()?, bias.detach().contiguous()?);
    let (y, stats) = norm_forward_cpu(name, &xc, (&w, &b), d, eps, silu)?;
    let y = attach(
        name,
        &[&xc, weight, bias],
        Value::Cpu(y, dims.clone().into()),
        Box::new(move |args, _, g| {
            let (x, g) = (args[0].detach().contiguous()?, g.contiguous()?);
            let (xs, xl) = x.storage_and_layout();
            let (gs, gl) = g.storage_and_layout();
            let (ws, wl) = w.storage_and_layout();
            let (bs, bl) = b.storage_and_layout();
            let (xv, gv, wv, bv) = (
                cpu_f32(&xs, xl, name)?,
                cpu_f32(&gs, gl, name)?,
                cpu_f32(&ws, wl, name)?,
                cpu_f32(&bs, bl, name)?,
            );
            let dx = if args[0].track_op() {
                let v = norm_act::backward(xv, gv, wv, bv, &stats, d, silu);
                Some(Tensor::from_vec(v, dims.clone(), x.device())?)
            } else {
                None
            };
            let (dw, db) = norm_act::affine_grads(xv, gv, wv, bv, &stats, d, silu);
            Ok(vec![
                dx,
                Some(Tensor::from_vec(dw, d.c, x.device())?),
                Some(Tensor::from_vec(db, d.c, x.device())?),
            ])
        }),
    )?;
    Ok(Some(y))
}

/// [`norm_act`]'s input gradient of [`fused_norm`] for contiguous f32 CPU tensors `x` and `g`,
/// from the forward's statistics, or from statistics recomputed from `x` (a forward pass whose
/// output is dropped) when `stats` is `None`.
fn fused_norm_input_grad(
    name: &'static str,
    (x, g): (&Tensor, &Tensor),
    (w, bias): (&Tensor, &Tensor),
    stats: Option<&norm_act::Stats>,
    d: norm_act::Dims,
    eps: f64,
    silu: bool,
) -> Result<Vec<f32>> {
    let (xs, xl) = x.storage_and_layout();
    let (gs, gl) = g.storage_and_layout();
    let (ws, wl) = w.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    let (xv, wv, bv) = (
        cpu_f32(&xs, xl, name)?,
        cpu_f32(&ws, wl, name)?,
        cpu_f32(&bs, bl, name)?,
    );
    let recomputed;
    let stats = match stats {
        Some(s) => s,
        None => {
            recomputed = norm_act::forward(xv, wv, bv, d, eps, silu).1;
            &recomputed
        }
    };
    Ok(norm_act::backward(
        xv,
        cpu_f32(&gs, gl, name)?,
        wv,
        bv,
        stats,
        d,
        silu,
    ))
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

impl LayerNorm {
    /// True when neither the weight nor the bias needs a gradient.
    pub fn is_frozen(&self) -> bool {
        !trainable(&self.weight, Some(&self.bias))
    }

    /// The gradient with respect to `x` of this layer's output, given the output gradient `g`,
    /// for a caller that fuses layers into one graph node (the weights get none). The
    /// statistics are recomputed from `x`: one pass over it.
    pub fn input_grad(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        let (x, g) = (x.detach().contiguous()?, g.contiguous()?);
        let c = x.dim(D::Minus1)?;
        let (w, b) = (&self.weight, &self.bias);
        if is_cpu_f32(&x) && is_cpu_f32(&g) && is_cpu_f32(w) && is_cpu_f32(b) {
            let d = norm_act::Dims {
                b: x.elem_count() / c.max(1),
                c,
                hw: 1,
                groups: 1,
            };
            let (w, b) = (w.contiguous()?, b.contiguous()?);
            let dx = fused_norm_input_grad(
                "layer-norm-input-grad",
                (&x, &g),
                (&w, &b),
                None,
                d,
                self.eps,
                false,
            )?;
            return Tensor::from_vec(dx, x.dims(), x.device());
        }
        layer_norm_grad_composed(&x, &g, w, self.eps)
    }
}

/// The input gradient of a layer norm with weight `w`, from candle's ops (any dtype and
/// device; half precision computes in f32).
fn layer_norm_grad_composed(x: &Tensor, g: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let (dtype, sd) = (x.dtype(), stat_dtype(x.dtype()));
    let (xhat, rstd) = normalize_last(&x.detach().to_dtype(sd)?, eps)?;
    let gw = g.broadcast_mul(w)?.to_dtype(sd)?;
    normalize_last_backward(&gw, &xhat, &rstd)?.to_dtype(dtype)
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last dimension (biased variance, as PyTorch).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    // Each row is one group of `C` channels of one value each (so the affine gradients' sums
    // per channel run over the rows).
    let c = x.dim(D::Minus1)?;
    let rows = norm_act::Dims {
        b: x.elem_count() / c.max(1),
        c,
        hw: 1,
        groups: 1,
    };
    if trainable(w, Some(b)) {
        if let Some(y) = fused_norm_trainable("layer-norm-trainable", x, (w, b), rows, eps, false)?
        {
            return Ok(y);
        }
        let x = x.to_dtype(stat_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
        return xn
            .to_dtype(dtype)?
            .broadcast_mul(&cast_to(w, dtype)?)?
            .broadcast_add(&cast_to(b, dtype)?);
    }
    if let Some(y) = fused_norm("layer-norm-frozen", x, w, b, rows, eps, false)? {
        return Ok(y);
    }
    let sd = stat_dtype(dtype);
    let (xn, _) = normalize_last(&x.detach().to_dtype(sd)?, eps)?;
    let y = xn.to_dtype(dtype)?.broadcast_mul(w)?.broadcast_add(b)?;
    let w = w.clone();
    attach(
        "layer-norm-frozen",
        &[x],
        y,
        Box::new(move |args, _, g| Ok(vec![Some(layer_norm_grad_composed(args[0], g, &w, eps)?)])),
    )
}

/// Statistics of half-precision activations are computed in f32; f32 and f64 stay as they are.
fn stat_dtype(d: DType) -> DType {
    match d {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
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
/// additive mask (no gradient) broadcastable to `[batch, heads, q_len, k_len]`. The softmax is
/// never kept for the backward pass, which recomputes it block by block.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    if mask.is_some_and(|m| m.track_op()) {
        return attention_composed(q, k, v, mask);
    }
    attention::attention_blocks(q, k, v, mask)
}

/// Attention composed from differentiable ops (also differentiable in the mask); keeps the
/// softmax for the backward pass.
fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
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

/// `x + c`, broadcasting `c` to the shape of `x`. When `c` needs no gradient (a timestep
/// embedding, a position table), the backward pass hands `x` the output gradient and forms none
/// for `c` (candle's broadcast add would form, and keep, a full-size one).
pub fn broadcast_add(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if c.track_op() {
        return x.broadcast_add(c);
    }
    let y = x.detach().broadcast_add(c)?;
    if y.dims() != x.dims() {
        return x.broadcast_add(c);
    }
    attach(
        "add-constant",
        &[x],
        y,
        Box::new(|_, _, g| Ok(vec![Some(g.clone())])),
    )
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

#[cfg(test)]
mod tests {
    use super::testing::{max_diff, randn};
    use super::*;
    use candle_core::Var;

    /// Run `layer(x)` with frozen weights and with the same weights as `Var`s (candle's own
    /// backward); outputs and input gradients must agree, and the frozen run must form no
    /// gradient for any weight.
    fn check_frozen_matches_trainable(
        name: &str,
        x0: &Tensor,
        weights: &[Tensor],
        layer: impl Fn(&Tensor, &[Tensor]) -> Tensor,
    ) {
        let x = Var::from_tensor(x0).unwrap();
        let y = layer(x.as_tensor(), weights);
        let r = randn(y.dims(), 99);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(x.as_tensor()).expect("input gradient");
        for w in weights {
            assert!(g.get(w).is_none(), "{name}: a frozen weight got a gradient");
        }
        let vars: Vec<Var> = weights
            .iter()
            .map(|w| Var::from_tensor(w).unwrap())
            .collect();
        let wt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let xr = Var::from_tensor(x0).unwrap();
        let yr = layer(xr.as_tensor(), &wt);
        let gr = (&yr * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&y, &yr) < 1e-10, "{name}: forward");
        let dx_ref = gr.get(xr.as_tensor()).unwrap();
        assert!(max_diff(dx, dx_ref) < 1e-10, "{name}: input gradient");
        for v in &vars {
            assert!(
                gr.get(v.as_tensor()).is_some(),
                "{name}: trainable weight lost its gradient"
            );
        }
    }

    #[test]
    fn frozen_linear_matches_trainable() {
        for (shape, seed) in [(vec![5, 6], 1), (vec![2, 3, 6], 2), (vec![2, 2, 3, 6], 3)] {
            check_frozen_matches_trainable(
                "linear",
                &randn(&shape, seed),
                &[randn(&[4, 6], 10), randn(&[4], 11)],
                |x, w| {
                    Linear::from_tensors(w[0].clone(), Some(w[1].clone()))
                        .forward(x)
                        .unwrap()
                },
            );
        }
        // Non-contiguous input.
        let x = randn(&[3, 6, 2], 4).transpose(1, 2).unwrap();
        check_frozen_matches_trainable("linear-t", &x, &[randn(&[4, 6], 12)], |x, w| {
            Linear::from_tensors(w[0].clone(), None).forward(x).unwrap()
        });
    }

    /// The f32 CPU path of the frozen linear layer (one gemm onto the bias and the residual)
    /// against the f64 composition with trainable weights: values, and gradients to the input
    /// and to a tracked residual; with and without bias, residual untracked, and a 4-d input;
    /// the weight stored `[out, in]` or as the transposed view of an `[in, out]` buffer.
    #[test]
    fn frozen_f32_linear_with_residual_matches_composition() {
        for (shape, bias, residual, seed, stored_transposed) in [
            (vec![2, 7, 6], true, Some(true), 1, false),
            (vec![2, 7, 6], false, Some(true), 2, false),
            (vec![3, 6], true, None, 3, false),
            (vec![2, 2, 3, 6], true, Some(false), 4, false),
            (vec![2, 7, 6], true, Some(true), 5, true),
            (vec![3, 6], false, None, 6, true),
            (vec![2, 2, 3, 6], true, Some(false), 7, true),
        ] {
            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let frozen_w = |t: &Tensor| {
                let w = f32s(t);
                if stored_transposed {
                    let w = w.t().unwrap().contiguous().unwrap().t().unwrap();
                    assert!(!w.is_contiguous());
                    w
                } else {
                    w
                }
            };
            let (w, b) = (randn(&[5, 6], seed + 10), randn(&[5], seed + 20));
            let x0 = randn(&shape, seed);
            let mut out = shape.clone();
            *out.last_mut().unwrap() = 5;
            let r0 = randn(&out, seed + 30);
            let g = randn(&out, seed + 40);
            assert!(linear::forward(&f32s(&x0), &frozen_w(&w), None, None)
                .unwrap()
                .is_some());
            let run = |x: &Tensor, r: &Tensor, w: &Tensor, b: &Tensor| {
                let lin = Linear::from_tensors(w.clone(), bias.then(|| b.clone()));
                match residual {
                    Some(_) => lin.forward_residual(x, r).unwrap(),
                    None => lin.forward(x).unwrap(),
                }
            };
            // Frozen f32.
            let (xv, rv) = (
                Var::from_tensor(&f32s(&x0)).unwrap(),
                Var::from_tensor(&f32s(&r0)).unwrap(),
            );
            let r_in = if residual == Some(true) {
                rv.as_tensor().clone()
            } else {
                f32s(&r0)
            };
            let y = run(xv.as_tensor(), &r_in, &frozen_w(&w), &f32s(&b));
            let gs = (&y * &f32s(&g))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            // Trainable f64.
            let (xr, rr) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&r0).unwrap(),
            );
            let (wv, bv) = (Var::from_tensor(&w).unwrap(), Var::from_tensor(&b).unwrap());
            let yr = run(
                xr.as_tensor(),
                rr.as_tensor(),
                wv.as_tensor(),
                bv.as_tensor(),
            );
            let gr = (&yr * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
            let case = format!(
                "{shape:?} bias {bias} residual {residual:?} transposed {stored_transposed}"
            );
            assert!(max_diff(&to64(&y), &yr) < 1e-5, "{case}: forward");
            let dx = gs.get(xv.as_tensor()).unwrap();
            assert!(
                max_diff(&to64(dx), gr.get(xr.as_tensor()).unwrap()) < 1e-5,
                "{case}: dx"
            );
            match residual {
                Some(true) => {
                    let dr = gs.get(rv.as_tensor()).expect("residual gradient");
                    assert!(max_diff(&to64(dr), &g) < 1e-6, "{case}: dr");
                }
                _ => assert!(
                    gs.get(rv.as_tensor()).is_none(),
                    "{case}: untracked residual"
                ),
            }
        }
    }

    /// `Linear::new` stores a frozen f32 weight that narrows its input as an `[in, out]` buffer
    /// (its `weight` still reads `[out, in]`), and leaves widening layers and trainable weights
    /// as loaded.
    #[test]
    fn frozen_narrowing_linear_is_stored_transposed() {
        let w = |o: usize, i: usize| randn(&[o, i], (o * 10 + i) as u64).to_dtype(DType::F32);
        let (narrow, widen) = (w(3, 5).unwrap(), w(5, 3).unwrap());
        let tensors = std::collections::HashMap::from([
            ("narrow.weight".to_string(), narrow.clone()),
            ("widen.weight".to_string(), widen.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let n = Linear::new(vb.pp("narrow"), 5, 3, false).unwrap();
        assert_eq!(n.weight.dims(), &[3, 5]);
        assert!(!n.weight.is_contiguous() && n.weight.t().unwrap().is_contiguous());
        assert_eq!(max_diff(&n.weight, &narrow), 0.0);
        let x = randn(&[4, 5], 9).to_dtype(DType::F32).unwrap();
        let plain = x.matmul(&narrow.t().unwrap()).unwrap();
        assert!(max_diff(&n.forward(&x).unwrap(), &plain) < 1e-6);
        let wd = Linear::new(vb.pp("widen"), 3, 5, false).unwrap();
        assert!(wd.weight.is_contiguous());
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let t = Linear::new(vb.pp("trainable"), 5, 3, false).unwrap();
        assert!(
            t.weight.is_contiguous(),
            "a trainable weight is left as loaded"
        );
    }

    #[test]
    fn frozen_conv_matches_trainable() {
        for (stride, pad, k) in [(1, 1, 3), (2, 1, 3), (1, 0, 1)] {
            check_frozen_matches_trainable(
                "conv",
                &randn(&[2, 3, 6, 6], 5),
                &[randn(&[4, 3, k, k], 13), randn(&[4], 14)],
                |x, w| {
                    Conv2d {
                        weight: w[0].clone(),
                        bias: Some(w[1].clone()),
                        stride,
                        padding: pad,
                    }
                    .forward(x)
                    .unwrap()
                },
            );
        }
    }

    #[test]
    fn frozen_norms_match_trainable() {
        let w = (randn(&[6], 15) + 1.0).unwrap();
        let b = randn(&[6], 16);
        check_frozen_matches_trainable(
            "group-norm",
            &randn(&[2, 6, 3, 4], 6),
            &[w.clone(), b.clone()],
            |x, w| {
                GroupNorm {
                    weight: w[0].clone(),
                    bias: w[1].clone(),
                    groups: 3,
                    eps: 1e-5,
                }
                .forward(x)
                .unwrap()
            },
        );
        check_frozen_matches_trainable("layer-norm", &randn(&[2, 5, 6], 7), &[w, b], |x, w| {
            LayerNorm::from_tensors(w[0].clone(), w[1].clone(), 1e-5)
                .forward(x)
                .unwrap()
        });
    }

    /// A fused f32 CPU layer against its composition in f64 with trainable weights: `fused` gets
    /// `x` and `weights` in f32, `reference` in f64 as variables; the values must agree to 1e-5
    /// and the input gradients (of `sum(y * r)`) to 1e-4 of their size.
    fn assert_fused_matches_f64(
        label: &str,
        x: &Tensor,
        weights: &[Tensor],
        r: &Tensor,
        fused: impl Fn(&Tensor, &[Tensor]) -> Tensor,
        reference: impl Fn(&Tensor, &[Tensor]) -> Tensor,
    ) {
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let xv = Var::from_tensor(&f32s(x)).unwrap();
        let w32: Vec<Tensor> = weights.iter().map(f32s).collect();
        let y = fused(xv.as_tensor(), &w32);
        let grads = (&y * &f32s(r)).unwrap().sum_all().unwrap().backward();
        let dx = grads.unwrap().get(xv.as_tensor()).unwrap().clone();
        let xr = Var::from_tensor(x).unwrap();
        let vars: Vec<Tensor> = weights
            .iter()
            .map(|w| Var::from_tensor(w).unwrap().as_tensor().clone())
            .collect();
        let yr = reference(xr.as_tensor(), &vars);
        let gr = (&yr * r).unwrap().sum_all().unwrap().backward().unwrap();
        let dx_ref = gr.get(xr.as_tensor()).unwrap();
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let dy = max_diff(&to64(&y), &yr);
        let ddx = max_diff(&to64(&dx), dx_ref);
        assert!(dy < 1e-5, "{label}: forward {dy}");
        assert!(
            ddx < 1e-4 * testing::max_abs(dx_ref).max(1.0),
            "{label}: input gradient {ddx}"
        );
    }

    /// The frozen f32 layer norm (the fused kernel, one group per row) against the composition
    /// in f64 with trainable weights: values and input gradients, 2-d and 3-d inputs.
    #[test]
    fn fused_layer_norm_matches_composition() {
        for shape in [vec![5, 33], vec![2, 7, 48], vec![3, 768]] {
            let c = *shape.last().unwrap();
            let x = randn(&shape, 31).affine(3.0, 0.5).unwrap();
            let (w, b) = ((randn(&[c], 32) + 1.0).unwrap(), randn(&[c], 33));
            let r = randn(&shape, 34);
            let ln = |x: &Tensor, w: &[Tensor]| layer_norm(x, &w[0], &w[1], 1e-5).unwrap();
            assert_fused_matches_f64(&format!("{shape:?}"), &x, &[w, b], &r, ln, ln);
        }
    }

    /// The fused f32 CPU group norm (with and without SiLU) against the composition in f64
    /// with trainable weights: values and input gradients; 4-d and 3-d inputs.
    #[test]
    fn fused_group_norm_matches_composition() {
        for (shape, groups) in [(vec![2, 6, 5, 7], 3), (vec![2, 4, 9], 2)] {
            let c = shape[1];
            let (x, w, b) = (
                randn(&shape, 21),
                (randn(&[c], 22) + 1.0).unwrap(),
                randn(&[c], 23),
            );
            let r = randn(&shape, 24);
            let gn = |w: &[Tensor]| GroupNorm {
                weight: w[0].clone(),
                bias: w[1].clone(),
                groups,
                eps: 1e-5,
            };
            for silu in [false, true] {
                assert_fused_matches_f64(
                    &format!("{shape:?} silu {silu}"),
                    &x,
                    &[w.clone(), b.clone()],
                    &r,
                    |x, w| {
                        gn(w)
                            .fused_cpu(x, silu)
                            .unwrap()
                            .expect("the fused path applies to f32 CPU tensors")
                    },
                    |x, w| {
                        if silu {
                            gn(w).forward_silu(x)
                        } else {
                            gn(w).forward(x)
                        }
                        .unwrap()
                    },
                );
            }
        }
    }

    /// Central finite differences of `sum(layer(x, w) * r)` with respect to a few entries of
    /// each trainable weight (f64), against candle's backward through the layer's trainable
    /// path: a linear layer (and its LoRA factors), a stride-1 and a stride-2 convolution, a
    /// group norm (with SiLU) and a layer norm.
    #[test]
    fn weight_gradients_match_finite_differences() {
        type Layer = Box<dyn Fn(&Tensor, &[Tensor]) -> Tensor>;
        let cases: Vec<(&str, Tensor, Vec<Tensor>, Layer)> = vec![
            (
                "linear",
                randn(&[2, 3, 6], 1),
                vec![randn(&[4, 6], 2), randn(&[4], 3)],
                Box::new(|x, w| {
                    Linear::from_tensors(w[0].clone(), Some(w[1].clone()))
                        .forward(x)
                        .unwrap()
                }),
            ),
            (
                "lora",
                randn(&[2, 3, 6], 4),
                vec![randn(&[2, 6], 5), randn(&[4, 2], 6)],
                Box::new(|x, w| {
                    let mut l = Linear::from_tensors(randn(&[4, 6], 7), None);
                    l.lora = Some(LoraAdapter {
                        down: w[0].clone(),
                        up: w[1].clone(),
                        scale: 0.5,
                    });
                    l.forward(x).unwrap()
                }),
            ),
            (
                "conv stride 1",
                randn(&[2, 3, 5, 5], 8),
                vec![randn(&[4, 3, 3, 3], 9), randn(&[4], 10)],
                Box::new(|x, w| {
                    Conv2d {
                        weight: w[0].clone(),
                        bias: Some(w[1].clone()),
                        stride: 1,
                        padding: 1,
                    }
                    .forward(x)
                    .unwrap()
                }),
            ),
            (
                "conv stride 2",
                randn(&[2, 3, 6, 6], 11),
                vec![randn(&[4, 3, 3, 3], 12), randn(&[4], 13)],
                Box::new(|x, w| {
                    Conv2d {
                        weight: w[0].clone(),
                        bias: Some(w[1].clone()),
                        stride: 2,
                        padding: 1,
                    }
                    .forward(x)
                    .unwrap()
                }),
            ),
            (
                "group norm + silu",
                randn(&[2, 6, 3, 4], 14),
                vec![(randn(&[6], 15) + 1.0).unwrap(), randn(&[6], 16)],
                Box::new(|x, w| {
                    GroupNorm {
                        weight: w[0].clone(),
                        bias: w[1].clone(),
                        groups: 3,
                        eps: 1e-5,
                    }
                    .forward_silu(x)
                    .unwrap()
                }),
            ),
            (
                "layer norm",
                randn(&[2, 5, 6], 17),
                vec![(randn(&[6], 18) + 1.0).unwrap(), randn(&[6], 19)],
                Box::new(|x, w| layer_norm(x, &w[0], &w[1], 1e-5).unwrap()),
            ),
        ];
        for (name, x, w0, layer) in cases {
            let y0 = layer(&x, &w0);
            let r = randn(y0.dims(), 99);
            let loss = |w: &[Tensor]| -> f64 {
                (layer(&x, w) * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let vars: Vec<Var> = w0.iter().map(|w| Var::from_tensor(w).unwrap()).collect();
            let wt: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let grads = (layer(&x, &wt) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (i, v) in vars.iter().enumerate() {
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: weight {i} got no gradient"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let base = w0[i].flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let h = 1e-5;
                for k in [0, base.len() / 2, base.len() - 1] {
                    let at = |d: f64| {
                        let mut vals = base.clone();
                        vals[k] += d;
                        let mut w = w0.clone();
                        w[i] = Tensor::from_vec(vals, w0[i].dims(), &Device::Cpu).unwrap();
                        loss(&w)
                    };
                    let fd = (at(h) - at(-h)) / (2.0 * h);
                    assert!(
                        (fd - g[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
                        "{name}: weight {i}[{k}]: backward {} vs finite difference {fd}",
                        g[k]
                    );
                }
            }
        }
    }

    #[test]
    fn broadcast_add_of_a_constant() {
        let c = randn(&[1, 4, 1, 1], 8);
        check_frozen_matches_trainable("add", &randn(&[2, 4, 3, 3], 9), &[], |x, _| {
            broadcast_add(x, &c).unwrap()
        });
    }
}
