//! The store's side of a secure-aggregation round (SecAgg+, `fedretail_core::secagg`): it
//! checks the round's parameters against its task, advertises signed keys, shares its seeds
//! with its neighbours, masks its quantised update, and reveals only the shares the protocol
//! allows. Under secure aggregation nothing but masked integers leaves the store for a round.

use super::Participant;
use crate::identity::StoreSigner;
use crate::policy::Refusal;
use crate::transport::{AdvertisePlan, Enrollment, MaskedPlan, Transport, TransportError};
use fedretail_core::privacy::Contribution;
use fedretail_core::secagg::ddg::{Calibrated, Encoder};
use fedretail_core::secagg::protocol::{Advertised, Client, Identity, ProtocolError};
use fedretail_core::secagg::round::task_noise;
use rand::{CryptoRng, Rng};
use std::collections::BTreeMap;

/// One round's protocol state.
#[derive(Debug)]
pub(super) struct SecureRound {
    round_id: u64,
    client: Client,
    /// Simulated dropout: the step from which this store stays silent in this round.
    vanish: Option<Step>,
}

/// A step of the protocol after advertising keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Step {
    Share,
    Upload,
    Unmask,
}

/// How long a vanished store waits before polling again (the coordinator keeps offering it the
/// step it did not take until the step's deadline).
const SILENCE: std::time::Duration = std::time::Duration::from_millis(500);

fn protocol(e: impl std::fmt::Display) -> TransportError {
    TransportError::Protocol(format!("secure aggregation: {e}"))
}

impl<T: Transport> Participant<T> {
    /// Step 1: checks the round against the task, makes and signs the round's keys.
    pub(super) async fn advertise(
        &mut self,
        e: &Enrollment,
        plan: AdvertisePlan,
    ) -> Result<(), TransportError> {
        let checked = match &e.spec {
            Some(spec) if spec.plan.secure_aggregation.is_on() => match self.store_noise(e).await {
                Ok(noise) => plan.params.check(spec, noise.as_ref()),
                Err(message) => Err(message),
            },
            _ => Err("the task does not use secure aggregation".into()),
        };
        if let Err(message) = checked {
            let refusal = Refusal { rule: "secure_aggregation", message };
            return Err(self.refuse(e, plan.round_id, refusal));
        }
        let index = plan.index as usize;
        if plan.cohort.len() != plan.params.graph.n || plan.cohort.get(index) != Some(&e.client_id)
        {
            return Err(protocol("this client is not at its index in the cohort"));
        }
        if self.signer.is_none() {
            let key = self.transport.tls().map(|t| t.key_pem.as_slice());
            self.signer = Some(StoreSigner::new(key).map_err(protocol)?);
        }
        let signer = self.signer.as_ref().expect("set above");
        let ctx = plan.params.context(plan.round_id);
        let mut rng = fedretail_core::privacy::noise::os_seeded();
        let (client, advert) = Client::new(ctx, plan.index, signer, &mut rng);
        let bare_key = signer.bare_key();
        let vanish = self.vanish(plan.round_id);
        self.secure = Some(SecureRound { round_id: plan.round_id, client, vanish });
        self.transport.advertise_keys(e, plan.round_id, advert, bare_key).await
    }

    /// The discrete Gaussian this store's task asks of it, by its own calibration (once per
    /// task: a fraction of a second of accounting, off the reactor).
    pub(super) async fn store_noise(
        &mut self,
        e: &Enrollment,
    ) -> Result<Option<Calibrated>, String> {
        if let Some((task, noise)) = &self.store_noise
            && *task == e.task_id
        {
            return Ok(*noise);
        }
        let spec = e.spec.clone().ok_or("the coordinator sent no task spec")?;
        let noise = tokio::task::spawn_blocking(move || task_noise(&spec))
            .await
            .expect("calibration panicked")?;
        self.store_noise = Some((e.task_id, noise));
        Ok(noise)
    }

    /// Simulated dropout: whether, and from which step, this store vanishes from a round
    /// (drawn from the store's name and the round, so runs repeat).
    fn vanish(&self, round_id: u64) -> Option<Step> {
        use rand::{RngExt, SeedableRng};
        if self.config.dropout <= 0.0 {
            return None;
        }
        let seed = fedretail_core::model::mf::user_seed(&self.config.store_name) ^ round_id;
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
        (rng.random::<f64>() < self.config.dropout)
            .then(|| [Step::Share, Step::Upload, Step::Unmask][rng.random_range(0..3)])
    }

    /// Simulated dropout: true (after a pause) when the store is silent from `step` on.
    pub(super) async fn vanished(&self, round_id: u64, step: Step) -> bool {
        let silent = self
            .secure
            .as_ref()
            .is_some_and(|s| s.round_id == round_id && s.vanish.is_some_and(|v| v <= step));
        if silent {
            tokio::time::sleep(SILENCE).await;
        }
        silent
    }

    fn round(&mut self, round_id: u64) -> Result<&mut Client, TransportError> {
        match self.secure.as_mut() {
            Some(s) if s.round_id == round_id => Ok(&mut s.client),
            _ => Err(protocol(format!("no keys for round {round_id}"))),
        }
    }

    /// Step 2: verifies the neighbours' signatures and sends them sealed shares.
    pub(super) async fn share_keys(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        adverts: Vec<(Advertised, Identity)>,
    ) -> Result<(), TransportError> {
        if self.vanished(round_id, Step::Share).await {
            return Ok(());
        }
        let identities: BTreeMap<u32, Identity> =
            adverts.iter().map(|(a, id)| (a.index, id.clone())).collect();
        let adverts: Vec<Advertised> = adverts.into_iter().map(|(a, _)| a).collect();
        let ca = self.transport.tls().map(|t| t.ca_pem.clone());
        let verify = |i: u32, message: &[u8], signature: &[u8]| {
            let id = identities.get(&i).ok_or(ProtocolError::NotNeighbour(i))?;
            crate::identity::verify(ca.as_deref(), id, message, signature)
        };
        let mut rng = fedretail_core::privacy::noise::os_seeded();
        let sealed =
            self.round(round_id)?.share_keys(&adverts, verify, &mut rng).map_err(protocol)?;
        self.transport.share_keys(e, round_id, sealed).await
    }

    /// Step 3's encoding and masking of a clipped update: quantised, noised with the round's
    /// discrete Gaussian, masked. Under conditional rounding (β > 0) each unit is rounded on
    /// its own: a customer sum (`per_customer`) customer by customer, so that one customer
    /// moves the store's integers by at most the bound the noise was calibrated for.
    pub(super) fn mask<R: Rng + CryptoRng + ?Sized>(
        &mut self,
        round_id: u64,
        plan: &MaskedPlan,
        update: &Contribution,
        per_customer: bool,
        rng: &mut R,
    ) -> Result<Vec<u32>, TransportError> {
        let p = &plan.params;
        let values = update.values();
        if values.len() != p.input_len {
            return Err(protocol(format!(
                "the update has {} values, the round {}",
                values.len(),
                p.input_len
            )));
        }
        let encoder = Encoder::new(p.ddg, p.rotation_seed, p.input_len);
        let encoded = if per_customer && p.ddg.beta > 0.0 {
            let mut sum = vec![0i64; encoder.padded_len()];
            let mut dense = vec![0f32; p.input_len];
            for part in update.parts() {
                dense.iter_mut().for_each(|v| *v = 0.0);
                for &(i, v) in part {
                    let slot = dense.get_mut(i as usize).ok_or_else(|| protocol("coordinate"))?;
                    *slot = v as f32;
                }
                for (s, r) in sum.iter_mut().zip(encoder.round(&dense, rng)) {
                    *s += r;
                }
            }
            encoder.finish(&sum, rng)
        } else {
            encoder.encode(values, rng)
        };
        self.round(round_id)?.masked_input(&plan.shares, &encoded).map_err(protocol)
    }

    /// Step 4: reveals the shares asked for, never both of one neighbour.
    pub(super) async fn unmask(
        &mut self,
        e: &Enrollment,
        round_id: u64,
        survivors: &[u32],
        dropped: &[u32],
    ) -> Result<(), TransportError> {
        if self.vanished(round_id, Step::Unmask).await {
            return Ok(());
        }
        let revealed = self.round(round_id)?.unmask(survivors, dropped).map_err(protocol)?;
        self.transport.unmask(e, round_id, revealed).await
    }
}
