//! The cryptographic primitives of SecAgg+, each from ring or x25519-dalek: seeds, X25519 key
//! agreement with keys derived from a seed, HKDF-SHA256, AES-256-GCM for the shares routed
//! through the coordinator, and Ed25519 signatures on advertised keys.
//!
//! Why x25519-dalek beside ring: SecAgg+ recovers a dropped client's pairwise masks from
//! Shamir shares of the seed its key-agreement key came from. ring's X25519 private keys are
//! single-use and can be neither exported nor built from bytes, so they cannot be recovered
//! from a seed; x25519-dalek's `StaticSecret` can (dalek-cryptography, constant-time, audited).

use rand::{CryptoRng, Rng};
use ring::{aead, hkdf, signature};
use thiserror::Error;

/// A 256-bit seed.
pub type Seed = [u8; 32];

/// Why a primitive refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum KeyError {
    /// A peer's public key gave an all-zero shared secret (a low-order point).
    #[error("the peer's public key is not contributory")]
    NotContributory,
    /// A ciphertext did not authenticate (tampered, or for someone else).
    #[error("a share did not decrypt: tampered or misrouted")]
    Decrypt,
    /// A signature did not verify: the advertised keys are not the store's.
    #[error("the advertised keys' signature does not verify")]
    Signature,
    /// A key of the wrong length.
    #[error("malformed key")]
    Malformed,
}

/// A fresh seed from the caller's CSPRNG.
pub fn random_seed<R: Rng + CryptoRng + ?Sized>(rng: &mut R) -> Seed {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    seed
}

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-SHA256 (RFC 5869) of `secret` with `salt`, expanded for `info`, as 32 bytes.
pub fn hkdf32(secret: &[u8], salt: &[u8], info: &[&[u8]]) -> Seed {
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(secret);
    let okm = prk.expand(info, Len(32)).expect("32 bytes is within HKDF's limit");
    let mut out = [0u8; 32];
    okm.fill(&mut out).expect("length matches");
    out
}

/// An X25519 key pair derived from a seed: whoever learns the seed (t holders of its shares)
/// can rebuild the private key.
pub struct AgreementKey {
    secret: x25519_dalek::StaticSecret,
    public: [u8; 32],
}

impl std::fmt::Debug for AgreementKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgreementKey").field("public", &self.public).finish_non_exhaustive()
    }
}

impl AgreementKey {
    /// The key pair of `seed` for `label` (one seed may give several independent keys).
    pub fn from_seed(seed: &Seed, label: &[u8]) -> AgreementKey {
        let bytes = hkdf32(seed, b"fedretail secagg x25519", &[label]);
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret).to_bytes();
        AgreementKey { secret, public }
    }

    /// The public key to advertise.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    /// A 32-byte key shared with the owner of `peer`, bound to `context` (the round and the
    /// pair), through HKDF-SHA256 of the X25519 shared secret.
    ///
    /// # Errors
    ///
    /// A low-order public key.
    pub fn agree(&self, peer: &[u8; 32], context: &[&[u8]]) -> Result<Seed, KeyError> {
        let shared = self.secret.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(KeyError::NotContributory);
        }
        Ok(hkdf32(shared.as_bytes(), b"fedretail secagg agreement", context))
    }
}

/// Nonce of a message from `sender` to `receiver`: each key carries one message per
/// direction, so the pair of indices makes it unique.
fn nonce(sender: u32, receiver: u32) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&sender.to_le_bytes());
    n[4..8].copy_from_slice(&receiver.to_le_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// AES-256-GCM encryption of `plaintext` from `sender` to `receiver` under `key`, with `aad`
/// (the round) authenticated.
pub fn seal(key: &Seed, sender: u32, receiver: u32, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte key"),
    );
    let mut data = plaintext.to_vec();
    key.seal_in_place_append_tag(nonce(sender, receiver), aead::Aad::from(aad), &mut data)
        .expect("AES-GCM seals any message of this size");
    data
}

/// The plaintext of [`seal`].
///
/// # Errors
///
/// A ciphertext that does not authenticate.
pub fn open(
    key: &Seed,
    sender: u32,
    receiver: u32,
    aad: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, KeyError> {
    let key = aead::LessSafeKey::new(
        aead::UnboundKey::new(&aead::AES_256_GCM, key).expect("32-byte key"),
    );
    let mut data = ciphertext.to_vec();
    let plain = key
        .open_in_place(nonce(sender, receiver), aead::Aad::from(aad), &mut data)
        .map_err(|_| KeyError::Decrypt)?;
    Ok(plain.to_vec())
}

/// A store's Ed25519 signing key: the identity its advertised keys are signed with.
pub struct SigningKey(signature::Ed25519KeyPair);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("public", &self.public()).finish_non_exhaustive()
    }
}

impl SigningKey {
    /// The signing key of a 32-byte seed (kept by the store, like its TLS key).
    ///
    /// # Panics
    ///
    /// Never for a 32-byte seed.
    pub fn from_seed(seed: &Seed) -> SigningKey {
        SigningKey(
            signature::Ed25519KeyPair::from_seed_unchecked(seed).expect("a 32-byte seed is valid"),
        )
    }

    /// The public key peers verify with.
    pub fn public(&self) -> [u8; 32] {
        use signature::KeyPair;
        self.0.public_key().as_ref().try_into().expect("Ed25519 public keys are 32 bytes")
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.0.sign(message).as_ref().try_into().expect("Ed25519 signatures are 64 bytes")
    }
}

/// Checks an Ed25519 signature.
///
/// # Errors
///
/// [`KeyError::Signature`] when it does not verify.
pub fn verify(public: &[u8; 32], message: &[u8], sig: &[u8]) -> Result<(), KeyError> {
    signature::UnparsedPublicKey::new(&signature::ED25519, public)
        .verify(message, sig)
        .map_err(|_| KeyError::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn both_sides_agree_on_one_key_and_a_rebuilt_key_agrees_too() {
        let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(4);
        let (sa, sb) = (random_seed(&mut rng), random_seed(&mut rng));
        let (a, b) = (AgreementKey::from_seed(&sa, b"s"), AgreementKey::from_seed(&sb, b"s"));
        let ab = a.agree(&b.public(), &[b"round 1"]).unwrap();
        assert_eq!(ab, b.agree(&a.public(), &[b"round 1"]).unwrap());
        assert_ne!(ab, a.agree(&b.public(), &[b"round 2"]).unwrap(), "context binds the key");
        // Whoever rebuilds a's seed (from t shares) recomputes the same pairwise key.
        assert_eq!(
            AgreementKey::from_seed(&sa, b"s").agree(&b.public(), &[b"round 1"]).unwrap(),
            ab
        );
        assert_eq!(a.agree(&[0u8; 32], &[]), Err(KeyError::NotContributory));
    }

    #[test]
    fn sealed_shares_open_only_for_their_pair_and_round() {
        let key = [3u8; 32];
        let sealed = seal(&key, 1, 2, b"round 7", b"share");
        assert_eq!(open(&key, 1, 2, b"round 7", &sealed).unwrap(), b"share");
        assert_eq!(open(&key, 2, 1, b"round 7", &sealed), Err(KeyError::Decrypt));
        assert_eq!(open(&key, 1, 2, b"round 8", &sealed), Err(KeyError::Decrypt));
        let mut tampered = sealed.clone();
        tampered[0] ^= 1;
        assert_eq!(open(&key, 1, 2, b"round 7", &tampered), Err(KeyError::Decrypt));
    }

    #[test]
    fn a_substituted_key_fails_the_signature_check() {
        let store = SigningKey::from_seed(&[5u8; 32]);
        let sig = store.sign(b"keys of store 3");
        assert_eq!(verify(&store.public(), b"keys of store 3", &sig), Ok(()));
        assert_eq!(verify(&store.public(), b"keys of store 4", &sig), Err(KeyError::Signature));
        let other = SigningKey::from_seed(&[6u8; 32]);
        assert_eq!(verify(&other.public(), b"keys of store 3", &sig), Err(KeyError::Signature));
    }
}
