//! OCP FP8 E4M3, as `torch.float8_e4m3fn`: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa
//! bits. No infinities; 0x7f and 0xff are NaN; the largest finite value is 448 (0x7e).
//! Exponent 0 holds the subnormals m/8 · 2⁻⁶ (0x01 = 2⁻⁹).
//!
//! Decoding is a table (every code's value is exact in f32). Encoding rounds to the nearest
//! code, ties to the even code, and saturates at ±448 instead of overflowing to NaN, as
//! quantizers do (`clamp(x, -448, 448).to(float8_e4m3fn)`).

/// The largest finite E4M3 value.
pub const MAX: f32 = 448.0;

/// The value of every code.
pub static VALUES: [f32; 256] = table();

/// The value of `code`.
pub fn to_f32(code: u8) -> f32 {
    VALUES[code as usize]
}

/// The code nearest `x` (exact: an f32 converts to f64 without rounding).
pub fn from_f32(x: f32) -> u8 {
    from_f64(x as f64)
}

/// The code nearest `x`, ties to even, saturating at ±448; NaN gives 0x7f.
pub fn from_f64(x: f64) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= MAX as f64 {
        // Everything from 448 up rounds to 448 (464, halfway to the next step, ties to
        // 448's even code) or would overflow: saturate.
        return sign | 0x7e;
    }
    if a < MIN_NORMAL {
        // Subnormal: a multiple of 2⁻⁹, and 8 · 2⁻⁹ is the smallest normal, code 0x08.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    let bits = a.to_bits();
    let exponent = ((bits >> 52) as i32 - 1023 + 7) as u8; // 1..=15 here
    let mantissa = ((bits >> 49) & 7) as u8;
    let rest = bits & ((1 << 49) - 1); // the dropped mantissa bits
    let half = 1 << 48;
    let mut code = exponent << 3 | mantissa;
    if rest > half || (rest == half && code & 1 == 1) {
        code += 1; // a carry out of the mantissa steps the exponent, as it should
    }
    sign | code
}

const MIN_NORMAL: f64 = 1.0 / 64.0;

const fn table() -> [f32; 256] {
    let mut t = [0f32; 256];
    let mut code = 0;
    while code < 256 {
        t[code] = decode(code as u8);
        code += 1;
    }
    t
}

const fn decode(code: u8) -> f32 {
    let exponent = (code >> 3) & 0x0f;
    let mantissa = (code & 0x07) as u32;
    let magnitude = if exponent == 0x0f && mantissa == 7 {
        f32::NAN
    } else if exponent == 0 {
        mantissa as f32 / 512.0
    } else {
        // Rebias 7 → 127 and widen the mantissa to f32's 23 bits.
        f32::from_bits(((exponent as u32 + 120) << 23) | (mantissa << 20))
    };
    if code & 0x80 != 0 {
        -magnitude
    } else {
        magnitude
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_nan_code(c: u8) -> bool {
        c & 0x7f == 0x7f
    }

    #[test]
    fn known_codes() {
        assert_eq!(to_f32(0x00).to_bits(), 0f32.to_bits());
        assert_eq!(to_f32(0x80).to_bits(), (-0f32).to_bits());
        assert_eq!(to_f32(0x01), 2f32.powi(-9));
        assert_eq!(to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(to_f32(0x08), 2f32.powi(-6));
        assert_eq!(to_f32(0x38), 1.0);
        assert_eq!(to_f32(0x39), 1.125);
        assert_eq!(to_f32(0xb8), -1.0);
        assert_eq!(to_f32(0x7e), 448.0);
        assert_eq!(to_f32(0xfe), -448.0);
        assert!(to_f32(0x7f).is_nan() && to_f32(0xff).is_nan());
        assert_eq!((0..=255u8).filter(|&c| to_f32(c).is_nan()).count(), 2);
    }

    #[test]
    fn every_code_round_trips() {
        for c in 0..=255u8 {
            if is_nan_code(c) {
                assert_eq!(from_f32(to_f32(c)), 0x7f);
            } else {
                assert_eq!(from_f32(to_f32(c)), c, "code {c:#04x} = {}", to_f32(c));
            }
        }
    }

    #[test]
    fn positive_codes_increase() {
        for c in 0..0x7eu8 {
            assert!(to_f32(c) < to_f32(c + 1), "{c:#04x}");
        }
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_to_nearest() {
        for c in 0..0x7eu8 {
            let (lo, hi) = (to_f32(c) as f64, to_f32(c + 1) as f64);
            let mid = (lo + hi) / 2.0; // exact
            let even = if c % 2 == 0 { c } else { c + 1 };
            for sign in [0u8, 0x80] {
                let s = if sign == 0 { 1.0 } else { -1.0 };
                assert_eq!(from_f64(s * mid), sign | even, "midpoint of {c:#04x}");
                assert_eq!(from_f64(s * mid.next_up()), sign | (c + 1), "above the midpoint of {c:#04x}");
                assert_eq!(from_f64(s * mid.next_down()), sign | c, "below the midpoint of {c:#04x}");
                assert_eq!(from_f32(s as f32 * (mid as f32).next_up()), sign | (c + 1));
            }
        }
    }

    #[test]
    fn saturates_at_448() {
        for (x, code) in [
            (448.0, 0x7e),
            (463.9, 0x7e),
            (464.0, 0x7e),
            (480.0, 0x7e),
            (1e30, 0x7e),
            (f64::INFINITY, 0x7e),
            (-500.0, 0xfe),
            (f64::NEG_INFINITY, 0xfe),
        ] {
            assert_eq!(from_f64(x), code, "{x}");
        }
        assert_eq!(from_f64(f64::NAN), 0x7f);
        assert_eq!(from_f32(1e-30), 0x00);
        assert_eq!(from_f32(-1e-30), 0x80);
    }
}
