//! `attractor fetch`: resolve (and, online, download) the SD 1.5 files `--model` names, and say
//! where they are. With `--offline` it only checks the cache: exit 0 when everything is there.

use super::sample::model_source;
use super::Common;
use crate::hub;
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug, Clone)]
pub struct FetchArgs {
    #[command(flatten)]
    pub common: Common,
}

pub fn run(args: &FetchArgs) -> Result<()> {
    let source = model_source(&args.common)?;
    let f = hub::resolve_sd(&source, args.common.offline())?;
    for (what, p) in [
        ("unet", &f.unet_weights),
        ("vae", &f.vae_weights),
        ("text encoder", &f.text_weights),
        ("scheduler", &f.scheduler_config),
    ] {
        println!("{what:>13}: {}", p.display());
    }
    match &f.tokenizer {
        Some(p) => println!("{:>13}: {}", "tokenizer", p.display()),
        None => println!("{:>13}: bundled CLIP tokenizer", "tokenizer"),
    }
    println!("{} is ready", f.id);
    Ok(())
}
