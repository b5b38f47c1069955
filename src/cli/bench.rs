//! `attractor bench`: time a TI training step, a NeTI-style step, the trainer's ti+ and neti+
//! steps and a guided sampling step on random weights of the real SD 1.5 size (see
//! `crate::bench`), and compare with SPEC.md §7's
//! PyTorch figures. Each (case, size) runs in a fresh child process (this binary, re-executed
//! with the hidden `--case`/`--size` flags), so its peak memory is its own, and under an
//! address-space limit, so a case that does not fit fails alone instead of waking the OOM killer.

use super::ranges;
use super::Common;
use crate::bench::{self, BenchConfigs, Case, CaseResult};
use crate::ranges::Range;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const GIB: f64 = (1u64 << 30) as f64;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(flatten)]
    pub common: Common,
    /// Image sizes in pixels (multiples of 8), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![256usize, 512], value_parser = ranges::int(Range::MultipleOf8), allow_negative_numbers = true)]
    pub sizes: Vec<usize>,
    /// Cases to run, comma-separated: ti, neti, ti+, neti+, sample, dreambooth, dreambooth-lora,
    /// custom-diffusion, heldout, generate.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = Case::DEFAULT.to_vec())]
    pub cases: Vec<Case>,
    /// Images per guided step of the `generate` case, comma-separated: one row each, and the
    /// projected time of the paper's full evaluation (10,000 images, 50 DDIM steps) from it.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 4, 8], value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub batches: Vec<usize>,
    /// Runs per case; the table reports the median.
    #[arg(long, default_value_t = 3, value_parser = ranges::int(Range::AtLeast(1)), allow_negative_numbers = true)]
    pub runs: usize,
    /// Untimed runs before them, in the same process (first touch of the weights, the
    /// allocator's growth), as `scripts/pytorch-bench.py` does; 0 times the cold first step too.
    #[arg(long, default_value_t = 1, value_parser = ranges::int(Range::AtLeast(0)), allow_negative_numbers = true)]
    pub warmup: usize,
    /// Also write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// PyTorch's figures measured beside ours: the JSON lines that `scripts/pytorch-bench.py
    /// --out FILE` appends. The (case, size) pairs it covers take their ratios from its last
    /// line for them instead of SPEC.md §7's figures, which were taken once on an idle machine
    /// (a shared CPU's speed drifts by ±20 % within minutes, so alternate the two programs).
    #[arg(long, value_name = "FILE")]
    pub pytorch: Option<PathBuf>,
    /// Address-space limit of each case's process, in GiB (default: 90 % of the memory
    /// available when the case starts). A case over it fails as "out of memory".
    #[arg(long, value_parser = ranges::float(Range::Positive), allow_negative_numbers = true)]
    pub max_memory_gb: Option<f64>,
    /// Internal: run this one case in this process and print its result as one JSON line.
    #[arg(long, value_enum, hide = true)]
    pub case: Option<Case>,
    /// Internal: the image size of `--case`.
    #[arg(long, hide = true, value_parser = ranges::int(Range::MultipleOf8), allow_negative_numbers = true)]
    pub size: Option<usize>,
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
struct Row {
    case: Case,
    size: usize,
    /// Images per step (the `generate` case).
    #[serde(skip_serializing_if = "Option::is_none")]
    batch: Option<usize>,
    /// `ok`, `out of memory` or `failed`.
    status: String,
    /// What went wrong, when status is not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    result: Option<CaseResult>,
    peak_rss_gib: Option<f64>,
    pytorch_s: Option<f64>,
    pytorch_rss_gib: Option<f64>,
    /// Where the PyTorch figures come from: the `--pytorch` file or SPEC.md §7.
    #[serde(skip_serializing_if = "Option::is_none")]
    pytorch_from: Option<String>,
    /// Our median time over PyTorch's (lower is better).
    time_ratio: Option<f64>,
    /// The machine's 1-minute load average when the case started (other processes slow the
    /// wall-clock times down; PyTorch's figures were taken on an idle machine).
    load_avg: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    device: String,
    threads: usize,
    runs: usize,
    /// Untimed runs before the timed ones, per case.
    warmup: usize,
    seed: u64,
    weights: String,
    rows: Vec<Row>,
    /// Per image size: the neti+ step's median time over the ti+ step's (the goal is ≤ 1.3).
    neti_plus_over_ti_plus: Vec<SizeRatio>,
}

#[derive(Debug, Serialize, PartialEq)]
struct SizeRatio {
    size: usize,
    ratio: f64,
    /// The same ratio of PyTorch's steps, where both were measured beside ours (`--pytorch`).
    pytorch: Option<f64>,
}

/// neti+ over ti+ median step time at each size where both ran (and PyTorch's, where both of
/// its steps were measured beside them).
fn plus_ratios(rows: &[Row]) -> Vec<SizeRatio> {
    let find = |case: Case, size: usize| rows.iter().find(|r| r.case == case && r.size == size);
    let median = |case: Case, size: usize| {
        find(case, size)
            .and_then(|r| r.result.as_ref())
            .map(|x| x.median_s)
    };
    let pytorch = |case: Case, size: usize| {
        find(case, size)
            .filter(|r| r.pytorch_measured())
            .and_then(|r| r.pytorch_s)
    };
    let mut sizes: Vec<usize> = rows.iter().map(|r| r.size).collect();
    sizes.dedup();
    sizes
        .into_iter()
        .filter_map(|size| {
            let ratio = median(Case::NetiPlus, size)? / median(Case::TiPlus, size)?;
            let pytorch = pytorch(Case::NetiPlus, size)
                .zip(pytorch(Case::TiPlus, size))
                .map(|(n, t)| n / t);
            Some(SizeRatio {
                size,
                ratio,
                pytorch,
            })
        })
        .collect()
}

/// The held-out evaluation's cost per image beside the training steps measured at the same
/// size (`train --heldout-every N` adds it, times the test plus training images, every N steps).
fn heldout_lines(rows: &[Row]) -> Vec<String> {
    let median = |case: Case, size: usize| {
        rows.iter()
            .find(|r| r.case == case && r.size == size)
            .and_then(|r| r.result.as_ref())
            .map(|x| x.median_s)
    };
    rows.iter()
        .filter(|r| r.case == Case::HeldOut)
        .filter_map(|r| {
            let h = r.result.as_ref()?.median_s;
            let beside: Vec<String> = [Case::Ti, Case::TiPlus, Case::NetiPlus]
                .into_iter()
                .filter_map(|c| {
                    median(c, r.size).map(|m| format!("{:.2} x a {} step", h / m, c.name()))
                })
                .collect();
            Some(format!(
                "held-out loss at {} px: {h:.2} s per image ({} UNet forwards){}",
                r.size,
                crate::personalize::heldout::TIMESTEPS,
                if beside.is_empty() {
                    String::new()
                } else {
                    format!(" = {}", beside.join(", "))
                }
            ))
        })
        .collect()
}

pub fn run(args: &BenchArgs) -> Result<()> {
    let measured = match &args.pytorch {
        Some(p) => read_pytorch(p)?,
        None => Vec::new(),
    };
    let cfgs = configs(&args.common)?;
    let seed = args.common.seed.unwrap_or(0);
    if let Some(case) = args.case {
        let size = args
            .size
            .context("--case needs --size (it is set by the bench itself)")?;
        let device = args.common.device()?;
        let dtype = args.common.dtype()?;
        let batch = args.batches.first().copied().unwrap_or(1);
        let r = bench::measure(
            &cfgs,
            case,
            size,
            batch,
            (args.warmup, args.runs),
            seed,
            (&device, dtype),
        )
        .with_context(|| format!("bench case {} at {size} px", case.name()))?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }

    let dtype = args.common.dtype()?;
    let mut rows = Vec::new();
    for &size in &args.sizes {
        for &case in &args.cases {
            let batches: Vec<Option<usize>> = if case == Case::Generate {
                args.batches.iter().map(|&b| Some(b)).collect()
            } else {
                vec![None]
            };
            for batch in batches {
                eprintln!(
                    "bench: {} at {size} px, {} warm-up + {} timed runs ...",
                    label(case, batch),
                    args.warmup,
                    args.runs
                );
                let mut row = run_child(args, case, size, batch)?;
                row.set_pytorch(pytorch_figures(
                    &measured,
                    args.pytorch.as_deref(),
                    (case, size, batch),
                ));
                eprintln!("{}", format_row(&row));
                rows.push(row);
            }
        }
    }
    let report = Report {
        device: args.common.device.clone().unwrap_or_else(|| "cpu".into()),
        threads: candle_core::utils::get_num_threads(),
        runs: args.runs,
        warmup: args.warmup,
        seed,
        weights: format!(
            "random, uniform with std {} (norm layers 1/0), {}",
            bench::DEFAULT_STD,
            dtype.as_str()
        ),
        neti_plus_over_ti_plus: plus_ratios(&rows),
        rows,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", header())?;
    for r in &report.rows {
        writeln!(out, "{}", format_row(r))?;
    }
    writeln!(
        out,
        "weights in {}; median of the timed runs, after {} untimed warm-up run(s) per case; ratio = ours / PyTorch 2.15 (* = measured beside ours, from --pytorch; else SPEC.md §7, same 2-core machine, idle); cpu = CPU seconds of all threads; peak = VmHWM of the case's process, weights included; load = 1-min load average at the start; ti+ and neti+ are whole `train` steps at batch 1 (UNet on 3 prompt pools, AdamW, VAE weights loaded); PyTorch's neti, ti+ and neti+ are lower bounds (scripts/pytorch-bench.py: no bypass, mapper, InfoNCE, optimizer or VAE)",
        dtype.as_str(),
        report.warmup
    )?;
    for r in &report.neti_plus_over_ti_plus {
        let beside = r
            .pytorch
            .map_or(String::new(), |p| format!("; PyTorch beside it: {p:.2}"));
        writeln!(
            out,
            "neti+ / ti+ step time at {} px: {:.2} (goal: at most 1.3{beside})",
            r.size, r.ratio
        )?;
    }
    for line in heldout_lines(&report.rows) {
        writeln!(out, "{line}")?;
    }
    for line in generate_lines(&report.rows) {
        writeln!(out, "{line}")?;
    }
    if let Some(p) = &args.json {
        crate::files::atomic_write(p, serde_json::to_string_pretty(&report)?.as_bytes())
            .with_context(|| format!("--json {}", p.display()))?;
    }
    Ok(())
}

/// The SD 1.5 configs: the shipped ones, or `--model DIR`'s.
fn configs(common: &Common) -> Result<BenchConfigs> {
    match &common.model {
        None => BenchConfigs::sd15(),
        Some(m) => {
            let dir = Path::new(m);
            if !dir.is_dir() {
                bail!("--model {m}: bench builds random weights from configs only; give a local folder with text_encoder/, unet/, vae/ and scheduler/ configs, or leave --model out for SD 1.5's");
            }
            BenchConfigs::from_dir(dir)
        }
    }
}

/// Run one case in a fresh process of this binary and read its JSON line.
fn run_child(args: &BenchArgs, case: Case, size: usize, batch: Option<usize>) -> Result<Row> {
    let exe = std::env::current_exe().context("cannot find this program to re-run it per case")?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench")
        .args(["--case", case.name()])
        .args(["--size", &size.to_string()])
        .args(["--runs", &args.runs.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--seed", &args.common.seed.unwrap_or(0).to_string()]);
    if let Some(b) = batch {
        cmd.args(["--batches", &b.to_string()]);
    }
    if let Some(d) = &args.common.device {
        cmd.args(["--device", d]);
    }
    if let Some(d) = &args.common.dtype {
        cmd.args(["--dtype", d]);
    }
    if let Some(m) = &args.common.model {
        cmd.args(["--model", m]);
    }
    let limit = match args.max_memory_gb {
        Some(g) if g > 0.0 => Some((g * GIB) as u64),
        Some(g) => bail!("--max-memory-gb {g}: give a positive number of GiB"),
        None => bench::mem_available_bytes().map(|b| b / 10 * 9),
    };
    if let Some(bytes) = limit {
        limit_address_space(&mut cmd, bytes);
    }
    let load_avg = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok());
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .context("cannot start the bench's child process")?;
    let mut row = Row {
        case,
        size,
        batch,
        status: "ok".into(),
        error: None,
        result: None,
        peak_rss_gib: None,
        pytorch_s: None,
        pytorch_rss_gib: None,
        pytorch_from: None,
        time_ratio: None,
        load_avg,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str::<CaseResult>(l).ok());
    match (out.status.success(), parsed) {
        (true, Some(r)) => {
            row.peak_rss_gib = r.peak_rss_bytes.map(|b| b as f64 / GIB);
            row.result = Some(r);
        }
        (ok, _) => {
            // A failed allocation aborts the child (SIGABRT) or the kernel kills it (SIGKILL).
            let signalled = std::os::unix::process::ExitStatusExt::signal(&out.status);
            let oom = matches!(signalled, Some(6) | Some(9));
            row.status = if oom { "out of memory" } else { "failed" }.into();
            row.error = Some(match (ok, signalled) {
                (true, _) => "the child process printed no result".into(),
                (false, Some(s)) => format!(
                    "killed by signal {s}{}",
                    limit
                        .map(|b| format!(" (address-space limit {:.1} GiB)", b as f64 / GIB))
                        .unwrap_or_default()
                ),
                (false, None) => format!("exit status {}", out.status),
            });
        }
    }
    Ok(row)
}

/// One line of `scripts/pytorch-bench.py --out`: a case's median over its runs and its peak RSS.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
struct PytorchLine {
    case: String,
    size: usize,
    /// Images per step (`num_images_per_prompt`) of the `generate` case.
    #[serde(default)]
    batch: Option<usize>,
    median_s: f64,
    peak_gib: Option<f64>,
}

/// PyTorch's time and peak memory for a case: `measured`'s last line for it (read from `file`),
/// else SPEC.md §7's figures, with where they came from.
fn pytorch_figures(
    measured: &[PytorchLine],
    file: Option<&Path>,
    (case, size, batch): (Case, usize, Option<usize>),
) -> Option<(f64, Option<f64>, String)> {
    match measured
        .iter()
        .rev()
        .find(|l| l.case == case.name() && l.size == size && l.batch == batch)
    {
        Some(l) => Some((
            l.median_s,
            l.peak_gib,
            format!(
                "measured ({})",
                file.map_or("-".into(), |f| f.display().to_string())
            ),
        )),
        None => bench::pytorch_reference(case, size).map(|(s, g)| (s, g, "SPEC.md §7".into())),
    }
}

/// The `--pytorch` file: JSON lines as `scripts/pytorch-bench.py --out` appends them.
fn read_pytorch(path: &Path) -> Result<Vec<PytorchLine>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "--pytorch {}: cannot read it (write it with scripts/pytorch-bench.py --out FILE)",
            path.display()
        )
    })?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!(
                    "--pytorch {} line {}: not a line of scripts/pytorch-bench.py --out (JSON with case, size, median_s)",
                    path.display(),
                    i + 1
                )
            })
        })
        .collect()
}

impl Row {
    /// Set the PyTorch figures and the time ratio to them.
    /// Whether PyTorch's figures were measured beside ours (`--pytorch`), not SPEC.md §7's.
    fn pytorch_measured(&self) -> bool {
        self.pytorch_from
            .as_deref()
            .is_some_and(|f| f.starts_with("measured"))
    }

    fn set_pytorch(&mut self, figures: Option<(f64, Option<f64>, String)>) {
        if let Some((s, rss, from)) = figures {
            self.pytorch_s = Some(s);
            self.pytorch_rss_gib = rss;
            self.pytorch_from = Some(from);
            self.time_ratio = self.result.as_ref().map(|r| r.median_s / s);
        }
    }
}

/// Cap the child's address space (`RLIMIT_AS`), so an allocation over it fails in the child.
fn limit_address_space(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit {
                rlim_cur: bytes as libc::rlim_t,
                rlim_max: bytes as libc::rlim_t,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A row's case as the table shows it: `generate/4` for the generate case at batch 4.
fn label(case: Case, batch: Option<usize>) -> String {
    match batch {
        Some(b) => format!("{}/{b}", case.name()),
        None => case.name().to_string(),
    }
}

/// Images the paper scores per method (20 subjects x 10 test images x 10 captions x 5 seeds)
/// and the DDIM steps of each.
const PAPER_IMAGES: f64 = 10_000.0;
const PAPER_STEPS: f64 = 50.0;

/// Per `generate` row: the cost of one image-step, images per second at 50 steps (beside
/// PyTorch's where measured), and the projected time of the paper's evaluation on this machine
/// at that batch (UNet steps only: text encoding, VAE decode and scoring add a little per image).
fn generate_lines(rows: &[Row]) -> Vec<String> {
    rows.iter()
        .filter(|r| r.case == Case::Generate)
        .filter_map(|r| {
            let b = r.batch? as f64;
            let step = r.result.as_ref()?.median_s / b;
            let per_s = 1.0 / (step * PAPER_STEPS);
            let beside = r
                .pytorch_s
                .filter(|_| r.pytorch_measured())
                .map_or(String::new(), |p| {
                    let theirs = b / (p * PAPER_STEPS);
                    format!(
                        " (PyTorch {theirs:.4}: {:.2} x its throughput)",
                        per_s / theirs
                    )
                });
            let hours = PAPER_IMAGES * PAPER_STEPS * step / 3600.0;
            Some(format!(
                "generate at {} px, batch {}: {step:.3} s per image-step, {per_s:.4} images/s at 50 steps{beside}; the paper's evaluation (10,000 images x 50 DDIM steps) would take {hours:.1} h here",
                r.size, b as usize
            ))
        })
        .collect()
}

fn header() -> String {
    format!(
        "{:<17}{:>6}{:>10}{:>9}{:>9}{:>9}{:>10}{:>11}{:>8}{:>13}{:>6}  {}",
        "case",
        "px",
        "median s",
        "fwd s",
        "bwd s",
        "cpu s",
        "peak GiB",
        "PyTorch s",
        "ratio",
        "PyTorch GiB",
        "load",
        "status"
    )
}

fn format_row(r: &Row) -> String {
    let f = |v: Option<f64>, p: usize| v.map_or("-".to_string(), |x| format!("{x:.p$}"));
    let res = r.result.as_ref();
    format!(
        "{:<17}{:>6}{:>10}{:>9}{:>9}{:>9}{:>10}{:>11}{:>8}{:>13}{:>6}  {}",
        label(r.case, r.batch),
        r.size,
        f(res.map(|x| x.median_s), 2),
        f(res.map(|x| x.median_forward_s), 2),
        f(res.map(|x| x.median_backward_s), 2),
        f(res.map(|x| x.median_cpu_s), 1),
        f(r.peak_rss_gib, 2),
        f(r.pytorch_s, 1) + if r.pytorch_measured() { "*" } else { "" },
        f(r.time_ratio, 2),
        f(r.pytorch_rss_gib, 1),
        f(r.load_avg, 1),
        match &r.error {
            Some(e) => format!("{}: {e}", r.status),
            None => r.status.clone(),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        b: BenchArgs,
    }

    #[test]
    fn flags_default_and_parse() {
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert_eq!(w.b.sizes, vec![256, 512]);
        assert_eq!(w.b.cases, Case::DEFAULT.to_vec());
        assert_eq!(w.b.runs, 3);
        assert_eq!(
            w.b.warmup, 1,
            "one untimed run per case, as the PyTorch script"
        );
        assert_eq!(
            Wrap::try_parse_from(["x", "--warmup", "0"])
                .unwrap()
                .b
                .warmup,
            0
        );
        let w =
            Wrap::try_parse_from(["x", "--sizes", "128", "--cases", "ti,sample", "--runs", "1"])
                .unwrap();
        assert_eq!(w.b.sizes, vec![128]);
        assert_eq!(w.b.cases, vec![Case::Ti, Case::Sample]);
        assert_eq!(w.b.runs, 1);
        assert!(Wrap::try_parse_from(["x", "--cases", "dreambooth-full"]).is_err());
        let w = Wrap::try_parse_from([
            "x",
            "--cases",
            "dreambooth,dreambooth-lora,custom-diffusion",
        ])
        .unwrap();
        assert_eq!(
            w.b.cases,
            vec![
                Case::DreamBooth,
                Case::DreamBoothLora,
                Case::CustomDiffusion
            ]
        );
        let w = Wrap::try_parse_from(["x", "--cases", "ti+,neti+"]).unwrap();
        assert_eq!(w.b.cases, vec![Case::TiPlus, Case::NetiPlus]);
    }

    #[test]
    fn bad_flags_are_rejected() {
        // At parse time, before any case starts (see cli::ranges for every flag's range).
        let e = Wrap::try_parse_from(["x", "--sizes", "256,250"])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("--sizes 250: expected"), "{e}");
        let e = Wrap::try_parse_from(["x", "--runs", "0"])
            .err()
            .expect("refused");
        assert!(e.to_string().contains("--runs 0: expected"), "{e}");
    }

    fn row(case: Case, size: usize, median_s: Option<f64>) -> Row {
        Row {
            case,
            size,
            batch: None,
            status: "ok".into(),
            error: None,
            result: median_s.map(|m| CaseResult {
                case,
                size,
                batch: None,
                runs: Vec::new(),
                median_s: m,
                median_forward_s: 0.0,
                median_backward_s: 0.0,
                median_cpu_s: 0.0,
                build_s: 0.0,
                peak_rss_bytes: None,
            }),
            peak_rss_gib: None,
            pytorch_s: None,
            pytorch_rss_gib: None,
            pytorch_from: None,
            time_ratio: None,
            load_avg: None,
        }
    }

    /// The `--pytorch` file's last line for a (case, size) sets its figures and ratio; pairs it
    /// lacks keep SPEC.md §7's; a bad line is an error naming the file and the line.
    #[test]
    fn measured_pytorch_figures_replace_the_spec_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pt.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"case": "ti", "size": 512, "median_s": 20.0, "peak_gib": 6.4, "runs": 3}"#,
                "\n\n",
                r#"{"case": "ti", "size": 512, "median_s": 16.0, "peak_gib": 6.3}"#,
                "\n",
                r#"{"case": "sample", "size": 512, "median_s": 15.0, "peak_gib": null}"#,
                "\n"
            ),
        )
        .unwrap();
        let measured = read_pytorch(&path).unwrap();
        assert_eq!(measured.len(), 3);
        let mut r = row(Case::Ti, 512, Some(12.0));
        r.set_pytorch(pytorch_figures(
            &measured,
            Some(&path),
            (Case::Ti, 512, None),
        ));
        assert_eq!((r.pytorch_s, r.pytorch_rss_gib), (Some(16.0), Some(6.3)));
        assert_eq!(r.time_ratio, Some(0.75));
        assert!(format_row(&r).contains("16.0*"), "{}", format_row(&r));
        let mut r = row(Case::Ti, 256, Some(4.3));
        r.set_pytorch(pytorch_figures(
            &measured,
            Some(&path),
            (Case::Ti, 256, None),
        ));
        assert_eq!(r.pytorch_from.as_deref(), Some("SPEC.md §7"));
        assert_eq!(r.time_ratio, Some(1.0));
        assert!(!format_row(&r).contains('*'));
        std::fs::write(&path, "{\"case\": \"ti\", \"size\": 512}\n").unwrap();
        let e = format!("{:#}", read_pytorch(&path).unwrap_err());
        assert!(e.contains("pt.jsonl line 1"), "{e}");
    }

    /// The generate rows: the `--pytorch` line of the same batch, per-image cost and the
    /// projection of the paper's 10,000 x 50-step evaluation.
    #[test]
    fn generate_rows_pair_by_batch_and_project_the_full_evaluation() {
        let w = Wrap::try_parse_from(["x", "--cases", "generate"]).unwrap();
        assert_eq!(w.b.batches, vec![1, 4, 8]);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pt.jsonl");
        std::fs::write(
            &path,
            concat!(
                r#"{"case": "generate", "size": 512, "batch": 1, "median_s": 2.0}"#,
                "\n",
                r#"{"case": "generate", "size": 512, "batch": 4, "median_s": 8.0}"#,
                "\n"
            ),
        )
        .unwrap();
        let measured = read_pytorch(&path).unwrap();
        let mut rows = Vec::new();
        for (b, median) in [(1, 1.8), (4, 7.2), (8, 14.4)] {
            let mut r = row(Case::Generate, 512, Some(median));
            r.batch = Some(b);
            r.set_pytorch(pytorch_figures(
                &measured,
                Some(&path),
                (Case::Generate, 512, Some(b)),
            ));
            rows.push(r);
        }
        assert_eq!(rows[0].pytorch_s, Some(2.0));
        assert_eq!(rows[1].pytorch_s, Some(8.0));
        assert_eq!(rows[2].pytorch_s, None, "no PyTorch line at batch 8");
        assert!(format_row(&rows[1]).starts_with("generate/4 "));
        let lines = generate_lines(&rows);
        assert_eq!(lines.len(), 3);
        // 1.8 s per image-step: 10,000 x 50 x 1.8 s = 250 h; PyTorch's 2.0 s: 2.0 / 1.8 = 1.11.
        assert!(lines[0].contains("1.800 s per image-step"), "{}", lines[0]);
        assert!(lines[0].contains("250.0 h"), "{}", lines[0]);
        assert!(lines[0].contains("1.11 x its throughput"), "{}", lines[0]);
        assert!(!lines[2].contains("PyTorch"), "{}", lines[2]);
    }

    #[test]
    fn neti_plus_over_ti_plus_only_where_both_ran() {
        let rows = vec![
            row(Case::TiPlus, 256, Some(10.0)),
            row(Case::NetiPlus, 256, Some(12.5)),
            row(Case::TiPlus, 512, Some(40.0)),
            row(Case::NetiPlus, 512, None),
            row(Case::Ti, 1024, Some(1.0)),
        ];
        assert_eq!(
            plus_ratios(&rows),
            vec![SizeRatio {
                size: 256,
                ratio: 1.25,
                pytorch: None
            }]
        );
        // PyTorch's ratio only where both of its steps were measured beside ours.
        let mut rows = rows;
        rows[0].set_pytorch(Some((8.0, None, "measured (pt.jsonl)".into())));
        assert_eq!(plus_ratios(&rows)[0].pytorch, None);
        rows[1].set_pytorch(Some((20.0, None, "measured (pt.jsonl)".into())));
        assert_eq!(plus_ratios(&rows)[0].pytorch, Some(2.5));
        rows[1].set_pytorch(Some((20.0, None, "SPEC.md §7".into())));
        assert_eq!(plus_ratios(&rows)[0].pytorch, None);
    }
}
