//! NeTI (SPEC.md §4): the random-Fourier encoding of (timestep, UNet layer), the mapper network
//! that turns it into a token embedding plus a textual-bypass vector, nested dropout, the bypass
//! itself, and `mapper.safetensors`.
//!
//! Follows NeTI's official code (github.com/NeuralTextualInversion/NeTI at 28edf30):
//! `models/positional_encoding.py` (`NeTIPositionalEncoding.encode`, `init_layer`),
//! `models/neti_mapper.py` (`NeTIMapper`: layers, `apply_nested_dropout`, `get_output`) and
//! `models/neti_clip_text_encoder.py` (the bypass before the final layer norm). Weight names are
//! that mapper's PyTorch state-dict names; the frequencies `w` are stored as `encoder.w`.

use crate::nn::{LayerNorm, Linear};
use crate::rng::Rng;
use anyhow::{anyhow, Context};
use candle_core::{bail, DType, Device, Module, Result, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};
use std::collections::HashMap;
use std::path::Path;

/// The 16 cross-attention layers of the SD 1.5 UNet in forward order: NeTI's layer index `l`.
pub const UNET_LAYERS: [&str; 16] = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.0.attentions.1.transformer_blocks.0.attn2",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "down_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "mid_block.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.2.attentions.2.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.0.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.1.transformer_blocks.0.attn2",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn2",
];

/// Number of random frequencies (the encoding is twice as wide).
pub const NUM_W: usize = 1024;
/// Width of the mapper's hidden layers (the units nested dropout and truncation act on).
pub const HIDDEN: usize = 128;
/// PyTorch's LayerNorm default.
const LN_EPS: f64 = 1e-5;
/// PyTorch's LeakyReLU default slope.
const LEAKY_SLOPE: f64 = 0.01;

/// Random Fourier features of `[t, l]`: `gamma = [sin(w x), cos(w x)] / |[sin, cos]|` (the norm
/// is sqrt(1024) = 32). `w` is `[1024, 2]`, not trained, and saved with the mapper.
#[derive(Clone, Debug)]
pub struct FourierEncoding {
    w: Tensor,
}

impl FourierEncoding {
    /// New frequencies from our seeded RNG: `randn(1024, 2)`, column 0 (time) x `sigma_t`, column 1
    /// (layer) x `sigma_l` (NeTI: 0.03 and 2.0).
    pub fn random(rng: &mut Rng, sigma_t: f64, sigma_l: f64, device: &Device) -> Result<Self> {
        let w = rng.randn((NUM_W, 2), device)?;
        let scale = Tensor::new(&[[sigma_t as f32, sigma_l as f32]], device)?;
        Self::from_tensor(w.broadcast_mul(&scale)?)
    }

    /// Wrap saved frequencies `[num_w, 2]`.
    pub fn from_tensor(w: Tensor) -> Result<Self> {
        let (_, two) = w.dims2()?;
        if two != 2 {
            bail!("NeTI frequencies must be [num_w, 2], got {:?}", w.dims());
        }
        Ok(Self {
            w: w.to_dtype(DType::F32)?.detach(),
        })
    }

    pub fn w(&self) -> &Tensor {
        &self.w
    }

    /// Width of the encoding (2 x num_w = 2048).
    pub fn dim(&self) -> usize {
        2 * self.w.dim(0).unwrap_or(0)
    }

    /// Encode `N` pairs `(t[i], l[i])` (raw timestep 0..999 and layer 0..15, as floats) into
    /// `[N, 2 num_w]` unit vectors.
    pub fn encode(&self, t: &[f32], l: &[f32]) -> Result<Tensor> {
        if t.len() != l.len() {
            bail!(
                "NeTI encoding: {} timesteps but {} layers",
                t.len(),
                l.len()
            );
        }
        let n = t.len();
        let dev = self.w.device();
        let x = Tensor::from_vec([t, l].concat(), (2, n), dev)?;
        // 1. w x: [num_w, N]; 2. [sin; cos] stacked along the frequency axis, as the reference.
        let wx = self.w.matmul(&x)?;
        let v = Tensor::cat(&[wx.sin()?, wx.cos()?], 0)?;
        // 3. Unit norm per column (`v / v.norm(dim=0)`), then one row per input.
        let norm = v.sqr()?.sum_keepdim(0)?.sqrt()?;
        v.broadcast_div(&norm)?.t()?.contiguous()
    }

    /// NeTI's initial input-layer weight: the encodings of the anchors `t in {0, 1000/n_t, ...}` x
    /// `l in 0..num_layers`, t-major: `[n_t * num_layers, 2 num_w]`.
    pub fn anchors(&self, num_time_anchors: usize, num_layers: usize) -> Result<Tensor> {
        if num_time_anchors == 0 || num_time_anchors > 1000 {
            bail!("NeTI: number of time anchors must be in 1..=1000, got {num_time_anchors}");
        }
        let step = 1000 / num_time_anchors;
        let mut t = Vec::new();
        let mut l = Vec::new();
        for ta in (0..1000).step_by(step) {
            for la in 0..num_layers {
                t.push(ta as f32);
                l.push(la as f32);
            }
        }
        self.encode(&t, &l)
    }
}

/// The mapper's shape and the constants saved with it.
#[derive(Clone, Debug, PartialEq)]
pub struct MapperConfig {
    /// Token-embedding width (768 for SD 1.5); the mapper outputs twice this (word + bypass).
    pub word_dim: usize,
    /// L2 norm the whole output is rescaled to: the super-category word's embedding norm.
    pub target_norm: f64,
    /// Frequency scale of the timestep (0.03).
    pub sigma_t: f64,
    /// Frequency scale of the layer index (2.0).
    pub sigma_l: f64,
    /// Time anchors of the input-layer initialisation (10).
    pub num_time_anchors: usize,
    /// UNet cross-attention layers (16).
    pub num_layers: usize,
    /// Probability that a call (per layer) applies nested dropout in training (0.5).
    pub nested_dropout_prob: f64,
    /// Bypass strength (0.2).
    pub alpha: f64,
}

impl MapperConfig {
    /// NeTI's defaults for a text encoder of width `word_dim`.
    pub fn new(word_dim: usize, target_norm: f64) -> Self {
        Self {
            word_dim,
            target_norm,
            sigma_t: 0.03,
            sigma_l: 2.0,
            num_time_anchors: 10,
            num_layers: UNET_LAYERS.len(),
            nested_dropout_prob: 0.5,
            alpha: 0.2,
        }
    }

    /// Width of the input layer's output (time anchors x layers = 160).
    pub fn input_dim(&self) -> usize {
        self.num_time_anchors * self.num_layers
    }
}

/// What a `mapper.safetensors` records besides the weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MapperInfo {
    /// The placeholder token, e.g. `<v*>`.
    pub placeholder: String,
    /// The super-category word the placeholder row and the norm come from.
    pub super_category: String,
    /// The SD 1.5 weights it was trained on (repo id or folder).
    pub base_model: String,
    /// UNet layer names in the order of `l` (default [`UNET_LAYERS`]).
    pub layers: Vec<String>,
}

/// NeTI's mapper: `(t, l) -> [word; bypass]`, `[N, 2 word_dim]`.
#[derive(Clone, Debug)]
pub struct NetiMapper {
    pub encoder: FourierEncoding,
    pub input_layer: Linear,
    pub net_1: Linear,
    pub net_2: LayerNorm,
    pub net_4: Linear,
    pub net_5: LayerNorm,
    pub output_layer_0: Linear,
    pub cfg: MapperConfig,
}

/// `max(x, slope x)`: LeakyReLU from ops with a backward.
fn leaky_relu(x: &Tensor) -> Result<Tensor> {
    x.maximum(&x.affine(LEAKY_SLOPE, 0.0)?)
}

/// The weight names of a mapper (PyTorch state-dict names) with their shapes.
fn param_shapes(cfg: &MapperConfig, enc_dim: usize) -> Vec<(&'static str, Vec<usize>)> {
    let i = cfg.input_dim();
    vec![
        ("input_layer.weight", vec![i, enc_dim]),
        ("input_layer.bias", vec![i]),
        ("net.1.weight", vec![HIDDEN, i]),
        ("net.1.bias", vec![HIDDEN]),
        ("net.2.weight", vec![HIDDEN]),
        ("net.2.bias", vec![HIDDEN]),
        ("net.4.weight", vec![HIDDEN, HIDDEN]),
        ("net.4.bias", vec![HIDDEN]),
        ("net.5.weight", vec![HIDDEN]),
        ("net.5.bias", vec![HIDDEN]),
        ("output_layer.0.weight", vec![2 * cfg.word_dim, HIDDEN]),
        ("output_layer.0.bias", vec![2 * cfg.word_dim]),
    ]
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

fn with_prefix<'a>(vb: VarBuilder<'a>, prefix: &str) -> VarBuilder<'a> {
    if prefix.is_empty() {
        vb
    } else {
        vb.pp(prefix)
    }
}

/// Put `tensors` into `varmap` as new trainable variables named `prefix.name`; refuses to replace
/// an existing one (two mappers must not share a prefix).
fn insert_vars(varmap: &VarMap, prefix: &str, tensors: Vec<(String, Tensor)>) -> Result<()> {
    let mut data = varmap
        .data()
        .lock()
        .map_err(|_| candle_core::Error::Msg("NeTI mapper: variable map lock poisoned".into()))?;
    for (name, _) in &tensors {
        let full = join(prefix, name);
        if data.contains_key(&full) {
            bail!("NeTI mapper: variable {full} already exists; give each mapper its own prefix");
        }
    }
    for (name, t) in tensors {
        data.insert(join(prefix, &name), Var::from_tensor(&t)?);
    }
    Ok(())
}

impl NetiMapper {
    /// Build from weights under `vb` (PyTorch state-dict names, e.g. `net.1.weight`). With a
    /// VarBuilder over a [`VarMap`] the weights are the map's trainable variables.
    pub fn new(vb: VarBuilder, encoder: FourierEncoding, cfg: &MapperConfig) -> Result<Self> {
        let i = cfg.input_dim();
        Ok(Self {
            input_layer: Linear::new(vb.pp("input_layer"), encoder.dim(), i, true)?,
            net_1: Linear::new(vb.pp("net.1"), i, HIDDEN, true)?,
            net_2: LayerNorm::new(vb.pp("net.2"), HIDDEN, LN_EPS)?,
            net_4: Linear::new(vb.pp("net.4"), HIDDEN, HIDDEN, true)?,
            net_5: LayerNorm::new(vb.pp("net.5"), HIDDEN, LN_EPS)?,
            output_layer_0: Linear::new(vb.pp("output_layer.0"), HIDDEN, 2 * cfg.word_dim, true)?,
            encoder,
            cfg: cfg.clone(),
        })
    }

    /// A fresh trainable mapper in `varmap` (names `prefix.input_layer.weight`, ...; `prefix` may be
    /// empty), initialised from our seeded RNG as PyTorch would: new frequencies `w`, the input
    /// layer's weight = the anchor encodings, every other Linear `U(-1/sqrt(in), 1/sqrt(in))` for
    /// weight and bias, LayerNorms 1 and 0.
    pub fn init(
        varmap: &VarMap,
        prefix: &str,
        cfg: &MapperConfig,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let encoder = FourierEncoding::random(rng, cfg.sigma_t, cfg.sigma_l, device)?;
        let anchors = encoder.anchors(cfg.num_time_anchors, cfg.num_layers)?;
        let mut tensors = Vec::new();
        for (name, shape) in param_shapes(cfg, encoder.dim()) {
            let t = if name == "input_layer.weight" {
                anchors.clone()
            } else if name.starts_with("net.2.") || name.starts_with("net.5.") {
                if name.ends_with("weight") {
                    Tensor::ones(shape, DType::F32, device)?
                } else {
                    Tensor::zeros(shape, DType::F32, device)?
                }
            } else {
                // PyTorch's Linear init: kaiming_uniform(a = sqrt(5)) = U(+-1/sqrt(fan_in)) for
                // the weight, and the same bound for the bias.
                let layer = name.rsplit_once('.').map(|(l, _)| l).unwrap_or(name);
                let fan_in = param_shapes(cfg, encoder.dim())
                    .into_iter()
                    .find(|(n, _)| *n == format!("{layer}.weight"))
                    .map(|(_, s)| s[1])
                    .unwrap_or(1);
                let bound = 1.0 / (fan_in as f32).sqrt();
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| (2.0 * rng.uniform_f32() - 1.0) * bound)
                    .collect();
                Tensor::from_vec(v, shape, device)?
            };
            tensors.push((name.to_string(), t));
        }
        insert_vars(varmap, prefix, tensors)?;
        let vb = with_prefix(VarBuilder::from_varmap(varmap, DType::F32, device), prefix);
        Self::new(vb, encoder, cfg)
    }

    /// The hidden representation before nested dropout: `[N, 128]`.
    pub fn hidden(&self, t: &[f32], l: &[f32]) -> Result<Tensor> {
        // neti_mapper.py `extract_hidden_representation`: encoder, then `net` =
        // input_layer, Linear, LayerNorm, LeakyReLU, Linear, LayerNorm, LeakyReLU.
        let gamma = self.encoder.encode(t, l)?;
        let h = self.input_layer.forward(&gamma)?;
        let h = leaky_relu(&self.net_2.forward(&self.net_1.forward(&h)?)?)?;
        leaky_relu(&self.net_5.forward(&self.net_4.forward(&h)?)?)
    }

    /// The output layer and the rescaling of the whole output to `target_norm`
    /// (`F.normalize(out, dim=-1) * norm_scale`, eps 1e-12).
    pub fn output(&self, hidden: &Tensor) -> Result<Tensor> {
        let out = self.output_layer_0.forward(hidden)?;
        let norm = out.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
        let norm = norm.maximum(&norm.ones_like()?.affine(1e-12, 0.0)?)?;
        out.broadcast_div(&norm)?.affine(self.cfg.target_norm, 0.0)
    }

    /// `[word; bypass]` for each `(t[i], l[i])`: `[N, 2 word_dim]`.
    ///
    /// `dropout`: training mode. Nested dropout as `apply_nested_dropout`: with probability
    /// `nested_dropout_prob` each row draws `k ~ U{0..127}` and its hidden units `k..` are zeroed
    /// (survivors not rescaled). The reference calls the mapper once per UNet layer and flips the
    /// coin once per call; here the coin is flipped once per distinct layer value in `l`, so a call
    /// batching all 16 layers draws what 16 reference calls would. `truncation`: zero hidden units
    /// `k..` of every row (inference, `--truncation k`, k <= 128).
    pub fn forward(
        &self,
        t: &[f32],
        l: &[f32],
        truncation: Option<usize>,
        dropout: Option<&mut Rng>,
    ) -> Result<Tensor> {
        let h = self.hidden(t, l)?;
        let mut keep = vec![HIDDEN; t.len()];
        if let Some(k) = truncation {
            if k > HIDDEN {
                bail!("NeTI truncation {k} exceeds the mapper's {HIDDEN} hidden units");
            }
            keep.iter_mut().for_each(|x| *x = k);
        }
        if let Some(rng) = dropout {
            let drawn = nested_dropout_keep(l, self.cfg.nested_dropout_prob, rng);
            keep.iter_mut()
                .zip(drawn)
                .for_each(|(k, d)| *k = (*k).min(d));
        }
        let h = if keep.iter().all(|&k| k == HIDDEN) {
            h
        } else {
            let mask: Vec<f32> = keep
                .iter()
                .flat_map(|&k| (0..HIDDEN).map(move |j| if j < k { 1.0 } else { 0.0 }))
                .collect();
            let mask = Tensor::from_vec(mask, (keep.len(), HIDDEN), h.device())?;
            h.mul(&mask.to_dtype(h.dtype())?)?
        };
        self.output(&h)
    }

    /// Split an output `[N, 2 D]` into the word embedding (first D) and the bypass (last D).
    pub fn split(out: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, w) = out.dims2()?;
        if w % 2 != 0 {
            bail!("NeTI output width {w} is odd: it must be [word; bypass]");
        }
        Ok((out.narrow(1, 0, w / 2)?, out.narrow(1, w / 2, w / 2)?))
    }

    /// The weights under their file names (PyTorch state-dict names plus `encoder.w`).
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let lin = |n: &str, l: &Linear| {
            let mut v = vec![(format!("{n}.weight"), l.weight.clone())];
            if let Some(b) = &l.bias {
                v.push((format!("{n}.bias"), b.clone()));
            }
            v
        };
        let ln = |n: &str, l: &LayerNorm| {
            vec![
                (format!("{n}.weight"), l.weight.clone()),
                (format!("{n}.bias"), l.bias.clone()),
            ]
        };
        let mut v = vec![("encoder.w".to_string(), self.encoder.w.clone())];
        v.extend(lin("input_layer", &self.input_layer));
        v.extend(lin("net.1", &self.net_1));
        v.extend(ln("net.2", &self.net_2));
        v.extend(lin("net.4", &self.net_4));
        v.extend(ln("net.5", &self.net_5));
        v.extend(lin("output_layer.0", &self.output_layer_0));
        v
    }

    /// Write `mapper.safetensors`: the weights, `encoder.w` and the metadata (placeholder,
    /// super-category, target norm, sigmas, alpha, layer order, base model id, shape constants).
    pub fn save(&self, path: &Path, info: &MapperInfo) -> anyhow::Result<()> {
        let c = &self.cfg;
        let mut m = crate::files::pt_format();
        m.insert("kind".into(), "neti-mapper".into());
        m.insert("placeholder".into(), info.placeholder.clone());
        m.insert("super_category".into(), info.super_category.clone());
        m.insert("base_model".into(), info.base_model.clone());
        m.insert("layers".into(), serde_json::to_string(&info.layers)?);
        m.insert("target_norm".into(), format!("{:?}", c.target_norm));
        m.insert("sigma_t".into(), format!("{:?}", c.sigma_t));
        m.insert("sigma_l".into(), format!("{:?}", c.sigma_l));
        m.insert("alpha".into(), format!("{:?}", c.alpha));
        m.insert("word_dim".into(), c.word_dim.to_string());
        m.insert("num_time_anchors".into(), c.num_time_anchors.to_string());
        m.insert("num_layers".into(), c.num_layers.to_string());
        m.insert("hidden".into(), HIDDEN.to_string());
        m.insert(
            "nested_dropout_prob".into(),
            format!("{:?}", c.nested_dropout_prob),
        );
        crate::files::save_safetensors(path, &self.tensors(), &m)
    }

    /// Read a `mapper.safetensors` for inference (plain tensors, not trainable).
    pub fn load(path: &Path, device: &Device) -> anyhow::Result<(Self, MapperInfo)> {
        let (mut tensors, cfg, info) = read_mapper_file(path, device)?;
        let encoder = take_encoder(&mut tensors, path)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let mapper = Self::new(vb, encoder, &cfg)
            .with_context(|| format!("{} does not hold a NeTI mapper's weights", path.display()))?;
        Ok((mapper, info))
    }

    /// Read a `mapper.safetensors` into `varmap` under `prefix` as trainable variables (resume).
    pub fn load_trainable(
        path: &Path,
        varmap: &VarMap,
        prefix: &str,
        device: &Device,
    ) -> anyhow::Result<(Self, MapperInfo)> {
        let (mut tensors, cfg, info) = read_mapper_file(path, device)?;
        let encoder = take_encoder(&mut tensors, path)?;
        let mut named = Vec::new();
        for (name, shape) in param_shapes(&cfg, encoder.dim()) {
            let t = tensors
                .remove(name)
                .ok_or_else(|| anyhow!("{} has no tensor {name}", path.display()))?;
            if t.dims() != shape.as_slice() {
                anyhow::bail!(
                    "{}: {name} is {:?}, expected {:?}",
                    path.display(),
                    t.dims(),
                    shape
                );
            }
            named.push((name.to_string(), t));
        }
        insert_vars(varmap, prefix, named)?;
        let vb = with_prefix(VarBuilder::from_varmap(varmap, DType::F32, device), prefix);
        Ok((Self::new(vb, encoder, &cfg)?, info))
    }
}

fn take_encoder(
    tensors: &mut HashMap<String, Tensor>,
    path: &Path,
) -> anyhow::Result<FourierEncoding> {
    let w = tensors
        .remove("encoder.w")
        .ok_or_else(|| anyhow!("{} has no encoder.w (the NeTI frequencies)", path.display()))?;
    FourierEncoding::from_tensor(w).with_context(|| format!("{}: bad encoder.w", path.display()))
}

type MapperFile = (HashMap<String, Tensor>, MapperConfig, MapperInfo);

fn read_mapper_file(path: &Path, device: &Device) -> anyhow::Result<MapperFile> {
    let meta = crate::files::read_safetensors_metadata(path)?;
    let get = |k: &str| {
        meta.get(k).cloned().ok_or_else(|| {
            anyhow!(
                "{} lacks the metadata key {k:?}: it was not written by `attractor train --method neti`",
                path.display()
            )
        })
    };
    let num = |k: &str| -> anyhow::Result<f64> {
        get(k)?
            .parse::<f64>()
            .with_context(|| format!("{}: metadata {k} is not a number", path.display()))
    };
    let int = |k: &str| -> anyhow::Result<usize> {
        get(k)?
            .parse::<usize>()
            .with_context(|| format!("{}: metadata {k} is not an integer", path.display()))
    };
    if get("kind")? != "neti-mapper" {
        anyhow::bail!("{} is not a NeTI mapper file", path.display());
    }
    let hidden = int("hidden")?;
    if hidden != HIDDEN {
        anyhow::bail!(
            "{}: mapper hidden width {hidden}, this build supports {HIDDEN}",
            path.display()
        );
    }
    let cfg = MapperConfig {
        word_dim: int("word_dim")?,
        target_norm: num("target_norm")?,
        sigma_t: num("sigma_t")?,
        sigma_l: num("sigma_l")?,
        num_time_anchors: int("num_time_anchors")?,
        num_layers: int("num_layers")?,
        nested_dropout_prob: num("nested_dropout_prob")?,
        alpha: num("alpha")?,
    };
    let layers: Vec<String> = serde_json::from_str(&get("layers")?)
        .with_context(|| format!("{}: metadata layers is not a JSON list", path.display()))?;
    let info = MapperInfo {
        placeholder: get("placeholder")?,
        super_category: get("super_category")?,
        base_model: get("base_model")?,
        layers,
    };
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("cannot read the tensors of {}", path.display()))?;
    Ok((tensors, cfg, info))
}

/// Draw how many hidden units each row keeps under nested dropout: for each distinct layer value
/// (in order of first appearance) one coin with probability `prob`; on heads every row of that
/// layer draws `k ~ U{0..HIDDEN-1}`, otherwise keeps all `HIDDEN`.
pub fn nested_dropout_keep(l: &[f32], prob: f64, rng: &mut Rng) -> Vec<usize> {
    let mut keep = vec![HIDDEN; l.len()];
    let mut seen: Vec<u32> = Vec::new();
    for &layer in l {
        let bits = layer.to_bits();
        if seen.contains(&bits) {
            continue;
        }
        seen.push(bits);
        if (rng.uniform_f32() as f64) < prob {
            for (i, _) in l.iter().enumerate().filter(|(_, &x)| x.to_bits() == bits) {
                keep[i] = rng.range(0, HIDDEN);
            }
        }
    }
    keep
}

/// NeTI's textual bypass (neti_clip_text_encoder.py): with `E` the text-encoder output before the
/// final layer norm `[B, S, D]`, `pos[b]` the placeholder position of row `b` and `b` the bypass
/// vectors `[B, D]`: `E'[b, p] = e + alpha * b/|b| * |e|` with `e = E[b, p]`; other positions
/// unchanged. Built from masks (no in-place writes), differentiable in `E` and `b`. Apply the final
/// layer norm to the result for the value context; keys use the plain `E`.
pub fn bypass(e_pre_ln: &Tensor, pos: &[usize], b: &Tensor, alpha: f64) -> Result<Tensor> {
    let (bs, s, d) = e_pre_ln.dims3()?;
    let (bb, bd) = b.dims2()?;
    if bb != bs || bd != d || pos.len() != bs {
        bail!(
            "bypass: states {:?}, bypass {:?} and {} positions do not match",
            e_pre_ln.dims(),
            b.dims(),
            pos.len()
        );
    }
    if let Some(&p) = pos.iter().find(|&&p| p >= s) {
        bail!("bypass: placeholder position {p} is outside the {s}-token sequence");
    }
    let mut onehot = vec![0f32; bs * s];
    for (row, &p) in pos.iter().enumerate() {
        onehot[row * s + p] = 1.0;
    }
    let onehot =
        Tensor::from_vec(onehot, (bs, s, 1), e_pre_ln.device())?.to_dtype(e_pre_ln.dtype())?;
    // 1. e = E[b, p] (a masked sum: exact, and its gradient flows back to E).
    let e = e_pre_ln.broadcast_mul(&onehot)?.sum(1)?;
    // 2. alpha * b / |b| * |e|.
    let e_norm = e.sqr()?.sum_keepdim(1)?.sqrt()?;
    let b = b.to_dtype(e_pre_ln.dtype())?;
    let b_norm = b.sqr()?.sum_keepdim(1)?.sqrt()?;
    let delta = b
        .broadcast_div(&b_norm)?
        .broadcast_mul(&e_norm)?
        .affine(alpha, 0.0)?;
    // 3. Added at the placeholder only.
    e_pre_ln.broadcast_add(&onehot.broadcast_mul(&delta.unsqueeze(1)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testing::max_diff;

    fn tiny_cfg() -> MapperConfig {
        MapperConfig::new(8, 0.5)
    }

    #[test]
    fn encoding_is_unit_norm_and_anchor_init_matches() {
        let dev = Device::Cpu;
        let mut rng = Rng::new(1);
        let enc = FourierEncoding::random(&mut rng, 0.03, 2.0, &dev).unwrap();
        let w: Vec<Vec<f32>> = enc.w().to_vec2().unwrap();
        let mean_abs = |c: usize| w.iter().map(|r| r[c].abs()).sum::<f32>() / NUM_W as f32;
        // E|N(0, s^2)| = s sqrt(2/pi): ~0.0239 for time, ~1.596 for layer.
        assert!((mean_abs(0) - 0.0239).abs() < 0.003, "{}", mean_abs(0));
        assert!((mean_abs(1) - 1.596).abs() < 0.15, "{}", mean_abs(1));
        let g = enc.encode(&[0.0, 999.0], &[0.0, 15.0]).unwrap();
        assert_eq!(g.dims(), &[2, 2 * NUM_W]);
        let norms: Vec<f32> = g.sqr().unwrap().sum(1).unwrap().to_vec1().unwrap();
        assert!(norms.iter().all(|n| (n - 1.0).abs() < 1e-5));
        // t = l = 0: sin 0 = 0, cos 0 = 1 -> [0...0, 1/32...1/32].
        let row0: Vec<f32> = g.get(0).unwrap().to_vec1().unwrap();
        assert!(row0[..NUM_W].iter().all(|&x| x == 0.0));
        assert!(row0[NUM_W..].iter().all(|&x| (x - 1.0 / 32.0).abs() < 1e-7));
        let a = enc.anchors(10, 16).unwrap();
        assert_eq!(a.dims(), &[160, 2 * NUM_W]);
        // t-major: row 3 * 16 + 5 is (t = 300, l = 5).
        let want = enc.encode(&[300.0], &[5.0]).unwrap();
        assert_eq!(max_diff(&a.narrow(0, 53, 1).unwrap(), &want), 0.0);
    }

    #[test]
    fn init_is_seeded_and_starts_from_the_anchors() {
        let dev = Device::Cpu;
        let cfg = tiny_cfg();
        let (vm1, vm2) = (VarMap::new(), VarMap::new());
        let m1 = NetiMapper::init(&vm1, "", &cfg, &mut Rng::new(7), &dev).unwrap();
        let m2 = NetiMapper::init(&vm2, "", &cfg, &mut Rng::new(7), &dev).unwrap();
        for ((n, a), (_, b)) in m1.tensors().iter().zip(m2.tensors().iter()) {
            assert_eq!(max_diff(a, b), 0.0, "{n} differs between equal seeds");
        }
        let anchors = m1.encoder.anchors(10, 16).unwrap();
        assert_eq!(max_diff(&m1.input_layer.weight, &anchors), 0.0);
        // 12 trainable tensors, w is not among them; ~564k parameters at width 768.
        assert_eq!(vm1.all_vars().len(), 12);
        let n: usize = param_shapes(&MapperConfig::new(768, 1.0), 2048)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(
            n,
            2048 * 160 + 160 + 160 * 128 + 128 + 4 * 128 + 128 * 128 + 128 + 128 * 1536 + 1536
        );
        assert!((n as f64 - 564e3).abs() < 2e3, "{n}");
        // A second mapper under its own prefix, a clash refused.
        NetiMapper::init(&vm1, "a0", &cfg, &mut Rng::new(8), &dev).unwrap();
        assert_eq!(vm1.all_vars().len(), 24);
        assert!(NetiMapper::init(&vm1, "a0", &cfg, &mut Rng::new(9), &dev).is_err());
    }

    #[test]
    fn output_norm_split_truncation_and_dropout() {
        let dev = Device::Cpu;
        let cfg = tiny_cfg();
        let m = NetiMapper::init(&VarMap::new(), "", &cfg, &mut Rng::new(3), &dev).unwrap();
        let t = [999.0, 500.0, 20.0, 0.0];
        let l = [0.0, 5.0, 15.0, 7.0];
        let out = m.forward(&t, &l, None, None).unwrap();
        assert_eq!(out.dims(), &[4, 16]);
        let norms: Vec<f32> = out
            .sqr()
            .unwrap()
            .sum(1)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(norms.iter().all(|n| (n - 0.5).abs() < 1e-5), "{norms:?}");
        let (word, byp) = NetiMapper::split(&out).unwrap();
        assert_eq!(
            (word.dims(), byp.dims()),
            (&[4usize, 8][..], &[4usize, 8][..])
        );
        assert_eq!(
            max_diff(&Tensor::cat(&[&word, &byp], 1).unwrap(), &out),
            0.0
        );
        // Truncation at 128 changes nothing; at 16 it matches a hand-masked hidden state.
        let full = m.forward(&t, &l, Some(HIDDEN), None).unwrap();
        assert_eq!(max_diff(&full, &out), 0.0);
        let tr = m.forward(&t, &l, Some(16), None).unwrap();
        let h = m.hidden(&t, &l).unwrap();
        let hm = Tensor::cat(
            &[
                h.narrow(1, 0, 16).unwrap(),
                h.narrow(1, 16, HIDDEN - 16).unwrap().zeros_like().unwrap(),
            ],
            1,
        )
        .unwrap();
        assert!(max_diff(&tr, &m.output(&hm).unwrap()) < 1e-7);
        assert!(max_diff(&tr, &out) > 1e-4);
        assert!(m.forward(&t, &l, Some(129), None).is_err());
        // Dropout: prob 1 -> every layer group truncated at its own k; prob 0 -> nothing.
        let mut rng = Rng::new(5);
        let ll: Vec<f32> = (0..16).flat_map(|x| [x as f32; 4]).collect();
        let keep = nested_dropout_keep(&ll, 1.0, &mut rng);
        assert!(keep.iter().all(|&k| k < HIDDEN));
        assert!(keep.windows(2).any(|w| w[0] != w[1]));
        assert!(nested_dropout_keep(&ll, 0.0, &mut rng)
            .iter()
            .all(|&k| k == HIDDEN));
        // prob 0.5 over many layers: about half the groups are dropped.
        let ll: Vec<f32> = (0..2000).map(|x| x as f32).collect();
        let dropped = nested_dropout_keep(&ll, 0.5, &mut rng)
            .iter()
            .filter(|&&k| k < HIDDEN)
            .count();
        assert!((900..1100).contains(&dropped), "{dropped}");
        // The same rng state gives the same dropped output.
        let a = m.forward(&t, &l, None, Some(&mut Rng::new(11))).unwrap();
        let b = m.forward(&t, &l, None, Some(&mut Rng::new(11))).unwrap();
        assert_eq!(max_diff(&a, &b), 0.0);
    }

    #[test]
    fn gradient_reaches_every_mapper_tensor() {
        let dev = Device::Cpu;
        let cfg = tiny_cfg();
        let vm = VarMap::new();
        let m = NetiMapper::init(&vm, "", &cfg, &mut Rng::new(4), &dev).unwrap();
        let t = [999.0, 500.0, 20.0, 0.0, 250.0];
        let l = [0.0, 5.0, 15.0, 7.0, 3.0];
        let out = m.forward(&t, &l, None, None).unwrap();
        let r = Rng::new(2).randn(out.dims(), &dev).unwrap();
        let grads = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
        let data = vm.data().lock().unwrap();
        for (name, var) in data.iter() {
            let g = grads
                .get(var)
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let s: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(s > 0.0 && s.is_finite(), "{name}: |grad| = {s}");
        }
    }

    #[test]
    fn save_then_load_gives_the_same_mapper() {
        let dev = Device::Cpu;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mapper.safetensors");
        let cfg = tiny_cfg();
        let m = NetiMapper::init(&VarMap::new(), "", &cfg, &mut Rng::new(6), &dev).unwrap();
        let info = MapperInfo {
            placeholder: "<v*>".into(),
            super_category: "dog".into(),
            base_model: "stable-diffusion-v1-5/stable-diffusion-v1-5".into(),
            layers: UNET_LAYERS.iter().map(|s| s.to_string()).collect(),
        };
        m.save(&path, &info).unwrap();
        let (back, info_back) = NetiMapper::load(&path, &dev).unwrap();
        assert_eq!(info_back, info);
        assert_eq!(back.cfg, cfg);
        for ((n, a), (n2, b)) in m.tensors().iter().zip(back.tensors().iter()) {
            assert_eq!(n, n2);
            assert_eq!(max_diff(a, b), 0.0, "{n}");
        }
        let (t, l) = ([10.0, 900.0], [1.0, 14.0]);
        let a = m.forward(&t, &l, Some(32), None).unwrap();
        // The weights are bit-identical (above); the trainable mapper's Linear layers take the
        // variable-weight path and the loaded one the frozen-weight op of `crate::nn`, whose
        // float summation order may differ in the last bit.
        let err = max_diff(&a, &back.forward(&t, &l, Some(32), None).unwrap());
        assert!(err <= 1e-6, "outputs differ by {err}");
        let vm = VarMap::new();
        let (tr, _) = NetiMapper::load_trainable(&path, &vm, "a1", &dev).unwrap();
        assert_eq!(vm.all_vars().len(), 12);
        assert_eq!(
            max_diff(&a, &tr.forward(&t, &l, Some(32), None).unwrap()),
            0.0
        );
        let meta = crate::files::read_safetensors_metadata(&path).unwrap();
        assert_eq!(meta["alpha"], "0.2");
        assert_eq!(meta["sigma_t"], "0.03");
        // A file that is not a mapper is refused with its name.
        let bad = dir.path().join("x.safetensors");
        crate::files::save_safetensors(&bad, &m.tensors(), &HashMap::new()).unwrap();
        let err = NetiMapper::load(&bad, &dev).unwrap_err().to_string();
        assert!(err.contains("x.safetensors"), "{err}");
    }

    #[test]
    fn bypass_by_hand_and_differentiable() {
        let dev = Device::Cpu;
        // One row, 3 positions, D = 2; placeholder at 1 with e = (3, 4) (|e| = 5), b = (0, 2).
        let e = Tensor::new(&[[[1f32, 1.], [3., 4.], [0., 2.]]], &dev).unwrap();
        let b = Tensor::new(&[[0f32, 2.]], &dev).unwrap();
        let out = bypass(&e, &[1], &b, 0.2).unwrap();
        // e + 0.2 * (0, 1) * 5 = (3, 5).
        let want = Tensor::new(&[[[1f32, 1.], [3., 5.], [0., 2.]]], &dev).unwrap();
        assert!(max_diff(&out, &want) < 1e-6);
        let ev = Var::from_tensor(&e).unwrap();
        let bv = Var::from_tensor(&Tensor::new(&[[1f32, 2.]], &dev).unwrap()).unwrap();
        let g = bypass(ev.as_tensor(), &[1], bv.as_tensor(), 0.2)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ge: Vec<Vec<f32>> = g.get(&ev).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(ge[0], vec![1.0, 1.0]);
        assert_eq!(ge[2], vec![1.0, 1.0]);
        // d/de of sum(0.2 * bhat * |e|) = 0.2 * sum(bhat) * e/|e| added to 1.
        let s = 0.2 * (1.0 + 2.0) / 5f32.sqrt();
        assert!(
            (ge[1][0] - (1.0 + s * 0.6)).abs() < 1e-5 && (ge[1][1] - (1.0 + s * 0.8)).abs() < 1e-5
        );
        assert!(g.get(&bv).is_some());
        assert!(bypass(&e, &[3], &b, 0.2).is_err());
    }
}
