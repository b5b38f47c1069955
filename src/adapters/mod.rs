//! Adapter files other tools write and read: the weights a personalisation method adds to the
//! base model, in the layouts of the ecosystems they are shared in. Only file formats live here;
//! applying an adapter to the model is `nn`'s business. One module per kind: LoRA (diffusers,
//! peft and kohya layouts), Custom Diffusion (diffusers' attention-processor file), and the
//! diffusers model folder a DreamBooth fine-tune is saved as.

pub mod custom_diffusion;
pub mod diffusers_folder;
pub mod lora;
