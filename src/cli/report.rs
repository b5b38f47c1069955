//! `attractor report SWEEP_DIR`: collect every evaluation summary of a sweep into tables (one
//! per split, method x schedule pooled over subjects), paired comparisons with bootstrap
//! intervals, the schedule and method plots, the qualitative grid, the loss curves, and one
//! self-contained `report.html` (see `crate::report` for what is read and written).
//!
//! ```text
//! attractor report SWEEP_DIR [--out DIR] [--grid-images 4] [--thumb 128]
//!     [--compare A,B]... [--resamples 10000] [--seed 0]
//!     [--grid N] [--grid-cell 160] [--data DATASET]
//! ```

use super::ranges;
use super::Common;
use crate::ranges::Range;
use crate::report::compare::{parse_compare, summary_lines};
use crate::report::paired::{DEFAULT_RESAMPLES, DEFAULT_SEED};
use crate::report::{write_report, ReportOptions};
use anyhow::{bail, Result};
use clap::Args;
use std::path::PathBuf;

/// The largest `--grid-cell`: a grid of 8 rows and a dozen columns stays a few thousand pixels.
const MAX_GRID_CELL: u32 = 1024;

/// Flags of `attractor report`. `--seed` seeds the paired bootstrap (default 0); `--data` says
/// where the dataset with the reference test images is, when it moved since the evaluation.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    #[command(flatten)]
    pub common: Common,
    /// The sweep folder (what `scripts/sweep-schedules.sh --out` or `scripts/slurm/submit.sh
    /// --out` wrote): every `summary.json` below it is read.
    pub sweep_dir: PathBuf,
    /// Generated images per (method, schedule, subject) in the page's sample grid.
    #[arg(long, default_value_t = 4, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub grid_images: usize,
    /// Longest edge of the sample thumbnails, in pixels.
    #[arg(long, default_value_t = 128, value_parser = ranges::int32(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub thumb: u32,
    /// Also compare method B with method A on the same seeds: differences are B − A
    /// (`--compare neti+,dreambooth`: dreambooth − neti+). Pin a schedule with METHOD:SCHEDULE
    /// (`ti+:cosine,neti+:cosine`). Repeat for more pairs. Every + variant is compared with its
    /// base without asking.
    #[arg(long, value_name = "A,B", action = clap::ArgAction::Append)]
    pub compare: Vec<String>,
    /// Bootstrap resamples of the paired 95 % intervals.
    #[arg(long, default_value_t = DEFAULT_RESAMPLES, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub resamples: usize,
    /// Rows of the qualitative grid (qualitative.png), one held-out test image each; 0: none.
    /// Default: one per subject, at most 8.
    #[arg(long, value_name = "N", value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub grid: Option<usize>,
    /// Cell edge of the qualitative grid, in pixels.
    #[arg(long, default_value_t = 160, value_parser = ranges::int32(Range::Between(32, MAX_GRID_CELL as u64)), allow_negative_numbers = true)]
    pub grid_cell: u32,
}

/// Run `attractor report` (output: `--out`, default SWEEP_DIR/report).
pub fn run(args: &ReportArgs) -> Result<()> {
    if let Some(d) = &args.common.data {
        if !d.is_dir() {
            bail!(
                "--data {}: no such folder (the dataset holding <subject>/test/ images)",
                d.display()
            );
        }
    }
    let compare = args
        .compare
        .iter()
        .map(|c| parse_compare(c))
        .collect::<Result<Vec<_>>>()?;
    let out = args
        .common
        .out
        .clone()
        .unwrap_or_else(|| args.sweep_dir.join("report"));
    let opts = ReportOptions {
        grid_images: args.grid_images,
        thumb: args.thumb,
        compare,
        resamples: args.resamples,
        seed: args.common.seed.unwrap_or(DEFAULT_SEED),
        grid_rows: args.grid,
        grid_cell: args.grid_cell,
        data: args.common.data.clone(),
    };
    let written = write_report(&args.sweep_dir, &out, &opts)?;
    for s in &written.skipped {
        eprintln!("skipped {}: {}", s.path.display(), s.reason);
    }
    for t in &written.tables {
        println!("{}", t.to_markdown());
    }
    print!("{}", summary_lines(&written.paired));
    println!(
        "report of {} evaluated run(s): {}",
        written.entries,
        out.join("report.html").display()
    );
    Ok(())
}
