//! L2 clipping (McMahan et al. 2018): [`ClippedUpdate`] can only be built by [`clip`], so any
//! function that takes one knows its L2 norm is at most the clipping norm.

/// An update whose L2 norm is at most `clip_norm`.
///
/// Invariant: `l2_norm(values) <= clip_norm * (1 + 1e-6)` (rounding in `f32`), and every value
/// is finite.
#[derive(Debug, Clone, PartialEq)]
pub struct ClippedUpdate {
    values: Vec<f32>,
    clip_norm: f32,
    norm_before: f64,
}

impl ClippedUpdate {
    /// The clipped values.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// The clipping norm the values respect.
    pub fn clip_norm(&self) -> f32 {
        self.clip_norm
    }

    /// L2 norm before clipping.
    pub fn norm_before_clip(&self) -> f64 {
        self.norm_before
    }

    /// Takes the values out.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }
}

/// Scales `values` so their L2 norm is at most `clip_norm` (McMahan et al. 2018, Alg. 1,
/// `ClipFn`). Non-finite values are replaced by zero first: they carry no usable signal and
/// would otherwise poison the norm.
///
/// # Panics
///
/// If `clip_norm` is not positive and finite (validated task plans never do this).
pub fn clip(mut values: Vec<f32>, clip_norm: f32) -> ClippedUpdate {
    assert!(
        clip_norm.is_finite() && clip_norm > 0.0,
        "clip_norm must be positive, got {clip_norm}"
    );
    for v in &mut values {
        if !v.is_finite() {
            *v = 0.0;
        }
    }
    let norm = crate::update::l2_norm(&values);
    if norm > f64::from(clip_norm) {
        // Scale slightly under the bound so f32 rounding cannot push the norm over it.
        let scale = (f64::from(clip_norm) / norm * (1.0 - 1e-7)) as f32;
        for v in &mut values {
            *v *= scale;
        }
    }
    ClippedUpdate { values, clip_norm, norm_before: norm }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::l2_norm;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
        #[test]
        fn clipping_bounds_the_norm(values in proptest::collection::vec(-1e4f32..1e4, 0..300), c in 0.001f32..100.0) {
            let clipped = clip(values.clone(), c);
            prop_assert!(l2_norm(clipped.values()) <= f64::from(c) * (1.0 + 1e-6));
            // Under the bound, nothing changes.
            if l2_norm(&values) <= f64::from(c) {
                prop_assert_eq!(clipped.values(), &values[..]);
            }
        }
    }

    #[test]
    fn clipping_keeps_direction_and_zeroes_non_finite() {
        let clipped = clip(vec![3.0, 4.0, f32::NAN, f32::INFINITY], 1.0);
        let v = clipped.values();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        assert_eq!(&v[2..], &[0.0, 0.0]);
        assert!((clipped.norm_before_clip() - 5.0).abs() < 1e-12);
    }
}
