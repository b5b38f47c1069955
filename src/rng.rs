//! Seeded random numbers. candle's CPU RNG cannot be seeded (SPEC.md §1), so every random tensor
//! (noise, timesteps, VAE posterior samples, initial latents, dropout) comes from here: same seed,
//! same bytes, on every device (values are drawn on the CPU and moved).

use candle_core::{Device, Result, Shape, Tensor};
use rand::{Rng as _, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A ChaCha8 stream whose state can be saved in a checkpoint and restored exactly.
#[derive(Clone, Debug)]
pub struct Rng {
    inner: ChaCha8Rng,
}

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self {
            inner: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// A seed derived from a list of parts (e.g. subject, image, caption, sample) with a stable
    /// hash (FNV-1a), so the same parts give the same seed in any process or shard.
    pub fn derive_seed(parts: &[&str]) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325;
        for p in parts {
            for b in p.as_bytes().iter().chain(std::iter::once(&0u8)) {
                h ^= *b as u64;
                h = h.wrapping_mul(0x100000001b3);
            }
        }
        h
    }

    /// Standard normal values of `shape` as an f32 tensor on `device`.
    pub fn randn<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape: Shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.inner))
            .collect();
        Tensor::from_vec(v, shape, device)
    }

    pub fn uniform_f32(&mut self) -> f32 {
        self.inner.random::<f32>()
    }

    /// Uniform integer in `lo..hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        self.inner.random_range(lo..hi)
    }

    /// The stream position, for checkpoints: `(seed, word position)`.
    pub fn state(&self) -> ([u8; 32], u128) {
        (self.inner.get_seed(), self.inner.get_word_pos())
    }

    pub fn from_state(seed: [u8; 32], word_pos: u128) -> Self {
        let mut inner = ChaCha8Rng::from_seed(seed);
        inner.set_word_pos(word_pos);
        Self { inner }
    }
}
