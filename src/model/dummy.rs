//! The dummy load format: random weights of the right scale at a named real shape, for
//! speed work where the real weights cannot be shipped (as vLLM's `--load-format dummy`).
//! Linear and embedding weights are N(0, 0.02²), the Hugging Face initialisation; norms are 1.

/// Standard deviation of dummy linear and embedding weights.
pub const DUMMY_STD: f32 = 0.02;

/// A seed per tensor name, so each weight differs and reloading gives the same model.
pub fn seed_for(name: &str, seed: u64) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}
