//! Flat parameter vectors and their byte encoding: little-endian `f32`, sent in chunks with a
//! SHA-256 over all bytes.

use thiserror::Error;

/// Parameters per chunk on the wire: 64 Ki values = 256 KiB, well under gRPC's 4 MiB default.
pub const CHUNK_PARAMS: usize = 64 * 1024;

/// Errors decoding parameters from bytes.
#[derive(Debug, Error, PartialEq)]
pub enum DecodeError {
    /// The byte count is not a multiple of four.
    #[error("{n_bytes} bytes is not a whole number of float32 values")]
    Misaligned {
        /// Bytes received.
        n_bytes: usize,
    },
    /// A chunk does not start where the previous one ended.
    #[error("chunk starts at parameter {got}, expected {expected}")]
    OutOfOrder {
        /// Where the next chunk had to start.
        expected: usize,
        /// Where it started.
        got: usize,
    },
    /// A chunk carries no values.
    #[error("empty chunk")]
    Empty,
    /// More parameters arrived than announced.
    #[error("received more than the {expected} announced parameters")]
    TooMany {
        /// Parameters announced in the header.
        expected: usize,
    },
    /// Fewer parameters arrived than announced.
    #[error("received {got} parameters, expected {expected}")]
    TooFew {
        /// Parameters announced in the header.
        expected: usize,
        /// Parameters received.
        got: usize,
    },
    /// The checksum does not match the bytes.
    #[error("SHA-256 of the received bytes does not match the sender's")]
    Checksum,
}

/// Appends the little-endian bytes of `values` to `out`.
pub fn encode_f32s(values: &[f32], out: &mut Vec<u8>) {
    out.reserve(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// Decodes little-endian `f32` values, appending them to `out`.
///
/// # Errors
///
/// [`DecodeError::Misaligned`] if `bytes` is not a multiple of four long.
pub fn decode_f32s(bytes: &[u8], out: &mut Vec<f32>) -> Result<(), DecodeError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(DecodeError::Misaligned { n_bytes: bytes.len() });
    }
    out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])));
    Ok(())
}

/// SHA-256 of the little-endian encoding of `values`, computed without materialising it.
pub fn sha256_f32s(values: &[f32]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = Vec::with_capacity(CHUNK_PARAMS * 4);
    for chunk in values.chunks(CHUNK_PARAMS) {
        buf.clear();
        encode_f32s(chunk, &mut buf);
        ctx.update(&buf);
    }
    ctx.finish().as_ref().try_into().expect("SHA-256 digests are 32 bytes")
}

/// Reassembles a parameter vector from in-order chunks, checking offsets, length and checksum.
///
/// Invariant: `values.len() <= expected` at all times, so a hostile sender cannot make the
/// receiver allocate more than the announced size.
pub struct Reassembler {
    expected: usize,
    values: Vec<f32>,
    digest: ring::digest::Context,
}

impl std::fmt::Debug for Reassembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reassembler")
            .field("expected", &self.expected)
            .field("received", &self.values.len())
            .finish()
    }
}

impl Reassembler {
    /// Starts reassembling `expected` parameters.
    pub fn new(expected: usize) -> Reassembler {
        Reassembler {
            expected,
            values: Vec::with_capacity(expected),
            digest: ring::digest::Context::new(&ring::digest::SHA256),
        }
    }

    /// Adds the chunk that starts at parameter `offset`.
    ///
    /// # Errors
    ///
    /// Out-of-order chunks, misaligned bytes and more values than announced.
    pub fn push(&mut self, offset: usize, bytes: &[u8]) -> Result<(), DecodeError> {
        if offset != self.values.len() {
            return Err(DecodeError::OutOfOrder { expected: self.values.len(), got: offset });
        }
        if !bytes.len().is_multiple_of(4) {
            return Err(DecodeError::Misaligned { n_bytes: bytes.len() });
        }
        // An empty chunk moves nothing forward: accepting it would let a stream stay busy
        // forever (issue 10, M1).
        if bytes.is_empty() {
            return Err(DecodeError::Empty);
        }
        if self.values.len() + bytes.len() / 4 > self.expected {
            return Err(DecodeError::TooMany { expected: self.expected });
        }
        self.digest.update(bytes);
        decode_f32s(bytes, &mut self.values)
    }

    /// Parameters received so far.
    pub fn received(&self) -> usize {
        self.values.len()
    }

    /// Finishes, checking the count and, if given, the sender's SHA-256.
    ///
    /// # Errors
    ///
    /// [`DecodeError::TooFew`] or [`DecodeError::Checksum`].
    pub fn finish(self, sha256: Option<&[u8]>) -> Result<Vec<f32>, DecodeError> {
        if self.values.len() != self.expected {
            return Err(DecodeError::TooFew { expected: self.expected, got: self.values.len() });
        }
        let digest = self.digest.finish();
        match sha256 {
            Some(sent) if sent != digest.as_ref() => Err(DecodeError::Checksum),
            _ => Ok(self.values),
        }
    }
}

/// L2 norm, accumulated in `f64`.
pub fn l2_norm(values: &[f32]) -> f64 {
    values.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 10 (M1): an empty chunk is refused, so a stream cannot stay busy forever.
    #[test]
    fn empty_chunks_are_refused() {
        let mut r = Reassembler::new(2);
        assert_eq!(r.push(0, &[]), Err(DecodeError::Empty));
        r.push(0, &[0, 0, 128, 63]).unwrap();
        assert_eq!(r.push(1, &[]), Err(DecodeError::Empty));
    }

    fn chunked(values: &[f32], chunk: usize) -> Vec<(usize, Vec<u8>)> {
        values
            .chunks(chunk)
            .enumerate()
            .map(|(i, c)| {
                let mut b = Vec::new();
                encode_f32s(c, &mut b);
                (i * chunk, b)
            })
            .collect()
    }

    #[test]
    fn reassembles_chunks_and_checks_digest() {
        let values: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5 - 7.0).collect();
        let mut r = Reassembler::new(values.len());
        for (offset, bytes) in chunked(&values, 77) {
            r.push(offset, &bytes).unwrap();
        }
        let digest = sha256_f32s(&values);
        assert_eq!(r.finish(Some(&digest)).unwrap(), values);
    }

    #[test]
    fn rejects_bad_checksum_short_and_long_inputs() {
        let values = vec![1.0f32; 10];
        let chunks = chunked(&values, 4);
        let mut r = Reassembler::new(10);
        for (o, b) in &chunks {
            r.push(*o, b).unwrap();
        }
        assert_eq!(r.finish(Some(&[0u8; 32])), Err(DecodeError::Checksum));

        let mut r = Reassembler::new(10);
        r.push(0, &chunks[0].1).unwrap();
        assert_eq!(r.finish(None), Err(DecodeError::TooFew { expected: 10, got: 4 }));

        let mut r = Reassembler::new(3);
        assert_eq!(r.push(0, &chunks[0].1), Err(DecodeError::TooMany { expected: 3 }));

        let mut r = Reassembler::new(10);
        assert_eq!(r.push(4, &chunks[1].1), Err(DecodeError::OutOfOrder { expected: 0, got: 4 }));
        assert_eq!(r.push(0, &[0u8; 5]), Err(DecodeError::Misaligned { n_bytes: 5 }));
    }
}
