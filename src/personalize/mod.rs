//! Personalisation maths (SPEC.md §3-5): what each method implies ([`method`]), the new tokens
//! and CLIP tokenisation ([`tokens`]), the training prompt pools ([`prompts`]), NeTI's encoding,
//! mapper and bypass ([`neti`]) and the paper's losses and schedules ([`losses`]). No I/O here
//! except reading/writing a NeTI mapper file through `crate::files`.

pub mod losses;
pub mod method;
pub mod neti;
pub mod prompts;
pub mod tokens;

pub use losses::{info_nce, masked_mse, mse, total_loss, LossParts, LossWeights};
pub use method::{Method, Schedule, WeightTraining};
pub use neti::{bypass, FourierEncoding, MapperConfig, MapperInfo, NetiMapper, UNET_LAYERS};
pub use prompts::{PromptSampler, PromptTriple};
pub use tokens::{ClipTokenizer, TokenError, Tokens};
pub mod concept;
pub mod generate;
pub mod heldout;
pub mod optim;
pub mod prior;
pub mod settings;
pub mod trainer;
pub mod weights;
