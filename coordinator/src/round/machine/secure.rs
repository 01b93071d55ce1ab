//! A round's secure-aggregation state: who advertised keys, the sealed shares routed between
//! neighbours, the running masked sum and the revealed shares. Pure, like the machine.
//!
//! The coordinator only routes: it cannot open a sealed share (AES-256-GCM under a key the two
//! stores agreed), cannot forge a store's advert (signed with the key of the store's
//! certificate, which its neighbours verify), and
//! never holds a store's masked upload beyond adding it into the one running sum
//! ([`Unmasker`]).

use super::Reject;
use crate::round::{Advertised, Identity, MaskedTrain, Revealed, Sealed, SecureSummary};
use fedretail_core::ids::ClientId;
use fedretail_core::secagg::protocol::{ProtocolError, RoundContext, Unmasker};
use fedretail_core::secagg::round::RoundParams;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The secure-aggregation half of a round.
#[derive(Debug)]
pub(crate) struct Secure {
    pub(crate) params: Arc<RoundParams>,
    /// The protocol's view of the round (its graph built once).
    ctx: RoundContext,
    /// The cohort in index order.
    cohort: Arc<Vec<ClientId>>,
    index: BTreeMap<ClientId, u32>,
    adverts: BTreeMap<u32, (Advertised, Identity)>,
    /// Sealed shares by recipient.
    inbox: BTreeMap<u32, Vec<Sealed>>,
    sharers: BTreeSet<u32>,
    unmasker: Option<Unmasker>,
    survivors: Vec<u32>,
    responded: BTreeSet<u32>,
    revealed: Vec<Revealed>,
    /// The round's parameters and its drops so far, as status shows them.
    summary: SecureSummary,
}

fn refuse(e: ProtocolError) -> Reject {
    Reject::Malformed(e.to_string())
}

impl Secure {
    pub(crate) fn new(params: RoundParams, round: u64, cohort: &BTreeSet<ClientId>) -> Secure {
        let cohort: Vec<ClientId> = cohort.iter().copied().collect();
        let index = cohort.iter().enumerate().map(|(i, c)| (*c, i as u32)).collect();
        let summary = SecureSummary {
            cohort: cohort.len() as u32,
            bits: params.ddg.bits,
            degree: params.graph.k as u32,
            threshold: params.graph.t as u32,
            ..SecureSummary::default()
        };
        Secure {
            ctx: params.context(round),
            params: Arc::new(params),
            cohort: Arc::new(cohort),
            index,
            adverts: BTreeMap::new(),
            inbox: BTreeMap::new(),
            sharers: BTreeSet::new(),
            unmasker: None,
            survivors: Vec::new(),
            responded: BTreeSet::new(),
            revealed: Vec::new(),
            summary,
        }
    }

    pub(crate) fn index(&self, client: ClientId) -> Option<u32> {
        self.index.get(&client).copied()
    }

    pub(crate) fn client(&self, index: u32) -> ClientId {
        self.cohort[index as usize]
    }

    pub(crate) fn cohort(&self) -> &Arc<Vec<ClientId>> {
        &self.cohort
    }

    pub(crate) fn advertised(&self) -> usize {
        self.adverts.len()
    }

    pub(crate) fn has_advertised(&self, client: ClientId) -> bool {
        self.index(client).is_some_and(|i| self.adverts.contains_key(&i))
    }

    pub(crate) fn has_shared(&self, client: ClientId) -> bool {
        self.index(client).is_some_and(|i| self.sharers.contains(&i))
    }

    pub(crate) fn shared(&self) -> usize {
        self.sharers.len()
    }

    /// Step 1: a cohort member's advert. Its signature is checked by its neighbours, not here:
    /// the coordinator is who the signature protects against.
    pub(crate) fn advertise(
        &mut self,
        client: ClientId,
        advert: Advertised,
        identity: Identity,
    ) -> Result<(), Reject> {
        let i = self.index(client).ok_or(Reject::NotInCohort(client))?;
        if advert.index != i {
            return Err(Reject::Malformed(format!(
                "the advert names index {}, the client's is {i}",
                advert.index
            )));
        }
        if self.adverts.contains_key(&i) {
            return Err(Reject::Duplicate(client));
        }
        self.adverts.insert(i, (advert, identity));
        Ok(())
    }

    /// What `client` needs for step 2: its advertising neighbours' keys.
    pub(crate) fn neighbour_adverts(&self, client: ClientId) -> Vec<(Advertised, Identity)> {
        let Some(i) = self.index(client) else { return Vec::new() };
        self.ctx
            .graph
            .neighbours(i as usize)
            .into_iter()
            .filter_map(|v| self.adverts.get(&(v as u32)).cloned())
            .collect()
    }

    /// Step 2: a client's sealed shares, one per neighbour, held for their recipients.
    pub(crate) fn share(&mut self, client: ClientId, sealed: Vec<Sealed>) -> Result<(), Reject> {
        let i = self.index(client).ok_or(Reject::NotInCohort(client))?;
        if !self.adverts.contains_key(&i) {
            return Err(Reject::WrongPhase {
                phase: "Sharing (no keys advertised)",
                request: "shares",
            });
        }
        if self.sharers.contains(&i) {
            return Err(Reject::Duplicate(client));
        }
        let mut seen = BTreeSet::new();
        for s in &sealed {
            let fits = s.from == i
                && self.ctx.graph.adjacent(i as usize, s.to as usize)
                && self.adverts.contains_key(&s.to)
                && seen.insert(s.to);
            if !fits {
                return Err(Reject::Malformed(format!(
                    "a share from {} to {} is not between advertised neighbours",
                    s.from, s.to
                )));
            }
        }
        if sealed.len() < self.params.graph.t {
            return Err(refuse(ProtocolError::TooFewNeighbours {
                got: sealed.len(),
                threshold: self.params.graph.t,
            }));
        }
        for s in sealed {
            self.inbox.entry(s.to).or_default().push(s);
        }
        self.sharers.insert(i);
        Ok(())
    }

    /// Closes sharing: the clients that shared are the ones that may upload.
    pub(crate) fn close_sharing(&mut self) -> BTreeSet<ClientId> {
        let n = self.cohort.len() as u32;
        self.summary.dropped_before_advertising = n - self.adverts.len() as u32;
        self.summary.dropped_before_sharing = (self.adverts.len() - self.sharers.len()) as u32;
        let adverts: Vec<Advertised> = self.adverts.values().map(|(a, _)| a.clone()).collect();
        let sharers: Vec<u32> = self.sharers.iter().copied().collect();
        // Shares from clients that did not finish sharing are never delivered.
        for list in self.inbox.values_mut() {
            list.retain(|s| self.sharers.contains(&s.from));
        }
        self.unmasker = Some(Unmasker::new(self.ctx.clone(), &adverts, &sharers));
        sharers.iter().map(|&i| self.client(i)).collect()
    }

    /// What `client` needs for step 3.
    pub(crate) fn masked_train(&self, client: ClientId) -> Option<MaskedTrain> {
        let index = self.index(client)?;
        Some(MaskedTrain {
            params: self.params.clone(),
            index,
            shares: self.inbox.get(&index).cloned().unwrap_or_default(),
        })
    }

    /// Step 3: a masked upload, added into the running sum at once.
    pub(crate) fn add(&mut self, client: ClientId, values: Vec<u32>) -> Result<(), Reject> {
        let i = self.index(client).ok_or(Reject::NotInCohort(client))?;
        let unmasker = self
            .unmasker
            .as_mut()
            .ok_or(Reject::WrongPhase { phase: "Sharing", request: "masked uploads" })?;
        unmasker.add(i, Arc::new(values)).map_err(refuse)
    }

    /// Closes uploads: who is a survivor and who dropped.
    pub(crate) fn close_uploads(&mut self) {
        let unmasker = self.unmasker.as_ref().expect("uploads close after sharing");
        self.survivors = unmasker.survivors();
        self.summary.dropped_before_upload = unmasker.dropped().len() as u32;
    }

    /// What a survivor is asked at step 4; `None` for anyone else or who answered.
    pub(crate) fn unmask_request(&self, client: ClientId) -> Option<(Vec<u32>, Vec<u32>)> {
        let i = self.index(client)?;
        if !self.survivors.contains(&i) || self.responded.contains(&i) {
            return None;
        }
        let unmasker = self.unmasker.as_ref()?;
        Some((self.survivors.clone(), unmasker.dropped()))
    }

    /// Step 4: a survivor's revealed shares.
    pub(crate) fn reveal(
        &mut self,
        client: ClientId,
        revealed: Vec<Revealed>,
    ) -> Result<(), Reject> {
        let i = self.index(client).ok_or(Reject::NotInCohort(client))?;
        if !self.survivors.contains(&i) {
            return Err(Reject::NotInCohort(client));
        }
        if !self.responded.insert(i) {
            return Err(Reject::Duplicate(client));
        }
        let graph = &self.ctx.graph;
        // Only shares a neighbour can hold count: nobody adds shares of clients it is not
        // connected to.
        self.revealed.extend(
            revealed
                .into_iter()
                .filter(|r| graph.adjacent(i as usize, r.owner as usize) && r.share.x == i + 1),
        );
        Ok(())
    }

    pub(crate) fn summary(&self) -> SecureSummary {
        self.summary
    }

    pub(crate) fn all_responded(&self) -> bool {
        self.responded.len() == self.survivors.len()
    }

    /// The unmasker and the shares to finish it with (the heavy part runs off the reactor).
    pub(crate) fn take(&mut self) -> (Unmasker, Vec<Revealed>) {
        self.summary.dropped_before_unmasking =
            (self.survivors.len() - self.responded.len()) as u32;
        (
            self.unmasker.take().expect("taken once, after uploads"),
            std::mem::take(&mut self.revealed),
        )
    }
}
