//! 3 x 3, stride-1, padding-1 convolution on the CPU in f32 by Winograd's minimal filtering
//! F(2 x 2, 3 x 3) (Lavin & Gray, 2016): the map is cut into 2 x 2 output tiles, each read
//! through its 4 x 4 input window; both the window and the kernel go through small fixed
//! transforms, after which the convolution is 16 independent matrix products of
//! `[O, C] x [C, tiles]`. That is 16 multiplies per 4 outputs and input channel, against 36 for
//! im2col, so the products, which are most of SD's convolution time, shrink 2.25x. The
//! transforms only add and halve, so the result is within a few f32 roundings of the direct sum.
//!
//! The input gradient of such a convolution is the same convolution of the output gradient with
//! the kernel flipped and transposed, so one routine serves both directions.
//!
//! Memory stays bounded: tiles go in blocks, and output channels in chunks, so that the
//! transformed windows, the transformed kernel (16/9 the size of the kernel) and the products
//! each fit [`BLOCK_ELEMS`].

use super::Shared;
use candle_core::{DType, Result, Tensor};

/// Elements of one block's transformed windows (and, separately, of its products and of the
/// transformed kernel chunk): 4 M f32 = 16 MB.
const BLOCK_ELEMS: usize = 1 << 22;

/// Whether [`conv3x3`] is worth it for a `h x w` map: the kernel transform is per call, the
/// saving per output, so small maps (SD's 8 x 8 level, whose kernels are the largest) keep
/// im2col. Measured at batch 1 on the 2-core CPU, Winograd against im2col: 64 x 64 with
/// 320 -> 320 channels 31 against 114 ms forward and 30 against 105 ms input gradient;
/// 16 x 16 with 2560 -> 1280 channels 88 against 112 ms and 107 against 282 ms.
pub(super) fn pays_off(h: usize, w: usize) -> bool {
    h * w >= 16 * 16
}

/// `Some(y)`: the `3 x 3` convolution with padding 1 of `x` `[B, C, H, W]` with `weight`
/// `[O, C, 3, 3]` plus `bias` (`[O]`), as `[B, O, H, W]`; with `flip_transpose` the kernel is
/// used flipped and transposed (`x` is then `[B, O, H, W]`, the result `[B, C, H, W]` and there
/// is no bias): the input gradient. `None` where this path does not apply (not a CPU, not f32).
pub(super) fn conv3x3(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    flip_transpose: bool,
) -> Result<Option<super::Value>> {
    if !super::is_cpu_f32(x) || weight.dtype() != DType::F32 {
        return Ok(None);
    }
    let (b, ci, h, w) = x.dims4()?;
    let (o, c, kh, kw) = weight.dims4()?;
    let (out_ch, in_ch) = if flip_transpose { (c, o) } else { (o, c) };
    if (kh, kw) != (3, 3) || ci != in_ch {
        candle_core::bail!(
            "winograd: input {:?} and kernel {:?} do not match",
            x.shape(),
            weight.shape()
        );
    }
    let x = x.contiguous()?;
    let weight = weight.contiguous()?;
    let bias = bias.map(|t| t.contiguous()).transpose()?;
    let mut out = vec![0f32; b * out_ch * h * w];
    {
        let (ws, wl) = weight.storage_and_layout();
        let kernel = Kernel {
            w: super::cpu_f32(&ws, wl, "winograd")?,
            o,
            c,
            flip_transpose,
        };
        let (xs, xl) = x.storage_and_layout();
        let bias_guard = bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bias_guard {
            Some((st, l)) => Some(super::cpu_f32(st, l, "winograd")?),
            None => None,
        };
        let shape = Shape {
            b,
            c: in_ch,
            o: out_ch,
            h,
            w,
        };
        run(
            super::cpu_f32(&xs, xl, "winograd")?,
            kernel,
            bias,
            &mut out,
            shape,
            BLOCK_ELEMS,
        );
    }
    Ok(Some(super::Value::Cpu(out, (b, out_ch, h, w).into())))
}

/// `U = G g G^T` for rows `rows` and columns `cols` of a `[_, c, 3, 3]` kernel (each `g` is one
/// 3 x 3 kernel), as `[16][rows.len()][cols.len()]` in `dst`, where
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`. Parallel over rows; each
/// row's taps are first split into nine contiguous planes, so the arithmetic runs on vectors.
fn kernel_transform(
    wt: &[f32],
    c: usize,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    dst: &mut [f32],
) {
    let (nr, nc) = (rows.len(), cols.len());
    assert!(dst.len() >= 16 * nr * nc && wt.len() >= rows.end * c * 9 && cols.end <= c);
    let dst = Shared(dst.as_mut_ptr());
    candle_core::utils::barrier_pool().execute_chunked(nr, |local| {
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let mut planes = vec![0f32; 9 * nc];
        for r in local {
            let src = &wt[((rows.start + r) * c + cols.start) * 9..][..nc * 9];
            for (j, taps) in src.chunks_exact(9).enumerate() {
                for (k, &v) in taps.iter().enumerate() {
                    planes[k * nc + j] = v;
                }
            }
            let g: [&[f32]; 9] = std::array::from_fn(|k| &planes[k * nc..(k + 1) * nc]);
            // SAFETY: the 16 rows `(xi * nr + r) * nc ..+ nc` lie inside `dst` (asserted above),
            // are disjoint, and row `r` belongs to this task alone.
            let mut u: [&mut [f32]; 16] = std::array::from_fn(|xi| unsafe {
                std::slice::from_raw_parts_mut(dst.0.add((xi * nr + r) * nc), nc)
            });
            let mut j = 0;
            while j < nc {
                let n = LANES.min(nc - j);
                let mut gl = [[0f32; LANES]; 9];
                for (k, lane) in gl.iter_mut().enumerate() {
                    lane[..n].copy_from_slice(&g[k][j..j + n]);
                }
                let ul = transform_lanes(&gl);
                for (xi, row) in u.iter_mut().enumerate() {
                    row[j..j + n].copy_from_slice(&ul[xi][..n]);
                }
                j += n;
            }
        }
    });
}

/// Kernels transformed together by [`transform_lanes`]: two AVX registers.
const LANES: usize = 16;

/// `G g G^T` for `LANES` kernels at once, lane by lane (fixed-size loops the compiler turns into
/// vector arithmetic): `g[3 * row + col][lane]` -> `u[4 * row + col][lane]`.
#[inline]
fn transform_lanes(g: &[[f32; LANES]; 9]) -> [[f32; LANES]; 16] {
    // t = G g (4 x 3), then u = t G^T (4 x 4).
    let mut t = [[[0f32; LANES]; 3]; 4];
    for q in 0..3 {
        for l in 0..LANES {
            let (g0, g1, g2) = (g[q][l], g[3 + q][l], g[6 + q][l]);
            t[0][q][l] = g0;
            t[1][q][l] = 0.5 * (g0 + g1 + g2);
            t[2][q][l] = 0.5 * (g0 - g1 + g2);
            t[3][q][l] = g2;
        }
    }
    let mut u = [[0f32; LANES]; 16];
    for (i, ti) in t.iter().enumerate() {
        for l in 0..LANES {
            let (a, b, c) = (ti[0][l], ti[1][l], ti[2][l]);
            u[4 * i][l] = a;
            u[4 * i + 1][l] = 0.5 * (a + b + c);
            u[4 * i + 2][l] = 0.5 * (a - b + c);
            u[4 * i + 3][l] = c;
        }
    }
    u
}

/// Where position `xi` of the flipped kernel's transform sits in the unflipped one's: rotating
/// `g` by 180 degrees reverses its rows and columns, and `G` maps a reversed column to its own
/// image with the first and last entries swapped (the middle two are symmetric).
fn flipped_position(xi: usize) -> usize {
    const P: [usize; 4] = [3, 1, 2, 0];
    4 * P[xi / 4] + P[xi % 4]
}

/// Sizes of one call: `x` is `[b, c, h, w]`, the output `[b, o, h, w]`.
#[derive(Clone, Copy, Debug)]
struct Shape {
    b: usize,
    c: usize,
    o: usize,
    h: usize,
    w: usize,
}

/// A `[o, c, 3, 3]` kernel, used as is or flipped and transposed.
#[derive(Clone, Copy)]
struct Kernel<'a> {
    w: &'a [f32],
    o: usize,
    c: usize,
    flip_transpose: bool,
}

impl Kernel<'_> {
    /// The transform of the convolution's output channels `outs` into `dst`: kernel rows
    /// (`[16][outs][c]`), or with `flip_transpose` kernel columns (`[16][o][outs]`, read through
    /// [`flipped_position`] and transposed by [`Kernel::lhs`]).
    fn transform(&self, outs: std::ops::Range<usize>, dst: &mut [f32]) {
        if self.flip_transpose {
            kernel_transform(self.w, self.c, 0..self.o, outs, dst);
        } else {
            kernel_transform(self.w, self.c, outs, 0..self.c, dst);
        }
    }

    /// Offset, row stride and column stride of the `[outs, inner]` matrix of position `xi` in a
    /// chunk made by [`Kernel::transform`] for `outs` output channels.
    fn lhs(&self, xi: usize, outs: usize) -> (usize, isize, isize) {
        if self.flip_transpose {
            (flipped_position(xi) * self.o * outs, 1, outs as isize)
        } else {
            (xi * outs * self.c, self.c as isize, 1)
        }
    }
}

/// The convolution proper, tile block by tile block: windows transformed (parallel over input
/// channels), then per chunk of output channels 16 products (parallel over the 16 window
/// positions) and the outputs transformed back and written (parallel over output channels).
/// The transformed kernel is made once where it fits `budget` (one chunk); larger ones (SD's
/// deep levels, where there are few tiles) are transformed chunk by chunk for every tile block.
fn run(x: &[f32], kernel: Kernel, bias: Option<&[f32]>, out: &mut [f32], s: Shape, budget: usize) {
    let Shape { b, c, o, h, w } = s;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let tiles = b * th * tw;
    let per_block = (budget / (16 * c.max(o))).clamp(1, tiles);
    let chunk = (budget / (16 * c)).clamp(1, o);
    let (u_len, v_len) = (16 * chunk * c, 16 * c * per_block);
    let mut scratch = Scratch::take(u_len + v_len + 16 * chunk * per_block);
    let (u, rest) = scratch.0.split_at_mut(u_len);
    let (v, m) = rest.split_at_mut(v_len);
    let hoisted = chunk == o;
    if hoisted {
        kernel.transform(0..o, u);
    }
    let pool = candle_core::utils::barrier_pool();
    let xs = Shared(x.as_ptr());
    let bs = bias.map(|b| Shared(b.as_ptr()));
    let ys = Shared(out.as_mut_ptr());
    let mut t0 = 0;
    while t0 < tiles {
        let nt = per_block.min(tiles - t0);
        let vs = Shared(v.as_mut_ptr());
        // 1. V[xi][ch][t] = (B^T d B)[xi] for the 4 x 4 window d of tile t0 + t in channel ch.
        pool.execute_chunked(c, |chans| {
            #[allow(clippy::redundant_locals)]
            let (xs, vs) = (xs, vs);
            for ch in chans {
                for t in 0..nt {
                    let (bi, ty, tx) = tile_pos(t0 + t, th, tw);
                    // SAFETY: the image plane `(bi, ch)` lies inside `x`, which is only read.
                    let plane = unsafe {
                        std::slice::from_raw_parts(xs.0.add((bi * c + ch) * h * w), h * w)
                    };
                    let d = window(plane, h, w, 2 * ty, 2 * tx);
                    let vt = input_transform(&d);
                    for (xi, val) in vt.into_iter().enumerate() {
                        // SAFETY: `(xi * c + ch) * nt + t < 16 * c * per_block`; channel `ch`'s
                        // entries belong to this task alone.
                        unsafe { *vs.0.add((xi * c + ch) * nt + t) = val };
                    }
                }
            }
        });
        let mut o0 = 0;
        while o0 < o {
            let oc = chunk.min(o - o0);
            if !hoisted {
                kernel.transform(o0..o0 + oc, u);
            }
            let us = Shared(u.as_ptr());
            let ms = Shared(m.as_mut_ptr());
            // 2. M[xi] = U[xi] V[xi]: [oc, c] x [c, nt] for each of the 16 positions.
            pool.execute_chunked(16, |positions| {
                #[allow(clippy::redundant_locals)]
                let (us, vs, ms) = (us, vs, ms);
                for xi in positions {
                    let (at, rs, cs) = kernel.lhs(xi, oc);
                    // SAFETY: U[xi] (`oc x c` at `at` with strides `rs`, `cs`; see
                    // [`Kernel::lhs`]), V[xi] (`c x nt`) and M[xi] (`oc x nt`) lie within their
                    // buffers; M[xi] is written by this task alone, U and V only read.
                    unsafe {
                        gemm::gemm(
                            oc,
                            nt,
                            c,
                            ms.0.add(xi * oc * nt),
                            1,
                            nt as isize,
                            false,
                            us.0.add(at),
                            cs,
                            rs,
                            vs.0.add(xi * c * nt),
                            1,
                            nt as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            gemm::Parallelism::None,
                        );
                    }
                }
            });
            // 3. y = A^T M A (+ bias) for each tile and output channel, cropped to the map.
            pool.execute_chunked(oc, |chans| {
                #[allow(clippy::redundant_locals)]
                let (ms, ys, bs) = (ms, ys, bs);
                for r in chans {
                    let och = o0 + r;
                    // SAFETY: `bias` has `o` elements and is only read.
                    let beta = bs.map_or(0.0, |p| unsafe { *p.0.add(och) });
                    for t in 0..nt {
                        let mut mt = [0f32; 16];
                        for (xi, e) in mt.iter_mut().enumerate() {
                            // SAFETY: within M (see step 2), which is only read here.
                            *e = unsafe { *ms.0.add((xi * oc + r) * nt + t) };
                        }
                        let y = output_transform(&mt);
                        let (bi, ty, tx) = tile_pos(t0 + t, th, tw);
                        let base = (bi * o + och) * h * w;
                        for (dy, row) in y.iter().enumerate() {
                            let yy = 2 * ty + dy;
                            if yy >= h {
                                break;
                            }
                            for (dx, val) in row.iter().enumerate() {
                                let xx = 2 * tx + dx;
                                if xx < w {
                                    // SAFETY: `(bi, och, yy, xx)` is inside `out`; plane
                                    // `(bi, och)` is written by this task alone (tiles never
                                    // overlap).
                                    unsafe { *ys.0.add(base + yy * w + xx) = val + beta };
                                }
                            }
                        }
                    }
                }
            });
            o0 += oc;
        }
        t0 += nt;
    }
    scratch.give_back();
}

/// The work memory of [`run`] (transformed kernel, windows and products), kept per thread from
/// call to call: every element a call reads it has written first, so it needs no clearing. It
/// is made at least `3 x BLOCK_ELEMS` (48 MB) at once, which glibc maps outside its heap, so a
/// model's convolutions reuse one block instead of taking fresh ones from the heap between
/// activations of longer life (which fragmented it: +1 GiB at the peak of a 512 px step).
struct Scratch(Vec<f32>);

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// This thread's memory, at least `len` elements (fresh memory inside a nested call).
    fn take(len: usize) -> Self {
        let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if buf.len() < len {
            buf = vec![0f32; len.max(3 * BLOCK_ELEMS)];
        }
        Self(buf)
    }

    fn give_back(self) {
        SCRATCH.with(|s| *s.borrow_mut() = self.0);
    }
}

/// Tile `t` of `b x th x tw` as (image, tile row, tile column).
fn tile_pos(t: usize, th: usize, tw: usize) -> (usize, usize, usize) {
    (t / (th * tw), (t / tw) % th, t % tw)
}

/// The 4 x 4 window of `plane` (`h x w`) whose top-left output is `(y0, x0)`: rows
/// `y0 - 1 ..= y0 + 2`, columns `x0 - 1 ..= x0 + 2`, zero outside the map (the padding).
#[inline]
fn window(plane: &[f32], h: usize, w: usize, y0: usize, x0: usize) -> [[f32; 4]; 4] {
    let mut d = [[0f32; 4]; 4];
    if y0 >= 1 && x0 >= 1 && y0 + 2 < h && x0 + 2 < w {
        for (i, row) in d.iter_mut().enumerate() {
            let s = (y0 - 1 + i) * w + x0 - 1;
            row.copy_from_slice(&plane[s..s + 4]);
        }
    } else {
        for (i, row) in d.iter_mut().enumerate() {
            let Some(yy) = (y0 + i).checked_sub(1).filter(|&yy| yy < h) else {
                continue;
            };
            for (j, v) in row.iter_mut().enumerate() {
                if let Some(xx) = (x0 + j).checked_sub(1).filter(|&xx| xx < w) {
                    *v = plane[yy * w + xx];
                }
            }
        }
    }
    d
}

/// `B^T d B` with `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`, row-major.
#[inline]
fn input_transform(d: &[[f32; 4]; 4]) -> [f32; 16] {
    let mut s = [[0f32; 4]; 4];
    for j in 0..4 {
        s[0][j] = d[0][j] - d[2][j];
        s[1][j] = d[1][j] + d[2][j];
        s[2][j] = d[2][j] - d[1][j];
        s[3][j] = d[1][j] - d[3][j];
    }
    let mut v = [0f32; 16];
    for (i, r) in s.iter().enumerate() {
        v[4 * i] = r[0] - r[2];
        v[4 * i + 1] = r[1] + r[2];
        v[4 * i + 2] = r[2] - r[1];
        v[4 * i + 3] = r[1] - r[3];
    }
    v
}

/// `A^T m A` with `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`: the 2 x 2 outputs of a tile.
#[inline]
fn output_transform(m: &[f32; 16]) -> [[f32; 2]; 2] {
    let mut p = [[0f32; 4]; 2];
    for j in 0..4 {
        p[0][j] = m[j] + m[4 + j] + m[8 + j];
        p[1][j] = m[4 + j] - m[8 + j] - m[12 + j];
    }
    [
        [p[0][0] + p[0][1] + p[0][2], p[0][1] - p[0][2] - p[0][3]],
        [p[1][0] + p[1][1] + p[1][2], p[1][1] - p[1][2] - p[1][3]],
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::randn;
    use candle_core::Device;

    fn f32s(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// Worst error relative to the reference's largest magnitude.
    fn rel_err(ours: &Tensor, reference: &Tensor) -> f64 {
        let d = crate::nn::testing::max_diff(&ours.to_dtype(DType::F64).unwrap(), reference);
        d / crate::nn::testing::max_abs(reference)
    }

    /// Against candle's own f64 convolution: odd and even sizes, one- and many-block runs
    /// (blocks that straddle images), whole and chunked kernels, with and without bias, forward
    /// and flipped-transposed.
    #[test]
    fn matches_direct_convolution() {
        // (b, c, o, h, w, budget)
        let cases = [
            (1, 3, 4, 4, 4, BLOCK_ELEMS),
            (2, 5, 7, 7, 9, BLOCK_ELEMS),
            // 3 tiles per block (blocks straddle images), output channels in 2 chunks
            (2, 5, 7, 7, 9, 16 * 7 * 3),
            // one row; one tile per block, one output channel per chunk
            (3, 8, 6, 1, 5, 16 * 8),
            (1, 16, 32, 18, 17, BLOCK_ELEMS),
            // 5 tile blocks sharing one transformed kernel
            (1, 16, 32, 18, 17, 16 * 32 * 20),
        ];
        for (i, &(b, c, o, h, w, budget)) in cases.iter().enumerate() {
            let x = randn(&[b, c, h, w], 100 + i as u64);
            let wt = randn(&[o, c, 3, 3], 200 + i as u64);
            let bias = randn(&[o], 300 + i as u64);
            let shape = Shape { b, c, o, h, w };
            let (x32, w32, b32) = (f32s(&x), f32s(&wt), f32s(&bias));
            let xv: Vec<f32> = x32.flatten_all().unwrap().to_vec1().unwrap();
            let wv: Vec<f32> = w32.flatten_all().unwrap().to_vec1().unwrap();
            let bv: Vec<f32> = b32.to_vec1().unwrap();
            let mut out = vec![0f32; b * o * h * w];
            let kernel = Kernel {
                w: &wv,
                o,
                c,
                flip_transpose: false,
            };
            run(&xv, kernel, Some(&bv), &mut out, shape, budget);
            let ours = Tensor::from_vec(out, (b, o, h, w), &Device::Cpu).unwrap();
            let reference = x
                .conv2d(&wt, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, o, 1, 1)).unwrap())
                .unwrap();
            let e = rel_err(&ours, &reference);
            assert!(e < 2e-6, "case {i}: forward relative error {e}");

            // Flipped and transposed: the input gradient of the same convolution.
            let g = randn(&[b, o, h, w], 400 + i as u64);
            let gv: Vec<f32> = f32s(&g).flatten_all().unwrap().to_vec1().unwrap();
            let mut dx = vec![0f32; b * c * h * w];
            let kernel = Kernel {
                flip_transpose: true,
                ..kernel
            };
            let back = Shape {
                b,
                c: o,
                o: c,
                h,
                w,
            };
            run(&gv, kernel, None, &mut dx, back, budget);
            let ours = Tensor::from_vec(dx, (b, c, h, w), &Device::Cpu).unwrap();
            let reference = g.conv_transpose2d(&wt, 1, 0, 1, 1).unwrap();
            let e = rel_err(&ours, &reference);
            assert!(e < 2e-6, "case {i}: flipped relative error {e}");
        }
    }

    /// The tensor entry point: f32 CPU tensors take this path, others are declined.
    #[test]
    fn entry_point_declines_other_dtypes() {
        let x = randn(&[1, 2, 5, 5], 1);
        let wt = randn(&[3, 2, 3, 3], 2);
        assert!(conv3x3(&x, &wt, None, false).unwrap().is_none());
        let y = conv3x3(&f32s(&x), &f32s(&wt), None, false)
            .unwrap()
            .unwrap()
            .into_tensor()
            .unwrap();
        let reference = x.conv2d(&wt, 1, 1, 1, 1).unwrap();
        assert!(rel_err(&y, &reference) < 2e-6);
        let dx = conv3x3(&f32s(&y), &f32s(&wt), None, true)
            .unwrap()
            .unwrap()
            .into_tensor()
            .unwrap();
        assert_eq!(dx.dims(), &[1, 2, 5, 5]);
    }
}
