//! The ledger's in-memory view: every account, and the indexes a paid request reads in O(1)
//! (unsettled per user and token, per-model usage, the host's totals, what can be settled).

use std::collections::{HashMap, HashSet};

use alloy::primitives::{Address, B256, U256};

use super::records::{ModelUsage, PermitAccount, Totals};

/// What the ledger keeps in memory: the accounts, the next journal position, the permits that
/// already have their API key, and the indexes over them.
#[derive(Default)]
pub(super) struct State {
    pub(super) accounts: HashMap<B256, PermitAccount>,
    pub(super) next_seq: u64,
    pub(super) keyed: HashSet<B256>,
    pub(super) unsettled_by_user: HashMap<(Address, Address), U256>,
    pub(super) permits_by_user: HashMap<Address, Vec<B256>>,
    pub(super) usage_by_model: HashMap<B256, ModelUsage>,
    pub(super) settleable: HashSet<B256>,
    pub(super) totals: Totals,
}

impl State {
    /// Adds (`add` = true) or removes an account's share of every index.
    pub(super) fn index(&mut self, hash: B256, a: &PermitAccount, add: bool) {
        // a permit the contract refused will never be paid: it holds none of the user's funds
        let (unsettled, requests) =
            if a.rejected.is_some() { (U256::ZERO, 0) } else { (a.unsettled(), a.unsettled_requests()) };
        let key = (a.permit.user, a.permit.token);
        let u = self.unsettled_by_user.entry(key).or_default();
        let m = self.usage_by_model.entry(a.permit.model_id).or_default();
        if add {
            *u += unsettled;
            m.charged_amount += a.charged_amount;
            m.charged_requests += a.charged_requests;
            m.settled_amount += a.settled_amount;
            m.settled_requests += a.settled_requests;
            self.totals.unsettled_amount += unsettled;
            self.totals.unsettled_requests += requests;
            if a.settleable() {
                self.settleable.insert(hash);
            }
        } else {
            *u = u.saturating_sub(unsettled);
            m.charged_amount = m.charged_amount.saturating_sub(a.charged_amount);
            m.charged_requests = m.charged_requests.saturating_sub(a.charged_requests);
            m.settled_amount = m.settled_amount.saturating_sub(a.settled_amount);
            m.settled_requests = m.settled_requests.saturating_sub(a.settled_requests);
            self.totals.unsettled_amount = self.totals.unsettled_amount.saturating_sub(unsettled);
            self.totals.unsettled_requests = self.totals.unsettled_requests.saturating_sub(requests);
            self.settleable.remove(&hash);
        }
    }

    pub(super) fn insert(&mut self, hash: B256, a: PermitAccount) {
        self.permits_by_user.entry(a.permit.user).or_default().push(hash);
        self.usage_by_model.entry(a.permit.model_id).or_default().permits += 1;
        self.totals.permits += 1;
        self.index(hash, &a, true);
        self.accounts.insert(hash, a);
    }

    /// Changes an account through `f`, keeping the indexes in step; returns the account after.
    pub(super) fn update<R>(
        &mut self,
        hash: &B256,
        f: impl FnOnce(&mut PermitAccount) -> R,
    ) -> Option<(R, PermitAccount)> {
        let mut a = self.accounts.remove(hash)?;
        self.index(*hash, &a, false);
        let r = f(&mut a);
        self.index(*hash, &a, true);
        self.accounts.insert(*hash, a.clone());
        Some((r, a))
    }
}
