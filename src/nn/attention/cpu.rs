//! The fused CPU kernels of the attention op, f32 without a mask (the UNet's attention): each
//! task computes one block of queries' scores into its own buffer and calls `gemm` directly, so
//! no score tensor is allocated and every elementwise step runs on cache-warm rows.
//!
//! Forward: `S = s Q K^T`, the softmax in place, `O = P V`.
//! Backward, per block, from the recomputed `P`: `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))`
//! in place, `dQ = s dS K`, and the sums over blocks `dV += P^T dO`, `dK += s dS^T Q`.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};

use crate::nn::{cpu_f32, softmax, Shared};

/// Scores per task: 1 M f32 = 4 MB (256 queries of SD's 4096 keys). Each task has `gemm` pack
/// all the keys and all the values again, so few tall blocks beat many cache-sized ones: against
/// 64 K scores (256 KB, L2-resident), the 512 px sampling step took 17-19 s instead of 19.8 s;
/// 16 M scores was no better than 1 M (back to back, 2-core CPU).
const TASK_SCORES: usize = 1 << 20;

/// Batch, heads, query length, key length, head width.
type Dims = (usize, usize, usize, usize, usize);

/// `(b, h, lq, lk, d)` when the fused kernels apply to these `[B, H, L, d]` inputs: f32 on the
/// CPU, with AVX2 and FMA for the softmax.
fn dims(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Option<Dims>> {
    if !matches!(q.device(), Device::Cpu) || q.dtype() != DType::F32 || !softmax::simd_available() {
        return Ok(None);
    }
    let (b, h, lq, d) = q.dims4()?;
    let lk = k.dim(2)?;
    if k.dims4()? != (b, h, lk, d) || v.dims4()? != (b, h, lk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match",
            q.shape(),
            k.shape(),
            v.shape()
        );
    }
    Ok(Some((b, h, lq, lk, d)))
}

/// Query rows per task of at most `scores` scores, for `lk` keys.
fn rows_per_task(scores: usize, lq: usize, lk: usize) -> usize {
    (scores / lk.max(1)).clamp(1, lq.max(1))
}

/// `p = softmax(s Q_b K^T)` for `r` query rows `qb` (`r x d`) and the head's keys `kh`
/// (`lk x d`): the forward's probabilities and the backward's recomputation of them.
///
/// # Safety
/// `qb` and `kh` span their matrices; `p` holds `r * lk` values and `tmp` at least `lk`.
#[allow(clippy::too_many_arguments)]
unsafe fn block_probs(
    p: &mut [f32],
    qb: *const f32,
    kh: *const f32,
    r: usize,
    lk: usize,
    d: usize,
    scale: f32,
    tmp: &mut [f32],
) {
    gemm(
        r,
        lk,
        d,
        Mat::rows(p.as_mut_ptr(), lk),
        false,
        Mat::rows(qb, d),
        Mat::transposed(kh, d),
        scale,
    );
    softmax::softmax_rows_in_place(p, lk, tmp);
}

/// A row-major matrix view for [`gemm`]: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Row-major with `cols` columns.
    fn rows(ptr: *const f32, cols: usize) -> Self {
        Self {
            ptr,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with `cols` columns.
    fn transposed(ptr: *const f32, cols: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: cols,
        }
    }
}

/// `dst (m x n) = [dst +] scale * lhs (m x k) rhs (k x n)` on this thread.
///
/// # Safety
/// Every view spans the memory its strides describe, and `dst` is written by this caller alone.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: Mat,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst.ptr as *mut f32,
        dst.cs as isize,
        dst.rs as isize,
        accumulate,
        lhs.ptr,
        lhs.cs as isize,
        lhs.rs as isize,
        rhs.ptr,
        rhs.cs as isize,
        rhs.rs as isize,
        if accumulate { 1.0 } else { 0.0 },
        scale,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// The f32 data of contiguous CPU tensors as shared read-only pointers, from their held
/// storages (`storage_and_layout`), which the caller keeps until the pointers are done with.
fn pointers(
    held: &[(impl std::ops::Deref<Target = Storage>, &Layout)],
) -> Result<Vec<Shared<*const f32>>> {
    held.iter()
        .map(|(st, l)| Ok(Shared(cpu_f32(st, l, "attention")?.as_ptr())))
        .collect()
}

/// Attention forward without a graph. `None` where these kernels do not apply. Inputs contiguous.
pub(super) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Option<Tensor>> {
    let Some((b, h, lq, lk, d)) = dims(q, k, v)? else {
        return Ok(None);
    };
    let held: Vec<_> = [q, k, v].iter().map(|t| t.storage_and_layout()).collect();
    let p = pointers(&held)?;
    let (qs, ks, vs) = (p[0], p[1], p[2]);
    let rows = rows_per_task(TASK_SCORES, lq, lk);
    let per_head = lq.div_ceil(rows);
    let mut out = vec![0f32; b * h * lq * d];
    let dst = Shared(out.as_mut_ptr());
    let scale = scale as f32;
    candle_core::utils::barrier_pool().execute_chunked(b * h * per_head, |tasks| {
        #[allow(clippy::redundant_locals)]
        let (dst, qs, ks, vs) = (dst, qs, ks, vs);
        let mut scores = vec![0f32; rows * lk];
        let mut tmp = vec![0f32; lk];
        for task in tasks {
            let (head, blk) = (task / per_head, task % per_head);
            let r0 = blk * rows;
            let r = rows.min(lq - r0);
            let s = &mut scores[..r * lk];
            // SAFETY: the storages are held (`held`) for the whole call and each view spans its
            // matrix: the queries r x d, the keys lk x d read as K^T, the values lk x d, `s`
            // r x lk; the output rows [head * lq + r0, + r) belong to this task alone.
            unsafe {
                let (qb, kh, vh) = (
                    qs.0.add((head * lq + r0) * d),
                    ks.0.add(head * lk * d),
                    vs.0.add(head * lk * d),
                );
                block_probs(s, qb, kh, r, lk, d, scale, &mut tmp);
                gemm(
                    r,
                    d,
                    lk,
                    Mat::rows(dst.0.add((head * lq + r0) * d), d),
                    false,
                    Mat::rows(s.as_ptr(), lk),
                    Mat::rows(vh, d),
                    1.0,
                );
            }
        }
    });
    drop(held);
    Ok(Some(Tensor::from_vec(out, (b, h, lq, d), q.device())?))
}

/// Scores per task of [`backward`]: 256 K f32 = 1 MB (64 queries of 4096 keys). The products
/// `dS^T Q` and `P^T dO` sum over the block's queries and run at about half the rate of the
/// others; with taller blocks they slow further (one thread, 4096 keys, d = 40: 44, 31, 19
/// GFLOPS at 128, 256, 1024 queries). The whole backward of SD's 64 x 64 self-attention took
/// about the same time at 128 K to 1 M scores (0.7-0.95 s, within this machine's noise).
const BACKWARD_TASK_SCORES: usize = 1 << 18;

/// `(dq, dk, dv)` of attention without a mask, given the output `o` and its gradient `g` (all
/// `[B, H, L, d]`, contiguous). `None` where these kernels do not apply.
///
/// Tasks are (batch x head, group of query blocks). Each group sums its own `dK` and `dV`;
/// with more than one group per head (fewer heads than twice the threads) the groups' sums are
/// added afterwards.
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    g: &Tensor,
    scale: f64,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some((b, h, lq, lk, d)) = dims(q, k, v)? else {
        return Ok(None);
    };
    if o.dims4()? != (b, h, lq, d) || g.dims4()? != (b, h, lq, d) {
        candle_core::bail!(
            "attention backward: output {:?} or its gradient {:?} is not {:?}",
            o.shape(),
            g.shape(),
            q.shape()
        );
    }
    let held: Vec<_> = [q, k, v, o, g]
        .iter()
        .map(|t| t.storage_and_layout())
        .collect();
    let p = pointers(&held)?;
    let (qs, ks, vs, os, gs) = (p[0], p[1], p[2], p[3], p[4]);
    let bh = b * h;
    let rows = rows_per_task(BACKWARD_TASK_SCORES, lq, lk);
    let blocks = lq.div_ceil(rows);
    let threads = candle_core::utils::get_num_threads().max(1);
    let groups = (2 * threads).div_ceil(bh).clamp(1, blocks);
    let per_group = blocks.div_ceil(groups);
    let mut dq = vec![0f32; bh * lq * d];
    // dK and dV of every (head, group); with one group, the results themselves.
    let mut dk = vec![0f32; bh * groups * lk * d];
    let mut dv = vec![0f32; bh * groups * lk * d];
    let (dq_p, dk_p, dv_p) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let scale = scale as f32;
    candle_core::utils::barrier_pool().execute_chunked(bh * groups, |tasks| {
        #[allow(clippy::redundant_locals)]
        let (dq_p, dk_p, dv_p, qs, ks, vs, os, gs) = (dq_p, dk_p, dv_p, qs, ks, vs, os, gs);
        let mut probs = vec![0f32; rows * lk];
        let mut dprobs = vec![0f32; rows * lk];
        let mut tmp = vec![0f32; lk];
        for task in tasks {
            let head = task / groups;
            let first = (task % groups) * per_group;
            let last = (first + per_group).min(blocks);
            // SAFETY: the storages are held (`held`) for the whole call and each view spans its
            // matrix (queries, outputs and their gradients r x d at row r0 of this head, keys and
            // values lk x d, the score buffers r x lk). This task alone writes dq's rows
            // [head * lq + r0, + r) and its own (head, group) slot of dk and dv.
            unsafe {
                let (kh, vh) = (ks.0.add(head * lk * d), vs.0.add(head * lk * d));
                let (dk_t, dv_t) = (dk_p.0.add(task * lk * d), dv_p.0.add(task * lk * d));
                for blk in first..last {
                    let r0 = blk * rows;
                    let r = rows.min(lq - r0);
                    let at = (head * lq + r0) * d;
                    let (qb, ob, gb) = (qs.0.add(at), os.0.add(at), gs.0.add(at));
                    let p = &mut probs[..r * lk];
                    let dp = &mut dprobs[..r * lk];
                    block_probs(p, qb, kh, r, lk, d, scale, &mut tmp);
                    gemm(
                        r,
                        lk,
                        d,
                        Mat::rows(dp.as_mut_ptr(), lk),
                        false,
                        Mat::rows(gb, d),
                        Mat::transposed(vh, d),
                        1.0,
                    );
                    let (o_rows, g_rows) = (
                        std::slice::from_raw_parts(ob, r * d),
                        std::slice::from_raw_parts(gb, r * d),
                    );
                    for (i, (p_row, dp_row)) in
                        p.chunks_exact(lk).zip(dp.chunks_exact_mut(lk)).enumerate()
                    {
                        let dot: f32 = o_rows[i * d..(i + 1) * d]
                            .iter()
                            .zip(&g_rows[i * d..(i + 1) * d])
                            .map(|(a, b)| a * b)
                            .sum();
                        softmax_grad_row(p_row, dp_row, dot);
                    }
                    let first_block = blk == first;
                    // dV^T = dO^T P and dK^T = s Q^T dS, written transposed: this way gemm
                    // reads the score blocks along their rows.
                    gemm(
                        d,
                        lk,
                        r,
                        Mat::transposed(dv_t, d),
                        !first_block,
                        Mat::transposed(gb, d),
                        Mat::rows(p.as_ptr(), lk),
                        1.0,
                    );
                    gemm(
                        r,
                        d,
                        lk,
                        Mat::rows(dq_p.0.add(at), d),
                        false,
                        Mat::rows(dp.as_ptr(), lk),
                        Mat::rows(kh, d),
                        scale,
                    );
                    gemm(
                        d,
                        lk,
                        r,
                        Mat::transposed(dk_t, d),
                        !first_block,
                        Mat::transposed(qb, d),
                        Mat::rows(dp.as_ptr(), lk),
                        scale,
                    );
                }
            }
        }
    });
    drop(held);
    let (dk, dv) = if groups == 1 {
        (dk, dv)
    } else {
        (
            sum_groups(&dk, groups, lk * d),
            sum_groups(&dv, groups, lk * d),
        )
    };
    let dev = q.device();
    Ok(Some((
        Tensor::from_vec(dq, (b, h, lq, d), dev)?,
        Tensor::from_vec(dk, (b, h, lk, d), dev)?,
        Tensor::from_vec(dv, (b, h, lk, d), dev)?,
    )))
}

/// `dp = p * (dp - dot)`: the softmax's backward for one row, in place.
fn softmax_grad_row(p: &[f32], dp: &mut [f32], dot: f32) {
    for (x, &p) in dp.iter_mut().zip(p) {
        *x = p * (*x - dot);
    }
}

/// Per head, the sum of `groups` consecutive slots of `len` values.
fn sum_groups(parts: &[f32], groups: usize, len: usize) -> Vec<f32> {
    parts
        .chunks_exact(groups * len)
        .flat_map(|head| {
            let mut acc = head[..len].to_vec();
            for part in head[len..].chunks_exact(len) {
                acc.iter_mut().zip(part).for_each(|(a, b)| *a += b);
            }
            acc
        })
        .collect()
}
