//! Tests of one SecAgg+ round: masks cancel under random graphs and dropouts, uploads look
//! uniform, honest clients refuse both shares, substituted keys fail.

use super::*;
use crate::secagg::graph;
use proptest::prelude::*;
use rand::{RngExt, SeedableRng};

/// When a client vanishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Vanish {
    Never,
    BeforeSharing,
    AfterSharing,
    AfterUpload,
}

struct Outcome {
    result: Result<Vec<u32>, ProtocolError>,
    expected: Vec<u32>,
    /// Whether every seed the coordinator needs has t responding holders.
    recoverable: bool,
    masked: Vec<Vec<u32>>,
}

fn identities(n: usize) -> Vec<SigningKey> {
    (0..n).map(|i| SigningKey::from_seed(&[i as u8 + 1; 32])).collect()
}

/// Runs one round over `drops.len()` clients with inputs mod 2^bits.
fn run(drops: &[Vanish], k: usize, t: usize, bits: u32, len: usize, seed: u64) -> Outcome {
    let n = drops.len();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(seed);
    let ctx = RoundContext {
        round: 7,
        bits,
        len,
        threshold: t,
        graph: graph::Graph::new(n, k, seed ^ 0x5eed),
    };
    let ids = identities(n);
    let public: Vec<[u8; 32]> = ids.iter().map(SigningKey::public).collect();
    let mask = masks::modulus_mask(bits);
    let inputs: Vec<Vec<u32>> =
        (0..n).map(|_| (0..len).map(|_| rng.random::<u32>() & mask).collect()).collect();
    let mut clients = Vec::new();
    let mut adverts = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let (c, a) = Client::new(ctx.clone(), i as u32, id, &mut rng);
        clients.push(c);
        adverts.push(a);
    }
    let alive = |i: usize, after: Vanish| drops[i] == Vanish::Never || drops[i] > after;
    let mut sealed = Vec::new();
    let mut sharers = Vec::new();
    for (i, client) in clients.iter_mut().enumerate() {
        if !alive(i, Vanish::BeforeSharing) {
            continue;
        }
        if let Ok(s) = client.share_keys(
            &adverts,
            super::ed25519(|j| public.get(j as usize).copied()),
            &mut rng,
        ) {
            sealed.extend(s);
            sharers.push(i as u32);
        }
    }
    let mut unmasker = Unmasker::new(ctx.clone(), &adverts, &sharers);
    let mut masked = Vec::new();
    for &i in &sharers {
        let i = i as usize;
        if !alive(i, Vanish::AfterSharing) {
            continue;
        }
        let forwarded: Vec<Sealed> =
            sealed.iter().filter(|s| sharers.contains(&s.from)).cloned().collect();
        if let Ok(y) = clients[i].masked_input(&forwarded, &inputs[i]) {
            unmasker.add(i as u32, std::sync::Arc::new(y.clone())).unwrap();
            masked.push(y);
        }
    }
    let (survivors, dropped) = (unmasker.survivors(), unmasker.dropped());
    let mut revealed = Vec::new();
    let mut responders = BTreeSet::new();
    for &i in &survivors {
        if drops[i as usize] == Vanish::AfterUpload {
            continue;
        }
        if let Ok(r) = clients[i as usize].unmask(&survivors, &dropped) {
            responders.insert(i);
            revealed.extend(r);
        }
    }
    let holders = |u: u32| {
        ctx.graph
            .neighbours(u as usize)
            .into_iter()
            .filter(|&v| responders.contains(&(v as u32)) && clients[v].held.contains_key(&u))
            .count()
    };
    let recoverable = survivors.iter().chain(&dropped).all(|&u| holders(u) >= t);
    let mut expected = vec![0u32; len];
    for &i in &survivors {
        crate::secagg::sum::add_wrapping(&mut expected, &inputs[i as usize]);
    }
    masks::reduce(&mut expected, bits);
    Outcome { result: unmasker.finish(&revealed), expected, recoverable, masked }
}

fn drop_strategy() -> impl Strategy<Value = Vanish> {
    prop_oneof![
        6 => Just(Vanish::Never),
        1 => Just(Vanish::BeforeSharing),
        1 => Just(Vanish::AfterSharing),
        1 => Just(Vanish::AfterUpload),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Masks cancel exactly: whenever every needed seed has t responding holders, the unmasked
    /// sum is the survivors' inputs summed mod 2^b, for random graphs and dropout patterns.
    #[test]
    fn masks_cancel_for_random_graphs_and_dropouts(
        drops in proptest::collection::vec(drop_strategy(), 4..16),
        k_half in 1usize..5,
        bits in prop_oneof![Just(8u32), Just(16), Just(20), Just(32)],
        seed in any::<u64>(),
    ) {
        let n = drops.len();
        let k = (2 * k_half).min(n - 1);
        let t = (k / 2 + 1).min(k);
        let out = run(&drops, k, t, bits, 37, seed);
        if out.recoverable {
            prop_assert_eq!(out.result.expect("recoverable"), out.expected);
        } else {
            prop_assert!(out.result.is_err(), "an unrecoverable round must not produce a sum");
        }
    }
}

#[test]
fn ten_clients_with_thirty_percent_dropped_across_phases_sum_exactly() {
    let mut drops = vec![Vanish::Never; 10];
    drops[1] = Vanish::BeforeSharing;
    drops[4] = Vanish::AfterSharing;
    drops[8] = Vanish::AfterUpload;
    let p = graph::choose(10, &graph::Assumptions::default());
    let out = run(&drops, p.k, 5, 16, 1000, 11);
    assert!(out.recoverable);
    assert_eq!(out.result.unwrap(), out.expected);
}

/// One client's masked upload, seen alone, is uniform mod 2^b: a chi-square test over 64
/// buckets of 64 000 coordinates (the input itself is constant, so any leak would show).
#[test]
fn a_masked_upload_alone_is_indistinguishable_from_uniform() {
    let out = run(&[Vanish::Never; 5], 4, 3, 16, 64_000, 5);
    let buckets = 64usize;
    for y in &out.masked[..2] {
        let mut counts = vec![0f64; buckets];
        for &v in y {
            counts[(v as usize * buckets) >> 16] += 1.0;
        }
        let e = y.len() as f64 / buckets as f64;
        let chi2: f64 = counts.iter().map(|c| (c - e).powi(2) / e).sum();
        // 63 degrees of freedom: the 99.99th percentile is about 116.
        assert!(chi2 < 116.0, "chi-square {chi2}");
    }
}

fn ready_clients(n: usize) -> (Vec<Client>, Vec<Advertised>, Vec<[u8; 32]>, Vec<Sealed>) {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(2);
    let ctx = RoundContext {
        round: 1,
        bits: 16,
        len: 4,
        threshold: 3,
        graph: graph::Graph::new(n, n - 1, 1),
    };
    let ids = identities(n);
    let public: Vec<[u8; 32]> = ids.iter().map(SigningKey::public).collect();
    let (mut clients, mut adverts) = (Vec::new(), Vec::new());
    for (i, id) in ids.iter().enumerate() {
        let (c, a) = Client::new(ctx.clone(), i as u32, id, &mut rng);
        clients.push(c);
        adverts.push(a);
    }
    let mut sealed = Vec::new();
    for c in &mut clients {
        sealed.extend(
            c.share_keys(&adverts, super::ed25519(|j| public.get(j as usize).copied()), &mut rng)
                .unwrap(),
        );
    }
    (clients, adverts, public, sealed)
}

/// A coordinator that asks an honest client for both shares of one peer gets neither, in one
/// request or across two.
#[test]
fn an_honest_client_never_reveals_both_shares_of_one_peer() {
    let (mut clients, _, _, sealed) = ready_clients(5);
    let c = &mut clients[0];
    assert!(matches!(c.unmask(&[0, 1, 2], &[]), Err(ProtocolError::Order(_))), "before upload");
    c.masked_input(&sealed, &[1, 2, 3, 4]).unwrap();
    // Fewer survivors named than the threshold: the coordinator could learn an input.
    assert!(matches!(c.unmask(&[0, 1], &[]), Err(ProtocolError::TooFewNeighbours { .. })));
    assert_eq!(c.unmask(&[0, 1, 2, 3], &[3]), Err(ProtocolError::BothShares(3)));
    // Its own pairwise-key seed would unmask its own upload.
    assert_eq!(c.unmask(&[1, 2, 3], &[0]), Err(ProtocolError::OwnPairwiseKey(0)));
    let first = c.unmask(&[0, 1, 2], &[3]).unwrap();
    assert!(first.iter().any(|r| r.owner == 3 && r.kind == SeedKind::PairwiseKey));
    assert_eq!(c.unmask(&[0, 1, 2, 3], &[]), Err(ProtocolError::BothShares(3)));
}

/// A public key substituted by the coordinator fails the signature check.
#[test]
fn a_substituted_public_key_fails_the_signature_check() {
    let (clients, mut adverts, public, _) = ready_clients(4);
    let evil = AgreementKey::from_seed(&[9; 32], b"mask");
    adverts[2].mask_key = evil.public();
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(3);
    let mut fresh =
        Client::new(clients[0].ctx.clone(), 0, &SigningKey::from_seed(&[1; 32]), &mut rng).0;
    assert_eq!(
        fresh.share_keys(&adverts, super::ed25519(|j| public.get(j as usize).copied()), &mut rng),
        Err(ProtocolError::Key(KeyError::Signature))
    );
}
