//! Stripe reporting: metered totals of closed periods go to Stripe as meter
//! events, exactly once in total, whatever fails.
//!
//! * [`plan`] decides, without I/O, what one meter needs: per (customer, closed
//!   period) the stored total (whole units) minus the ledger is the delta to
//!   send, with a deterministic identifier per delta;
//! * [`client`] speaks Stripe (v1 form events, v2 session + stream, cancels) and
//!   sorts its answers into retry / already reported / refused / bad key;
//! * [`reporter`] is the background task: lease, plan, send, ledger;
//! * [`lease`] keeps it to one reporter across instances (fencing tokens);
//! * [`status`] is what `GET /v1/stripe/status` shows.
//!
//! The ledger lives in the usage store (`LedgerStore`), next to the totals.

pub mod client;
pub mod lease;
pub mod plan;
pub mod reporter;
pub mod status;

pub use client::{ClientError, StripeClient};
pub use lease::{Lease, LeaseError, LocalLease, RedisLease};
pub use reporter::{ReportError, Reporter};
pub use status::StatusBoard;
