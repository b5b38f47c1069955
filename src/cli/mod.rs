//! The command line: one verb per file, each a clap `Args` struct plus `run`. Every verb flattens
//! [`Common`], so the same name means the same thing everywhere (SPEC.md §0). Nothing below this
//! module knows about flags: a verb resolves flags + TOML into the settings struct of the library
//! module it drives, and owns all console output.

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

pub mod bench;
pub mod dataset;
pub mod eval;
pub mod fetch;
pub mod masks;
pub mod ranges;
pub mod report;
pub mod sample;
pub mod train;

/// The flags every verb takes (SPEC.md §0).
#[derive(Args, Debug, Clone, Default)]
pub struct Common {
    /// SD 1.5 weights: a local folder in the diffusers layout or a Hugging Face repo id.
    #[arg(long, global = true)]
    pub model: Option<String>,
    /// A dataset folder in the split-test layout (default: the bundled benchmark).
    #[arg(long, global = true)]
    pub data: Option<PathBuf>,
    /// Subject name (a folder of the dataset).
    #[arg(long, global = true)]
    pub subject: Option<String>,
    /// Output folder.
    #[arg(long, global = true)]
    pub out: Option<PathBuf>,
    /// Random seed.
    #[arg(long, global = true)]
    pub seed: Option<u64>,
    /// `cpu` or `cuda:N`.
    #[arg(long, global = true)]
    pub device: Option<String>,
    /// Precision of the frozen SD weights and of the activations through them: `f32`, `f16`,
    /// `bf16` or `auto` (the default: f32 on the CPU, bf16 on CUDA). Learned tensors, optimizer
    /// state and losses stay f32 whatever this says.
    #[arg(long, global = true)]
    pub dtype: Option<String>,
    /// Never touch the network (also set by HF_HUB_OFFLINE=1).
    #[arg(long, global = true)]
    pub offline: bool,
    /// A TOML preset; flags override its values.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
}

impl Common {
    /// The compute device named by `--device` (default cpu).
    pub fn device(&self) -> Result<Device> {
        parse_device(self.device.as_deref().unwrap_or("cpu"))
    }

    /// The model precision `--dtype` names for `--device` (see [`resolve_dtype`]).
    pub fn dtype(&self) -> Result<DType> {
        resolve_dtype(self.dtype.as_deref(), self.on_cpu())
    }

    /// Whether `--device` names the CPU (the default), read from the flag without opening a
    /// device: each `Device::new_cuda` makes a CUDA context of its own, and a process that only
    /// starts others (`bench`) must hold none.
    pub fn on_cpu(&self) -> bool {
        matches!(self.device.as_deref(), None | Some("cpu"))
    }

    /// True when `--offline` or `HF_HUB_OFFLINE=1` is given.
    pub fn offline(&self) -> bool {
        self.offline
            || std::env::var("HF_HUB_OFFLINE")
                .map(|v| v == "1" || v.eq_ignore_ascii_case("true"))
                .unwrap_or(false)
    }
}

/// `--dtype` for the CPU (`on_cpu`) or a GPU: `None` or `auto` picks f32 on the CPU (candle's CPU matrix product
/// has no bf16 and runs f16 slower than f32) and bf16 on CUDA (half the memory and traffic of
/// f32, with f32's exponent range, so small gradients do not underflow as they would in f16).
pub fn resolve_dtype(s: Option<&str>, on_cpu: bool) -> Result<DType> {
    let dtype = match s.unwrap_or("auto") {
        "auto" if on_cpu => DType::F32,
        "auto" => DType::BF16,
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype {other}: expected auto, f32, f16 or bf16"),
    };
    if on_cpu {
        crate::pipeline::check_dtype(dtype, &Device::Cpu)
            .map_err(|e| anyhow::anyhow!("--dtype: {e}"))?;
    }
    Ok(dtype)
}

/// Parse `cpu` or `cuda:N` (`cuda` = `cuda:0`).
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let n: usize = s
                .strip_prefix("cuda:")
                .unwrap_or("0")
                .parse()
                .map_err(|_| anyhow::anyhow!("--device {s}: expected cpu or cuda:N"))?;
            if !candle_core::utils::cuda_is_available() {
                bail!("--device {s}: this binary was built without CUDA; rebuild with `cargo build --release --features cuda` (see scripts/build-cuda.sh) or use --device cpu");
            }
            Device::new_cuda(n).map_err(|e| {
                anyhow::anyhow!(
                    "--device {s}: cannot open CUDA device {n} ({e}); check that an NVIDIA driver \
                     is installed, that `nvidia-smi` lists the GPU and that libcuda.so.1 and the \
                     CUDA 13 libraries (cuBLAS, cuRAND, NVRTC) are on LD_LIBRARY_PATH"
                )
            })
        }
        _ => bail!("--device {s}: expected cpu or cuda:N"),
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "attractor",
    version,
    about = "Personalized text-to-image generation on Stable Diffusion 1.5: Textual Inversion, NeTI and the attractor, with honest split-test evaluation"
)]
pub struct Cli {
    #[command(subcommand)]
    pub verb: Verb,
}

#[derive(Subcommand, Debug)]
pub enum Verb {
    /// Generate images from a prompt (optionally with a learned subject).
    Sample(sample::SampleArgs),
    /// Learn a subject: a token (ti, ti+, neti, neti+) or model weights (the baselines).
    // Boxed: its many flags make it several times the size of the other verbs.
    Train(Box<train::TrainArgs>),
    /// Find (and download unless --offline) the SD 1.5 weights --model names.
    Fetch(fetch::FetchArgs),
    /// Validate a split-test dataset (`check`) or build one from folders of photos (`new`).
    Dataset(dataset::DatasetArgs),
    /// Automatic subject masks of the training images (SAM proposals ranked by CLIP).
    Masks(masks::MasksArgs),
    /// Score generations: split-test (default) or classic protocol, CLIP-T, CLIP-I, DINO.
    Eval(eval::EvalArgs),
    /// Time training and sampling steps on random SD 1.5-size weights against PyTorch.
    Bench(bench::BenchArgs),
    /// Collect a sweep's evaluations: tables per split, schedule and method plots, report.html.
    Report(report::ReportArgs),
}

/// Run the parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    tune_allocator();
    match cli.verb {
        Verb::Sample(a) => sample::run(&a),
        Verb::Train(a) => train::run(&a),
        Verb::Fetch(a) => fetch::run(&a),
        Verb::Dataset(args) => dataset::run(&args),
        Verb::Masks(args) => masks::run(&args),
        Verb::Eval(args) => eval::run(&args),
        Verb::Bench(a) => bench::run(&a),
        Verb::Report(a) => report::run(&a),
    }
}

/// Keep freed tensor memory in the process. Every candle op allocates its output afresh; with
/// glibc's defaults, buffers over a moving threshold are mapped and unmapped each time and the
/// heap is trimmed often, so the same memory is page-faulted (and zeroed by the kernel) again and
/// again: a third of a 512 px training step went to page faults. A fixed 32 MiB mmap threshold
/// (glibc's maximum; the layers keep their temporaries under it) and a trim threshold of 1 GiB
/// let buffers be reused instead.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // of this program exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// The lines `main` prints for an error: the message and each cause, with the backtraces that
/// candle attaches to its errors (printed with `RUST_BACKTRACE`, and as "disabled backtrace"
/// without) left out: a user who mistypes a flag reads what is wrong and the fix, not a stack.
pub fn error_lines(e: &anyhow::Error) -> Vec<String> {
    fn candle_text(e: &candle_core::Error) -> String {
        match e {
            candle_core::Error::WithBacktrace { inner, .. } => candle_text(inner),
            candle_core::Error::Context { inner, context } => {
                format!("{context}: {}", candle_text(inner))
            }
            candle_core::Error::WithPath { inner, path } => {
                format!("{}: {}", path.display(), candle_text(inner))
            }
            other => other.to_string(),
        }
    }
    e.chain()
        .map(|c| match c.downcast_ref::<candle_core::Error>() {
            Some(ce) => candle_text(ce),
            None => c.to_string(),
        })
        .collect()
}
