//! Two bf16 outputs of the same op, computed in f32 in different orders, agree when each
//! element is the other or its bf16 neighbour: rounding can send results a hair apart to
//! either side of a bf16 boundary, so a relative bound tighter than one ulp of the
//! largest output (2^-8 to 2^-7 of it) would fail on that alone.

/// How many elements of `a` and `b` are further apart than one bf16 ulp of the larger of
/// the two, and further than `floor` (for outputs near zero, whose ulp is tiny beside the
/// rounding of the sums that made them). `None` where the lengths differ or a value is not
/// finite.
pub fn beyond_one_bf16_ulp(a: &[f32], b: &[f32], floor: f32) -> Option<usize> {
    if a.len() != b.len() || a.iter().chain(b).any(|v| !v.is_finite()) {
        return None;
    }
    Some(a.iter().zip(b).filter(|&(&x, &y)| (x - y).abs() > ulp(x.abs().max(y.abs())).max(floor)).count())
}

/// The gap from |x| (rounded to bf16) to the next bf16 value up.
fn ulp(x: f32) -> f32 {
    let b = half::bf16::from_f32(x);
    half::bf16::from_bits(b.to_bits() + 1).to_f32() - b.to_f32()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_agree_and_two_ulps_do_not() {
        let one = 1.5f32;
        let up = half::bf16::from_bits(half::bf16::from_f32(one).to_bits() + 1).to_f32();
        let two_up = half::bf16::from_bits(half::bf16::from_f32(one).to_bits() + 2).to_f32();
        assert_eq!(ulp(one), 2f32.powi(-7));
        assert_eq!(beyond_one_bf16_ulp(&[one, -one], &[up, -up], 0.0), Some(0));
        assert_eq!(beyond_one_bf16_ulp(&[one, 0.25], &[two_up, 0.25], 0.0), Some(1));
    }

    #[test]
    fn near_zero_the_floor_decides() {
        // 1e-6 and 3e-6 are many bf16 ulps apart, but far inside a floor of 1e-5.
        assert_eq!(beyond_one_bf16_ulp(&[1e-6], &[3e-6], 0.0), Some(1));
        assert_eq!(beyond_one_bf16_ulp(&[1e-6], &[3e-6], 1e-5), Some(0));
    }

    #[test]
    fn mismatched_or_non_finite_outputs_are_refused() {
        assert_eq!(beyond_one_bf16_ulp(&[1.0], &[1.0, 2.0], 0.0), None);
        assert_eq!(beyond_one_bf16_ulp(&[f32::NAN], &[1.0], 0.0), None);
    }
}
