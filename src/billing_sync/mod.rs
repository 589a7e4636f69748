//! Stripe subscription sync (webhooks in): `POST /v1/webhooks/stripe` is
//! verified ([`signature`]), read ([`event`]) and applied here, so that a plan
//! bought, changed or cancelled in Stripe is the customer's plan in meterd
//! without anyone copying it, and a paid checkout session can add credits
//! ([`grants`]).
//!
//! A subscription event sets the customer's plan (its first item whose price
//! id or lookup_key is mapped in `[stripe.webhooks.plans]`, or the default
//! plan once the subscription has ended), `stripe_customer_id` and
//! `billing_anchor`, keeping overrides and features. It goes through the same
//! path as `PUT /v1/customers/{c}/entitlements`, so every instance has it
//! within a second. Each event id is applied once, and a subscription's older
//! event never undoes a newer one, across restarts and instances
//! ([`crate::store::stripe_events`]).

pub mod customers;
pub mod event;
pub mod grants;
pub mod signature;

pub use grants::{CheckoutGrant, GrantIssueError, GrantIssuer};

use crate::config::StripeWebhookSettings;
use crate::engine::Engine;
use crate::entitlements::EntitlementsError;
use crate::store::stripe_events::{Claim, Ordering, StripeEventLedger};
use crate::store::StoreError;
use event::{Checkout, Event, EventBody, Subscription};
use std::sync::{Arc, OnceLock};

/// Why a webhook was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// `400 invalid_signature`.
    #[error(transparent)]
    Signature(#[from] signature::SignatureError),
    /// A verified body that is not a Stripe event (`400`).
    #[error(transparent)]
    Event(#[from] event::EventError),
    /// Another request is applying this event right now (`503`: Stripe retries).
    #[error("event {0} is being applied by another request")]
    InFlight(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Entitlements(#[from] EntitlementsError),
    #[error(transparent)]
    Grant(#[from] GrantIssueError),
}

/// What became of one delivered event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// Applied before (a retry or a replay).
    Duplicate,
    /// Older than an event already applied to the same subscription.
    Stale,
    /// Nothing to do: another type, an unknown customer, an unmapped price,
    /// a checkout without grant metadata, no grant issuer.
    Ignored,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Duplicate => "duplicate",
            Outcome::Stale => "stale",
            Outcome::Ignored => "ignored",
        }
    }
}

/// The webhook receiver: settings, the applied-events ledger, and the grant
/// issuer when credits are wired in.
pub struct StripeWebhooks {
    settings: StripeWebhookSettings,
    ledger: Arc<dyn StripeEventLedger>,
    grants: OnceLock<Arc<dyn GrantIssuer>>,
}

/// The plan a subscription gives, if it says anything: `Some(None)` is the
/// default plan.
fn plan_for(settings: &StripeWebhookSettings, sub: &Subscription) -> Option<Option<String>> {
    if sub.deleted {
        return Some(None);
    }
    match sub.status.as_str() {
        "active" | "trialing" | "past_due" => sub
            .prices
            .iter()
            .find_map(|(id, lookup_key)| {
                let mapped = |key: &Option<String>| key.as_ref().and_then(|k| settings.plans.get(k));
                mapped(id).or_else(|| mapped(lookup_key))
            })
            .map(|plan| Some(plan.clone())),
        "canceled" | "unpaid" | "incomplete_expired" | "paused" => Some(None),
        // `incomplete`: the first payment has not gone through yet; wait for
        // the update that follows it.
        _ => None,
    }
}

fn valid_customer(name: &str) -> bool {
    !name.is_empty() && name.len() <= 256 && !name.chars().any(char::is_control)
}

impl StripeWebhooks {
    pub fn new(settings: StripeWebhookSettings, ledger: Arc<dyn StripeEventLedger>) -> StripeWebhooks {
        StripeWebhooks { settings, ledger, grants: OnceLock::new() }
    }

    /// Wires in the credits service; false if one was set already.
    pub fn set_grant_issuer(&self, issuer: Arc<dyn GrantIssuer>) -> bool {
        self.grants.set(issuer).is_ok()
    }

    /// Verifies, reads and applies one delivery.
    pub async fn receive(&self, engine: &Arc<Engine>, body: &[u8], header: Option<&str>, now_ms: i64) -> Result<Outcome, WebhookError> {
        let tolerance = i64::try_from(self.settings.tolerance.as_secs()).unwrap_or(i64::MAX);
        let verified = signature::verify(header, body, self.settings.secret.expose(), tolerance, now_ms.div_euclid(1000));
        if let Err(e) = verified {
            crate::telemetry::stripe_webhook("invalid_signature");
            return Err(e.into());
        }
        let event = match event::parse(body) {
            Ok(event) => event,
            Err(e) => {
                crate::telemetry::stripe_webhook("failed");
                tracing::warn!(error = %e, "a signed Stripe webhook body is not an event");
                return Err(e.into());
            }
        };
        let outcome = match &event.body {
            EventBody::Subscription(sub) => self.subscription(engine, &event, sub, now_ms).await,
            EventBody::Checkout(checkout) => self.checkout(&event, checkout, now_ms).await,
            EventBody::Other => Ok(Outcome::Ignored),
        };
        let label = outcome.as_ref().map(|o| o.as_str()).unwrap_or("failed");
        crate::telemetry::stripe_webhook(label);
        match &outcome {
            Ok(o) => tracing::info!(event = %event.id, kind = %event.kind, outcome = o.as_str(), "stripe webhook"),
            Err(e) => tracing::warn!(event = %event.id, kind = %event.kind, error = %e, "stripe webhook not applied; Stripe retries it"),
        }
        outcome
    }

    /// The meterd customer of a subscription: its metadata, else the customer
    /// whose `stripe_customer_id` it is.
    async fn customer_for(&self, engine: &Engine, sub: &Subscription) -> Result<Option<String>, WebhookError> {
        if let Some(name) = &sub.meterd_customer {
            return Ok(Some(name.clone()));
        }
        let all = engine.entitlements().store().list().await?;
        let mut found = all.into_iter().filter(|(_, doc)| doc.stripe_customer_id.as_deref() == Some(sub.stripe_customer.as_str()));
        let first = found.next().map(|(name, _)| name);
        if let (Some(first), Some((other, _))) = (&first, found.next()) {
            tracing::warn!(stripe_customer = %sub.stripe_customer, chosen = %first, also = %other, "several customers have this stripe_customer_id; using the first by name");
        }
        Ok(first)
    }

    async fn subscription(&self, engine: &Arc<Engine>, event: &Event, sub: &Subscription, now_ms: i64) -> Result<Outcome, WebhookError> {
        let Some(plan) = plan_for(&self.settings, sub) else {
            tracing::warn!(event = %event.id, subscription = %sub.id, status = %sub.status, "no plan to set: the status waits for a later event, or no item's price id or lookup_key is in [stripe.webhooks.plans]");
            return Ok(Outcome::Ignored);
        };
        let Some(name) = self.customer_for(engine, sub).await?.filter(|n| valid_customer(n)) else {
            tracing::warn!(event = %event.id, stripe_customer = %sub.stripe_customer, "no meterd customer for this subscription (set metadata.meterd_customer, or stripe_customer_id in the entitlements)");
            return Ok(Outcome::Ignored);
        };
        let order = Ordering { subscription: sub.id.clone(), created: event.created };
        match self.ledger.claim(&event.id, Some(&order), now_ms).await? {
            Claim::Apply => {}
            Claim::Duplicate => return Ok(Outcome::Duplicate),
            Claim::Stale => return Ok(Outcome::Stale),
            Claim::InFlight => return Err(WebhookError::InFlight(event.id.clone())),
        }
        match self.set_plan(engine, &name, plan, sub).await {
            Ok(()) => {
                self.ledger.finish(&event.id, Some(&order), now_ms).await?;
                Ok(Outcome::Applied)
            }
            Err(e) => {
                if let Err(release) = self.ledger.release(&event.id, Some(&order)).await {
                    tracing::warn!(event = %event.id, error = %release, "could not release a failed claim; it is taken over after a minute");
                }
                Err(e)
            }
        }
    }

    /// The PUT path: read what is stored, change plan, Stripe id and anchor,
    /// store and announce it (every instance within a second).
    async fn set_plan(&self, engine: &Arc<Engine>, name: &str, plan: Option<String>, sub: &Subscription) -> Result<(), WebhookError> {
        engine.ensure_customer(name).await;
        let mut doc = engine.entitlements().store().get(name).await?.unwrap_or_default();
        doc.plan = plan;
        doc.stripe_customer_id = Some(sub.stripe_customer.clone());
        if let Some(anchor) = sub.billing_cycle_anchor {
            doc.billing_anchor = Some(crate::model::window::rfc3339(anchor.saturating_mul(1000)));
        }
        engine.backfill_ports().set_entitlements(name, doc).await?;
        Ok(())
    }

    async fn checkout(&self, event: &Event, checkout: &Checkout, now_ms: i64) -> Result<Outcome, WebhookError> {
        let (Some(meter), Some(amount)) = (&checkout.grant_meter, &checkout.grant_amount) else {
            return Ok(Outcome::Ignored); // Not a credits purchase.
        };
        if !matches!(checkout.payment_status.as_deref(), None | Some("paid" | "no_payment_required")) {
            tracing::info!(event = %event.id, session = %checkout.id, "checkout not paid yet; the grant waits for checkout.session.async_payment_succeeded");
            return Ok(Outcome::Ignored);
        }
        let Some(customer) = checkout.customer.clone().filter(|c| valid_customer(c)) else {
            tracing::warn!(event = %event.id, session = %checkout.id, "checkout grant without a customer (client_reference_id or metadata.meterd_customer)");
            return Ok(Outcome::Ignored);
        };
        let Some(issuer) = self.grants.get() else {
            tracing::warn!(event = %event.id, session = %checkout.id, "checkout grant received but no credits service is wired in; not applied");
            return Ok(Outcome::Ignored);
        };
        match self.ledger.claim(&event.id, None, now_ms).await? {
            Claim::Apply => {}
            Claim::Duplicate | Claim::Stale => return Ok(Outcome::Duplicate),
            Claim::InFlight => return Err(WebhookError::InFlight(event.id.clone())),
        }
        let grant = CheckoutGrant { id: checkout.id.clone(), customer, meter: meter.clone(), amount: amount.clone() };
        match issuer.issue(grant).await {
            Ok(created) => {
                self.ledger.finish(&event.id, None, now_ms).await?;
                Ok(if created { Outcome::Applied } else { Outcome::Duplicate })
            }
            Err(GrantIssueError::Refused(reason)) => {
                tracing::warn!(event = %event.id, session = %checkout.id, reason = %reason, "checkout grant refused");
                self.ledger.finish(&event.id, None, now_ms).await?;
                Ok(Outcome::Ignored)
            }
            Err(e) => {
                if let Err(release) = self.ledger.release(&event.id, None).await {
                    tracing::warn!(event = %event.id, error = %release, "could not release a failed claim; it is taken over after a minute");
                }
                Err(e.into())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SecretKey;

    fn settings() -> StripeWebhookSettings {
        StripeWebhookSettings {
            secret_env: "X".into(),
            secret: SecretKey::new("whsec_x".into()),
            tolerance: std::time::Duration::from_secs(300),
            plans: [("price_pro".to_string(), "pro".to_string()), ("team_monthly".to_string(), "team".to_string())].into(),
        }
    }

    fn sub(status: &str, prices: &[(Option<&str>, Option<&str>)]) -> Subscription {
        Subscription {
            id: "sub".into(),
            stripe_customer: "cus".into(),
            meterd_customer: None,
            status: status.into(),
            deleted: false,
            prices: prices.iter().map(|(a, b)| (a.map(str::to_string), b.map(str::to_string))).collect(),
            billing_cycle_anchor: None,
        }
    }

    #[test]
    fn statuses_map_to_the_first_mapped_price_or_the_default_plan() {
        let s = settings();
        let items = [(Some("price_unknown"), None), (Some("price_other"), Some("team_monthly")), (Some("price_pro"), None)];
        for status in ["active", "trialing", "past_due"] {
            assert_eq!(plan_for(&s, &sub(status, &items)), Some(Some("team".into())), "{status}: first mapped item, by lookup_key");
        }
        assert_eq!(plan_for(&s, &sub("active", &[(Some("price_pro"), Some("team_monthly"))])), Some(Some("pro".into())), "id first");
        assert_eq!(plan_for(&s, &sub("active", &[(Some("price_unknown"), None)])), None, "nothing mapped: unchanged");
        for status in ["canceled", "unpaid", "incomplete_expired", "paused"] {
            assert_eq!(plan_for(&s, &sub(status, &items)), Some(None), "{status}: default plan");
        }
        assert_eq!(plan_for(&s, &sub("incomplete", &items)), None, "incomplete waits");
        let deleted = Subscription { deleted: true, ..sub("active", &items) };
        assert_eq!(plan_for(&s, &deleted), Some(None), "deleted: default plan whatever the status says");
    }
}
