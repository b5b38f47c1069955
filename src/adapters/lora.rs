//! LoRA adapter files: reading the layouts the ecosystem shares LoRAs in into one canonical form,
//! [`LoraWeights`], and writing that form back as diffusers or kohya files.
//!
//! Layouts read (all converted to f32, the tensors kept on the caller's device):
//! - diffusers, as `StableDiffusionLoraLoaderMixin.save_lora_weights` writes it after
//!   `convert_state_dict_to_diffusers`: `unet.<module>.lora.down.weight` / `.lora.up.weight`,
//!   `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight`, an optional
//!   `<module>.alpha`, and the pre-peft attention-processor names
//!   (`<attn>.processor.to_q_lora.down.weight`) that `state_dict_utils` still converts;
//! - peft: `<module>.lora_A.weight` / `.lora_B.weight` (also `.lora_A.default.weight`), with or
//!   without peft's `base_model.model.` wrapper and with or without the component prefix (a bare
//!   module path is the UNet's unless only the text encoder has it). Where the safetensors
//!   metadata carries diffusers' `lora_adapter_metadata` (peft's `LoraConfig`), its `lora_alpha`,
//!   `alpha_pattern` and `use_rslora` give the modules their alpha, as peft's `LoraLayer` would;
//! - kohya-ss `networks/lora.py` (what A1111 and ComfyUI load): `lora_unet_<module with _>` /
//!   `lora_te_<module with _>` with `.lora_down.weight`, `.lora_up.weight` and `.alpha`.
//!
//! diffusers' `lora_conversion_utils` guesses the dotted path behind a kohya name from
//! hand-written rules; here it is looked up instead: every module the model can adapt is given its
//! kohya name ([`kohya_name`]) and the file's names are matched against those, so any module the
//! model has maps back exactly, and a file for another model fails on its first foreign key.
//! LoHa, LoKr, DoRA and files in the original Stable Diffusion checkpoint naming
//! (`input_blocks`, ...) are refused with an error rather than half-read.

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// Component prefixes of canonical module paths.
const UNET: &str = "unet.";
const TEXT_ENCODER: &str = "text_encoder.";
/// What peft's `PeftModel` puts in front of the wrapped model's module paths.
const PEFT_WRAPPER: &str = "base_model.model.";
/// The safetensors metadata entry in which diffusers stores peft's `LoraConfig` (as JSON).
const PEFT_METADATA_KEY: &str = "lora_adapter_metadata";

/// The layouts a reader accepts, for error messages.
const EXPECTED_ANY: &str = "diffusers `<module>.lora.down.weight` / `.lora.up.weight`, peft \
    `<module>.lora_A.weight` / `.lora_B.weight`, or kohya `lora_unet_<module>.lora_down.weight` / \
    `.lora_up.weight` / `.alpha`";
const EXPECTED_NAMED: &str = "`<module>.lora.down.weight` / `.lora.up.weight`, \
    `.lora_linear_layer.down.weight` / `.up.weight`, `.lora_A.weight` / `.lora_B.weight` \
    (optionally `.lora_A.default.weight`) or `<module>.alpha`";
const EXPECTED_KOHYA: &str =
    "`lora_unet_<module>` or `lora_te_<module>` with `.lora_down.weight`, \
    `.lora_up.weight` or `.alpha` (LoHa, LoKr and DoRA weights are not supported)";

/// One adapted module: `W' = W + scale * up @ down`, `scale = alpha / rank` (alpha `None` means
/// alpha = rank, diffusers' convention, so `scale = 1`).
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// `[r, in]`, or `[r, in, kh, kw]` for convolutions in kohya files.
    pub down: Tensor,
    /// `[out, r]`, or `[out, r, 1, 1]` for convolutions in kohya files.
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    /// The adapter's rank `r`: the rows of `down`.
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }

    /// `alpha / rank`, the factor kohya and peft multiply `up @ down` by (1 when alpha is unset).
    /// An empty adapter (rank 0, which [`parse`] never returns) changes nothing: 0.
    pub fn scale(&self) -> f64 {
        match self.rank() {
            0 => 0.0,
            r => self.alpha.unwrap_or(r as f64) / r as f64,
        }
    }
}

/// A LoRA keyed by canonical module path: `unet.<diffusers module path>` (e.g.
/// `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`) or
/// `text_encoder.<transformers module path>` (e.g.
/// `text_encoder.text_model.encoder.layers.0.self_attn.q_proj`). Sorted, so files written from
/// it are the same whatever order the modules were added in.
#[derive(Debug, Clone, Default)]
pub struct LoraWeights {
    pub modules: BTreeMap<String, LoraModule>,
}

/// The key layout a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// diffusers' own names (`.lora.down.weight`, `.lora_linear_layer.down.weight`), possibly
    /// mixed with peft names for the modules `convert_state_dict_to_diffusers` leaves alone.
    Diffusers,
    /// peft's `lora_A` / `lora_B` names only.
    Peft,
    /// kohya-ss `lora_unet_*` / `lora_te_*` names.
    Kohya,
}

/// Read a LoRA file (safetensors; `.bin`, `.pt`, `.pth` and `.ckpt` are read as PyTorch pickles)
/// and tell which layout it was in. `known` lists every canonical module path the model can
/// adapt: a module outside it means the file is for another model, and it is what kohya's
/// underscored names are mapped back through (their dots are lost, so the mapping is only
/// unambiguous against the model's real module names).
pub fn read(path: &Path, known: &[String], device: &Device) -> Result<(LoraWeights, LoraLayout)> {
    let source = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    if matches!(ext.as_deref(), Some("bin" | "pt" | "pth" | "ckpt")) {
        let tensors = candle_core::pickle::read_all(path)
            .with_context(|| format!("cannot read the pickled LoRA {source}"))?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        return parse_inner(tensors, known, &source, None);
    }
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read the LoRA file {source}"))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{source} is not a safetensors file"))?;
    let peft = match header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(PEFT_METADATA_KEY))
    {
        Some(json) => Some(
            PeftAlphas::parse(json)
                .with_context(|| format!("{source}: bad `{PEFT_METADATA_KEY}` metadata"))?,
        ),
        None => None,
    };
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("cannot load the tensors of {source}"))?;
    parse_inner(tensors, known, &source, peft.as_ref())
}

/// Parse already-loaded tensors by the rules of [`read`]; `source` names the file in errors.
/// Without the file's metadata, peft modules get no alpha from a `lora_adapter_metadata`.
pub fn parse(
    tensors: HashMap<String, Tensor>,
    known: &[String],
    source: &str,
) -> Result<(LoraWeights, LoraLayout)> {
    parse_inner(tensors, known, source, None)
}

/// Save in diffusers' layout, as `save_lora_weights` writes it: UNet modules as
/// `unet.<module>.lora.down.weight` / `.lora.up.weight`, text-encoder modules as
/// `text_encoder.<module>.lora_linear_layer.down.weight` / `.up.weight` (diffusers' text-encoder
/// loader infers the layout from `lora_linear_layer` and refuses `.lora.down` there), f32,
/// metadata `{"format": "pt"}`.
///
/// diffusers stores no alpha: its loaders take alpha = rank. A module whose alpha differs from
/// its rank has `alpha / rank` folded into `up`, so the file gives the same `scale * up @ down`
/// and reads back with alpha `None`.
pub fn save_diffusers(path: &Path, w: &LoraWeights) -> Result<()> {
    if w.modules.is_empty() {
        bail!(
            "no LoRA modules to save to {}: an empty adapter file would not read back",
            path.display()
        );
    }
    let mut tensors = Vec::with_capacity(2 * w.modules.len());
    for (name, m) in &w.modules {
        let (down_suffix, up_suffix) = if name.starts_with(UNET) {
            (".lora.down.weight", ".lora.up.weight")
        } else if name.starts_with(TEXT_ENCODER) {
            (
                ".lora_linear_layer.down.weight",
                ".lora_linear_layer.up.weight",
            )
        } else {
            bail!(
                "cannot save module `{name}` to {} in diffusers' layout: its keys must start \
                 with `{UNET}` or `{TEXT_ENCODER}`",
                path.display()
            );
        };
        let r = m.rank() as f64;
        let up = m.up.to_dtype(DType::F32)?;
        let up = match m.alpha {
            Some(a) if !a.is_finite() => {
                bail!("module `{name}` has alpha {a}, which cannot be saved")
            }
            Some(a) if a != r => (up * (a / r))?,
            _ => up,
        };
        tensors.push((format!("{name}{down_suffix}"), m.down.to_dtype(DType::F32)?));
        tensors.push((format!("{name}{up_suffix}"), up));
    }
    let meta = crate::files::pt_format();
    crate::files::save_safetensors(path, &tensors, &meta)
        .with_context(|| format!("cannot save the LoRA {}", path.display()))
}

/// Save in kohya-ss' layout (`networks/lora.py`, what A1111 and ComfyUI load):
/// `<kohya name>.lora_down.weight`, `.lora_up.weight` and a 0-d f32 `.alpha` for every module
/// (kohya files always carry alpha; an unset one is written as the rank, which means the same).
/// Metadata: `format` = `pt`, and kohya's `ss_network_dim` / `ss_network_alpha` when every module
/// shares the rank / the alpha (written as kohya does, e.g. `4` and `4.0`).
pub fn save_kohya(path: &Path, w: &LoraWeights) -> Result<()> {
    if w.modules.is_empty() {
        bail!(
            "no LoRA modules to save to {}: an empty adapter file would not read back",
            path.display()
        );
    }
    let mut tensors = Vec::with_capacity(3 * w.modules.len());
    let mut seen: HashMap<String, &str> = HashMap::new();
    let mut ranks = HashSet::new();
    let mut alphas = HashSet::new();
    for (name, m) in &w.modules {
        let k = kohya_name(name);
        if let Some(other) = seen.insert(k.clone(), name) {
            bail!(
                "cannot save {} in kohya's layout: modules `{other}` and `{name}` both get the \
                 kohya name `{k}`",
                path.display()
            );
        }
        let rank = m.rank();
        let alpha = m.alpha.unwrap_or(rank as f64) as f32;
        if !alpha.is_finite() || alpha <= 0.0 {
            // kohya reads alpha 0 (and None) as "alpha = rank", so it cannot say "no effect".
            bail!("module `{name}` has alpha {alpha}, which kohya's layout cannot express");
        }
        ranks.insert(rank);
        alphas.insert(alpha.to_bits());
        tensors.push((
            format!("{k}.lora_down.weight"),
            m.down.to_dtype(DType::F32)?,
        ));
        tensors.push((format!("{k}.lora_up.weight"), m.up.to_dtype(DType::F32)?));
        tensors.push((format!("{k}.alpha"), Tensor::new(alpha, &Device::Cpu)?));
    }
    let mut meta = crate::files::pt_format();
    if let [rank] = ranks.into_iter().collect::<Vec<_>>()[..] {
        meta.insert("ss_network_dim".into(), rank.to_string());
    }
    if let [alpha] = alphas.into_iter().collect::<Vec<_>>()[..] {
        // Python's str(float), as kohya's train_network.py writes `args.network_alpha`.
        meta.insert(
            "ss_network_alpha".into(),
            format!("{:?}", f32::from_bits(alpha)),
        );
    }
    crate::files::save_safetensors(path, &tensors, &meta)
        .with_context(|| format!("cannot save the LoRA {}", path.display()))
}

/// kohya's name for a canonical module path: the component becomes `lora_unet` or `lora_te`
/// (kohya's `LORA_PREFIX_UNET` / `LORA_PREFIX_TEXT_ENCODER`) and every `.` becomes `_`, e.g.
/// `unet.a.b_c.0` -> `lora_unet_a_b_c_0`. A path with neither prefix gets plain `lora_`.
pub fn kohya_name(canonical: &str) -> String {
    let (prefix, rest) = if let Some(rest) = canonical.strip_prefix(UNET) {
        ("lora_unet_", rest)
    } else if let Some(rest) = canonical.strip_prefix(TEXT_ENCODER) {
        ("lora_te_", rest)
    } else {
        ("lora_", canonical)
    };
    format!("{prefix}{}", rest.replace('.', "_"))
}

/// Which part of a module a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Half {
    Down,
    Up,
    Alpha,
}

/// The naming scheme of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Style {
    Kohya,
    Diffusers,
    /// diffusers' attention-processor names from before peft: `<attn>.processor.to_q_lora.*`.
    DiffusersOld,
    Peft,
    /// `<module>.alpha`, which diffusers and peft files may both carry.
    PlainAlpha,
}

/// Key endings of the dotted layouts, longest first where one ends another.
const NAMED_SUFFIXES: &[(&str, Style, Half)] = &[
    (".lora.down.weight", Style::Diffusers, Half::Down),
    (".lora.up.weight", Style::Diffusers, Half::Up),
    (
        ".lora_linear_layer.down.weight",
        Style::Diffusers,
        Half::Down,
    ),
    (".lora_linear_layer.up.weight", Style::Diffusers, Half::Up),
    ("_lora.down.weight", Style::DiffusersOld, Half::Down),
    ("_lora.up.weight", Style::DiffusersOld, Half::Up),
    (".lora_A.default.weight", Style::Peft, Half::Down),
    (".lora_B.default.weight", Style::Peft, Half::Up),
    (".lora_A.weight", Style::Peft, Half::Down),
    (".lora_B.weight", Style::Peft, Half::Up),
    (".alpha", Style::PlainAlpha, Half::Alpha),
];

/// Key endings of kohya's layout.
const KOHYA_SUFFIXES: &[(&str, Half)] = &[
    (".lora_down.weight", Half::Down),
    (".lora_up.weight", Half::Up),
    (".alpha", Half::Alpha),
];

/// One key understood: its naming scheme, the module name in that scheme, the part it holds and
/// the ending that was cut off.
#[derive(Debug, Clone, Copy)]
struct KeyInfo<'a> {
    style: Style,
    name: &'a str,
    half: Half,
    suffix: &'static str,
}

/// Split a key into module name and ending; `None` for a key no accepted layout has. Keys
/// starting with `lora_` are kohya's (no diffusers or transformers module path starts so).
fn classify(key: &str) -> Option<KeyInfo<'_>> {
    if key.starts_with("lora_") {
        return KOHYA_SUFFIXES.iter().find_map(|&(suffix, half)| {
            key.strip_suffix(suffix).map(|name| KeyInfo {
                style: Style::Kohya,
                name,
                half,
                suffix,
            })
        });
    }
    NAMED_SUFFIXES.iter().find_map(|&(suffix, style, half)| {
        key.strip_suffix(suffix).map(|name| KeyInfo {
            style,
            name,
            half,
            suffix,
        })
    })
}

/// The key that would hold `want` for the module of `k`, in the same naming scheme (for the
/// "missing half" error).
fn sibling_key(k: &KeyInfo<'_>, want: Half) -> String {
    let suffix = match (k.style, want) {
        (Style::Kohya, Half::Down) => ".lora_down.weight",
        (Style::Kohya, Half::Up) => ".lora_up.weight",
        (_, Half::Alpha) => ".alpha",
        (Style::DiffusersOld, Half::Down) => "_lora.down.weight",
        (Style::DiffusersOld, Half::Up) => "_lora.up.weight",
        (Style::Diffusers, Half::Down) if k.suffix.contains("lora_linear_layer") => {
            ".lora_linear_layer.down.weight"
        }
        (Style::Diffusers, Half::Up) if k.suffix.contains("lora_linear_layer") => {
            ".lora_linear_layer.up.weight"
        }
        (Style::Diffusers | Style::PlainAlpha, Half::Down) => ".lora.down.weight",
        (Style::Diffusers | Style::PlainAlpha, Half::Up) => ".lora.up.weight",
        (Style::Peft, Half::Down) if k.suffix.contains(".default.") => ".lora_A.default.weight",
        (Style::Peft, Half::Up) if k.suffix.contains(".default.") => ".lora_B.default.weight",
        (Style::Peft, Half::Down) => ".lora_A.weight",
        (Style::Peft, Half::Up) => ".lora_B.weight",
    };
    format!("{}{suffix}", k.name)
}

/// The canonical path behind a dotted (diffusers / peft) module name: peft's wrapper dropped,
/// a bare path given the component that has it (the UNet unless only the text encoder does), and
/// the pre-peft processor names turned into the modules they adapt.
fn canonical_named(k: &KeyInfo<'_>, known: &HashSet<&str>) -> String {
    let p = k.name.strip_prefix(PEFT_WRAPPER).unwrap_or(k.name);
    let p = if k.style == Style::DiffusersOld {
        p.replace(".processor.", ".")
    } else {
        p.to_string()
    };
    let c = if p.starts_with(UNET) || p.starts_with(TEXT_ENCODER) {
        p
    } else {
        let unet = format!("{UNET}{p}");
        let te = format!("{TEXT_ENCODER}{p}");
        if !known.contains(unet.as_str()) && known.contains(te.as_str()) {
            te
        } else {
            unet
        }
    };
    if k.style != Style::DiffusersOld {
        return c;
    }
    // `to_q_lora` sat on the attention processor; it adapts `to_q` in the UNet and `q_proj` in
    // CLIP (diffusers' `UNET_TO_DIFFUSERS` / `DIFFUSERS_OLD_TO_DIFFUSERS`).
    let Some((head, last)) = c.rsplit_once('.') else {
        return c;
    };
    let te = c.starts_with(TEXT_ENCODER);
    let last = match (te, last) {
        (false, "to_out") => "to_out.0",
        (true, "to_q") => "q_proj",
        (true, "to_k") => "k_proj",
        (true, "to_v") => "v_proj",
        (true, "to_out") => "out_proj",
        (_, other) => other,
    };
    format!("{head}.{last}")
}

/// The error for a key whose module the model does not have.
fn not_in_model(
    source: &str,
    key: &str,
    module: &str,
    known: &[String],
    kohya: bool,
) -> anyhow::Error {
    let mut msg = format!(
        "{source}: key `{key}` is for module `{module}`, which this model does not have \
         (a LoRA for another model?)"
    );
    match known.first() {
        Some(k) if kohya => msg.push_str(&format!("; expected a name like `{}`", kohya_name(k))),
        Some(k) => msg.push_str(&format!("; expected a module like `{k}`")),
        None => msg.push_str("; this model has no modules a LoRA can adapt"),
    }
    if ["input_blocks", "middle_block", "output_blocks"]
        .iter()
        .any(|b| module.contains(b))
    {
        msg.push_str(
            "; module names of the original Stable Diffusion checkpoints (`input_blocks`, \
             `middle_block`, `output_blocks`) are not supported: convert the file to diffusers \
             module names",
        );
    }
    anyhow!(msg)
}

/// The keys of one module gathered so far.
#[derive(Default)]
struct Parts<'a> {
    down: Option<(&'a str, Tensor)>,
    up: Option<(&'a str, Tensor)>,
    alpha: Option<(&'a str, Tensor)>,
    /// The first key seen, to name the missing half after.
    first: Option<(&'a str, KeyInfo<'a>)>,
}

fn parse_inner(
    mut tensors: HashMap<String, Tensor>,
    known: &[String],
    source: &str,
    peft: Option<&PeftAlphas>,
) -> Result<(LoraWeights, LoraLayout)> {
    let mut keys: Vec<String> = tensors.keys().cloned().collect();
    keys.sort();
    let Some(first) = keys.first() else {
        bail!("{source} holds no tensors: expected a LoRA with keys like {EXPECTED_ANY}");
    };
    let infos: Vec<Option<KeyInfo<'_>>> = keys.iter().map(|k| classify(k)).collect();
    let Some((lead, kohya)) = keys
        .iter()
        .zip(&infos)
        .find_map(|(k, i)| i.map(|i| (k, i.style == Style::Kohya)))
    else {
        bail!(
            "{source}: unknown LoRA layout: no key fits one, the first being `{first}`; \
             expected {EXPECTED_ANY}"
        );
    };
    let (family, expected) = if kohya {
        ("kohya", EXPECTED_KOHYA)
    } else {
        ("diffusers/peft", EXPECTED_NAMED)
    };
    let mut fitted = Vec::with_capacity(keys.len());
    for (key, info) in keys.iter().zip(&infos) {
        match info {
            Some(i) if (i.style == Style::Kohya) == kohya => fitted.push((key.as_str(), *i)),
            _ => bail!(
                "{source}: key `{key}` does not fit the {family} layout of the file's key \
                 `{lead}`: expected {expected}"
            ),
        }
    }
    let layout = if kohya {
        LoraLayout::Kohya
    } else if fitted
        .iter()
        .any(|(_, i)| matches!(i.style, Style::Diffusers | Style::DiffusersOld))
    {
        LoraLayout::Diffusers
    } else {
        LoraLayout::Peft
    };

    let known_set: HashSet<&str> = known.iter().map(String::as_str).collect();
    let mut by_kohya: HashMap<String, Vec<&str>> = HashMap::new();
    if kohya {
        for k in known {
            by_kohya.entry(kohya_name(k)).or_default().push(k);
        }
    }
    let mut parts: BTreeMap<String, Parts<'_>> = BTreeMap::new();
    for (key, info) in fitted {
        let module = if kohya {
            match by_kohya.get(info.name).map(Vec::as_slice) {
                Some([one]) => one.to_string(),
                Some([a, b, ..]) => bail!(
                    "{source}: key `{key}` could be for module `{a}` or `{b}`: their kohya names \
                     are the same"
                ),
                _ => return Err(not_in_model(source, key, info.name, known, true)),
            }
        } else {
            let c = canonical_named(&info, &known_set);
            if !known_set.contains(c.as_str()) {
                return Err(not_in_model(source, key, &c, known, false));
            }
            c
        };
        let t = tensors
            .remove(key)
            .ok_or_else(|| anyhow!("{source}: key `{key}` went missing while parsing"))?;
        let p = parts.entry(module.clone()).or_default();
        p.first.get_or_insert((key, info));
        let slot = match info.half {
            Half::Down => &mut p.down,
            Half::Up => &mut p.up,
            Half::Alpha => &mut p.alpha,
        };
        if let Some((other, _)) = slot {
            bail!(
                "{source}: keys `{other}` and `{key}` both hold the {} of module `{module}`",
                match info.half {
                    Half::Down => "down (A) weight",
                    Half::Up => "up (B) weight",
                    Half::Alpha => "alpha",
                }
            );
        }
        *slot = Some((key, t));
    }

    let mut modules = BTreeMap::new();
    for (module, p) in parts {
        let Some((seen, seen_info)) = p.first else {
            continue;
        };
        let (down_key, down) = p.down.ok_or_else(|| {
            anyhow!(
                "{source}: module `{module}` has `{seen}` but no down (A) weight: expected the \
                 key `{}`",
                sibling_key(&seen_info, Half::Down)
            )
        })?;
        let (up_key, up) = p.up.ok_or_else(|| {
            anyhow!(
                "{source}: module `{module}` has `{seen}` but no up (B) weight: expected the \
                 key `{}`",
                sibling_key(&seen_info, Half::Up)
            )
        })?;
        let rank = check_shapes(source, down_key, &down, up_key, &up)?;
        let alpha = match p.alpha {
            Some((k, t)) => alpha_value(source, k, &t)?,
            None if kohya => None,
            None => match peft {
                Some(m) => m.alpha_for(&module, rank),
                None => None,
            },
        };
        let down = down
            .to_dtype(DType::F32)
            .with_context(|| format!("{source}: cannot convert `{down_key}` to f32"))?;
        let up = up
            .to_dtype(DType::F32)
            .with_context(|| format!("{source}: cannot convert `{up_key}` to f32"))?;
        modules.insert(module, LoraModule { down, up, alpha });
    }
    Ok((LoraWeights { modules }, layout))
}

/// Check that `down` and `up` make a LoRA pair (`[r, in]` with `[out, r]`, or `[r, in, kh, kw]`
/// with `[out, r, 1, 1]`) and return the rank.
fn check_shapes(source: &str, dk: &str, down: &Tensor, uk: &str, up: &Tensor) -> Result<usize> {
    let (d, u) = (down.dims(), up.dims());
    let pair = match (d, u) {
        ([r, _], [_, ru]) => Some((*r, *ru)),
        ([r, _, _, _], [_, ru, 1, 1]) => Some((*r, *ru)),
        _ => None,
    };
    let Some((r, ru)) = pair else {
        bail!(
            "{source}: `{dk}` {d:?} and `{uk}` {u:?} are not a LoRA pair: expected down [r, in] \
             with up [out, r], or down [r, in, kh, kw] with up [out, r, 1, 1]"
        );
    };
    if r != ru {
        bail!(
            "{source}: rank mismatch: `{dk}` {d:?} has rank {r} but `{uk}` {u:?} has rank {ru}: \
             expected the up weight's second dimension to equal the down weight's first"
        );
    }
    if r == 0 {
        bail!("{source}: `{dk}` {d:?} has rank 0: expected at least one row");
    }
    Ok(r)
}

/// A stored alpha: one number in a 0-d or `[1]` tensor of any dtype. 0 means "alpha = rank", as
/// kohya's `LoRAModule` reads it.
fn alpha_value(source: &str, key: &str, t: &Tensor) -> Result<Option<f64>> {
    if t.elem_count() != 1 {
        bail!(
            "{source}: `{key}` has shape {:?}: expected one number (a 0-d or [1] tensor)",
            t.dims()
        );
    }
    let v = t
        .flatten_all()?
        .to_dtype(DType::F32)?
        .to_vec1::<f32>()?
        .first()
        .copied()
        .ok_or_else(|| anyhow!("{source}: `{key}` is empty"))? as f64;
    if !v.is_finite() || v < 0.0 {
        bail!("{source}: `{key}` is {v}: expected a finite alpha >= 0");
    }
    Ok((v != 0.0).then_some(v))
}

/// The alphas in diffusers' `lora_adapter_metadata`: peft's `LoraConfig` per component
/// (`unet.lora_alpha`, `text_encoder.alpha_pattern`, ..., or unprefixed for one model's adapter).
/// peft scales by `lora_alpha / r` (`/ sqrt(r)` with `use_rslora`), and files saved by peft carry
/// no `.alpha` tensors, so without this a LoRA trained with alpha != rank would read wrongly.
#[derive(Debug, Default)]
struct PeftAlphas {
    /// Keyed by component (`unet`, `text_encoder`; `""` for unprefixed entries).
    components: BTreeMap<String, PeftComponent>,
}

#[derive(Debug, Default)]
struct PeftComponent {
    lora_alpha: Option<f64>,
    /// Module-name patterns and their alphas, matched as peft does for plain names: the whole
    /// module path or its dotted tail.
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftAlphas {
    fn parse(json: &str) -> Result<Self> {
        let v: serde_json::Value = serde_json::from_str(json).context("it is not JSON")?;
        let obj = v
            .as_object()
            .ok_or_else(|| anyhow!("it is not a JSON object"))?;
        let mut out = Self::default();
        for (k, val) in obj {
            let (component, field) = k.split_once('.').unwrap_or(("", k.as_str()));
            match field {
                "lora_alpha" => {
                    let a = match val.as_f64() {
                        Some(a) if a.is_finite() && a > 0.0 => a,
                        _ => bail!("`{k}` is {val}: expected a positive number"),
                    };
                    out.components
                        .entry(component.to_string())
                        .or_default()
                        .lora_alpha = Some(a);
                }
                "alpha_pattern" => {
                    let Some(patterns) = val.as_object() else {
                        bail!("`{k}` is {val}: expected an object of module patterns");
                    };
                    let mut list = Vec::new();
                    for (pat, a) in patterns {
                        if pat.contains([
                            '*', '+', '?', '[', ']', '(', ')', '{', '}', '|', '^', '$', '\\',
                        ]) {
                            bail!(
                                "`{k}` has the regular expression `{pat}`: only plain module \
                                 names are supported"
                            );
                        }
                        let a = match a.as_f64() {
                            Some(x) if x.is_finite() && x > 0.0 => x,
                            _ => bail!("`{k}`[`{pat}`] is {a}: expected a positive number"),
                        };
                        list.push((pat.clone(), a));
                    }
                    out.components
                        .entry(component.to_string())
                        .or_default()
                        .alpha_pattern = list;
                }
                "use_rslora" => {
                    out.components
                        .entry(component.to_string())
                        .or_default()
                        .rslora = val.as_bool().unwrap_or(false);
                }
                _ => {}
            }
        }
        Ok(out)
    }

    /// The alpha peft would use for `module` (a canonical path) of rank `rank`, expressed for
    /// `scale = alpha / rank`; `None` where the metadata says nothing about it.
    fn alpha_for(&self, module: &str, rank: usize) -> Option<f64> {
        let (component, rel) = if let Some(rel) = module.strip_prefix(UNET) {
            ("unet", rel)
        } else if let Some(rel) = module.strip_prefix(TEXT_ENCODER) {
            ("text_encoder", rel)
        } else {
            ("", module)
        };
        let c = self
            .components
            .get(component)
            .or_else(|| self.components.get(""))?;
        let alpha = c
            .alpha_pattern
            .iter()
            .find(|(p, _)| {
                rel == p
                    || rel
                        .strip_suffix(p.as_str())
                        .is_some_and(|h| h.ends_with('.'))
            })
            .map(|(_, a)| *a)
            .or(c.lora_alpha)?;
        // rsLoRA scales by alpha / sqrt(r) = (alpha * sqrt(r)) / r.
        Some(if c.rslora {
            alpha * (rank as f64).sqrt()
        } else {
            alpha
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ref-lora/pytorch_lora_weights.safetensors"
    );

    /// The module paths of the diffusers-written reference file, read off its keys.
    fn reference_known() -> Vec<String> {
        let t = candle_core::safetensors::load(REFERENCE, &Device::Cpu).unwrap();
        let mut known: Vec<String> = t
            .keys()
            .filter_map(|k| {
                k.strip_suffix(".lora.down.weight")
                    .or_else(|| k.strip_suffix(".lora.up.weight"))
            })
            .map(str::to_string)
            .collect();
        known.sort();
        known.dedup();
        known
    }

    fn reference() -> (LoraWeights, Vec<String>) {
        let known = reference_known();
        let (w, layout) = read(Path::new(REFERENCE), &known, &Device::Cpu).unwrap();
        assert_eq!(layout, LoraLayout::Diffusers);
        (w, known)
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn key_set(path: &Path) -> Vec<String> {
        let mut k: Vec<String> = candle_core::safetensors::load(path, &Device::Cpu)
            .unwrap()
            .into_keys()
            .collect();
        k.sort();
        k
    }

    fn same_modules(a: &LoraWeights, b: &LoraWeights) {
        assert_eq!(
            a.modules.keys().collect::<Vec<_>>(),
            b.modules.keys().collect::<Vec<_>>()
        );
        for (name, m) in &a.modules {
            let n = &b.modules[name];
            assert_eq!(m.down.dims(), n.down.dims(), "{name}");
            assert_eq!(m.up.dims(), n.up.dims(), "{name}");
            assert_eq!(values(&m.down), values(&n.down), "{name}");
            assert_eq!(values(&m.up), values(&n.up), "{name}");
        }
    }

    fn err(r: Result<(LoraWeights, LoraLayout)>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    fn rand(shape: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1f32, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn reference_file_reads_as_diffusers() {
        let (w, known) = reference();
        assert_eq!(w.modules.len(), 128);
        assert_eq!(known.len(), 128);
        for (name, m) in &w.modules {
            assert!(name.starts_with("unet."), "{name}");
            assert!(
                ["to_q", "to_k", "to_v", "to_out.0"]
                    .iter()
                    .any(|e| name.ends_with(&format!(".{e}"))),
                "{name}"
            );
            assert_eq!(m.rank(), 4, "{name}");
            assert_eq!(m.alpha, None);
            assert_eq!(m.scale(), 1.0);
            assert_eq!(m.down.dtype(), DType::F32);
            assert_eq!(m.up.dims()[1], 4);
        }
    }

    #[test]
    fn diffusers_round_trip_is_exact() {
        let (w, known) = reference();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lora.safetensors");
        save_diffusers(&out, &w).unwrap();
        assert_eq!(key_set(&out), key_set(Path::new(REFERENCE)));
        let meta = crate::files::read_safetensors_metadata(&out).unwrap();
        assert_eq!(meta, HashMap::from([("format".into(), "pt".into())]));
        let (back, layout) = read(&out, &known, &Device::Cpu).unwrap();
        assert_eq!(layout, LoraLayout::Diffusers);
        same_modules(&w, &back);
    }

    #[test]
    fn kohya_round_trip_stores_alpha() {
        let (w, known) = reference();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lora.safetensors");
        save_kohya(&out, &w).unwrap();
        let raw = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert_eq!(raw.len(), 3 * 128);
        let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0";
        assert!(raw.contains_key(&format!("{name}.lora_down.weight")));
        assert!(raw.contains_key(&format!("{name}.lora_up.weight")));
        let alpha = &raw[&format!("{name}.alpha")];
        assert_eq!(alpha.dims(), &[] as &[usize]);
        assert_eq!(alpha.dtype(), DType::F32);
        assert_eq!(alpha.to_scalar::<f32>().unwrap(), 4.0);
        let meta = crate::files::read_safetensors_metadata(&out).unwrap();
        assert_eq!(meta.get("format").map(String::as_str), Some("pt"));
        assert_eq!(meta.get("ss_network_dim").map(String::as_str), Some("4"));
        assert_eq!(
            meta.get("ss_network_alpha").map(String::as_str),
            Some("4.0")
        );

        let (back, layout) = read(&out, &known, &Device::Cpu).unwrap();
        assert_eq!(layout, LoraLayout::Kohya);
        same_modules(&w, &back);
        assert!(back.modules.values().all(|m| m.alpha == Some(4.0)));
    }

    #[test]
    fn kohya_names() {
        assert_eq!(kohya_name("unet.a.b_c.0"), "lora_unet_a_b_c_0");
        assert_eq!(
            kohya_name("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
        );
        assert_eq!(
            kohya_name("text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
        );
    }

    /// Effective update `scale * up @ down` of a linear module.
    fn delta(m: &LoraModule) -> Vec<f32> {
        values(&(m.up.matmul(&m.down).unwrap() * m.scale()).unwrap())
    }

    #[test]
    fn diffusers_folds_alpha_into_up() {
        let q = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_q".to_string();
        let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj".to_string();
        let known = vec![q.clone(), te.clone()];
        let mut w = LoraWeights::default();
        w.modules.insert(
            q.clone(),
            LoraModule {
                down: rand(&[4, 8]),
                up: rand(&[6, 4]),
                alpha: Some(2.0),
            },
        );
        w.modules.insert(
            te.clone(),
            LoraModule {
                down: rand(&[2, 8]),
                up: rand(&[8, 2]),
                alpha: Some(2.0),
            },
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("d.safetensors");
        save_diffusers(&out, &w).unwrap();
        assert_eq!(
            key_set(&out),
            [
                format!("{te}.lora_linear_layer.down.weight"),
                format!("{te}.lora_linear_layer.up.weight"),
                format!("{q}.lora.down.weight"),
                format!("{q}.lora.up.weight"),
            ]
        );
        let (back, layout) = read(&out, &known, &Device::Cpu).unwrap();
        assert_eq!(layout, LoraLayout::Diffusers);
        for (name, m) in &w.modules {
            let b = &back.modules[name];
            assert_eq!(b.alpha, None);
            for (x, y) in delta(m).iter().zip(delta(b)) {
                assert!((x - y).abs() < 1e-5, "{name}: {x} vs {y}");
            }
        }

        // kohya keeps the alphas as they are; with two different ranks there is no one
        // `ss_network_dim`, while the shared alpha is still recorded.
        let out = dir.path().join("k.safetensors");
        save_kohya(&out, &w).unwrap();
        let meta = crate::files::read_safetensors_metadata(&out).unwrap();
        assert_eq!(meta.get("ss_network_dim"), None);
        assert_eq!(
            meta.get("ss_network_alpha").map(String::as_str),
            Some("2.0")
        );
        let (back, _) = read(&out, &known, &Device::Cpu).unwrap();
        same_modules(&w, &back);
        assert!(back.modules.values().all(|m| m.alpha == Some(2.0)));
    }

    #[test]
    fn peft_and_kohya_variants_read() {
        let q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let te = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
        let conv = "unet.down_blocks.0.attentions.0.proj_in";
        let known: Vec<String> = [q, te, conv].iter().map(|s| s.to_string()).collect();
        let rel = q.strip_prefix("unet.").unwrap();
        let te_rel = te.strip_prefix("text_encoder.").unwrap();

        // peft with its wrapper and adapter name; a bare text-encoder path; an alpha tensor.
        let t = HashMap::from([
            (
                format!("base_model.model.{rel}.lora_A.default.weight"),
                rand(&[4, 8]),
            ),
            (
                format!("base_model.model.{rel}.lora_B.default.weight"),
                rand(&[8, 4]),
            ),
            (format!("{te_rel}.lora_A.weight"), rand(&[2, 8])),
            (format!("{te_rel}.lora_B.weight"), rand(&[8, 2])),
            (
                format!("{te_rel}.alpha"),
                Tensor::new(1f32, &Device::Cpu).unwrap(),
            ),
        ]);
        let (w, layout) = parse(t, &known, "peft.safetensors").unwrap();
        assert_eq!(layout, LoraLayout::Peft);
        assert_eq!(w.modules.keys().collect::<Vec<_>>(), [te, q]);
        assert_eq!(w.modules[q].alpha, None);
        assert_eq!(w.modules[te].alpha, Some(1.0));
        assert_eq!(w.modules[te].scale(), 0.5);

        // kohya with an f16 [1] alpha and a 1x1 convolution; f16 weights become f32.
        let k = kohya_name(conv);
        let t = HashMap::from([
            (
                format!("{k}.lora_down.weight"),
                rand(&[4, 8, 1, 1]).to_dtype(DType::F16).unwrap(),
            ),
            (format!("{k}.lora_up.weight"), rand(&[8, 4, 1, 1])),
            (
                format!("{k}.alpha"),
                Tensor::new(&[8f32], &Device::Cpu)
                    .unwrap()
                    .to_dtype(DType::F16)
                    .unwrap(),
            ),
        ]);
        let (w, layout) = parse(t, &known, "kohya.safetensors").unwrap();
        assert_eq!(layout, LoraLayout::Kohya);
        let m = &w.modules[conv];
        assert_eq!(m.down.dtype(), DType::F32);
        assert_eq!(m.rank(), 4);
        assert_eq!(m.scale(), 2.0);

        // The pre-peft processor names of old diffusers files.
        let attn = rel.strip_suffix(".to_q").unwrap();
        let t = HashMap::from([
            (
                format!("{attn}.processor.to_q_lora.down.weight"),
                rand(&[4, 8]),
            ),
            (
                format!("{attn}.processor.to_q_lora.up.weight"),
                rand(&[8, 4]),
            ),
        ]);
        let (w, layout) = parse(t, &known, "old.bin").unwrap();
        assert_eq!(layout, LoraLayout::Diffusers);
        assert!(w.modules.contains_key(q));
    }

    #[test]
    fn peft_metadata_gives_alpha() {
        let (w, known) = reference();
        let rel = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
        let tensors: Vec<(String, Tensor)> = w
            .modules
            .iter()
            .flat_map(|(n, m)| {
                let n = n.strip_prefix("unet.").unwrap();
                [
                    (format!("{n}.lora_A.weight"), m.down.clone()),
                    (format!("{n}.lora_B.weight"), m.up.clone()),
                ]
            })
            .collect();
        let json = format!(
            r#"{{"unet.r": 4, "unet.lora_alpha": 8, "unet.alpha_pattern": {{"{rel}": 2}}}}"#
        );
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (PEFT_METADATA_KEY.to_string(), json),
        ]);
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("peft.safetensors");
        crate::files::save_safetensors(&out, &tensors, &meta).unwrap();
        let (back, layout) = read(&out, &known, &Device::Cpu).unwrap();
        assert_eq!(layout, LoraLayout::Peft);
        same_modules(&w, &back);
        for (name, m) in &back.modules {
            let want = if name.ends_with(rel) { 2.0 } else { 8.0 };
            assert_eq!(m.alpha, Some(want), "{name}");
        }
    }

    #[test]
    fn bad_files_are_refused() {
        let q = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q".to_string();
        let known = vec![q.clone()];

        let t = HashMap::from([(
            "model.diffusion_model.out.2.weight".to_string(),
            rand(&[4, 4]),
        )]);
        let e = err(parse(t, &known, "x.safetensors"));
        assert!(
            e.contains("x.safetensors") && e.contains("unknown LoRA layout"),
            "{e}"
        );
        assert!(e.contains("model.diffusion_model.out.2.weight"), "{e}");

        let other = "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k";
        let t = HashMap::from([
            (format!("{q}.lora.down.weight"), rand(&[4, 8])),
            (format!("{q}.lora.up.weight"), rand(&[8, 4])),
            (format!("{other}.lora.down.weight"), rand(&[4, 8])),
            (format!("{other}.lora.up.weight"), rand(&[8, 4])),
        ]);
        let e = err(parse(t, &known, "y.safetensors"));
        assert!(e.contains(&format!("{other}.lora.down.weight")), "{e}");
        assert!(e.contains("another model"), "{e}");

        let t = HashMap::from([
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_down.weight".to_string(),
                rand(&[4, 8]),
            ),
            (
                "lora_unet_input_blocks_1_1_proj_in.lora_up.weight".to_string(),
                rand(&[8, 4]),
            ),
        ]);
        let e = err(parse(t, &known, "ldm.safetensors"));
        assert!(
            e.contains("lora_unet_input_blocks_1_1_proj_in.lora_down.weight"),
            "{e}"
        );
        assert!(e.contains("input_blocks"), "{e}");

        let t = HashMap::from([
            (format!("{q}.lora.down.weight"), rand(&[4, 8])),
            (format!("{q}.lora.up.weight"), rand(&[8, 3])),
        ]);
        let e = err(parse(t, &known, "z.safetensors"));
        assert!(
            e.contains("rank mismatch") && e.contains("z.safetensors"),
            "{e}"
        );

        let t = HashMap::from([(format!("{q}.lora_A.weight"), rand(&[4, 8]))]);
        let e = err(parse(t, &known, "half.safetensors"));
        assert!(e.contains(&format!("{q}.lora_B.weight")), "{e}");

        let t = HashMap::from([
            (format!("{q}.lora.down.weight"), rand(&[4, 8])),
            (format!("{q}.lora.up.weight"), rand(&[8, 4])),
            (
                format!("{}.lora_down.weight", kohya_name(&q)),
                rand(&[4, 8]),
            ),
        ]);
        let e = err(parse(t, &known, "mixed.safetensors"));
        assert!(e.contains("does not fit"), "{e}");

        let t = HashMap::from([
            (format!("{q}.lora.down.weight"), rand(&[4, 8])),
            (format!("{q}.lora.up.weight"), rand(&[8, 4])),
            (format!("{q}.alpha"), rand(&[2])),
        ]);
        let e = err(parse(t, &known, "alpha.safetensors"));
        assert!(e.contains(&format!("{q}.alpha")), "{e}");

        let e = format!(
            "{:#}",
            save_diffusers(Path::new("/nonexistent/x"), &LoraWeights::default()).unwrap_err()
        );
        assert!(e.contains("no LoRA modules"), "{e}");
    }
}
