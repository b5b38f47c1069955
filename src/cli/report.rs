//! `attractor report SWEEP_DIR`: collect every evaluation summary of a sweep into tables (one
//! per split, method x schedule pooled over subjects), the schedule and method plots, and one
//! self-contained `report.html` (see `crate::report` for what is read and written).
//!
//! ```text
//! attractor report SWEEP_DIR [--out DIR] [--grid-images 4] [--thumb 128]
//! ```

use super::ranges;
use super::Common;
use crate::ranges::Range;
use crate::report::{write_report, ReportOptions};
use anyhow::Result;
use clap::Args;
use std::path::PathBuf;

/// Flags of `attractor report`.
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
}

/// Run `attractor report` (output: `--out`, default SWEEP_DIR/report).
pub fn run(args: &ReportArgs) -> Result<()> {
    let out = args
        .common
        .out
        .clone()
        .unwrap_or_else(|| args.sweep_dir.join("report"));
    let opts = ReportOptions {
        grid_images: args.grid_images,
        thumb: args.thumb,
    };
    let written = write_report(&args.sweep_dir, &out, &opts)?;
    for s in &written.skipped {
        eprintln!("skipped {}: {}", s.path.display(), s.reason);
    }
    for t in &written.tables {
        println!("{}", t.to_markdown());
    }
    println!(
        "report of {} evaluated run(s): {}",
        written.entries,
        out.join("report.html").display()
    );
    Ok(())
}
