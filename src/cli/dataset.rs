//! `attractor dataset check [DIR]` and `attractor dataset new SRC OUT --test N`: console front of
//! [`crate::data::check`].

use crate::cli::ranges;
use crate::data::check::{self, CheckOptions, ProblemKind};
use crate::data::Dataset;
use crate::ranges::Range;
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct DatasetArgs {
    #[command(subcommand)]
    pub action: DatasetAction,
    #[command(flatten)]
    pub common: crate::cli::Common,
}

#[derive(Subcommand, Debug)]
pub enum DatasetAction {
    /// Validate a split-test dataset: layout, captions, images, masks, train/test leaks.
    Check(CheckArgs),
    /// Build a split-test dataset from one folder of photos per subject.
    New(NewArgs),
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The dataset folder (default: --data, else the bundled data/dreambooth-split).
    pub dir: Option<PathBuf>,
    /// Perceptual-hash distance (of 256 bits) at or below which a test image counts as a copy
    /// of a training image.
    #[arg(long, default_value_t = check::DEFAULT_LEAK_THRESHOLD, value_parser = ranges::int32(Range::Between(0, check::HASH_BITS as u64)), allow_negative_numbers = true)]
    pub leak_threshold: u32,
    /// A CLIP `tokenizer.json` to count caption tokens with (default: the one built in).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct NewArgs {
    /// A folder holding one sub-folder of photos per subject (sub-folder name = subject name).
    pub src: PathBuf,
    /// The dataset folder to create (must not exist, or be empty).
    pub out: PathBuf,
    /// How many photos per subject (the last ones by file name) become the test split.
    #[arg(long = "test", default_value_t = 2, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub n_test: usize,
}

pub fn run(args: &DatasetArgs) -> Result<()> {
    match &args.action {
        DatasetAction::Check(a) => run_check(a, &args.common),
        DatasetAction::New(a) => run_new(a),
    }
}

fn run_check(a: &CheckArgs, common: &crate::cli::Common) -> Result<()> {
    let dir = match a.dir.clone().or_else(|| common.data.clone()) {
        Some(d) => d,
        None => Dataset::default_dir()?,
    };
    let tok = match &a.tokenizer {
        Some(p) => tokenizers::Tokenizer::from_file(p).map_err(|e| {
            anyhow!("--tokenizer {}: cannot load it as a tokenizer.json ({e}); pass the tokenizer.json of openai/clip-vit-base-patch32, or leave the flag out to use the built-in one", p.display())
        })?,
        None => crate::assets::clip_tokenizer()?,
    };
    let opts = CheckOptions {
        leak_threshold: a.leak_threshold,
        ..CheckOptions::default()
    };
    let r = check::check_dataset(&dir, &tok, &opts);
    println!(
        "checked {}: {} subjects, {} images ({} train, {} test), {} captions, {} masks in {:.2} s",
        dir.display(),
        r.subjects,
        r.train_images + r.test_images,
        r.train_images,
        r.test_images,
        r.captions,
        r.masks,
        r.elapsed.as_secs_f64()
    );
    if let Some(c) = &r.closest {
        println!(
            "closest train/test pair: {} ~ {}{} at perceptual-hash distance {} of {} (leaks are <= {})",
            c.test.display(),
            c.train.display(),
            if c.mirrored { " (mirrored)" } else { "" },
            c.distance,
            check::HASH_BITS,
            opts.leak_threshold
        );
    }
    if r.is_ok() {
        println!("no problems found");
        return Ok(());
    }
    for kind in [
        ProblemKind::Layout,
        ProblemKind::Image,
        ProblemKind::Leak,
        ProblemKind::Caption,
        ProblemKind::Mask,
    ] {
        let ps = r.of_kind(kind);
        if ps.is_empty() {
            continue;
        }
        println!("{kind:?} ({}):", ps.len());
        for p in ps {
            println!("  {p}");
        }
    }
    bail!(
        "{} problem(s) in {}: fix them as listed above and rerun `attractor dataset check`",
        r.problems.len(),
        dir.display()
    )
}

fn run_new(a: &NewArgs) -> Result<()> {
    let r = check::new_dataset(&a.src, &a.out, a.n_test)
        .with_context(|| format!("dataset new {} {}", a.src.display(), a.out.display()))?;
    for s in &r.subjects {
        println!(
            "{}: {} train ({}), {} test ({})",
            s.name,
            s.train.len(),
            s.train.join(" "),
            s.test.len(),
            s.test.join(" ")
        );
    }
    for p in &r.skipped {
        println!("skipped (not an image): {}", p.display());
    }
    let out = r.out.display();
    println!("wrote {out} with {} subject(s). Next:", r.subjects.len());
    println!("  1. edit {out}/subjects.json: each subject's class word (now its folder name) and kind (now \"object\"; \"live\" for animals and people)");
    println!("  2. write the captions in {out}/<subject>/captions.json ({} placeholders per test image, each with {{}} where the subject is)", check::MAX_CAPTIONS);
    println!("  3. run: attractor dataset check {out}   (it lists the captions still to write and any train/test leak)");
    Ok(())
}
