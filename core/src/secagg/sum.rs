//! The sums at the heart of aggregation, written so the compiler vectorises them: wrapping
//! integer sums mod 2³² for masked uploads.

use std::ops::Range;
use std::sync::Arc;

use crate::stripes::{Batched, CHUNK_BYTES};

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

/// A running sum of masked uploads mod 2³², split over threads and added [`BATCH`](crate::stripes::BATCH) at a time
/// ([`Batched`]): what the coordinator keeps while a secure round collects.
#[derive(Debug)]
pub struct WrappingSum {
    sum: Batched<u32, Arc<Vec<u32>>>,
}

impl WrappingSum {
    /// A zero sum of `len` values.
    pub fn new(len: usize) -> WrappingSum {
        WrappingSum { sum: Batched::new(len, add_batch) }
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.sum.len()
    }

    /// Whether it has no values.
    pub fn is_empty(&self) -> bool {
        self.sum.is_empty()
    }

    /// Adds `x` mod 2³², shared with the summing threads rather than copied.
    ///
    /// # Panics
    ///
    /// If the length differs (check it first).
    pub fn add(&mut self, x: Arc<Vec<u32>>) {
        assert_eq!(x.len(), self.len(), "lengths differ");
        self.sum.push(x);
    }

    /// The sum, once every value added has been summed.
    pub fn finish(self) -> Vec<u32> {
        self.sum.finish()
    }
}

/// Adds a batch of masked uploads over `range` of their coordinates, mod 2³².
fn add_batch(acc: &mut [u32], batch: &[Arc<Vec<u32>>], range: Range<usize>) {
    // The common case in one loop over four streams (faster than the chunks below).
    if let [a, b, c, d] = batch {
        let (a, b, c, d) = (&a[range.clone()], &b[range.clone()], &c[range.clone()], &d[range]);
        for ((((s, &a), &b), &c), &d) in acc.iter_mut().zip(a).zip(b).zip(c).zip(d) {
            *s = s.wrapping_add(a).wrapping_add(b).wrapping_add(c).wrapping_add(d);
        }
        return;
    }
    for (c, chunk) in acc.chunks_mut(CHUNK_BYTES / 4).enumerate() {
        let from = range.start + c * (CHUNK_BYTES / 4);
        for x in batch {
            add_wrapping(chunk, &x[from..from + chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Striped, batched and with a partial last batch, the masked sum wraps exactly as one
    /// loop of `add_wrapping` does.
    #[test]
    fn the_batched_masked_sum_is_the_sequential_one() {
        let len = 3 * crate::stripes::MIN_STRIPE + 17;
        let uploads: Vec<Arc<Vec<u32>>> = (0..7u32)
            .map(|k| {
                Arc::new(
                    (0..len as u32)
                        .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(k << 29))
                        .collect(),
                )
            })
            .collect();
        let mut expected = vec![0u32; len];
        let mut sum = WrappingSum::new(len);
        for u in &uploads {
            add_wrapping(&mut expected, u);
            sum.add(Arc::clone(u));
        }
        assert_eq!(sum.finish(), expected);
    }
}
