use clap::Parser;

fn main() {
    one_malloc_arena();
    let cli = attractor::cli::Cli::parse();
    if let Err(e) = attractor::cli::run(cli) {
        eprintln!("error: {e}");
        for cause in e.chain().skip(1) {
            eprintln!("  caused by: {cause}");
        }
        std::process::exit(1);
    }
}

/// One glibc malloc arena for all threads, unless `MALLOC_ARENA_MAX` says otherwise. The worker
/// threads' own arenas each kept freed activation buffers that the main thread could not reuse,
/// so more of each step's memory came from fresh pages: a 512 px ti step took 15.2-18.2 s
/// (median 15.8) with one arena against 17.0-21.5 s (median 18.9) with glibc's default, and
/// peaked at 5.84-5.85 GiB against 5.97-6.53 (`bench`, alternated, 2-core CPU).
fn one_malloc_arena() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: called first thing in main, before any other thread exists or allocates.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}
