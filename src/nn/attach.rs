//! Hand-written backward passes for values computed outside candle's autograd graph.
//!
//! candle's backprop computes a gradient for every operand of every recorded op and keeps the
//! ones that lead nowhere (frozen weights, broadcast biases, a detached softmax max) until the
//! gradient store is dropped (SPEC.md §1). The layers of this module instead compute their output
//! from detached inputs with ordinary tensor ops (so any device works and no graph is recorded)
//! and then hand the value to a candle custom op whose forward only copies it and whose `bwd`
//! returns the input gradients alone: no weight gradient is ever computed, and nothing but the
//! op's inputs and output is kept for the backward pass.
//!
//! The copy is one pass over the output, cheap beside the matmul or convolution it follows, and
//! it is skipped entirely when no input is tracked (inference): then the plain value is returned.
//! The CPU kernels that fill an f32 buffer themselves hand that buffer over instead
//! ([`Value::Cpu`]): it becomes the op's output as it is, with no copy and no fresh pages.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, MetalStorage, Result, Shape,
    Storage, Tensor,
};
use std::sync::Mutex;

/// The backward of an attached value: `(inputs, output, output gradient)` to one optional
/// gradient per input (`None` where the input is not tracked).
pub type Backward =
    Box<dyn Fn(&[&Tensor], &Tensor, &Tensor) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

/// A value computed outside the graph, to be attached.
pub enum Value {
    /// Any tensor: the op's output is a copy of it.
    Tensor(Tensor),
    /// f32 data on the CPU in row-major order: the op's output takes the buffer over.
    Cpu(Vec<f32>, Shape),
}

impl From<Tensor> for Value {
    fn from(t: Tensor) -> Self {
        Self::Tensor(t)
    }
}

impl Value {
    /// The value as a plain tensor (without a copy).
    pub fn into_tensor(self) -> Result<Tensor> {
        match self {
            Self::Tensor(t) => Ok(t),
            Self::Cpu(data, shape) => Tensor::from_vec(data, shape, &candle_core::Device::Cpu),
        }
    }
}

/// A custom op whose forward yields a value computed beforehand and whose backward is `bwd`.
struct Attached {
    name: &'static str,
    value: Mutex<Option<Value>>,
    bwd: Backward,
}

impl Attached {
    fn take(&self) -> Result<Value> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.name)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.name)))
    }

    fn fwd<S, F>(&self, pick: F) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
        F: Fn(&Storage) -> Option<&S>,
    {
        match self.take()? {
            Value::Tensor(t) => self.copy_value(&t, pick),
            Value::Cpu(..) => candle_core::bail!(
                "{}: a CPU value attached to inputs on another device",
                self.name
            ),
        }
    }

    /// A copy of `v`'s storage on the device that `pick` selects.
    fn copy_value<S, F>(&self, v: &Tensor, pick: F) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
        F: Fn(&Storage) -> Option<&S>,
    {
        let (storage, layout) = v.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "{}: the value is on another device than the inputs",
                self.name
            ))
        })?;
        Ok((copy_out(s, layout)?, layout.shape().clone()))
    }

    /// The CPU output: a [`Value::Cpu`] buffer as it is, a tensor copied.
    fn cpu_value(&self) -> Result<(CpuStorage, Shape)> {
        match self.take()? {
            Value::Cpu(data, shape) => {
                if data.len() != shape.elem_count() {
                    candle_core::bail!("{}: {} values for shape {shape:?}", self.name, data.len());
                }
                Ok((CpuStorage::F32(data), shape))
            }
            Value::Tensor(t) => self.copy_value(&t, cpu),
        }
    }

    fn grads(&self, args: &[&Tensor], res: &Tensor, grad: &Tensor) -> Result<Vec<Option<Tensor>>> {
        let g = (self.bwd)(args, res, grad)?;
        if g.len() != args.len() {
            candle_core::bail!(
                "{}: backward gave {} gradients for {} inputs",
                self.name,
                g.len(),
                args.len()
            );
        }
        for (i, (gi, a)) in g.iter().zip(args).enumerate() {
            if let Some(gi) = gi {
                if gi.dims() != a.dims() {
                    candle_core::bail!(
                        "{}: gradient {i} has shape {:?}, its input {:?}",
                        self.name,
                        gi.dims(),
                        a.dims()
                    );
                }
            }
        }
        Ok(g)
    }
}

/// A fresh contiguous copy of the elements `layout` addresses.
fn copy_out<S>(s: &S, layout: &Layout) -> Result<S>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new storage is written by copy_strided_src right below.
    let mut dst = unsafe { s.device().alloc_uninit(layout.shape(), s.dtype())? };
    s.copy_strided_src(&mut dst, 0, layout)?;
    Ok(dst)
}

fn cpu(s: &Storage) -> Option<&CpuStorage> {
    match s {
        Storage::Cpu(s) => Some(s),
        _ => None,
    }
}

fn cuda(s: &Storage) -> Option<&CudaStorage> {
    match s {
        Storage::Cuda(s) => Some(s),
        _ => None,
    }
}

fn metal(s: &Storage) -> Option<&MetalStorage> {
    match s {
        Storage::Metal(s) => Some(s),
        _ => None,
    }
}

impl CustomOp1 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.fwd(cuda)
    }
    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        self.fwd(metal)
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.grads(&[arg], res, grad)?.pop().flatten())
    }
}

impl CustomOp2 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.fwd(cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.fwd(metal)
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a1, a2], res, grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}

impl CustomOp3 for Attached {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu_value()
    }
    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.fwd(cuda)
    }
    fn metal_fwd(
        &self,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
        _: &MetalStorage,
        _: &Layout,
    ) -> Result<(MetalStorage, Shape)> {
        self.fwd(metal)
    }
    fn bwd(
        &self,
        a1: &Tensor,
        a2: &Tensor,
        a3: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let mut g = self.grads(&[a1, a2, a3], res, grad)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten(), g.next().flatten()))
    }
}

/// Attach `value` (computed from detached `inputs`) to the graph of `inputs`, with `bwd` as its
/// backward. `inputs` are 1 to 3 tensors on the device of `value`; when none is tracked, `value`
/// is returned as it is and `bwd` is dropped.
pub fn attach(
    name: &'static str,
    inputs: &[&Tensor],
    value: impl Into<Value>,
    bwd: Backward,
) -> Result<Tensor> {
    let value = value.into();
    if !inputs.iter().any(|t| t.track_op()) {
        return value.into_tensor();
    }
    let op = Attached {
        name,
        value: Mutex::new(Some(value)),
        bwd,
    };
    match inputs {
        [a] => a.apply_op1(op),
        [a, b] => a.apply_op2(b, op),
        [a, b, c] => a.apply_op3(b, c, op),
        _ => candle_core::bail!("{name}: attach takes 1 to 3 inputs, got {}", inputs.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// `y = 3 x` attached with its true backward gives the same gradient as candle's own op, and
    /// an untracked input returns the value unchanged.
    #[test]
    fn attached_value_backpropagates() {
        let dev = Device::Cpu;
        let x = Var::new(&[1f32, -2.0, 0.5], &dev).unwrap();
        let y = (x.as_tensor().detach() * 3.0).unwrap();
        let y = attach(
            "triple",
            &[x.as_tensor()],
            y,
            Box::new(|_, _, g| Ok(vec![Some((g * 3.0)?)])),
        )
        .unwrap();
        let loss = (y.sqr().unwrap()).sum_all().unwrap();
        let g = loss.backward().unwrap();
        let g: Vec<f32> = g.get(x.as_tensor()).unwrap().to_vec1().unwrap();
        // d/dx (3x)^2 = 18 x
        assert_eq!(g, vec![18.0, -36.0, 9.0]);

        let c = Tensor::new(&[1f32, 2.0], &dev).unwrap();
        let v = (&c + 1.0).unwrap();
        let out = attach("noop", &[&c], v.clone(), Box::new(|_, _, _| Ok(vec![None]))).unwrap();
        assert_eq!(out.id(), v.id());
    }

    /// Two and three inputs: gradients go to the tracked inputs only.
    #[test]
    fn attached_value_with_several_inputs() {
        let dev = Device::Cpu;
        let a = Var::new(&[2f32, 3.0], &dev).unwrap();
        let b = Tensor::new(&[5f32, 7.0], &dev).unwrap();
        let c = Var::new(&[1f32, 1.0], &dev).unwrap();
        let v = ((a.as_tensor().detach() * &b).unwrap() + c.as_tensor().detach()).unwrap();
        let bb = b.clone();
        let y = attach(
            "mul_add",
            &[a.as_tensor(), &b, c.as_tensor()],
            v,
            Box::new(move |_, _, g| Ok(vec![Some((g * &bb)?), None, Some(g.clone())])),
        )
        .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let ga: Vec<f32> = grads.get(a.as_tensor()).unwrap().to_vec1().unwrap();
        let gc: Vec<f32> = grads.get(c.as_tensor()).unwrap().to_vec1().unwrap();
        assert_eq!(ga, vec![5.0, 7.0]);
        assert_eq!(gc, vec![1.0, 1.0]);
        assert!(grads.get(&b).is_none());
    }
}
