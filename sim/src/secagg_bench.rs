//! `fedretail-sim bench secagg`: one SecAgg+ round with the distributed discrete Gaussian,
//! in process (the protocol's pure functions, no transport), timing each client's compute and
//! the coordinator's.

use fedretail_core::secagg::ddg::{DdgParams, Encoder, rational_variance};
use fedretail_core::secagg::graph::{self, Assumptions, Graph};
use fedretail_core::secagg::keys::SigningKey;
use fedretail_core::secagg::protocol::{Advertised, Client, RoundContext, Sealed, Unmasker};
use rand::{RngExt, SeedableRng};
use tokio::time::Instant;

/// What the bench measures, printed as JSON.
#[derive(Debug, serde::Serialize)]
pub struct SecaggBench {
    /// Clients in the cohort.
    pub clients: usize,
    /// Parameters of an update.
    pub params: usize,
    /// Padded dimension D (power of two, for the rotation).
    pub padded: usize,
    /// Fraction of the cohort that vanished after sharing keys.
    pub dropout: f64,
    /// Clients dropped.
    pub dropped: usize,
    /// Bits per coordinate.
    pub bits: u32,
    /// Neighbours per client.
    pub k: usize,
    /// Shamir threshold.
    pub t: usize,
    /// Whether the graph bounds hold at these parameters (σ = 40, η = 20).
    pub bounds_hold: bool,
    /// Median over clients of one client's compute in the round: keys, shares, DDG encoding
    /// (rotation, rounding, noise), masking, unmasking.
    pub client_seconds: f64,
    /// Of which the DDG encoding.
    pub client_encode_seconds: f64,
    /// The coordinator's compute: summing the masked uploads, reconstructing seeds, removing
    /// masks, decoding.
    pub coordinator_seconds: f64,
    /// Bytes one client sends (advert, sealed shares, masked upload packed to b bits, revealed
    /// shares).
    pub bytes_per_client: usize,
    /// Those bytes over a plain float32 upload of the parameters.
    pub expansion: f64,
    /// Whether the unmasked sum equals the survivors' quantised inputs summed mod 2^b.
    pub sum_exact: bool,
}

/// Runs the bench.
///
/// # Errors
///
/// A protocol failure (which would be a bug at these parameters).
pub fn run(clients: usize, params: usize, dropout: f64, bits: u32) -> anyhow::Result<SecaggBench> {
    let mut rng = rand::rngs::ChaCha20Rng::seed_from_u64(1);
    let assumptions = Assumptions { dropout: dropout.max(0.1), ..Assumptions::default() };
    let gp = graph::choose(clients, &assumptions);
    let ctx = RoundContext {
        round: 1,
        bits,
        len: DdgParams::padded(params),
        threshold: gp.t,
        graph: Graph::new(clients, gp.k, 99),
    };
    let ddg = DdgParams {
        bits,
        gamma: 1e-3,
        clip: 1.0,
        beta: (-0.5f64).exp(),
        sigma2: rational_variance(100.0),
    };
    let encoder = Encoder::new(ddg, 7, params);
    let ids: Vec<SigningKey> =
        (0..clients).map(|i| SigningKey::from_seed(&[(i % 251) as u8 + 1; 32])).collect();
    let public: Vec<[u8; 32]> = ids.iter().map(SigningKey::public).collect();
    let mut times = vec![0.0f64; clients];
    let mut encode_times = vec![0.0f64; clients];
    let mut bytes = vec![0usize; clients];
    let mut parties: Vec<Client> = Vec::with_capacity(clients);
    let mut adverts: Vec<Advertised> = Vec::with_capacity(clients);
    for (i, id) in ids.iter().enumerate() {
        let t = Instant::now();
        let (c, a) = Client::new(ctx.clone(), i as u32, id, &mut rng);
        times[i] += t.elapsed().as_secs_f64();
        bytes[i] += 4 + 32 + 32 + 64;
        parties.push(c);
        adverts.push(a);
    }
    let mut sealed: Vec<Sealed> = Vec::new();
    let lookup = |j: u32| public.get(j as usize).copied();
    for (i, c) in parties.iter_mut().enumerate() {
        let t = Instant::now();
        let s =
            c.share_keys(&adverts, fedretail_core::secagg::protocol::ed25519(lookup), &mut rng)?;
        times[i] += t.elapsed().as_secs_f64();
        bytes[i] += s.iter().map(|s| 8 + s.ciphertext.len()).sum::<usize>();
        sealed.extend(s);
    }
    let n_drop = ((clients as f64) * dropout).round() as usize;
    let mut order: Vec<usize> = (0..clients).collect();
    rand::seq::SliceRandom::shuffle(&mut order[..], &mut rng);
    let dropped: std::collections::BTreeSet<usize> = order[..n_drop].iter().copied().collect();
    let sharers: Vec<u32> = (0..clients as u32).collect();
    let mut by_receiver: Vec<Vec<Sealed>> = vec![Vec::new(); clients];
    for s in sealed {
        by_receiver[s.to as usize].push(s);
    }
    let mut coordinator = 0.0;
    let mut unmasker = Unmasker::new(ctx.clone(), &adverts, &sharers);
    let mask = fedretail_core::secagg::masks::modulus_mask(bits);
    let mut expected = vec![0u32; ctx.len];
    for (i, c) in parties.iter_mut().enumerate() {
        if dropped.contains(&i) {
            continue;
        }
        let x: Vec<f32> = (0..params).map(|_| (rng.random::<f32>() - 0.5) * 2e-3).collect();
        let t = Instant::now();
        let input = encoder.encode(&x, &mut rng);
        encode_times[i] = t.elapsed().as_secs_f64();
        let y = c.masked_input(&by_receiver[i], &input)?;
        times[i] += t.elapsed().as_secs_f64();
        bytes[i] += (ctx.len * bits as usize).div_ceil(8);
        fedretail_core::secagg::sum::add_wrapping(&mut expected, &input);
        let t = Instant::now();
        unmasker.add(i as u32, std::sync::Arc::new(y))?;
        coordinator += t.elapsed().as_secs_f64();
    }
    expected.iter_mut().for_each(|v| *v &= mask);
    let (survivors, gone) = (unmasker.survivors(), unmasker.dropped());
    let mut revealed = Vec::new();
    for &i in &survivors {
        let t = Instant::now();
        let r = parties[i as usize].unmask(&survivors, &gone)?;
        times[i as usize] += t.elapsed().as_secs_f64();
        bytes[i as usize] += r.len() * (4 + 1 + 68);
        revealed.extend(r);
    }
    let t = Instant::now();
    let sum = unmasker.finish(&revealed)?;
    let decoded = fedretail_core::secagg::ddg::decode(&sum, &ddg, 7, params);
    coordinator += t.elapsed().as_secs_f64();
    std::hint::black_box(decoded);
    let live: Vec<f64> = (0..clients).filter(|i| !dropped.contains(i)).map(|i| times[i]).collect();
    let live_encode: Vec<f64> =
        (0..clients).filter(|i| !dropped.contains(i)).map(|i| encode_times[i]).collect();
    let live_bytes: Vec<usize> =
        (0..clients).filter(|i| !dropped.contains(i)).map(|i| bytes[i]).collect();
    let per_client = live_bytes.iter().sum::<usize>() / live_bytes.len().max(1);
    Ok(SecaggBench {
        clients,
        params,
        padded: ctx.len,
        dropout,
        dropped: n_drop,
        bits,
        k: gp.k,
        t: gp.t,
        bounds_hold: gp.meets,
        client_seconds: crate::bench::median(&live),
        client_encode_seconds: crate::bench::median(&live_encode),
        coordinator_seconds: coordinator,
        bytes_per_client: per_client,
        expansion: per_client as f64 / (params as f64 * 4.0),
        sum_exact: sum == expected,
    })
}
