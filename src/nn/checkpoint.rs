//! Gradient checkpointing (diffusers' `unet.enable_gradient_checkpointing()`): a segment of the
//! network (a UNet ResNet block or transformer) runs forward without keeping its activations,
//! and its backward pass runs the segment again, with a graph, to differentiate it.
//!
//! The segment is attached as one custom op on its (up to three) activation inputs; the
//! gradients of the segment's own parameters come out of the inner backward pass, and since a
//! custom op can only return gradients for its inputs, they go to a [`ParamGrads`] sink that
//! the trainer adds to the outer gradient store after `backward()`.

use super::attach;
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};
use std::sync::{Arc, Mutex};

/// A segment: its output from its inputs (the parameters are captured inside).
pub type Segment = Arc<dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync>;

/// The parameter gradients that checkpointed segments' backward passes produced, waiting to be
/// added to the outer gradient store ([`ParamGrads::drain_into`]).
#[derive(Clone, Default, Debug)]
pub struct ParamGrads(Arc<Mutex<Vec<(Tensor, Tensor)>>>);

impl ParamGrads {
    fn push(&self, p: Tensor, g: Tensor) -> Result<()> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradients lock poisoned".into()))?
            .push((p, g));
        Ok(())
    }

    /// Add every collected gradient to `grads` (summing with what it holds) and empty the sink.
    pub fn drain_into(&self, grads: &mut GradStore) -> Result<()> {
        let mut v = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradients lock poisoned".into()))?;
        for (p, g) in v.drain(..) {
            let sum = match grads.get(&p) {
                Some(a) => (a + &g)?,
                None => g,
            };
            grads.insert(&p, sum);
        }
        Ok(())
    }

    /// Drop collected gradients (a forward pass whose backward was never run).
    pub fn clear(&self) {
        if let Ok(mut v) = self.0.lock() {
            v.clear();
        }
    }
}

/// `f(inputs)` without keeping its activations: the value is computed on detached inputs and
/// attached with a backward that recomputes `f` and differentiates it with respect to the
/// tracked inputs (returned) and `params` (sent to `sink`). Runs `f` plainly when no input is
/// tracked (the segment's parameters would then get no gradient through the op).
pub fn checkpoint(
    name: &'static str,
    inputs: &[&Tensor],
    params: Vec<Tensor>,
    sink: &ParamGrads,
    f: Segment,
) -> Result<Tensor> {
    if !inputs.iter().any(|t| t.track_op()) {
        let owned: Vec<Tensor> = inputs.iter().map(|t| (*t).clone()).collect();
        return f(&owned);
    }
    let detached: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    // The graph this builds over the parameters is dropped with `y`: only the value is kept.
    let value = f(&detached)?.detach();
    let sink = sink.clone();
    attach(
        name,
        inputs,
        value,
        Box::new(move |args, _res, g| {
            let vars: Vec<Option<Var>> = args
                .iter()
                .map(|a| {
                    a.track_op()
                        .then(|| Var::from_tensor(&a.detach()))
                        .transpose()
                })
                .collect::<Result<_>>()?;
            let xs: Vec<Tensor> = args
                .iter()
                .zip(&vars)
                .map(|(a, v)| match v {
                    Some(v) => v.as_tensor().clone(),
                    None => a.detach(),
                })
                .collect();
            let y = f(&xs)?;
            let grads = (y * g.detach())?.sum_all()?.backward()?;
            for p in &params {
                if let Some(gp) = grads.get(p) {
                    sink.push(p.clone(), gp.clone())?;
                }
            }
            Ok(vars
                .iter()
                .map(|v| v.as_ref().and_then(|v| grads.get(v.as_tensor()).cloned()))
                .collect())
        }),
    )
}
