//! The domain model: quantities, meters, windows, plans and entitlements. Depends on
//! nothing else in the crate, so every layer above can share it.

pub mod answer;
mod answer_json;
// Prepaid credits and grants (issue 18).
pub mod grant;
pub mod meter;
pub mod plan;
pub mod quantity;
// Threshold notifications (issue 17).
pub mod thresholds;
pub mod window;

pub use answer::{CheckAnswer, LimitView, LimitViews, Reason};
pub use meter::{Aggregation, Meter, MeterId};
pub use plan::{Catalog, Enforcement, Entitlements, EntitlementsDoc, Limit, LimitAmount, Plan, SpecProblem};
pub use quantity::{Decimal, QuantityError};
pub use thresholds::Thresholds;
pub use window::{BillingAnchor, Window, WindowKind};
