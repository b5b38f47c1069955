//! The valid ranges of numeric settings, in one place: the command line's value parsers
//! (`crate::cli::ranges`, checked by clap before any model loads) and the TOML presets
//! (`crate::personalize::settings`, checked where they resolve) both ask a [`Range`], so a flag
//! and its TOML key refuse the same values with the same words.
//!
//! Messages read `NAME VALUE: expected RANGE`, e.g. `--steps 0: expected a whole number >= 1`.

use std::fmt;

/// What values a numeric setting takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Range {
    /// A whole number >= the bound.
    AtLeast(u64),
    /// A whole number in `[lo, hi]`.
    Between(u64, u64),
    /// A positive whole number that is a multiple of 8 (image sizes: the VAE halves them three
    /// times).
    MultipleOf8,
    /// A finite number > 0 (learning rates, temperatures, LoRA alpha, memory limits).
    Positive,
    /// A finite number >= 0 (loss weights, guidance, clipping norms).
    NonNegative,
    /// A probability: a number in `[0, 1]`.
    Unit,
}

impl fmt::Display for Range {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Range::AtLeast(n) => write!(f, "a whole number >= {n}"),
            Range::Between(lo, hi) => write!(f, "a whole number from {lo} to {hi}"),
            Range::MultipleOf8 => f.write_str("a positive multiple of 8 (e.g. 512)"),
            Range::Positive => f.write_str("a finite number > 0"),
            Range::NonNegative => f.write_str("a finite number >= 0"),
            Range::Unit => f.write_str("a number from 0 to 1"),
        }
    }
}

impl Range {
    /// Whether the range holds whole numbers only.
    pub fn is_integer(self) -> bool {
        matches!(
            self,
            Range::AtLeast(_) | Range::Between(..) | Range::MultipleOf8
        )
    }

    /// Whether `v` lies in the range.
    pub fn contains(self, v: f64) -> bool {
        let whole = v.is_finite() && v.fract() == 0.0 && v >= 0.0;
        match self {
            Range::AtLeast(n) => whole && v >= n as f64,
            Range::Between(lo, hi) => whole && v >= lo as f64 && v <= hi as f64,
            Range::MultipleOf8 => whole && v >= 8.0 && (v as u64).is_multiple_of(8),
            Range::Positive => v.is_finite() && v > 0.0,
            Range::NonNegative => v.is_finite() && v >= 0.0,
            Range::Unit => (0.0..=1.0).contains(&v),
        }
    }

    /// `Ok` when `value` is in the range, else `NAME VALUE: expected RANGE`. `name` is what the
    /// user typed: a flag (`--steps`) or a TOML key (`steps`).
    pub fn check(self, name: &str, value: f64) -> Result<(), String> {
        if self.contains(value) {
            Ok(())
        } else {
            Err(self.message(name, &fmt_value(value)))
        }
    }

    /// The refusal message for `value` (as typed) of `name`.
    pub fn message(self, name: &str, value: &str) -> String {
        format!("{name} {value}: expected {self}")
    }
}

/// A value as the user would have written it (`0`, not `0.0`, for whole numbers).
fn fmt_value(v: f64) -> String {
    if v.is_finite() && v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_accept_and_refuse() {
        assert!(Range::AtLeast(1).contains(1.0));
        assert!(!Range::AtLeast(1).contains(0.0));
        assert!(!Range::AtLeast(1).contains(1.5));
        assert!(Range::Between(0, 256).contains(256.0));
        assert!(!Range::Between(0, 256).contains(257.0));
        assert!(Range::MultipleOf8.contains(128.0));
        assert!(!Range::MultipleOf8.contains(0.0));
        assert!(!Range::MultipleOf8.contains(100.0));
        assert!(Range::Positive.contains(1e-9));
        assert!(!Range::Positive.contains(0.0));
        assert!(!Range::Positive.contains(f64::NAN));
        assert!(!Range::Positive.contains(f64::INFINITY));
        assert!(Range::NonNegative.contains(0.0));
        assert!(!Range::NonNegative.contains(-0.1));
        assert!(Range::Unit.contains(1.0));
        assert!(!Range::Unit.contains(1.01));
        assert!(!Range::Unit.contains(f64::NAN));
        assert_eq!(
            Range::AtLeast(1).check("steps", 0.0).unwrap_err(),
            "steps 0: expected a whole number >= 1"
        );
        assert_eq!(
            Range::Positive.check("base_lr", -0.5).unwrap_err(),
            "base_lr -0.5: expected a finite number > 0"
        );
    }
}
