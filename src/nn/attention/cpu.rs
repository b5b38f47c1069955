//! The fused CPU kernels of the attention op, f32 without a mask (the UNet's attention): each
//! task computes one block of queries' scores into its own buffer and calls `gemm` directly, so
//! no score tensor is allocated and every elementwise step runs on cache-warm rows.
//!
//! Forward: `S = s Q K^T`, the softmax in place (keeping each row's log-sum-exp), `O = P V`.
//! Backward, per tile of queries and keys, from `P` rebuilt with the log-sum-exps:
//! `dP = dO V^T`, `dS = P * (dP - rowsum(dO * O))` in place, and the sums over tiles
//! `dQ += s dS K`, `dV += P^T dO`, `dK += s dS^T Q`.
//!
//! The tensors are either split by head, `[B, H, L, d]`, or merged as linear layers give and
//! take them, `[B, L, H * d]` ([`Heads::merged`]): a head is then a strided matrix, which `gemm`
//! reads and writes in place, so the merged form needs no copies to split and merge the heads.

use candle_core::{DType, Device, Layout, Result, Storage, Tensor};

use crate::nn::{cpu_f32, softmax, Shared, Value};

/// Query rows per task of [`forward`]: as many as 1 M scores of the whole key length give (256
/// of SD's 4096 keys). Each task has `gemm` pack all the keys and all the values again, so few
/// tall blocks beat many cache-sized ones: against 64 K scores a task, the 512 px sampling step
/// took 17-19 s instead of 19.8 s; 16 M was no better than 1 M (back to back, 2-core CPU).
const TASK_SCORES: usize = 1 << 20;

/// Keys per tile of [`forward`]: a tile of 256 queries' scores is 512 KB, which stays in the
/// core's L2 cache (1 MB here) from the product that makes it to the one that uses it, where the
/// whole 256 x 4096 block (4 MB) went out to L3 and back.
const FORWARD_TILE_K: usize = 512;

/// Batch, heads, query length, key length, head width.
type Dims = (usize, usize, usize, usize, usize);

/// Where each (batch x head)'s `len x d` matrix lies in a tensor's memory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Heads {
    h: usize,
    d: usize,
    /// `[B, L, H * d]` (true) or `[B, H, L, d]`.
    merged: bool,
}

impl Heads {
    /// Offset of (batch x head) `bh`'s first row, in a tensor of `len` rows per head.
    fn at(&self, bh: usize, len: usize) -> usize {
        if self.merged {
            (bh / self.h) * len * self.h * self.d + (bh % self.h) * self.d
        } else {
            bh * len * self.d
        }
    }

    /// Distance between consecutive rows of one head.
    fn stride(&self) -> usize {
        if self.merged {
            self.h * self.d
        } else {
            self.d
        }
    }
}

/// `((b, h, lq, lk, d), layout)` when the fused kernels apply to these inputs: f32 on the CPU,
/// with AVX2 and FMA for the softmax. `heads` is `None` for `[B, H, L, d]` inputs and the head
/// count for merged `[B, L, H * d]` ones.
fn dims(q: &Tensor, k: &Tensor, v: &Tensor, heads: Option<usize>) -> Result<Option<(Dims, Heads)>> {
    if !super::super::is_cpu_f32(q) || !softmax::simd_available() {
        return Ok(None);
    }
    let mismatch = || {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not match ({heads:?} merged heads)",
            q.shape(),
            k.shape(),
            v.shape()
        )
    };
    let dims = match heads {
        None => {
            let (b, h, lq, d) = q.dims4()?;
            let lk = k.dim(2)?;
            if k.dims4()? != (b, h, lk, d) || v.dims4()? != (b, h, lk, d) {
                return mismatch();
            }
            (b, h, lq, lk, d)
        }
        Some(h) => {
            let (b, lq, hd) = q.dims3()?;
            let lk = k.dim(1)?;
            if h == 0 || hd % h != 0 || k.dims3()? != (b, lk, hd) || v.dims3()? != (b, lk, hd) {
                return mismatch();
            }
            (b, h, lq, lk, hd / h)
        }
    };
    let layout = Heads {
        h: dims.1,
        d: dims.4,
        merged: heads.is_some(),
    };
    Ok(Some((dims, layout)))
}

/// The shape of a tensor of `len` rows per head in `layout`.
fn shape(layout: Heads, b: usize, len: usize) -> Vec<usize> {
    if layout.merged {
        vec![b, len, layout.h * layout.d]
    } else {
        vec![b, layout.h, len, layout.d]
    }
}

/// Whether an additive mask broadcasts as one `[Lq, Lk]` matrix over batch and heads (f32 on
/// the CPU, leading dimensions 1): the one form the kernels take. Otherwise the caller takes
/// another path.
fn mask_fits(mask: &Tensor, lq: usize, lk: usize) -> bool {
    let dims = mask.dims();
    let n = dims.len();
    mask.dtype() == DType::F32
        && matches!(mask.device(), Device::Cpu)
        && n >= 2
        && dims[n - 2..] == [lq, lk]
        && dims[..n - 2].iter().all(|&x| x == 1)
}

/// The mask (if any) made contiguous, or `None` when it does not fit [`mask_fits`].
fn mask_matrix(mask: Option<&Tensor>, lq: usize, lk: usize) -> Result<Option<Option<Tensor>>> {
    match mask {
        None => Ok(Some(None)),
        Some(m) if mask_fits(m, lq, lk) => Ok(Some(Some(m.contiguous()?))),
        Some(_) => Ok(None),
    }
}

/// Query rows per task of at most `scores` scores, for `lk` keys.
fn rows_per_task(scores: usize, lq: usize, lk: usize) -> usize {
    (scores / lk.max(1)).clamp(1, lq.max(1))
}

/// A row-major matrix view for [`gemm`]: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Row-major with rows `stride` apart (the column count, when packed).
    fn rows(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            rs: stride,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with rows `stride` apart.
    fn transposed(ptr: *const f32, stride: usize) -> Self {
        Self {
            ptr,
            rs: 1,
            cs: stride,
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

/// The output of [`forward`]: the attention values, in the inputs' layout, and each query row's
/// log-sum-exp of its scores `[B * H, Lq]`, which [`backward`] needs.
pub(super) struct Forward {
    pub out: Value,
    pub lse: Vec<f32>,
}

/// Attention forward without a graph, in the layout of the inputs (`heads`: see [`dims`]).
/// `None` where these kernels do not apply. Inputs contiguous.
pub(super) fn forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    heads: Option<usize>,
    mask: Option<&Tensor>,
) -> Result<Option<Forward>> {
    let Some(((b, h, lq, lk, d), lay)) = dims(q, k, v, heads)? else {
        return Ok(None);
    };
    let Some(mask) = mask_matrix(mask, lq, lk)? else {
        return Ok(None);
    };
    let held: Vec<_> = [q, k, v]
        .into_iter()
        .chain(mask.as_ref())
        .map(|t| t.storage_and_layout())
        .collect();
    let p = pointers(&held)?;
    let (qs, ks, vs, ms) = (p[0], p[1], p[2], p.get(3).copied());
    let rows = rows_per_task(TASK_SCORES, lq, lk);
    let per_head = lq.div_ceil(rows);
    let tile_k = FORWARD_TILE_K.min(lk);
    let st = lay.stride();
    let mut out = vec![0f32; b * h * lq * d];
    let mut lse = vec![0f32; b * h * lq];
    let (dst, lse_p) = (Shared(out.as_mut_ptr()), Shared(lse.as_mut_ptr()));
    let scale = scale as f32;
    candle_core::utils::barrier_pool().execute_chunked(b * h * per_head, |tasks| {
        #[allow(clippy::redundant_locals)]
        let (dst, lse_p, qs, ks, vs, ms) = (dst, lse_p, qs, ks, vs, ms);
        let mut scores = vec![0f32; rows * tile_k];
        // Per query row: the running maximum and sum of the online softmax.
        let mut maxes = vec![0f32; rows];
        let mut sums = vec![0f32; rows];
        for task in tasks {
            let (head, blk) = (task / per_head, task % per_head);
            let r0 = blk * rows;
            let r = rows.min(lq - r0);
            let at = lay.at(head, lq) + r0 * st;
            let (m, l) = (&mut maxes[..r], &mut sums[..r]);
            m.fill(f32::NEG_INFINITY);
            l.fill(0.0);
            // SAFETY: the storages are held (`held`) for the whole call and each view spans its
            // matrix: the queries r x d, a tile's keys c x d read as K^T and its values c x d
            // (rows `st` apart), the scores r x c; the output rows r0..r0 + r of this head, and
            // their log-sum-exps, belong to this task alone.
            unsafe {
                let (qb, kh, vh, ob) = (
                    qs.0.add(at),
                    ks.0.add(lay.at(head, lk)),
                    vs.0.add(lay.at(head, lk)),
                    dst.0.add(at),
                );
                let o_row = |i: usize| std::slice::from_raw_parts_mut(ob.add(i * st), d);
                for c0 in (0..lk).step_by(tile_k) {
                    let c = tile_k.min(lk - c0);
                    let s = &mut scores[..r * c];
                    gemm(
                        r,
                        c,
                        d,
                        Mat::rows(s.as_mut_ptr(), c),
                        false,
                        Mat::rows(qb, st),
                        Mat::transposed(kh.add(c0 * st), st),
                        scale,
                    );
                    // The online softmax (Milakov & Gimelshein 2018): rescale what the row has
                    // summed so far to the new maximum, add this tile's exponentials.
                    for (i, row) in s.chunks_exact_mut(c).enumerate() {
                        if let Some(mk) = ms {
                            let mk = std::slice::from_raw_parts(mk.0.add((r0 + i) * lk + c0), c);
                            row.iter_mut().zip(mk).for_each(|(x, &y)| *x += y);
                        }
                        let m_new = m[i].max(softmax::max_of(row));
                        if m_new == f32::NEG_INFINITY {
                            // Every key so far masked: nothing to add yet.
                            row.fill(0.0);
                            continue;
                        }
                        let corr = (m[i] - m_new).exp();
                        m[i] = m_new;
                        l[i] = l[i] * corr + softmax::exp_shifted_sum(row, m_new);
                        if c0 > 0 && corr != 1.0 {
                            o_row(i).iter_mut().for_each(|x| *x *= corr);
                        }
                    }
                    gemm(
                        r,
                        d,
                        c,
                        Mat::rows(ob, st),
                        c0 > 0,
                        Mat::rows(s.as_ptr(), c),
                        Mat::rows(vh.add(c0 * st), st),
                        1.0,
                    );
                }
                let lse_b = std::slice::from_raw_parts_mut(lse_p.0.add(head * lq + r0), r);
                for i in 0..r {
                    // A row with every key masked sums to 0 and gives NaN, as candle's softmax.
                    let inv = 1.0 / l[i];
                    o_row(i).iter_mut().for_each(|x| *x *= inv);
                    lse_b[i] = m[i] + l[i].ln();
                }
            }
        }
    });
    drop(held);
    Ok(Some(Forward {
        out: Value::Cpu(out, shape(lay, b, lq).into()),
        lse,
    }))
}

/// Keys per tile of [`backward`], and the scores of the whole key length that give its query
/// rows (64 rows of SD's 4096 keys, 3404 of CLIP's 77). Against the previous backward (64-query
/// blocks over all keys, whose score blocks and `dK`, `dV` sums left the core's cache), SD's
/// 64 x 64 self-attention backward fell from 1.05-1.12 s to 0.63-0.84 s (min of 7 to 9, batch 1,
/// 8 heads, 2 threads, alternated). Keys per tile from 128 to 512 and query rows from 32 to 1024
/// were within this machine's noise.
const TILE_K: usize = 256;
const BACKWARD_ROW_SCORES: usize = 1 << 18;

/// `(dq, dk, dv)` of attention, given the output `o`, its gradient `g` and the forward's
/// log-sum-exps `lse` (all contiguous, in the layout that `heads` gives: see [`dims`]; `mask`
/// as the forward had it). `None` where these kernels do not apply.
///
/// FlashAttention-2's backward at tile granularity: each tile of query rows and [`TILE_K`] keys
/// rebuilds its probabilities as `P = exp(s Q_i K_j^T + M_ij - lse_i)` without the rest of their
/// rows, so a tile and its keys' gradient sums stay in the core's cache through the tile's five
/// products. Tasks are (batch x head, group of key blocks); a task runs through its key blocks
/// one at a time and, for each, through all the query tiles, so the block's `dK_j` and `dV_j`
/// are summed in cache and written by this task alone. `dQ` sums over key blocks: with more than
/// one group per head (fewer heads than twice the threads) each group sums its own and the
/// groups' sums are added afterwards.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    g: &Tensor,
    lse: &[f32],
    scale: f64,
    heads: Option<usize>,
    mask: Option<&Tensor>,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    let Some(((b, h, lq, lk, d), lay)) = dims(q, k, v, heads)? else {
        return Ok(None);
    };
    let Some(mask) = mask_matrix(mask, lq, lk)? else {
        return Ok(None);
    };
    if o.dims() != q.dims() || g.dims() != q.dims() {
        candle_core::bail!(
            "attention backward: output {:?} or its gradient {:?} is not {:?}",
            o.shape(),
            g.shape(),
            q.shape()
        );
    }
    let bh = b * h;
    if lse.len() != bh * lq {
        candle_core::bail!(
            "attention backward: {} log-sum-exps for {bh} x {lq} query rows",
            lse.len()
        );
    }
    let held: Vec<_> = [q, k, v, o, g]
        .into_iter()
        .chain(mask.as_ref())
        .map(|t| t.storage_and_layout())
        .collect();
    let p = pointers(&held)?;
    let ms = p.get(5).copied();
    let (qs, ks, vs, os, gs) = (p[0], p[1], p[2], p[3], p[4]);
    let lse = Shared(lse.as_ptr());
    let tile_q = rows_per_task(BACKWARD_ROW_SCORES, lq, lk);
    let key_blocks = lk.div_ceil(TILE_K);
    let threads = candle_core::utils::get_num_threads().max(1);
    let per_group = key_blocks.div_ceil((2 * threads).div_ceil(bh).clamp(1, key_blocks));
    let groups = key_blocks.div_ceil(per_group);
    let st = lay.stride();
    // dQ of every (head, group) as `[bh * groups, lq, d]`; with one group, dQ itself, in the
    // inputs' layout.
    let mut dq = vec![0f32; bh * groups * lq * d];
    let mut dk = vec![0f32; bh * lk * d];
    let mut dv = vec![0f32; bh * lk * d];
    let (part_at, part_st) = if groups == 1 {
        (lay, st)
    } else {
        let split = Heads {
            h: 1,
            d,
            merged: false,
        };
        (split, d)
    };
    let (dq_p, dk_p, dv_p) = (
        Shared(dq.as_mut_ptr()),
        Shared(dk.as_mut_ptr()),
        Shared(dv.as_mut_ptr()),
    );
    let scale = scale as f32;
    candle_core::utils::barrier_pool().execute_chunked(bh * groups, |tasks| {
        #[allow(clippy::redundant_locals)]
        let (dq_p, dk_p, dv_p, qs, ks, vs, os, gs, ms, lse) =
            (dq_p, dk_p, dv_p, qs, ks, vs, os, gs, ms, lse);
        let tile = tile_q * TILE_K.min(lk);
        let mut probs = vec![0f32; tile];
        let mut dprobs = vec![0f32; tile];
        let mut dots = vec![0f32; lq];
        for task in tasks {
            let head = task / groups;
            let first = (task % groups) * per_group;
            let last = (first + per_group).min(key_blocks);
            // SAFETY: the storages are held (`held`) for the whole call, `lse` is borrowed for
            // it, and each view spans its matrix (queries, outputs and their gradients at row r0
            // of this head, keys and values at row c0, all with rows `st` apart; the tile
            // buffers r x c). This task alone writes its own (head, group) slot of dq (with one
            // group, the head itself) and the rows of dk and dv of its own key blocks.
            unsafe {
                let (qh, oh, gh) = (
                    qs.0.add(lay.at(head, lq)),
                    os.0.add(lay.at(head, lq)),
                    gs.0.add(lay.at(head, lq)),
                );
                let lse_h = std::slice::from_raw_parts(lse.0.add(head * lq), lq);
                // rowsum(dO * O), the softmax backward's subtrahend, per query row.
                for (i, dot) in dots.iter_mut().enumerate() {
                    let (o_row, g_row) = (
                        std::slice::from_raw_parts(oh.add(i * st), d),
                        std::slice::from_raw_parts(gh.add(i * st), d),
                    );
                    *dot = o_row.iter().zip(g_row).map(|(a, b)| a * b).sum();
                }
                let kv = lay.at(head, lk);
                let dq_t = dq_p.0.add(part_at.at(task, lq));
                for blk in first..last {
                    let c0 = blk * TILE_K;
                    let c = TILE_K.min(lk - c0);
                    let (kj, vj) = (ks.0.add(kv + c0 * st), vs.0.add(kv + c0 * st));
                    let (dkj, dvj) = (dk_p.0.add(kv + c0 * st), dv_p.0.add(kv + c0 * st));
                    for r0 in (0..lq).step_by(tile_q) {
                        let r = tile_q.min(lq - r0);
                        let (qi, gi) = (qh.add(r0 * st), gh.add(r0 * st));
                        let p = &mut probs[..r * c];
                        let dp = &mut dprobs[..r * c];
                        gemm(
                            r,
                            c,
                            d,
                            Mat::rows(p.as_mut_ptr(), c),
                            false,
                            Mat::rows(qi, st),
                            Mat::transposed(kj, st),
                            scale,
                        );
                        for (i, row) in p.chunks_exact_mut(c).enumerate() {
                            let l = lse_h[r0 + i];
                            match ms {
                                Some(m) => {
                                    let m =
                                        std::slice::from_raw_parts(m.0.add((r0 + i) * lk + c0), c);
                                    row.iter_mut().zip(m).for_each(|(x, &m)| *x = *x + m - l);
                                }
                                None => row.iter_mut().for_each(|x| *x -= l),
                            }
                        }
                        softmax::exp_in_place(p);
                        gemm(
                            r,
                            c,
                            d,
                            Mat::rows(dp.as_mut_ptr(), c),
                            false,
                            Mat::rows(gi, st),
                            Mat::transposed(vj, st),
                            1.0,
                        );
                        for (i, (p_row, dp_row)) in
                            p.chunks_exact(c).zip(dp.chunks_exact_mut(c)).enumerate()
                        {
                            softmax_grad_row(p_row, dp_row, dots[r0 + i]);
                        }
                        // dV_j += P^T dO_i and dK_j += s dS^T Q_i, written transposed so that
                        // gemm reads the tiles along their rows; then dQ_i += s dS K_j.
                        let first_tile = r0 == 0;
                        gemm(
                            d,
                            c,
                            r,
                            Mat::transposed(dvj, st),
                            !first_tile,
                            Mat::transposed(gi, st),
                            Mat::rows(p.as_ptr(), c),
                            1.0,
                        );
                        gemm(
                            d,
                            c,
                            r,
                            Mat::transposed(dkj, st),
                            !first_tile,
                            Mat::transposed(qi, st),
                            Mat::rows(dp.as_ptr(), c),
                            scale,
                        );
                        gemm(
                            r,
                            d,
                            c,
                            Mat::rows(dq_t.add(r0 * part_st), part_st),
                            blk != first,
                            Mat::rows(dp.as_ptr(), c),
                            Mat::rows(kj, st),
                            scale,
                        );
                    }
                }
            }
        }
    });
    drop(held);
    let dq = if groups == 1 {
        dq
    } else {
        sum_groups(&dq, groups, lq, lay)
    };
    let dev = q.device();
    Ok(Some((
        Tensor::from_vec(dq, shape(lay, b, lq), dev)?,
        Tensor::from_vec(dk, shape(lay, b, lk), dev)?,
        Tensor::from_vec(dv, shape(lay, b, lk), dev)?,
    )))
}

/// `dp = p * (dp - dot)`: the softmax's backward for one row, in place.
fn softmax_grad_row(p: &[f32], dp: &mut [f32], dot: f32) {
    for (x, &p) in dp.iter_mut().zip(p) {
        *x = p * (*x - dot);
    }
}

/// Per head, the sum of its `groups` consecutive `len x d` slots, placed in `layout`.
fn sum_groups(parts: &[f32], groups: usize, len: usize, layout: Heads) -> Vec<f32> {
    let (d, st) = (layout.d, layout.stride());
    let mut out = vec![0f32; parts.len() / groups];
    for (bh, head) in parts.chunks_exact(groups * len * d).enumerate() {
        let base = layout.at(bh, len);
        for part in head.chunks_exact(len * d) {
            for (j, row) in part.chunks_exact(d).enumerate() {
                let dst = &mut out[base + j * st..base + j * st + d];
                dst.iter_mut().zip(row).for_each(|(a, b)| *a += b);
            }
        }
    }
    out
}
