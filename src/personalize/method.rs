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
}

impl Method {
    pub const ALL: [Method; 4] = [Method::Ti, Method::TiPlus, Method::Neti, Method::NetiPlus];

    /// The name users type (`ti`, `ti+`, `neti`, `neti+`).
    pub fn name(self) -> &'static str {
        match self {
            Method::Ti => "ti",
            Method::TiPlus => "ti+",
            Method::Neti => "neti",
            Method::NetiPlus => "neti+",
        }
    }

    /// The method without the attractor (`ti+` -> `ti`, `neti+` -> `neti`).
    pub fn base(self) -> Method {
        match self {
            Method::Ti | Method::TiPlus => Method::Ti,
            Method::Neti | Method::NetiPlus => Method::Neti,
        }
    }

    /// True when the subject token comes from a NeTI mapper (SPEC.md §4).
    pub fn uses_neti(self) -> bool {
        matches!(self, Method::Neti | Method::NetiPlus)
    }

    /// True when each training image gets an attractor token and the three-pool + InfoNCE loss
    /// applies (SPEC.md §5).
    pub fn uses_attractor(self) -> bool {
        matches!(self, Method::TiPlus | Method::NetiPlus)
    }

    /// Base learning rate before scaling by batch x grad-accum: 5e-3 for TI (original TI), 1e-3 for
    /// NeTI (NeTI's `train.yaml`); the + variants default to their base method's (SPEC.md §5).
    pub fn default_base_lr(self) -> f64 {
        match self.base() {
            Method::Ti => 5e-3,
            _ => 1e-3,
        }
    }

    /// Optimizer steps: 5000 for TI, 1000 for NeTI.
    pub fn default_steps(self) -> usize {
        match self.base() {
            Method::Ti => 5000,
            _ => 1000,
        }
    }

    /// Images per micro-batch: 2 for both (TI: "1e-2 at batch 2"; NeTI: 2 x 4).
    pub fn default_batch(self) -> usize {
        2
    }

    /// Gradient-accumulation steps: 1 for TI, 4 for NeTI.
    pub fn default_grad_accum(self) -> usize {
        match self.base() {
            Method::Ti => 1,
            _ => 4,
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
