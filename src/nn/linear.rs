//! The frozen linear layer's forward on the CPU in f32 as one `gemm` call into a buffer that
//! already holds the bias (and, where asked, a residual added to the output), handed to the
//! graph without a copy ([`Value::Cpu`]).
//!
//! Composed, `x W^T + b (+ r)` allocates and writes the product, then a second tensor for the
//! bias, a third for the residual, and the attached op copies the result once more: four fresh
//! output-sized buffers where this writes one. The graph also no longer keeps the layer's own
//! output for the residual sum that follows it.

use super::{cpu_f32, Value};
use candle_core::{Result, Tensor};

/// `x W^T + b + r` for `x` `[..., in]`, `weight` `[out, in]`, `bias` `[out]` and `residual`
/// shaped as the output. `None` where this path does not apply (not f32 on the CPU).
pub(super) fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    residual: Option<&Tensor>,
) -> Result<Option<Value>> {
    use super::is_cpu_f32;
    if !is_cpu_f32(x)
        || !is_cpu_f32(weight)
        || !bias.is_none_or(is_cpu_f32)
        || !residual.is_none_or(is_cpu_f32)
    {
        return Ok(None);
    }
    let (out, inp) = weight.dims2()?;
    let mut dims = x.dims().to_vec();
    match dims.last_mut() {
        Some(last) if *last == inp => *last = out,
        _ => candle_core::bail!(
            "linear: input {:?} does not end in the weight's {inp} inputs",
            x.dims()
        ),
    }
    if let Some(r) = residual {
        if r.dims() != dims.as_slice() {
            candle_core::bail!(
                "linear: residual {:?} is not the output's {dims:?}",
                r.dims()
            );
        }
    }
    let rows = x.elem_count() / inp.max(1);
    // The weight's buffer as stored, with the strides that read W^T from it as the `inp x out`
    // right-hand side (column, row): the `[in, out]` buffer behind a transposed view (see
    // `Linear`), else `[out, in]` row-major (copied so where it is neither).
    let x = x.contiguous()?;
    let (w_buf, (w_cs, w_rs)) = if !weight.is_contiguous() && weight.t()?.is_contiguous() {
        (weight.t()?, (1, out as isize))
    } else {
        (weight.contiguous()?, (inp as isize, 1))
    };
    let bias = bias.map(|b| b.contiguous()).transpose()?;
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    // The output starts as the bias and the residual; the product is added onto it.
    let mut dst = match &residual {
        Some(r) => r.flatten_all()?.to_vec1::<f32>()?,
        None => vec![0f32; rows * out],
    };
    if let Some(b) = &bias {
        let (bs, bl) = b.storage_and_layout();
        let b = cpu_f32(&bs, bl, "linear")?;
        if b.len() != out {
            candle_core::bail!("linear: bias has {} values for {out} outputs", b.len());
        }
        for row in dst.chunks_exact_mut(out) {
            row.iter_mut().zip(b).for_each(|(d, &b)| *d += b);
        }
    }
    let read_dst = bias.is_some() || residual.is_some();
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w_buf.storage_and_layout();
        let (xv, wv) = (cpu_f32(&xs, xl, "linear")?, cpu_f32(&ws, wl, "linear")?);
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: dst is rows x out (row-major), x rows x inp, and W^T is read as inp x out
        // through (w_cs, w_rs) from a buffer of out * inp values in the order those strides
        // describe; all three slices span these sizes.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inp,
                dst.as_mut_ptr(),
                1,
                out as isize,
                read_dst,
                xv.as_ptr(),
                1,
                inp as isize,
                wv.as_ptr(),
                w_cs,
                w_rs,
                if read_dst { 1.0 } else { 0.0 },
                1.0,
                false,
                false,
                false,
                parallelism,
            );
        }
    }
    Ok(Some(Value::Cpu(dst, dims.into())))
}
