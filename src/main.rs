use clap::Parser;

fn main() {
    tune_malloc();
    let cli = attractor::cli::Cli::parse();
    if let Err(e) = attractor::cli::run(cli) {
        let lines = attractor::cli::error_lines(&e);
        if let Some((first, causes)) = lines.split_first() {
            eprintln!("error: {first}");
            for cause in causes {
                eprintln!("  caused by: {cause}");
            }
        }
        std::process::exit(1);
    }
}

/// glibc malloc tuned for a process whose working set is a few large, short-lived tensors
/// allocated again every step. Each setting yields to the environment variable (or
/// `GLIBC_TUNABLES`) that sets it.
///
/// - One arena for all threads (`MALLOC_ARENA_MAX`). The worker threads' own arenas each kept
///   freed activation buffers that the main thread could not reuse, so more of each step's memory
///   came from fresh pages: a 512 px ti step took 15.2-18.2 s (median 15.8) with one arena
///   against 17.0-21.5 s (median 18.9) with glibc's default, and peaked at 5.84-5.85 GiB against
///   5.97-6.53 (`bench`, alternated, 2-core CPU).
/// - No `mmap` for large blocks and no trimming of the heap's top below 2 GiB
///   (`MALLOC_MMAP_MAX_`, `MALLOC_TRIM_THRESHOLD_`). By default every block over 32 MB (NeTI's
///   48-prompt text-encoder activations, the UNet's 64 x 64 feed-forward) is a fresh mapping,
///   and freed heap tops go back to the kernel, so the next step faults the same pages in again,
///   each zeroed by the kernel (4-5 us a page on this VM). With both off, a neti+ step at 256 px
///   made 0.5-0.6 M fewer page faults and took 20.4-21.6 s against 22.3-23.0 s (36.7-38.2 CPU
///   seconds against 39.6-40.7), peaking at 7.78 GiB either way; a 512 px ti step took 12.2-12.8 s
///   against 14.0-14.4 (peak 5.67 GiB against 5.63) and a 512 px sampling step 9.5-9.7 s
///   against 10.1-10.4 (`bench`, alternated). brk still falls back to mmap when it cannot grow.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let unset = |var: &str| std::env::var_os(var).is_none();
        let tunables = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        let settings = [
            ("MALLOC_ARENA_MAX", "arena_max", libc::M_ARENA_MAX, 1),
            ("MALLOC_MMAP_MAX_", "mmap_max", libc::M_MMAP_MAX, 0),
            (
                "MALLOC_TRIM_THRESHOLD_",
                "trim_threshold",
                libc::M_TRIM_THRESHOLD,
                i32::MAX,
            ),
        ];
        for (var, tunable, param, value) in settings {
            if unset(var) && !tunables.contains(&format!("glibc.malloc.{tunable}=")) {
                // SAFETY: called first thing in main, before any other thread exists or
                // allocates.
                unsafe {
                    libc::mallopt(param, value);
                }
            }
        }
    }
}
