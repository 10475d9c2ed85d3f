//! FP8 E4M3 weight matrices with one f32 scale per output row, and the scheme a matmul on
//! them follows for its input activations.

use rayon::prelude::*;

use super::e4m3;

/// How the weight's scales were chosen. The matrix always carries one scale per row; a
/// per-tensor scale is repeated, and this remembers that it was one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleGranularity {
    PerChannel,
    PerTensor,
}

/// What happens to a matmul's input before it meets the FP8 weight.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActivationScheme {
    /// Activations stay unquantized (W8A16).
    WeightOnly,
    /// Each token's row is quantized to E4M3 with scale amax(|row|) / 448, found as it comes.
    DynamicPerToken,
    /// Every value is quantized to E4M3 with the checkpoint's `input_scale`, saturating.
    Static { input_scale: f32 },
}

impl ActivationScheme {
    /// Replaces each value of one token's row by its E4M3 quantization times the scale: the
    /// value the quantized matmul computes with.
    pub fn apply(self, row: &mut [f32]) {
        let scale = match self {
            ActivationScheme::WeightOnly => return,
            ActivationScheme::DynamicPerToken => row.iter().fold(0f32, |m, x| m.max(x.abs())) / e4m3::MAX,
            ActivationScheme::Static { input_scale } => input_scale,
        };
        if scale == 0.0 {
            return; // an all-zero row under the dynamic scheme: nothing to quantize
        }
        for x in row {
            *x = e4m3::to_f32(quantize(*x, scale)) * scale;
        }
    }
}

/// The code of `x / scale`. The division is done in f64, where it is exact enough that the
/// code is the one nearest the true quotient (an f32 quotient could round onto a midpoint).
pub fn quantize(x: f32, scale: f32) -> u8 {
    e4m3::from_f64(x as f64 / scale as f64)
}

/// A matrix `[rows, cols]` of E4M3 codes, row-major, whose value at (r, c) is
/// `e4m3(codes[r · cols + c]) × scales[r]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    /// `[rows (outputs), cols (inputs)]`, the checkpoint's layout.
    pub shape: [usize; 2],
    pub codes: Vec<u8>,
    /// One per row.
    pub scales: Vec<f32>,
    pub granularity: ScaleGranularity,
    pub activations: ActivationScheme,
}

impl Fp8Weight {
    /// Assembles a weight from a checkpoint's parts: `scales` holds one scale per row
    /// (`PerChannel`) or one for the whole tensor (`PerTensor`). Refuses parts that do not
    /// fit together and scales that are not finite (or, for inputs, not positive).
    pub fn from_parts(
        shape: [usize; 2],
        codes: Vec<u8>,
        scales: &[f32],
        granularity: ScaleGranularity,
        activations: ActivationScheme,
    ) -> Result<Self, String> {
        let [rows, cols] = shape;
        if rows.checked_mul(cols) != Some(codes.len()) {
            return Err(format!("{} codes for a [{rows}, {cols}] matrix", codes.len()));
        }
        let expected = match granularity {
            ScaleGranularity::PerChannel => rows,
            ScaleGranularity::PerTensor => 1,
        };
        if scales.len() != expected {
            return Err(format!("{} weight scales, expected {expected} ({granularity:?})", scales.len()));
        }
        if let Some(s) = scales.iter().find(|s| !s.is_finite()) {
            return Err(format!("weight scale {s} is not finite"));
        }
        if let ActivationScheme::Static { input_scale } = activations {
            if !(input_scale.is_finite() && input_scale > 0.0) {
                return Err(format!("input scale {input_scale} is not a positive finite number"));
            }
        }
        let scales = if granularity == ScaleGranularity::PerTensor { vec![scales[0]; rows] } else { scales.to_vec() };
        Ok(Fp8Weight { shape, codes, scales, granularity, activations })
    }

    /// Quantizes a row-major f32 matrix per output channel: each row's scale maps its
    /// largest magnitude to 448 (an all-zero row gets scale 1).
    pub fn quantize(shape: [usize; 2], values: &[f32], activations: ActivationScheme) -> Self {
        let cols = shape[1].max(1);
        assert_eq!(values.len(), shape[0] * shape[1], "values for {shape:?}");
        let (scales, codes): (Vec<f32>, Vec<Vec<u8>>) = values
            .par_chunks(cols)
            .map(|row| {
                let amax = row.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = (amax as f64 / e4m3::MAX as f64) as f32;
                let scale = if scale > 0.0 && scale.is_finite() { scale } else { 1.0 };
                (scale, row.iter().map(|&x| quantize(x, scale)).collect())
            })
            .unzip();
        let codes = codes.concat();
        Fp8Weight { shape, codes, scales, granularity: ScaleGranularity::PerChannel, activations }
    }

    pub fn row(&self, r: usize) -> &[u8] {
        let cols = self.shape[1];
        &self.codes[r * cols..(r + 1) * cols]
    }

    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        self.row(r).iter().map(|&c| e4m3::to_f32(c) * self.scales[r]).collect()
    }

    pub fn to_f32(&self) -> Vec<f32> {
        (0..self.shape[0]).flat_map(|r| self.dequantize_row(r)).collect()
    }

    /// Reorders whole rows with their scales: row `i` of the result is row `from[i]`.
    pub fn permute_rows(&self, from: &[usize]) -> Fp8Weight {
        let codes = from.iter().flat_map(|&r| self.row(r).iter().copied()).collect();
        let scales = from.iter().map(|&r| self.scales[r]).collect();
        Fp8Weight { codes, scales, ..self.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_channel_quantization_maps_each_row_maximum_to_448() {
        let values = [3.5, -7.0, 1.75, 0.0, 0.0, 0.0, 28.0, 14.0, -10.5];
        let w = Fp8Weight::quantize([3, 3], &values, ActivationScheme::WeightOnly);
        assert_eq!(w.scales, vec![1.0 / 64.0, 1.0, 1.0 / 16.0]);
        assert_eq!(w.codes[1], 0xfe); // -7 · 64 = -448
        assert_eq!(&w.codes[3..6], &[0, 0, 0]);
        assert_eq!(w.codes[6], 0x7e);
        // -10.5 · 16 = -168, halfway between 160 (even code 0x72) and 176: ties to even.
        assert_eq!(w.codes[8], 0xf2);
        assert_eq!(w.to_f32(), vec![3.5, -7.0, 1.75, 0.0, 0.0, 0.0, 28.0, 14.0, -10.0]);
    }

    #[test]
    fn parts_that_do_not_fit_are_refused() {
        let ok = |s: &[f32], g| Fp8Weight::from_parts([2, 2], vec![0; 4], s, g, ActivationScheme::WeightOnly);
        assert!(ok(&[1.0, 2.0], ScaleGranularity::PerChannel).is_ok());
        assert_eq!(ok(&[2.0], ScaleGranularity::PerTensor).unwrap().scales, vec![2.0, 2.0]);
        assert!(ok(&[1.0], ScaleGranularity::PerChannel).is_err());
        assert!(ok(&[1.0, f32::NAN], ScaleGranularity::PerChannel).is_err());
        assert!(Fp8Weight::from_parts(
            [2, 3],
            vec![0; 4],
            &[1.0],
            ScaleGranularity::PerTensor,
            ActivationScheme::WeightOnly
        )
        .is_err());
        let bad_input = ActivationScheme::Static { input_scale: 0.0 };
        assert!(Fp8Weight::from_parts([2, 2], vec![0; 4], &[1.0], ScaleGranularity::PerTensor, bad_input).is_err());
    }

    #[test]
    fn activation_schemes() {
        let mut dynamic = [7.0f32, -3.5, 2.1, 0.0];
        ActivationScheme::DynamicPerToken.apply(&mut dynamic);
        // scale 7/448 = 1/64: 2.1 · 64 = 134.4 lies between the codes 128 and 144.
        assert_eq!(dynamic, [7.0, -3.5, 2.0, 0.0]);
        let mut fixed = [1.0f32, -0.5, 0.3, 0.0];
        ActivationScheme::Static { input_scale: 1.0 / 1024.0 }.apply(&mut fixed);
        // 1024 and 512 saturate at 448; 0.3 · 1024 = 307.2 rounds to 320 (steps of 32).
        assert_eq!(fixed, [448.0 / 1024.0, -448.0 / 1024.0, 320.0 / 1024.0, 0.0]);
        let mut zeros = [0.0f32; 3];
        ActivationScheme::DynamicPerToken.apply(&mut zeros);
        assert_eq!(zeros, [0.0; 3]);
    }
}
