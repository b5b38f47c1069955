//! The differentiable Stable Diffusion 1.5: the serde configs of the diffusers folders and the
//! models and samplers built from them. No I/O beyond reading a config file; no command line.

pub mod config;
pub mod samplers;
pub mod schedule;
pub mod vae;
