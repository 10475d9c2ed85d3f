//! Reproducible random values: the dummy load format's weights where the host makes them
//! (the CPU backend's `random`, FP8 weights quantized on the host, tests' random models).

/// `n` normal values with standard deviation `std`, reproducible from `seed`.
pub fn normal_values(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box–Muller: two uniforms give two independent normals.
        let (u1, u2) = (uniform().max(f64::MIN_POSITIVE), uniform());
        let r = (-2.0 * u1.ln()).sqrt() * std as f64;
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_have_the_requested_scale_and_are_never_zero() {
        let v = normal_values(100_000, 0.02, 7);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 1e-3, "mean {mean}");
        assert!((var.sqrt() - 0.02).abs() < 5e-4, "std {}", var.sqrt());
        assert_eq!(normal_values(10, 1.0, 1), normal_values(10, 1.0, 1));
        assert_ne!(normal_values(10, 1.0, 1), normal_values(10, 1.0, 2));
    }
}
