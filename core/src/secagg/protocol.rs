//! One SecAgg+ round as pure functions: the client's four steps and the coordinator's
//! unmasking. The transport (who forwards what, deadlines, quorums) is the caller's.
//!
//! 1. **Advertise keys**: each client draws two 256-bit seeds, the pairwise-key seed (its X25519
//!    mask key comes from it) and the self-mask seed, derives an X25519 key for encrypting
//!    shares, and signs both public keys with its store identity key.
//! 2. **Share keys**: each client checks its neighbours' signatures, splits both seeds t-of-k
//!    among its neighbours (Shamir, the neighbour's index + 1 as point) and seals each
//!    neighbour's pair of shares with AES-256-GCM under their X25519 key.
//! 3. **Masked upload**: y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U₂} ±PRG(s_{u,v}) mod 2^b, where U₂
//!    are the neighbours whose shares arrived and the sign is + when u < v.
//! 4. **Unmask**: told which clients uploaded (U₃) and which shared but did not (U₂ \ U₃), each
//!    client reveals, for each neighbour, the self-mask share of a survivor or the
//!    pairwise-key share of a dropped client, never both for one client (in this round or
//!    any later request of it).
//!
//! The coordinator ([`Unmasker`]) sums the masked uploads into one buffer as they arrive,
//! then removes each survivor's self-mask and the masks survivors share with dropped clients,
//! streaming each mask from its seed: memory is O(model), never O(clients × model).

use super::graph::Graph;
use super::keys::{self, AgreementKey, KeyError, Seed, SigningKey};
use super::masks::{self, Sign};
use super::shamir::{self, ShamirError, Share};
use rand::{CryptoRng, Rng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use thiserror::Error;

/// What every party of a round knows publicly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundContext {
    /// The round (binds keys, signatures and ciphertexts to it).
    pub round: u64,
    /// b: sums are mod 2^b.
    pub bits: u32,
    /// Coordinates of an input.
    pub len: usize,
    /// Shamir threshold among a client's neighbours.
    pub threshold: usize,
    /// The round's graph over the cohort's indices.
    pub graph: Graph,
}

impl RoundContext {
    fn aad(&self) -> [u8; 8] {
        self.round.to_le_bytes()
    }

    /// The key-derivation context of the pair {u, v} (symmetric).
    fn pair(&self, u: u32, v: u32) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..8].copy_from_slice(&self.round.to_le_bytes());
        c[8..12].copy_from_slice(&u.min(v).to_le_bytes());
        c[12..].copy_from_slice(&u.max(v).to_le_bytes());
        c
    }
}

/// Why a step refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// Primitive failure (signature, decryption, key).
    #[error(transparent)]
    Key(#[from] KeyError),
    /// Shares that do not reconstruct.
    #[error(transparent)]
    Shamir(#[from] ShamirError),
    /// Fewer neighbours than the threshold took part: the round cannot be unmasked.
    #[error("only {got} neighbours took part, {threshold} needed")]
    TooFewNeighbours {
        /// Neighbours present.
        got: usize,
        /// t.
        threshold: usize,
    },
    /// A neighbour's identity could not be established (its certificate does not verify or
    /// is not a store's, or a bare key where a certificate is required).
    #[error("a neighbour's identity: {0}")]
    Identity(String),
    /// The coordinator asked for both shares of one client.
    #[error("asked to reveal both shares of client {0}; refused")]
    BothShares(u32),
    /// A message from or about a client that is not a neighbour, or an unknown client.
    #[error("client {0} is not a neighbour")]
    NotNeighbour(u32),
    /// An input or upload of the wrong length.
    #[error("expected {expected} coordinates, got {got}")]
    Length {
        /// Wanted.
        expected: usize,
        /// Given.
        got: usize,
    },
    /// The coordinator asked a client for its own pairwise-key share (it never holds one, and
    /// revealing it would unmask its upload).
    #[error("asked for client {0}'s own pairwise-key share; refused")]
    OwnPairwiseKey(u32),
    /// A client uploaded twice, or a step ran out of order.
    #[error("{0}")]
    Order(&'static str),
}

/// What signs a client's advert: its store identity (the key of its mTLS certificate in a
/// deployment, so the coordinator cannot substitute keys; [`SigningKey`] otherwise).
pub trait Signer {
    /// The signature of `message`.
    fn sign_advert(&self, message: &[u8]) -> Vec<u8>;
}

impl Signer for SigningKey {
    fn sign_advert(&self, message: &[u8]) -> Vec<u8> {
        self.sign(message).to_vec()
    }
}

/// Who a client is, as its neighbours check its advert: the certificate of its store (verified
/// against the deployment's CA by the caller), or a bare Ed25519 key (tests and insecure
/// mode, where nothing binds it to a store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// An Ed25519 public key.
    Key([u8; 32]),
    /// A DER certificate.
    Certificate(Vec<u8>),
}

/// The verifier [`Client::share_keys`] takes, for bare Ed25519 identities by index.
pub fn ed25519(
    identity: impl Fn(u32) -> Option<[u8; 32]>,
) -> impl Fn(u32, &[u8], &[u8]) -> Result<(), ProtocolError> {
    move |index, message, signature| {
        let key = identity(index).ok_or(ProtocolError::NotNeighbour(index))?;
        Ok(keys::verify(&key, message, signature)?)
    }
}

/// A client's advertised public keys, signed with its store identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    /// The client's index in the cohort.
    pub index: u32,
    /// X25519 key for the shares sent to it.
    pub cipher_key: [u8; 32],
    /// X25519 key of its pairwise masks (from its pairwise-key seed).
    pub mask_key: [u8; 32],
    /// The store identity's signature over round, index and both keys.
    pub signature: Vec<u8>,
}

fn advert_message(round: u64, index: u32, cipher: &[u8; 32], mask: &[u8; 32]) -> Vec<u8> {
    [b"fedretail secagg keys".as_slice(), &round.to_le_bytes(), &index.to_le_bytes(), cipher, mask]
        .concat()
}

/// Shares sealed from one client to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// Sender's index.
    pub from: u32,
    /// Receiver's index.
    pub to: u32,
    /// AES-256-GCM of the receiver's pairwise-key share and self-mask share.
    pub ciphertext: Vec<u8>,
}

/// Which of a client's seeds a share is of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum SeedKind {
    /// The self-mask seed b_u (revealed for survivors).
    SelfMask,
    /// The pairwise-key seed (revealed for dropped clients).
    PairwiseKey,
}

/// One share a client reveals at unmasking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Revealed {
    /// Whose seed.
    pub owner: u32,
    /// Which seed.
    pub kind: SeedKind,
    /// The share.
    pub share: Share,
}

/// A client's side of one round.
#[derive(Debug)]
pub struct Client {
    ctx: RoundContext,
    index: u32,
    pairwise_seed: Seed,
    self_seed: Seed,
    cipher: AgreementKey,
    mask: AgreementKey,
    /// Neighbours' verified adverts.
    peers: BTreeMap<u32, Advertised>,
    /// The AES-256-GCM key shared with each verified neighbour (derived once).
    cipher_keys: BTreeMap<u32, Seed>,
    /// Shares of neighbours' seeds, from those whose shares arrived (U₂ ∩ N(u)).
    held: BTreeMap<u32, (Share, Share)>,
    /// What was revealed of each owner, across unmask requests.
    revealed: BTreeMap<u32, SeedKind>,
    uploaded: bool,
}

impl Client {
    /// Step 1: fresh seeds and keys; the signed advert to send.
    pub fn new<R: Rng + CryptoRng + ?Sized>(
        ctx: RoundContext,
        index: u32,
        identity: &dyn Signer,
        rng: &mut R,
    ) -> (Client, Advertised) {
        let pairwise_seed = keys::random_seed(rng);
        let self_seed = keys::random_seed(rng);
        let cipher = AgreementKey::from_seed(&keys::random_seed(rng), b"cipher");
        let mask = AgreementKey::from_seed(&pairwise_seed, b"mask");
        let (c, m) = (cipher.public(), mask.public());
        let advert = Advertised {
            index,
            cipher_key: c,
            mask_key: m,
            signature: identity.sign_advert(&advert_message(ctx.round, index, &c, &m)),
        };
        let client = Client {
            ctx,
            index,
            pairwise_seed,
            self_seed,
            cipher,
            mask,
            peers: BTreeMap::new(),
            cipher_keys: BTreeMap::new(),
            held: BTreeMap::new(),
            revealed: BTreeMap::new(),
            uploaded: false,
        };
        (client, advert)
    }

    /// Step 2: checks the neighbours' adverts with `verify(index, message, signature)` (against
    /// the identity of that store: its certificate; see [`ed25519`] for bare keys), shares both
    /// seeds among them, and returns one sealed message per neighbour. Adverts of
    /// non-neighbours are ignored.
    ///
    /// # Errors
    ///
    /// A signature that does not verify (a substituted key), or fewer than t neighbours.
    pub fn share_keys<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        adverts: &[Advertised],
        verify: impl Fn(u32, &[u8], &[u8]) -> Result<(), ProtocolError>,
        rng: &mut R,
    ) -> Result<Vec<Sealed>, ProtocolError> {
        let neighbours: BTreeSet<u32> =
            self.ctx.graph.neighbours(self.index as usize).into_iter().map(|i| i as u32).collect();
        for a in adverts.iter().filter(|a| neighbours.contains(&a.index)) {
            let message = advert_message(self.ctx.round, a.index, &a.cipher_key, &a.mask_key);
            verify(a.index, &message, &a.signature)?;
            self.peers.insert(a.index, a.clone());
        }
        let t = self.ctx.threshold;
        if self.peers.len() < t {
            return Err(ProtocolError::TooFewNeighbours { got: self.peers.len(), threshold: t });
        }
        for peer in self.peers.values() {
            let key =
                self.cipher.agree(&peer.cipher_key, &[&self.ctx.pair(self.index, peer.index)])?;
            self.cipher_keys.insert(peer.index, key);
        }
        let points: Vec<u32> = self.peers.keys().map(|&v| v + 1).collect();
        let pairwise = shamir::split_at(&self.pairwise_seed, t, &points, rng);
        let own = shamir::split_at(&self.self_seed, t, &points, rng);
        let aad = self.ctx.aad();
        Ok(self
            .cipher_keys
            .iter()
            .zip(pairwise.iter().zip(&own))
            .map(|((&to, key), (s, b))| {
                let plain = [s.to_bytes(), b.to_bytes()].concat();
                Sealed {
                    from: self.index,
                    to,
                    ciphertext: keys::seal(key, self.index, to, &aad, &plain),
                }
            })
            .collect())
    }

    /// Step 3: opens the shares sent to it, and masks `input` (values mod 2^b) with its
    /// self-mask and the pairwise masks of the neighbours whose shares arrived.
    ///
    /// # Errors
    ///
    /// A share that does not open (tampered or misrouted), a sender that is not a neighbour,
    /// fewer than t neighbours' shares, a wrong input length, or a second call.
    pub fn masked_input(
        &mut self,
        shares: &[Sealed],
        input: &[u32],
    ) -> Result<Vec<u32>, ProtocolError> {
        if self.uploaded {
            return Err(ProtocolError::Order("masked input computed twice"));
        }
        if input.len() != self.ctx.len {
            return Err(ProtocolError::Length { expected: self.ctx.len, got: input.len() });
        }
        let aad = self.ctx.aad();
        for sealed in shares.iter().filter(|s| s.to == self.index) {
            let key = self
                .cipher_keys
                .get(&sealed.from)
                .ok_or(ProtocolError::NotNeighbour(sealed.from))?;
            let plain = keys::open(key, sealed.from, self.index, &aad, &sealed.ciphertext)?;
            let half = plain.len() / 2;
            let (s, b) = (Share::from_bytes(&plain[..half])?, Share::from_bytes(&plain[half..])?);
            if s.x != self.index + 1 || b.x != self.index + 1 {
                return Err(ShamirError::Malformed.into());
            }
            self.held.insert(sealed.from, (s, b));
        }
        if self.held.len() < self.ctx.threshold {
            return Err(ProtocolError::TooFewNeighbours {
                got: self.held.len(),
                threshold: self.ctx.threshold,
            });
        }
        let mut y = input.to_vec();
        masks::apply(&self.self_seed, Sign::Add, self.ctx.bits, &mut y);
        for &v in self.held.keys() {
            let peer = &self.peers[&v];
            let seed = self.mask.agree(&peer.mask_key, &[&self.ctx.pair(self.index, v)])?;
            masks::apply(&seed, pair_sign(self.index, v), self.ctx.bits, &mut y);
        }
        masks::reduce(&mut y, self.ctx.bits);
        self.uploaded = true;
        Ok(y)
    }

    /// Step 4: the shares asked for: the self-mask share of each surviving neighbour and the
    /// pairwise-key share of each dropped one, among the neighbours it holds shares of.
    ///
    /// # Errors
    ///
    /// Asked about one client as both survivor and dropped (now or in an earlier request), or
    /// told fewer survivors than the threshold (the coordinator could then learn an input).
    pub fn unmask(
        &mut self,
        survivors: &[u32],
        dropped: &[u32],
    ) -> Result<Vec<Revealed>, ProtocolError> {
        if !self.uploaded {
            return Err(ProtocolError::Order("unmask before the masked upload"));
        }
        if survivors.len() < self.ctx.threshold {
            return Err(ProtocolError::TooFewNeighbours {
                got: survivors.len(),
                threshold: self.ctx.threshold,
            });
        }
        let mut asked: BTreeMap<u32, SeedKind> = BTreeMap::new();
        let requests = survivors
            .iter()
            .map(|&u| (u, SeedKind::SelfMask))
            .chain(dropped.iter().map(|&u| (u, SeedKind::PairwiseKey)));
        for (u, kind) in requests {
            let earlier = asked.insert(u, kind).or_else(|| self.revealed.get(&u).copied());
            if earlier.is_some_and(|k| k != kind) {
                return Err(ProtocolError::BothShares(u));
            }
        }
        if asked.get(&self.index) == Some(&SeedKind::PairwiseKey) {
            return Err(ProtocolError::OwnPairwiseKey(self.index));
        }
        let mut out = Vec::new();
        for (u, kind) in asked {
            let Some((s, b)) = self.held.get(&u) else { continue };
            self.revealed.insert(u, kind);
            let share = if kind == SeedKind::SelfMask { *b } else { *s };
            out.push(Revealed { owner: u, kind, share });
        }
        Ok(out)
    }
}

/// The sign of u's pairwise mask with v: + when u < v.
fn pair_sign(u: u32, v: u32) -> Sign {
    if u < v { Sign::Add } else { Sign::Subtract }
}

/// The coordinator's side: sums masked uploads as they arrive and removes the masks.
#[derive(Debug)]
pub struct Unmasker {
    ctx: RoundContext,
    sum: crate::secagg::sum::WrappingSum,
    adverts: BTreeMap<u32, Advertised>,
    /// Clients whose shares were forwarded (U₂).
    sharers: BTreeSet<u32>,
    /// Clients whose masked upload was summed (U₃).
    uploaded: BTreeSet<u32>,
}

impl Unmasker {
    /// The unmasker of a round, given the adverts it forwarded and who shared keys.
    pub fn new(ctx: RoundContext, adverts: &[Advertised], sharers: &[u32]) -> Unmasker {
        let len = ctx.len;
        Unmasker {
            ctx,
            sum: crate::secagg::sum::WrappingSum::new(len),
            adverts: adverts.iter().map(|a| (a.index, a.clone())).collect(),
            sharers: sharers.iter().copied().collect(),
            uploaded: BTreeSet::new(),
        }
    }

    /// Adds one client's masked upload to the running sum (shared with the summing threads,
    /// not copied).
    ///
    /// # Errors
    ///
    /// A client that did not share keys, a second upload, or a wrong length.
    pub fn add(&mut self, index: u32, masked: Arc<Vec<u32>>) -> Result<(), ProtocolError> {
        if !self.sharers.contains(&index) {
            return Err(ProtocolError::NotNeighbour(index));
        }
        let got = masked.len();
        if got != self.ctx.len {
            return Err(ProtocolError::Length { expected: self.ctx.len, got });
        }
        if !self.uploaded.insert(index) {
            return Err(ProtocolError::Order("a second masked upload"));
        }
        self.sum.add(masked);
        Ok(())
    }

    /// U₃, ascending: the clients to name as survivors at unmasking.
    pub fn survivors(&self) -> Vec<u32> {
        self.uploaded.iter().copied().collect()
    }

    /// U₂ \ U₃, ascending: the clients to name as dropped.
    pub fn dropped(&self) -> Vec<u32> {
        self.sharers.difference(&self.uploaded).copied().collect()
    }

    /// The sum of the survivors' inputs mod 2^b, from the shares revealed at unmasking.
    ///
    /// # Errors
    ///
    /// Fewer than t shares of a seed that must be reconstructed, or inconsistent shares.
    pub fn finish(self, revealed: &[Revealed]) -> Result<Vec<u32>, ProtocolError> {
        let mut by_owner: BTreeMap<(u32, SeedKind), Vec<Share>> = BTreeMap::new();
        for r in revealed {
            by_owner.entry((r.owner, r.kind)).or_default().push(r.share);
        }
        let t = self.ctx.threshold;
        let mut take = |u: u32, kind: SeedKind| -> Result<Seed, ProtocolError> {
            let shares = by_owner.remove(&(u, kind)).unwrap_or_default();
            Ok(shamir::reconstruct(&shares, t)?)
        };
        // Every mask to remove, as (seed, sign): a few dozen bytes each, then one pass over
        // the sum per thread.
        let mut jobs: Vec<(Seed, Sign)> = Vec::new();
        for u in self.survivors() {
            jobs.push((take(u, SeedKind::SelfMask)?, Sign::Subtract));
        }
        for u in self.dropped() {
            let mask = AgreementKey::from_seed(&take(u, SeedKind::PairwiseKey)?, b"mask");
            for v in self.ctx.graph.neighbours(u as usize) {
                let v = v as u32;
                if !self.uploaded.contains(&v) {
                    continue;
                }
                let peer = self.adverts.get(&v).ok_or(ProtocolError::NotNeighbour(v))?;
                let seed = mask.agree(&peer.mask_key, &[&self.ctx.pair(u, v)])?;
                // v added its mask with u under v's sign: take it away.
                let sign = match pair_sign(v, u) {
                    Sign::Add => Sign::Subtract,
                    Sign::Subtract => Sign::Add,
                };
                jobs.push((seed, sign));
            }
        }
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let mut sum = self.sum.finish();
        masks::apply_many(&jobs, self.ctx.bits, &mut sum, threads);
        masks::reduce(&mut sum, self.ctx.bits);
        Ok(sum)
    }
}

#[cfg(test)]
mod tests;
