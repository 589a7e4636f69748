//! meterd: a usage-metering daemon. See DESIGN.md for the architecture.

pub mod config;
pub mod counters;
pub mod duration;
pub mod model;
