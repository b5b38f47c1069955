//! attractor: personalized text-to-image generation on Stable Diffusion 1.5 with candle.
//!
//! Data flows one way: files -> tensors -> models -> losses / samples -> scores -> reports.
//! `sd` and `nn` do no I/O and know nothing of the command line.

pub mod adapters;
pub mod assets;
pub mod bench;
pub mod cli;
pub mod data;
pub mod eval;
pub mod files;
pub mod hub;
pub mod nn;
pub mod personalize;
pub mod pipeline;
pub mod ranges;
pub mod report;
pub mod rng;
pub mod sd;
