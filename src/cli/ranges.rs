//! clap value parsers that check a numeric flag's range at parse time, before any model loads
//! (the ranges themselves are [`crate::ranges::Range`], shared with the TOML presets). Each
//! refusal names the flag, the value given and the range, e.g.
//! `error: --guidance -1: expected a finite number >= 0`.
//!
//! ```ignore
//! #[arg(long, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
//! pub steps: Option<usize>,
//! ```

use crate::ranges::Range;
use clap::builder::TypedValueParser;
use clap::error::ErrorKind;
use std::ffi::OsStr;
use std::marker::PhantomData;
use std::str::FromStr;

/// The number types flags use.
pub trait Number: FromStr + Copy + Clone + Send + Sync + 'static {
    fn as_f64(self) -> f64;
}

impl Number for usize {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Number for u32 {
    fn as_f64(self) -> f64 {
        self as f64
    }
}

impl Number for f64 {
    fn as_f64(self) -> f64 {
        self
    }
}

/// A value parser of `T` that refuses values outside `range`.
#[derive(Clone, Copy, Debug)]
pub struct Checked<T> {
    range: Range,
    _t: PhantomData<fn() -> T>,
}

/// A whole-number flag (`usize`) in `range`.
pub fn int(range: Range) -> Checked<usize> {
    Checked {
        range,
        _t: PhantomData,
    }
}

/// A `u32` flag in `range`.
pub fn int32(range: Range) -> Checked<u32> {
    Checked {
        range,
        _t: PhantomData,
    }
}

/// A real-number flag (`f64`) in `range`.
pub fn float(range: Range) -> Checked<f64> {
    Checked {
        range,
        _t: PhantomData,
    }
}

impl<T: Number> TypedValueParser for Checked<T> {
    type Value = T;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &OsStr,
    ) -> Result<T, clap::Error> {
        let name = arg
            .and_then(|a| a.get_long().map(|l| format!("--{l}")))
            .or_else(|| arg.map(|a| a.get_id().to_string()))
            .unwrap_or_else(|| "value".into());
        let text = value.to_string_lossy();
        let refuse = |msg: String| {
            let mut cmd = cmd.clone();
            cmd.error(ErrorKind::ValueValidation, msg)
        };
        let v: T = text
            .trim()
            .parse()
            .map_err(|_| refuse(self.range.message(&name, &text)))?;
        self.range.check(&name, v.as_f64()).map_err(refuse)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use crate::cli::Cli;
    use clap::Parser;

    /// One row per range-checked flag: the verb's arguments before it, the flag, a value
    /// outside its range and one inside.
    const TABLE: &[(&[&str], &str, &str, &str)] = &[
        // train
        (&["train"], "--steps", "0", "1"),
        (&["train"], "--save-every", "0", "1"),
        (&["train"], "--validate-every", "-1", "0"),
        (&["train"], "--heldout-every", "-1", "0"),
        (&["train"], "--early-stop", "0", "3"),
        (&["train"], "--prior-images", "-1", "0"),
        (&["train"], "--holdout", "0", "1"),
        (&["train"], "--batch", "0", "1"),
        (&["train"], "--grad-accum", "0", "2"),
        (&["train"], "--lr", "0", "5e-3"),
        (&["train"], "--resolution", "100", "128"),
        (&["train"], "--num-vectors", "0", "2"),
        (&["train"], "--contrastive-weight", "-0.1", "0"),
        (&["train"], "--tau", "0", "0.07"),
        (&["train"], "--prior-loss-weight", "-1", "1"),
        (&["train"], "--prior-steps", "0", "50"),
        (&["train"], "--lora-rank", "0", "4"),
        (&["train"], "--lora-alpha", "0", "8"),
        (&["train"], "--max-grad-norm", "-1", "0"),
        (&["train"], "--points-per-side", "0", "4"),
        // sample
        (&["sample", "--prompt", "p"], "--steps", "0", "20"),
        (&["sample", "--prompt", "p"], "--guidance", "-1", "0"),
        (&["sample", "--prompt", "p"], "--num-images", "0", "3"),
        (&["sample", "--prompt", "p"], "--height", "500", "512"),
        (&["sample", "--prompt", "p"], "--width", "0", "64"),
        (&["sample", "--prompt", "p"], "--truncation", "0", "16"),
        (&["sample", "--prompt", "p"], "--truncation", "129", "128"),
        (&["sample", "--prompt", "p"], "--attractor", "-1", "0"),
        (&["sample", "--prompt", "p"], "--batch", "0", "4"),
        // eval
        (&["eval"], "--samples", "0", "1"),
        (&["eval"], "--steps", "0", "25"),
        (&["eval"], "--guidance", "-0.5", "7.5"),
        (&["eval"], "--batch", "0", "8"),
        // masks
        (&["masks"], "--points-per-side", "0", "1"),
        // bench
        (&["bench"], "--sizes", "250", "256"),
        (&["bench"], "--runs", "0", "1"),
        (&["bench"], "--batches", "0", "4"),
        (&["bench"], "--warmup", "-1", "0"),
        (&["bench"], "--max-memory-gb", "0", "8"),
        (&["bench"], "--size", "12", "16"),
        // dataset
        (&["dataset", "check"], "--leak-threshold", "257", "256"),
        (&["dataset", "new", "a", "b"], "--test", "0", "1"),
        // report
        (&["report", "sweep"], "--thumb", "0", "64"),
        (&["report", "sweep"], "--grid-images", "0", "4"),
        (&["report", "sweep"], "--resamples", "0", "100"),
        (&["report", "sweep"], "--grid", "-1", "0"),
        (&["report", "sweep"], "--grid-cell", "31", "32"),
        (&["report", "sweep"], "--grid-cell", "1025", "1024"),
    ];

    #[test]
    fn every_range_is_checked_at_parse_time() {
        for (verb, flag, bad, good) in TABLE {
            let with = |v: &str| {
                let mut a = vec!["attractor"];
                a.extend_from_slice(verb);
                a.extend_from_slice(&[flag, v]);
                Cli::try_parse_from(a)
            };
            let err = with(bad).expect_err(&format!("{verb:?} {flag} {bad} parsed"));
            let msg = err.to_string();
            assert!(
                msg.contains(&format!("{flag} {bad}: expected")),
                "{verb:?} {flag} {bad}: {msg}"
            );
            assert!(
                !msg.contains("panicked") && err.kind() == clap::error::ErrorKind::ValueValidation,
                "{msg}"
            );
            if let Err(e) = with(good) {
                panic!("{verb:?} {flag} {good} refused: {e}");
            }
        }
        // The table is complete: every numeric flag of every verb is in it (a new flag without
        // a row, and so likely without a range, fails here).
        use clap::CommandFactory;
        use std::any::TypeId;
        let numeric = [
            TypeId::of::<usize>(),
            TypeId::of::<u32>(),
            TypeId::of::<f64>(),
        ];
        let mut missing = Vec::new();
        let mut walk = vec![(String::new(), Cli::command())];
        while let Some((path, cmd)) = walk.pop() {
            for arg in cmd.get_arguments() {
                let Some(long) = arg.get_long() else { continue };
                let id = arg.get_value_parser().type_id();
                if !numeric.iter().any(|t| id == *t) {
                    continue;
                }
                let flag = format!("--{long}");
                let listed = TABLE
                    .iter()
                    .any(|(verb, f, _, _)| *f == flag && path.trim() == verb[0]);
                if !listed {
                    missing.push(format!("{path} {flag}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = if path.is_empty() {
                    sub.get_name().to_string()
                } else {
                    path.clone()
                };
                walk.push((name, sub.clone()));
            }
        }
        assert!(
            missing.is_empty(),
            "numeric flags without a row: {missing:?}"
        );

        // Not a number at all: the same message.
        let e = Cli::try_parse_from(["attractor", "train", "--steps", "-3"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--steps -3: expected a whole number >= 1"),
            "{e}"
        );
        let e = Cli::try_parse_from(["attractor", "eval", "--guidance", "NaN"]).unwrap_err();
        assert!(
            e.to_string()
                .contains("--guidance NaN: expected a finite number >= 0"),
            "{e}"
        );
    }
}
