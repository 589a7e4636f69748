//! The parts of Stripe events meterd acts on, read from the verified body:
//! subscriptions (`customer.subscription.created|updated|deleted`) and paid
//! checkout sessions carrying grant metadata. Everything else is `Other`.

use serde_json::Value;

/// Why a verified body cannot be read as a Stripe event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("{0}: missing or of the wrong type")]
    Field(&'static str),
}

/// One event, as far as meterd cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// `evt_...`: what "applied once" is keyed on.
    pub id: String,
    pub kind: String,
    /// Unix seconds: what orders one subscription's events.
    pub created: i64,
    pub body: EventBody,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventBody {
    Subscription(Subscription),
    Checkout(Checkout),
    Other,
}

/// A subscription object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    /// The Stripe customer (`cus_...`).
    pub stripe_customer: String,
    /// `metadata.meterd_customer`, when set.
    pub meterd_customer: Option<String>,
    pub status: String,
    /// The event was `customer.subscription.deleted`.
    pub deleted: bool,
    /// Each item's price: (`id`, `lookup_key`), in item order.
    pub prices: Vec<(Option<String>, Option<String>)>,
    /// Unix seconds.
    pub billing_cycle_anchor: Option<i64>,
}

/// A checkout session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    /// `cs_...`: the grant id.
    pub id: String,
    /// `client_reference_id`, else `metadata.meterd_customer`.
    pub customer: Option<String>,
    pub grant_meter: Option<String>,
    pub grant_amount: Option<String>,
    /// `paid`, `unpaid` or `no_payment_required`.
    pub payment_status: Option<String>,
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_string)
}

/// A field that is an id, or an expanded object with an `id`.
fn id_of(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("id").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// Reads a verified webhook body.
pub fn parse(body: &[u8]) -> Result<Event, EventError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| EventError::Json(e.to_string()))?;
    let id = text(&v, "id").ok_or(EventError::Field("id"))?;
    let kind = text(&v, "type").ok_or(EventError::Field("type"))?;
    let created = v.get("created").and_then(Value::as_i64).ok_or(EventError::Field("created"))?;
    let object = v.get("data").and_then(|d| d.get("object"));
    let body = match kind.as_str() {
        "customer.subscription.created" | "customer.subscription.updated" | "customer.subscription.deleted" => {
            let o = object.ok_or(EventError::Field("data.object"))?;
            EventBody::Subscription(subscription(o, kind == "customer.subscription.deleted")?)
        }
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let o = object.ok_or(EventError::Field("data.object"))?;
            let meta = o.get("metadata");
            let meta_text = |k: &str| meta.and_then(|m| text(m, k));
            EventBody::Checkout(Checkout {
                id: text(o, "id").ok_or(EventError::Field("data.object.id"))?,
                customer: text(o, "client_reference_id").or_else(|| meta_text("meterd_customer")),
                grant_meter: meta_text("meterd_grant_meter"),
                grant_amount: meta_text("meterd_grant_amount"),
                payment_status: text(o, "payment_status"),
            })
        }
        _ => EventBody::Other,
    };
    Ok(Event { id, kind, created, body })
}

fn subscription(o: &Value, deleted: bool) -> Result<Subscription, EventError> {
    let prices = o
        .get("items")
        .and_then(|i| i.get("data"))
        .and_then(Value::as_array)
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.get("price"))
                .map(|p| match p {
                    Value::String(id) => (Some(id.clone()), None),
                    p => (text(p, "id"), text(p, "lookup_key")),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(Subscription {
        id: text(o, "id").ok_or(EventError::Field("data.object.id"))?,
        stripe_customer: id_of(o.get("customer")).ok_or(EventError::Field("data.object.customer"))?,
        meterd_customer: o.get("metadata").and_then(|m| text(m, "meterd_customer")).filter(|c| !c.is_empty()),
        status: text(o, "status").ok_or(EventError::Field("data.object.status"))?,
        deleted,
        prices,
        billing_cycle_anchor: o.get("billing_cycle_anchor").and_then(Value::as_i64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_subscription_event_is_read_with_an_expanded_customer() {
        let body = json!({"id": "evt_1", "type": "customer.subscription.updated", "created": 5,
            "data": {"object": {"id": "sub_1", "customer": {"id": "cus_1", "object": "customer"}, "status": "trialing",
                "billing_cycle_anchor": 1700000000, "metadata": {"meterd_customer": "u_1"},
                "items": {"data": [{"price": {"id": "price_a", "lookup_key": null}}, {"price": {"id": "price_b", "lookup_key": "pro"}}]}}}});
        let e = parse(body.to_string().as_bytes()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((e.id.as_str(), e.created), ("evt_1", 5));
        let EventBody::Subscription(s) = e.body else { panic!("not a subscription: {:?}", e.body) };
        assert_eq!((s.id.as_str(), s.stripe_customer.as_str(), s.meterd_customer.as_deref()), ("sub_1", "cus_1", Some("u_1")));
        assert_eq!(s.prices, vec![(Some("price_a".into()), None), (Some("price_b".into()), Some("pro".into()))]);
        assert_eq!((s.status.as_str(), s.deleted, s.billing_cycle_anchor), ("trialing", false, Some(1_700_000_000)));
    }

    #[test]
    fn a_checkout_session_takes_the_customer_from_the_reference_or_the_metadata() {
        let body = |reference: Value| {
            json!({"id": "evt_2", "type": "checkout.session.completed", "created": 6,
                "data": {"object": {"id": "cs_1", "client_reference_id": reference, "payment_status": "paid",
                    "metadata": {"meterd_customer": "from_meta", "meterd_grant_meter": "ai_tokens", "meterd_grant_amount": "1000"}}}})
            .to_string()
        };
        let read = |b: String| match parse(b.as_bytes()).map(|e| e.body) {
            Ok(EventBody::Checkout(c)) => c,
            other => panic!("{other:?}"),
        };
        let c = read(body(json!("from_ref")));
        assert_eq!((c.id.as_str(), c.customer.as_deref()), ("cs_1", Some("from_ref")));
        assert_eq!((c.grant_meter.as_deref(), c.grant_amount.as_deref()), (Some("ai_tokens"), Some("1000")));
        assert_eq!(read(body(Value::Null)).customer.as_deref(), Some("from_meta"));
    }

    #[test]
    fn other_types_and_bad_bodies() {
        let other = json!({"id": "evt_3", "type": "invoice.paid", "created": 7, "data": {"object": {}}}).to_string();
        assert_eq!(parse(other.as_bytes()).map(|e| e.body), Ok(EventBody::Other));
        assert!(matches!(parse(b"{not json"), Err(EventError::Json(_))));
        assert_eq!(parse(br#"{"type": "x", "created": 1}"#), Err(EventError::Field("id")));
        let no_customer = json!({"id": "e", "type": "customer.subscription.created", "created": 1,
            "data": {"object": {"id": "sub", "status": "active"}}})
        .to_string();
        assert_eq!(parse(no_customer.as_bytes()), Err(EventError::Field("data.object.customer")));
    }
}
