//! What is sent: the scenario (which operations, how many events per request)
//! and a pool of request shapes drawn once before the run, so the hot loop only
//! cycles through them and the generator stays cheap.

use crate::dist::Distribution;
use crate::rng::Rng;
use std::fmt;

/// One load scenario; the names are the command-line names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// `POST /v1/events` with one event per request.
    IngestSingle,
    /// `POST /v1/events` with a JSON array of `size` events.
    IngestBatch { size: usize },
    /// `POST /v1/check` without consuming.
    Check,
    /// `POST /v1/check` with `consume: true` (a fresh id each time).
    CheckConsume,
    /// `check_percent` % plain checks, the rest single-event ingests.
    Mixed { check_percent: u32 },
}

/// Why a scenario name or parameter was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioError {
    #[error("unknown scenario {0:?} (ingest-single, ingest-batch, check, check-consume, mixed)")]
    Unknown(String),
    #[error("batch size must be 1..=100000 (got {0})")]
    BadSize(usize),
    #[error("check percent must be 0..=100 (got {0})")]
    BadPercent(u32),
}

impl Scenario {
    pub fn parse(name: &str, size: usize, check_percent: u32) -> Result<Scenario, ScenarioError> {
        let s = match name {
            "ingest-single" => Scenario::IngestSingle,
            "ingest-batch" => {
                if !(1..=100_000).contains(&size) {
                    return Err(ScenarioError::BadSize(size));
                }
                Scenario::IngestBatch { size }
            }
            "check" => Scenario::Check,
            "check-consume" => Scenario::CheckConsume,
            "mixed" => {
                if check_percent > 100 {
                    return Err(ScenarioError::BadPercent(check_percent));
                }
                Scenario::Mixed { check_percent }
            }
            other => return Err(ScenarioError::Unknown(other.to_string())),
        };
        Ok(s)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Scenario::IngestSingle => "ingest-single",
            Scenario::IngestBatch { .. } => "ingest-batch",
            Scenario::Check => "check",
            Scenario::CheckConsume => "check-consume",
            Scenario::Mixed { .. } => "mixed",
        }
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scenario::IngestBatch { size } => write!(f, "ingest-batch-{size}"),
            Scenario::Mixed { check_percent } => write!(f, "mixed-{check_percent}"),
            other => f.write_str(other.name()),
        }
    }
}

/// The operation one request performs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    Ingest,
    Check,
    Consume,
}

/// One request: its operation and the customer rank of each event (one for checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    pub kind: OpKind,
    pub customers: Vec<u64>,
}

/// The pool of shapes a run cycles through.
#[derive(Debug, Clone)]
pub struct Workload {
    pub scenario: Scenario,
    pub shapes: Vec<Shape>,
}

/// About this many customer draws go into a pool (at least `MIN_SHAPES` shapes).
const POOL_DRAWS: usize = 65_536;
const MIN_SHAPES: usize = 64;

impl Workload {
    pub fn build(scenario: Scenario, dist: &Distribution, seed: u64) -> Workload {
        let mut rng = Rng::new(seed);
        let per_request = match scenario {
            Scenario::IngestBatch { size } => size,
            _ => 1,
        };
        let count = (POOL_DRAWS / per_request).max(MIN_SHAPES);
        let shapes = (0..count)
            .map(|i| {
                let kind = match scenario {
                    Scenario::IngestSingle | Scenario::IngestBatch { .. } => OpKind::Ingest,
                    Scenario::Check => OpKind::Check,
                    Scenario::CheckConsume => OpKind::Consume,
                    // Deterministic interleaving: exactly check_percent % of every 100 shapes.
                    Scenario::Mixed { check_percent } => {
                        if ((i % 100) as u32) < check_percent {
                            OpKind::Check
                        } else {
                            OpKind::Ingest
                        }
                    }
                };
                Shape { kind, customers: (0..per_request).map(|_| dist.sample(&mut rng)).collect() }
            })
            .collect::<Vec<_>>();
        let mut shapes = shapes;
        // Spread checks and ingests evenly rather than in runs of 80 and 20.
        if let Scenario::Mixed { .. } = scenario {
            let n = shapes.len();
            for i in 0..n {
                let j = rng.below(n as u64) as usize;
                shapes.swap(i, j);
            }
        }
        Workload { scenario, shapes }
    }

    /// Events a shape carries (0 for a plain check; a consume records one).
    pub fn events(shape: &Shape) -> u64 {
        match shape.kind {
            OpKind::Ingest => shape.customers.len() as u64,
            OpKind::Consume => 1,
            OpKind::Check => 0,
        }
    }
}

/// A customer name from a rank.
pub fn customer_name(rank: u64) -> String {
    format!("c{rank}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenarios_parse_and_print() {
        assert_eq!(Scenario::parse("ingest-batch", 1000, 80).unwrap().to_string(), "ingest-batch-1000");
        assert_eq!(Scenario::parse("mixed", 1, 80).unwrap(), Scenario::Mixed { check_percent: 80 });
        assert_eq!(Scenario::parse("ingest-batch", 0, 80), Err(ScenarioError::BadSize(0)));
        assert_eq!(Scenario::parse("mixed", 1, 101), Err(ScenarioError::BadPercent(101)));
        assert!(matches!(Scenario::parse("nope", 1, 1), Err(ScenarioError::Unknown(_))));
    }

    #[test]
    fn mixed_pool_has_the_requested_share_of_checks() {
        let d = Distribution::uniform(100).unwrap();
        let w = Workload::build(Scenario::Mixed { check_percent: 80 }, &d, 1);
        let checks = w.shapes.iter().filter(|s| s.kind == OpKind::Check).count();
        let share = checks as f64 / w.shapes.len() as f64;
        assert!((share - 0.8).abs() < 0.01, "{share}");
        // Shuffled: the first 100 are not simply 80 checks then 20 ingests.
        assert!(w.shapes[80..100].iter().any(|s| s.kind == OpKind::Check));
    }

    #[test]
    fn batch_shapes_carry_size_events() {
        let d = Distribution::uniform(10).unwrap();
        let w = Workload::build(Scenario::IngestBatch { size: 1000 }, &d, 1);
        assert!(w.shapes.len() >= MIN_SHAPES);
        assert!(w.shapes.iter().all(|s| s.customers.len() == 1000 && Workload::events(s) == 1000));
    }
}
