//! Redis key names, built in one place so the layout in `redis`'s module doc
//! (and docs/operations.md) is the only layout there is.

use crate::model::WindowKind;

/// Builds keys under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys { prefix: prefix.to_string() }
    }

    /// `P{C}:ent`: a customer's entitlements hash.
    pub fn entitlements(&self, customer: &str) -> String {
        format!("{}{{{customer}}}:ent", self.prefix)
    }

    /// `P{index}:customers`: the set of customers with stored entitlements.
    pub fn entitlements_index(&self) -> String {
        format!("{}{{index}}:customers", self.prefix)
    }

    /// The customer id inside an entitlements key, if it is one.
    pub fn customer_of(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(&self.prefix)?.strip_prefix('{')?;
        let customer = rest.strip_suffix("}:ent")?;
        Some(customer.to_string())
    }

    /// `P{C}:w:<meter>:<window>:<start_ms>`: one window's totals.
    pub fn window(&self, customer: &str, meter: &str, kind: WindowKind, start_ms: i64) -> String {
        format!("{}{{{customer}}}:w:{meter}:{}:{start_ms}", self.prefix, kind.as_str())
    }

    /// `P{C}:w:<meter>:<window>:<start_ms>:u`: the distinct values (hex
    /// hashes) of a `unique_count` window, all instances' (issue 25).
    pub fn unique_set(&self, customer: &str, meter: &str, kind: WindowKind, start_ms: i64) -> String {
        format!("{}:u", self.window(customer, meter, kind, start_ms))
    }

    /// `Pid:<hex>`: an event id claimed by some instance.
    pub fn event_id(&self, id_hash: u128) -> String {
        format!("{}id:{id_hash:032x}", self.prefix)
    }

    // Prepaid credits and grants (issue 18).
    /// One customer's grants: a hash, field = grant id, value = the JSON document.
    pub fn grants(&self, customer: &str) -> String {
        format!("{}{{{customer}}}:grants", self.prefix)
    }

    /// The index set of customers with grants.
    pub fn grants_index(&self) -> String {
        format!("{}{{index}}:grant_customers", self.prefix)
    }

    /// A counter bumped on every grant change (instances reload when it moves).
    pub fn grants_version(&self) -> String {
        format!("{}{{index}}:grants_version", self.prefix)
    }

    /// One customer's credit usage of `meter`: per-instance fields and `t`.
    pub fn credits(&self, customer: &str, meter: &str) -> String {
        format!("{}{{{customer}}}:credits:{meter}", self.prefix)
    }

    // Reservations across instances (issue 19).
    /// `P{C}:r:<id>`: one reservation (a hash: meter, quantity, status, ...).
    pub fn reservation(&self, customer: &str, id: &str) -> String {
        format!("{}{{{customer}}}:r:{id}", self.prefix)
    }

    /// `Pres:<id>`: the customer a reservation id belongs to (settle, release
    /// and get name only the id).
    pub fn reservation_owner(&self, id: &str) -> String {
        format!("{}res:{id}", self.prefix)
    }

    /// `P{C}:held:<meter>`: what the customer's reservations hold of `meter`
    /// over all instances (`t`) and the version of that total (`v`).
    pub fn held(&self, customer: &str, meter: &str) -> String {
        format!("{}{{{customer}}}:held:{meter}", self.prefix)
    }

    /// `P{C}:rl:created`: the customer's reservations by when they were taken
    /// (a sorted set; member: the id, score: created ms), for listing.
    pub fn reservations_by_created(&self, customer: &str) -> String {
        format!("{}{{{customer}}}:rl:created", self.prefix)
    }

    /// `P{C}:rl:end`: the same reservations by when their records expire
    /// (score: ms, `+inf` for a held allocation): members past it are dropped
    /// from both sets, and both keys expire with the last record.
    pub fn reservations_by_end(&self, customer: &str) -> String {
        format!("{}{{{customer}}}:rl:end", self.prefix)
    }

    /// `P{index}:hold_expiry`: reservations by expiry (a sorted set; member: the
    /// JSON `[customer, meter, id]`, score: `expires_at` ms).
    pub fn hold_expiry(&self) -> String {
        format!("{}{{index}}:hold_expiry", self.prefix)
    }

    /// `Palive`: present while Redis keeps its data (see `sync::counters`).
    pub fn alive(&self) -> String {
        format!("{}alive", self.prefix)
    }

    /// The channel entitlement changes are announced on.
    pub fn entitlements_channel(&self) -> String {
        format!("{}entitlements", self.prefix)
    }

    // Stripe subscription sync (issue 20): one slot (`{stripe}`) so the
    // ledger script may touch an event and its subscription together.
    /// `P{stripe}:evt:<id>`: a Stripe event being or having been applied.
    pub fn stripe_event(&self, event_id: &str) -> String {
        format!("{}{{stripe}}:evt:{event_id}", self.prefix)
    }

    /// `P{stripe}:sub:<id>`: the `created` of the newest event applied to a subscription.
    pub fn stripe_subscription(&self, subscription_id: &str) -> String {
        format!("{}{{stripe}}:sub:{subscription_id}", self.prefix)
    }

    /// An instance's field in a window hash.
    pub fn instance_field(instance_id: &str) -> String {
        format!("i:{instance_id}")
    }
}

/// Window keys expire this long after their window ends.
const EXPIRY_GRACE_MS: i64 = 3_600_000;

/// The end of a window, for its Redis key's expiry (0: never expires).
pub fn expire_at(key: &crate::counters::CounterKey) -> i64 {
    match key.kind {
        WindowKind::Total => 0,
        WindowKind::BillingCycle => key.start_ms.saturating_add(31 * 86_400_000 + EXPIRY_GRACE_MS),
        kind => kind.bounds(key.start_ms, Default::default()).end_ms.saturating_add(EXPIRY_GRACE_MS),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn customer_keys_share_a_hash_tag() {
        let keys = Keys::new("m:");
        assert_eq!(keys.entitlements("u_42"), "m:{u_42}:ent");
        assert_eq!(keys.window("u_42", "calls", WindowKind::Day, 86_400_000), "m:{u_42}:w:calls:day:86400000");
        assert_eq!(keys.customer_of("m:{u_42}:ent").as_deref(), Some("u_42"));
        assert_eq!(keys.customer_of("m:{u_42}:w:calls:day:0"), None);
        assert_eq!(keys.customer_of("other:{u_42}:ent"), None);
        assert_eq!(keys.reservation("u_42", "iv-1"), "m:{u_42}:r:iv-1");
        assert_eq!(keys.held("u_42", "calls"), "m:{u_42}:held:calls");
        assert_eq!(keys.reservations_by_created("u_42"), "m:{u_42}:rl:created");
        assert_eq!(keys.reservations_by_end("u_42"), "m:{u_42}:rl:end");
        assert_eq!(keys.event_id(255), "m:id:000000000000000000000000000000ff");
    }
}
