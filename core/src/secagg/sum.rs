//! The sums at the heart of aggregation, written so the compiler vectorises them: wrapping
//! integer sums mod 2³² for masked uploads.

use std::ops::Range;
use std::sync::Arc;

use crate::aggregate::BATCH;

/// Values of the sum kept in L1 cache while a batch is added to them (16 KiB).
const CHUNK: usize = 4096;
use crate::stripes::Stripes;

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

/// A running sum of masked uploads mod 2³², split over threads ([`Stripes`]) and added
/// [`BATCH`] at a time: what the coordinator keeps while a secure round collects.
#[derive(Debug)]
pub struct WrappingSum {
    sum: Stripes<u32>,
    pending: Vec<Arc<Vec<u32>>>,
}

impl WrappingSum {
    /// A zero sum of `len` values.
    pub fn new(len: usize) -> WrappingSum {
        WrappingSum { sum: Stripes::new(len), pending: Vec::with_capacity(BATCH) }
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
        self.pending.push(x);
        if self.pending.len() == BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
        self.sum.apply(Arc::new(move |acc: &mut [u32], range: Range<usize>| {
            if let [a, b, c, d] = &batch[..] {
                let (a, b, c, d) =
                    (&a[range.clone()], &b[range.clone()], &c[range.clone()], &d[range]);
                for ((((s, &a), &b), &c), &d) in acc.iter_mut().zip(a).zip(b).zip(c).zip(d) {
                    *s = s.wrapping_add(a).wrapping_add(b).wrapping_add(c).wrapping_add(d);
                }
                return;
            }
            for (c, chunk) in acc.chunks_mut(CHUNK).enumerate() {
                let from = range.start + c * CHUNK;
                for x in &batch {
                    add_wrapping(chunk, &x[from..from + chunk.len()]);
                }
            }
        }));
    }

    /// The sum, once every value added has been summed.
    pub fn finish(mut self) -> Vec<u32> {
        self.flush();
        self.sum.finish()
    }
}
