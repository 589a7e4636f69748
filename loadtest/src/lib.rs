//! The meterd load generator as a library, so its logic (samplers, schedules,
//! summaries) is unit-tested and the `meterd-loadtest` binary stays thin.
//!
//! One generator drives every target (meterd, the bare-hyper ceiling, the
//! PostgreSQL row-per-user design, the naive Redis design and Limitador) with the same
//! scenarios, connection counts and customer distributions, so the figures of
//! one run compare.

pub mod cli;
pub mod dist;
pub mod http;
pub mod pg;
pub mod procstat;
pub mod redis_target;
pub mod rng;
pub mod runner;
pub mod soak;
pub mod stats;
pub mod summary;
pub mod target;
pub mod workload;
pub mod wrk;
