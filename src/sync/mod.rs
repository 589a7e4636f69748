//! Keeping instances in step through Redis: entitlement changes
//! (`entitlements`), global window counters (`counters`), and loading a
//! customer on first sight (`customer`).

pub mod counters;
pub mod customer;
pub mod entitlements;
pub mod gauges;
pub mod leases;
// Unique counts (issue 25): distinct values through Redis sets.
pub mod unique;
