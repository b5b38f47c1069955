//! What trains in the model itself, per method (SPEC.md §8): [`make_trainable`] turns the weights
//! a method trains into `Var`s in place, so the one trainer loop, its AdamW and its checkpoints
//! treat them like any learned row or mapper weight.
//!
//! - DreamBooth: every UNet parameter (and, with `--train-text-encoder`, every text-encoder
//!   parameter), as diffusers' `train_dreambooth.py` trains `unet.parameters()`.
//! - DreamBooth-LoRA: peft's adapters on `to_q`, `to_k`, `to_v`, `to_out.0` of every attention
//!   (`train_dreambooth_lora.py`'s `LoraConfig`), with the "gaussian" init: A ~ N(0, (1/r)^2),
//!   B = 0, so the adapted model starts as the base model.
//! - Custom Diffusion: `to_k` and `to_v` of the 16 cross-attention layers
//!   (`train_custom_diffusion.py` with `--train_kv`), with the BOS token's keys and values
//!   detached as its `CustomDiffusionAttnProcessor` does.
//!
//! Trainable weights are f32 master copies whatever precision the frozen rest runs in; the layers
//! cast them to the activations' dtype inside the graph.

use crate::nn::LoraAdapter;
use crate::personalize::method::WeightTraining;
use crate::personalize::settings::Resolved;
use crate::pipeline::StableDiffusion;
use crate::rng::Rng;
use crate::sd::text_encoder::{TextConfig, TextEncoder};
use crate::sd::unet::{UNet, UNetConfig};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use std::sync::{Arc, Mutex};

/// Name prefixes of the model's trainable tensors in checkpoints and gradient lists.
pub const UNET: &str = "unet.";
pub const TEXT_ENCODER: &str = "text_encoder.";

/// Make the weights `s.s.method` trains `Var`s in `sd` (recorded in `sd.trainable`, sorted by
/// name) and return them. A model that is already prepared is left as it is.
pub fn make_trainable(sd: &mut StableDiffusion, s: &Resolved) -> Result<Vec<(String, Var)>> {
    if !sd.trainable.is_empty() {
        return Ok(sd.trainable.clone());
    }
    let b = &s.s.baseline;
    let dev = sd.device.clone();
    let mut named = Vec::new();
    match s.s.method.weight_training() {
        WeightTraining::Frozen => {}
        WeightTraining::FullUnet => {
            let src = sd.source.part("unet", DType::F32, &dev)?;
            let (unet, vars) = trainable_unet(src, &sd.unet.config, &dev)?;
            sd.unet = unet;
            named.extend(vars);
            if b.train_text_encoder {
                let src = sd.source.part("text_encoder", DType::F32, &dev)?;
                let (te, vars) = trainable_text_encoder(src, &sd.text.config, &dev)?;
                sd.text = te;
                named.extend(vars);
            }
        }
        WeightTraining::Lora => {
            let mut rng = Rng::new(s.s.seed ^ LORA_SEED);
            let scale = b.lora_scale();
            named.extend(add_lora(
                UNET,
                sd.unet.attention_linears_mut(),
                b.lora_rank,
                scale,
                &mut rng,
                &dev,
            )?);
            if b.train_text_encoder {
                named.extend(add_lora(
                    TEXT_ENCODER,
                    sd.text.attention_linears_mut(),
                    b.lora_rank,
                    scale,
                    &mut rng,
                    &dev,
                )?);
            }
        }
        WeightTraining::CrossAttentionKv => {
            for (path, lin) in sd.unet.attention_linears_mut() {
                if crate::adapters::custom_diffusion::is_kv_module(&path) {
                    let var = Var::from_tensor(&lin.weight.to_dtype(DType::F32)?.contiguous()?)?;
                    lin.set_weight(var.as_tensor().clone())?;
                    named.push((format!("{UNET}{path}.weight"), var));
                }
            }
            sd.unet.set_detach_bos_kv(b.detach_bos);
        }
    }
    if b.gradient_checkpointing && s.s.method.trains_weights() {
        sd.unet.checkpointing = Some(crate::nn::checkpoint::ParamGrads::default());
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    sd.trainable = named.clone();
    Ok(named)
}

/// Seed offset of the LoRA initialisation (its own stream: the training RNG's draws stay those
/// of a run without adapters).
const LORA_SEED: u64 = 0x4c6f_5241_2d69_6e69;

/// peft's LoRA on each linear: A `[r, in]` ~ N(0, (1/r)^2), B `[out, r]` = 0; vars named
/// `<prefix><module>.lora_A.weight` / `.lora_B.weight` (peft's names without `.default`).
fn add_lora(
    prefix: &str,
    linears: Vec<(String, &mut crate::nn::Linear)>,
    rank: usize,
    scale: f64,
    rng: &mut Rng,
    dev: &Device,
) -> Result<Vec<(String, Var)>> {
    let mut named = Vec::new();
    for (path, lin) in linears {
        let (i, o) = lin.dims()?;
        if rank > i.min(o) {
            bail!(
                "--lora-rank {rank} is larger than {path}'s smallest side ({i} inputs, {o} outputs): a rank-{rank} update of a {o}x{i} matrix adds nothing a full one would not. Fix: --lora-rank {} or less",
                i.min(o)
            );
        }
        let a = (rng.randn((rank, i), dev)? * (1.0 / rank as f64))?;
        let va = Var::from_tensor(&a)?;
        let vb = Var::from_tensor(&Tensor::zeros((o, rank), DType::F32, dev)?)?;
        lin.lora = Some(LoraAdapter {
            down: va.as_tensor().clone(),
            up: vb.as_tensor().clone(),
            scale,
        });
        named.push((format!("{prefix}{path}.lora_A.weight"), va));
        named.push((format!("{prefix}{path}.lora_B.weight"), vb));
    }
    Ok(named)
}

/// A VarBuilder backend that reads each weight from `inner` as f32 and hands out a `Var` of
/// it, recording `(name, var)`: a model built through it has every weight trainable, whatever
/// its source (files, or the benchmark's random weights).
struct AsVars {
    inner: VarBuilder<'static>,
    made: Arc<Mutex<Vec<(String, Var)>>>,
}

impl AsVars {
    /// `t` as an f32 `Var`, recorded under `name`.
    fn record(&self, name: &str, t: Tensor) -> candle_core::Result<Tensor> {
        let v = Var::from_tensor(&t)?;
        self.made
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable list lock poisoned".into()))?
            .push((name.to_string(), v.clone()));
        Ok(v.as_tensor().clone())
    }
}

impl candle_nn::var_builder::SimpleBackend for AsVars {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        h: candle_nn::Init,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record(
            name,
            self.inner.get_with_hints_dtype(s, name, h, DType::F32)?,
        )
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.record(name, self.inner.get_unchecked_dtype(name, DType::F32)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Build a model with `build` from `src` with every weight an f32 `Var`; returns it and the
/// vars, named `prefix` + the weight's key.
fn build_trainable<M>(
    src: VarBuilder<'static>,
    dev: &Device,
    prefix: &str,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<M>,
) -> Result<(M, Vec<(String, Var)>)> {
    let made = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(
        Box::new(AsVars {
            inner: src,
            made: made.clone(),
        }),
        DType::F32,
        dev.clone(),
    );
    let model = build(vb)?;
    let vars = made
        .lock()
        .map_err(|_| anyhow::anyhow!("variable list lock poisoned"))?
        .drain(..)
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect();
    Ok((model, vars))
}

/// A UNet whose every weight is an f32 `Var` read from `src`, and those vars (`unet.<key>`).
pub fn trainable_unet(
    src: VarBuilder<'static>,
    cfg: &UNetConfig,
    dev: &Device,
) -> Result<(UNet, Vec<(String, Var)>)> {
    build_trainable(src, dev, UNET, |vb| UNet::new(vb, cfg))
}

/// A text encoder whose every weight is an f32 `Var` read from `src`, and those vars
/// (`text_encoder.<key>`, keys as published: `text_model.encoder...`).
pub fn trainable_text_encoder(
    src: VarBuilder<'static>,
    cfg: &TextConfig,
    dev: &Device,
) -> Result<(TextEncoder, Vec<(String, Var)>)> {
    build_trainable(src, dev, TEXT_ENCODER, |vb| TextEncoder::new(vb, cfg))
}

/// The number of scalars in a list of variables.
pub fn parameter_count(vars: &[(String, Var)]) -> usize {
    vars.iter().map(|(_, v)| v.elem_count()).sum()
}

/// Every module path LoRA can adapt in `sd` (`unet.<path>`, `text_encoder.<path>`): the
/// attention projections, as diffusers' and kohya's SD 1.5 LoRAs target them.
pub fn lora_targets(sd: &mut StableDiffusion) -> Vec<String> {
    lora_linears(sd).into_iter().map(|(p, _)| p).collect()
}

/// The layers of [`lora_targets`] with their names.
fn lora_linears(sd: &mut StableDiffusion) -> Vec<(String, &mut crate::nn::Linear)> {
    let mut out: Vec<(String, &mut crate::nn::Linear)> = sd
        .unet
        .attention_linears_mut()
        .into_iter()
        .map(|(p, l)| (format!("{UNET}{p}"), l))
        .collect();
    out.extend(
        sd.text
            .attention_linears_mut()
            .into_iter()
            .map(|(p, l)| (format!("{TEXT_ENCODER}{p}"), l)),
    );
    out
}

/// Fold a LoRA into `sd`'s weights at `strength` (1 = as trained): `W += strength * alpha / r *
/// up @ down` for each module. Shapes are checked against the layer first: a LoRA made for
/// another model names the module and both shapes.
pub fn apply_lora(
    sd: &mut StableDiffusion,
    lora: &crate::adapters::lora::LoraWeights,
    strength: f64,
    source: &str,
) -> Result<()> {
    let mut linears: std::collections::HashMap<String, &mut crate::nn::Linear> =
        lora_linears(sd).into_iter().collect();
    for (module, m) in &lora.modules {
        let Some(lin) = linears.get_mut(module) else {
            bail!("{source}: the LoRA adapts {module}, which this model does not have: is it a LoRA for another model (SD 1.5 is expected)?");
        };
        let (i, o) = lin.dims()?;
        let (down, up) = (flat2(&m.down)?, flat2(&m.up)?);
        let (r, di) = down.dims2()?;
        let (uo, ur) = up.dims2()?;
        if di != i || uo != o || ur != r {
            bail!(
                "{source}: {module}'s LoRA is down {:?} / up {:?}, but the layer is {o}x{i} (expected down [r, {i}] and up [{o}, r]): a LoRA for another model?",
                m.down.dims(),
                m.up.dims()
            );
        }
        let dev = lin.weight.device().clone();
        lin.merge_lora(
            &down.to_device(&dev)?,
            &up.to_device(&dev)?,
            strength * m.scale(),
        )?;
    }
    Ok(())
}

/// A LoRA factor as a matrix (kohya stores 1x1 convolutions' factors as `[r, in, 1, 1]`).
fn flat2(t: &Tensor) -> Result<Tensor> {
    Ok(match t.rank() {
        2 => t.clone(),
        4 => t.flatten_from(1)?,
        _ => bail!("a LoRA factor of shape {:?}", t.dims()),
    })
}

/// Set the cross-attention K/V weights of a Custom Diffusion file (module path -> `[out, in]`)
/// in `sd`, checking every shape first.
pub fn apply_custom_diffusion(
    sd: &mut StableDiffusion,
    kv: &std::collections::BTreeMap<String, Tensor>,
    source: &str,
) -> Result<()> {
    let dtype = sd.dtype;
    let mut linears: std::collections::HashMap<String, &mut crate::nn::Linear> =
        sd.unet.attention_linears_mut().into_iter().collect();
    for (module, w) in kv {
        let Some(lin) = linears.get_mut(module) else {
            bail!("{source}: key for {module}, which this model does not have (a Custom Diffusion folder for another model?)");
        };
        let (i, o) = lin.dims()?;
        if w.dims() != [o, i] {
            bail!(
                "{source}: {module} is {:?} in the file and [{o}, {i}] in this model: a Custom Diffusion folder for another model?",
                w.dims()
            );
        }
        let dev = lin.weight.device().clone();
        lin.set_weight(w.to_device(&dev)?.to_dtype(dtype)?.contiguous()?)?;
    }
    Ok(())
}

/// Activation memory a full-fine-tune UNet row keeps for its backward pass, in GiB: a part that
/// does not grow with the image and one that grows with its pixel count, fitted to `attractor
/// bench --cases dreambooth` on the 2-core AMD EPYC (2 rows: 17.93 GiB peak at 512 px, 15.32
/// at 256, of which 12.8 are weights, gradients and moments and 0.9 the text encoder and VAE).
/// Gradient checkpointing keeps only the blocks' inputs, about a fifth of it.
const FULL_FT_ACTIVATIONS_GIB: (f64, f64) = (0.4, 1.7);

/// An estimate of the memory a DreamBooth step needs beyond the weights already loaded: the
/// gradients and AdamW's two moments (3 x the trainable weights, f32) and the activations of
/// `unet_rows` rows at `resolution` px.
pub fn full_finetune_extra_bytes(
    params: usize,
    unet_rows: usize,
    resolution: usize,
    checkpointing: bool,
) -> u64 {
    let state = 3.0 * 4.0 * params as f64;
    let px = (resolution as f64 / 512.0).powi(2);
    let (fixed, per_px) = FULL_FT_ACTIVATIONS_GIB;
    let per_row = (fixed + per_px * px) * (1u64 << 30) as f64;
    let act = per_row * unet_rows as f64 * if checkpointing { 0.2 } else { 1.0 };
    (state + act) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The estimate matches the measured peaks it was fitted to (within 5 %), grows with the
    /// rows and the pixels, and shrinks with checkpointing.
    #[test]
    fn full_finetune_estimate() {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        let params = 859_520_964;
        let weights_and_rest = 3.2 + 0.9;
        for (px, peak) in [(512, 17.93), (256, 15.32)] {
            let est = gib(full_finetune_extra_bytes(params, 2, px, false)) + weights_and_rest;
            assert!((est - peak).abs() < 0.05 * peak, "{px}: {est} vs {peak}");
        }
        let e = |rows, px, ck| full_finetune_extra_bytes(params, rows, px, ck);
        assert!(e(4, 512, false) > e(2, 512, false));
        assert!(e(2, 768, false) > e(2, 512, false));
        assert!(e(2, 512, true) < e(2, 512, false));
    }
}
