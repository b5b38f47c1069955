//! The differentiable Stable Diffusion 1.5: the serde configs of the diffusers folders and the
//! models and samplers built from them (text encoder, UNet, VAE, noise schedule, samplers). No
//! I/O here: `crate::hub` finds files and `crate::pipeline` loads them.

pub mod config;
pub mod samplers;
pub mod schedule;
pub mod text_encoder;
pub mod unet;
pub mod vae;
