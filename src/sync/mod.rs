//! Background tasks that keep instances in step through Redis: entitlement
//! changes (`entitlements`) and global window counters (`counters`).

pub mod counters;
pub mod entitlements;
