//! The sums at the heart of aggregation, written so the compiler vectorises them: wrapping
//! integer sums mod 2³² for masked uploads.

/// `acc[i] = acc[i] + x[i] mod 2³²`.
///
/// # Panics
///
/// If the lengths differ.
pub fn add_wrapping(acc: &mut [u32], x: &[u32]) {
    assert_eq!(acc.len(), x.len(), "lengths differ");
    for (a, b) in acc.iter_mut().zip(x) {
        *a = a.wrapping_add(*b);
    }
}
