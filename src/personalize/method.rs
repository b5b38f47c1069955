//! The four training methods (SPEC.md §3-5) and the contrastive-weight schedules (SPEC.md §5), as
//! enums that clap and serde parse with the names users type (`ti`, `ti+`, `neti`, `neti+`;
//! `zero` ... `cosine`). What a method implies (NeTI mapper or not, attractor tokens or not,
//! default optimiser settings) is a method on the enum, so no caller compares strings.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A personalisation method.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Method {
    /// Textual Inversion: one (or a few) learned token rows.
    #[value(name = "ti")]
    #[serde(rename = "ti")]
    Ti,
    /// Textual Inversion with per-image attractor tokens and the three-pool loss.
    #[value(name = "ti+")]
    #[serde(rename = "ti+")]
    TiPlus,
    /// NeTI: a mapper from (timestep, UNet layer) to the token embedding, with textual bypass.
    #[value(name = "neti")]
    #[serde(rename = "neti")]
    Neti,
    /// NeTI with per-image attractors, each with its own mapper.
    #[value(name = "neti+")]
    #[serde(rename = "neti+")]
    NetiPlus,
    /// DreamBooth: the whole UNet fine-tuned (and the text encoder with
    /// `--train-text-encoder`) on `a photo of sks <class>`, with prior preservation.
    #[value(name = "dreambooth")]
    #[serde(rename = "dreambooth")]
    DreamBooth,
    /// DreamBooth-LoRA: rank-r adapters on every UNet attention projection.
    #[value(name = "dreambooth-lora")]
    #[serde(rename = "dreambooth-lora")]
    DreamBoothLora,
    /// Custom Diffusion: the cross-attention K/V weights and a modifier token `<new1>`.
    #[value(name = "custom-diffusion")]
    #[serde(rename = "custom-diffusion")]
    CustomDiffusion,
    /// DreamBooth-LoRA with per-image attractor tokens, the three pools, masked losses and
    /// scheduled InfoNCE of ti+.
    #[value(name = "dreambooth-lora+")]
    #[serde(rename = "dreambooth-lora+")]
    DreamBoothLoraPlus,
}

/// Which model weights a method trains (beside any learned token rows or mappers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightTraining {
    /// None: the model stays frozen (ti, ti+, neti, neti+).
    Frozen,
    /// Every UNet parameter (DreamBooth).
    FullUnet,
    /// LoRA adapters on the attention projections (DreamBooth-LoRA).
    Lora,
    /// `to_k` and `to_v` of the cross-attention layers (Custom Diffusion).
    CrossAttentionKv,
}

impl Method {
    /// Every method, in the paper's table order (base methods, then the + variants).
    pub const ALL: [Method; 8] = [
        Method::Ti,
        Method::Neti,
        Method::DreamBooth,
        Method::DreamBoothLora,
        Method::CustomDiffusion,
        Method::TiPlus,
        Method::NetiPlus,
        Method::DreamBoothLoraPlus,
    ];

    /// The methods that learn only tokens or NeTI mappers on a frozen model.
    pub const TOKEN_METHODS: [Method; 4] =
        [Method::Ti, Method::TiPlus, Method::Neti, Method::NetiPlus];

    /// The name users type (`ti`, `ti+`, `neti`, `neti+`, `dreambooth`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Method::Ti => "ti",
            Method::TiPlus => "ti+",
            Method::Neti => "neti",
            Method::NetiPlus => "neti+",
            Method::DreamBooth => "dreambooth",
            Method::DreamBoothLora => "dreambooth-lora",
            Method::CustomDiffusion => "custom-diffusion",
            Method::DreamBoothLoraPlus => "dreambooth-lora+",
        }
    }

    /// The method without the attractor (`ti+` -> `ti`, `neti+` -> `neti`,
    /// `dreambooth-lora+` -> `dreambooth-lora`); a base method is its own base.
    pub fn base(self) -> Method {
        match self {
            Method::Ti | Method::TiPlus => Method::Ti,
            Method::Neti | Method::NetiPlus => Method::Neti,
            Method::DreamBoothLora | Method::DreamBoothLoraPlus => Method::DreamBoothLora,
            Method::DreamBooth => Method::DreamBooth,
            Method::CustomDiffusion => Method::CustomDiffusion,
        }
    }

    /// The + variant of a base method, where one exists.
    pub fn plus(self) -> Option<Method> {
        match self {
            Method::Ti => Some(Method::TiPlus),
            Method::Neti => Some(Method::NetiPlus),
            Method::DreamBoothLora => Some(Method::DreamBoothLoraPlus),
            _ => None,
        }
    }

    /// Which model weights train.
    pub fn weight_training(self) -> WeightTraining {
        match self {
            Method::DreamBooth => WeightTraining::FullUnet,
            Method::DreamBoothLora | Method::DreamBoothLoraPlus => WeightTraining::Lora,
            Method::CustomDiffusion => WeightTraining::CrossAttentionKv,
            _ => WeightTraining::Frozen,
        }
    }

    /// True when model weights train (the baselines and dreambooth-lora+).
    pub fn trains_weights(self) -> bool {
        self.weight_training() != WeightTraining::Frozen
    }

    /// True when the subject is an existing rare token (`sks`), not a learned placeholder
    /// (DreamBooth and its LoRA form).
    pub fn uses_identifier(self) -> bool {
        matches!(
            self,
            Method::DreamBooth | Method::DreamBoothLora | Method::DreamBoothLoraPlus
        )
    }

    /// True when a batch pairs instance images with generated class images (prior
    /// preservation): the DreamBooth family and Custom Diffusion.
    pub fn uses_prior(self) -> bool {
        self.trains_weights()
    }

    /// Whether the learning rate is scaled by batch x grad-accum by default: yes for TI/NeTI
    /// (their papers' recipes) and Custom Diffusion (its README's `--scale_lr`), no for the
    /// DreamBooth scripts.
    pub fn default_scale_lr(self) -> bool {
        !self.uses_identifier()
    }

    /// True when the subject token comes from a NeTI mapper (SPEC.md §4).
    pub fn uses_neti(self) -> bool {
        matches!(self, Method::Neti | Method::NetiPlus)
    }

    /// True when each training image gets an attractor token and the three-pool + InfoNCE loss
    /// applies (SPEC.md §5).
    pub fn uses_attractor(self) -> bool {
        matches!(
            self,
            Method::TiPlus | Method::NetiPlus | Method::DreamBoothLoraPlus
        )
    }

    /// Base learning rate before any scaling: 5e-3 for TI (original TI), 1e-3 for NeTI (NeTI's
    /// `train.yaml`); DreamBooth 5e-6, DreamBooth-LoRA 1e-4, Custom Diffusion 1e-5 (the READMEs
    /// of diffusers' `train_dreambooth.py`, `train_dreambooth_lora.py`,
    /// `train_custom_diffusion.py`, SPEC.md §8); the + variants default to their base method's.
    pub fn default_base_lr(self) -> f64 {
        match self.base() {
            Method::Ti => 5e-3,
            Method::Neti => 1e-3,
            Method::DreamBooth => 5e-6,
            Method::DreamBoothLora => 1e-4,
            _ => 1e-5,
        }
    }

    /// Optimizer steps: TI 5000, NeTI 1000, DreamBooth 800, DreamBooth-LoRA 500, Custom
    /// Diffusion 250 (SPEC.md §8).
    pub fn default_steps(self) -> usize {
        match self.base() {
            Method::Ti => 5000,
            Method::Neti => 1000,
            Method::DreamBooth => 800,
            Method::DreamBoothLora => 500,
            _ => 250,
        }
    }

    /// Instance images per micro-batch: 2 for TI and NeTI (TI: "1e-2 at batch 2"; NeTI: 2 x
    /// 4), 1 for the DreamBooth recipes, 2 for Custom Diffusion. With prior preservation as
    /// many class images join each micro-batch.
    pub fn default_batch(self) -> usize {
        match self.base() {
            Method::DreamBooth | Method::DreamBoothLora => 1,
            _ => 2,
        }
    }

    /// Gradient-accumulation steps: 1 for TI and the baselines, 4 for NeTI.
    pub fn default_grad_accum(self) -> usize {
        match self.base() {
            Method::Neti => 4,
            _ => 1,
        }
    }

    /// The learning rate actually used: base lr x batch x grad-accum (SPEC.md §3-4).
    pub fn scaled_lr(base_lr: f64, batch: usize, grad_accum: usize) -> f64 {
        base_lr * (batch * grad_accum) as f64
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The weight `s(p)` of the contrastive loss over training progress `p = step / total steps`
/// (SPEC.md §5: the paper names the schedules and plots them; the formulas are ours).
#[derive(
    clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default,
)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lowercase")]
pub enum Schedule {
    /// 0: no contrastive loss.
    Zero,
    /// 1 throughout.
    One,
    /// p.
    Linear,
    /// exp(-5p): high early.
    Exponential,
    /// 1 / (1 + exp(-10 (p - 0.5))).
    Sigmoid,
    /// (1 - cos(pi p)) / 2: starts low (the paper finds this and sigmoid best).
    #[default]
    Cosine,
}

impl Schedule {
    pub const ALL: [Schedule; 6] = [
        Schedule::Zero,
        Schedule::One,
        Schedule::Linear,
        Schedule::Exponential,
        Schedule::Sigmoid,
        Schedule::Cosine,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Zero => "zero",
            Schedule::One => "one",
            Schedule::Linear => "linear",
            Schedule::Exponential => "exponential",
            Schedule::Sigmoid => "sigmoid",
            Schedule::Cosine => "cosine",
        }
    }

    /// `s(p)`; `p` is clamped to [0, 1].
    pub fn weight(self, p: f64) -> f64 {
        let p = p.clamp(0.0, 1.0);
        match self {
            Schedule::Zero => 0.0,
            Schedule::One => 1.0,
            Schedule::Linear => p,
            Schedule::Exponential => (-5.0 * p).exp(),
            Schedule::Sigmoid => 1.0 / (1.0 + (-10.0 * (p - 0.5)).exp()),
            Schedule::Cosine => (1.0 - (std::f64::consts::PI * p).cos()) / 2.0,
        }
    }

    /// `s(step / total)`; a total of 0 counts as finished (p = 1).
    pub fn weight_at(self, step: usize, total: usize) -> f64 {
        if total == 0 {
            self.weight(1.0)
        } else {
            self.weight(step as f64 / total as f64)
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::ValueEnum;

    #[test]
    fn method_names_parse_in_clap_and_serde() {
        for (m, s) in [
            (Method::Ti, "ti"),
            (Method::TiPlus, "ti+"),
            (Method::Neti, "neti"),
            (Method::NetiPlus, "neti+"),
        ] {
            assert_eq!(m.to_string(), s);
            assert_eq!(Method::from_str(s, false).unwrap(), m);
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{s}\""));
            assert_eq!(
                serde_json::from_str::<Method>(&format!("\"{s}\"")).unwrap(),
                m
            );
            #[derive(Deserialize)]
            struct T {
                method: Method,
            }
            let t: T = toml::from_str(&format!("method = \"{s}\"")).unwrap();
            assert_eq!(t.method, m);
        }
        for m in Method::ALL {
            assert_eq!(Method::from_str(m.name(), false).unwrap(), m);
            let json = format!("\"{}\"", m.name());
            assert_eq!(serde_json::from_str::<Method>(&json).unwrap(), m);
        }
        assert!(Method::from_str("tiplus", false).is_err());
        assert!(serde_json::from_str::<Method>("\"TiPlus\"").is_err());
    }

    #[test]
    fn method_implications() {
        assert!(!Method::Ti.uses_neti() && !Method::Ti.uses_attractor());
        assert!(!Method::TiPlus.uses_neti() && Method::TiPlus.uses_attractor());
        assert!(Method::Neti.uses_neti() && !Method::Neti.uses_attractor());
        assert!(Method::NetiPlus.uses_neti() && Method::NetiPlus.uses_attractor());
        assert_eq!(Method::TiPlus.base(), Method::Ti);
        assert_eq!(Method::NetiPlus.base(), Method::Neti);
        // SPEC §3: 5e-3 x batch 2 = 1e-2; SPEC §4: 1e-3 x 2 x 4 = 8e-3.
        for m in [Method::Ti, Method::TiPlus] {
            let lr = Method::scaled_lr(
                m.default_base_lr(),
                m.default_batch(),
                m.default_grad_accum(),
            );
            assert!((lr - 1e-2).abs() < 1e-12);
            assert_eq!(m.default_steps(), 5000);
        }
        assert!(Method::DreamBooth.trains_weights() && Method::DreamBooth.uses_identifier());
        assert!(
            Method::CustomDiffusion.trains_weights() && !Method::CustomDiffusion.uses_identifier()
        );
        assert!(Method::DreamBoothLoraPlus.uses_attractor());
        assert_eq!(Method::DreamBoothLoraPlus.base(), Method::DreamBoothLora);
        assert_eq!(
            Method::DreamBoothLora.plus(),
            Some(Method::DreamBoothLoraPlus)
        );
        assert!(!Method::TiPlus.trains_weights());
        assert_eq!(Method::DreamBooth.default_base_lr(), 5e-6);
        assert_eq!(Method::DreamBooth.default_steps(), 800);
        assert_eq!(Method::DreamBoothLora.default_base_lr(), 1e-4);
        assert_eq!(Method::DreamBoothLora.default_steps(), 500);
        assert_eq!(Method::CustomDiffusion.default_steps(), 250);
        for m in [Method::Neti, Method::NetiPlus] {
            let lr = Method::scaled_lr(
                m.default_base_lr(),
                m.default_batch(),
                m.default_grad_accum(),
            );
            assert!((lr - 8e-3).abs() < 1e-12);
            assert_eq!(m.default_steps(), 1000);
        }
    }

    #[test]
    fn schedule_names_parse() {
        for s in Schedule::ALL {
            assert_eq!(Schedule::from_str(s.name(), false).unwrap(), s);
            let json = format!("\"{}\"", s.name());
            assert_eq!(serde_json::from_str::<Schedule>(&json).unwrap(), s);
            assert_eq!(serde_json::to_string(&s).unwrap(), json);
        }
    }

    #[test]
    fn schedule_values_by_hand() {
        // (schedule, s(0), s(0.5), s(1)), computed by hand from SPEC.md §5's formulas:
        // exp(-2.5) = 0.0820849986, exp(-5) = 0.0067379470, 1/(1+e^5) = 0.0066928509.
        let table = [
            (Schedule::Zero, [0.0, 0.0, 0.0]),
            (Schedule::One, [1.0, 1.0, 1.0]),
            (Schedule::Linear, [0.0, 0.5, 1.0]),
            (Schedule::Exponential, [1.0, 0.0820849986, 0.0067379470]),
            (Schedule::Sigmoid, [0.0066928509, 0.5, 0.9933071491]),
            (Schedule::Cosine, [0.0, 0.5, 1.0]),
        ];
        for (s, want) in table {
            for (p, w) in [0.0, 0.5, 1.0].into_iter().zip(want) {
                let got = s.weight(p);
                assert!((got - w).abs() < 1e-9, "{s}({p}) = {got}, want {w}");
            }
        }
        assert_eq!(
            Schedule::Cosine.weight_at(250, 1000),
            Schedule::Cosine.weight(0.25)
        );
        assert!((Schedule::Cosine.weight(0.25) - 0.1464466094).abs() < 1e-9);
        assert_eq!(Schedule::Linear.weight(2.0), 1.0);
    }
}
