//! The differentiable Stable Diffusion 1.5 stack: text encoder, UNet (and, from their own files,
//! VAE, schedule, samplers). No I/O here: `crate::hub` finds files and hands out VarBuilders.

pub mod text_encoder;
pub mod unet;
