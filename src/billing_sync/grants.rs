//! The seam to prepaid credits: a paid checkout session carrying grant
//! metadata becomes a [`CheckoutGrant`], handed to whatever issues credit
//! grants (the credits service, wired in by `app`). Without one, such events
//! are acknowledged and not applied.

use async_trait::async_trait;

/// A credit grant asked for by a Stripe checkout session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutGrant {
    /// The checkout session id (`cs_...`): the grant's idempotent id.
    pub id: String,
    /// The meterd customer (`client_reference_id`, else `metadata.meterd_customer`).
    pub customer: String,
    /// `metadata.meterd_grant_meter`: a configured meter.
    pub meter: String,
    /// `metadata.meterd_grant_amount`: a positive decimal in meter units, as written.
    pub amount: String,
}

/// Why a grant could not be issued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantIssueError {
    /// The grant can never be made (an unknown meter, a bad amount, the same id
    /// with another body): acknowledged, not applied, not retried.
    #[error("grant refused: {0}")]
    Refused(String),
    /// A transient failure: the webhook answers 503 and Stripe retries.
    #[error("grant store unavailable: {0}")]
    Unavailable(String),
}

/// Issues credit grants. Issuing the same `id` again must change nothing
/// (`Ok(false)`): a webhook may be delivered more than once.
#[async_trait]
pub trait GrantIssuer: Send + Sync + 'static {
    /// Issues the grant; `Ok(true)` when it was created now, `Ok(false)` when
    /// a grant with this id and body already existed.
    async fn issue(&self, grant: CheckoutGrant) -> Result<bool, GrantIssueError>;
}
