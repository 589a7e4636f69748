//! Which customer each generated event or check is for: uniform over N
//! customers, or Zipf (a few customers carry most of the traffic, as in real
//! SaaS usage, which stresses hot rows in PostgreSQL and hot keys elsewhere).

use crate::rng::Rng;

/// A customer distribution over ranks `0..n`.
#[derive(Debug, Clone)]
pub enum Distribution {
    Uniform {
        n: u64,
    },
    /// Zipf with exponent `s`: P(rank k) ∝ 1 / (k + 1)^s. Sampled exactly by
    /// binary search in the precomputed cumulative distribution.
    Zipf {
        cdf: Vec<f64>,
    },
}

/// Why a distribution could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DistError {
    #[error("the number of customers must be at least 1")]
    NoCustomers,
    #[error("zipf exponent must be finite and > 0 (got {0})")]
    BadExponent(f64),
    #[error("unknown distribution {0:?} (uniform or zipf)")]
    Unknown(String),
}

impl Distribution {
    pub fn uniform(n: u64) -> Result<Distribution, DistError> {
        if n == 0 {
            return Err(DistError::NoCustomers);
        }
        Ok(Distribution::Uniform { n })
    }

    pub fn zipf(n: u64, s: f64) -> Result<Distribution, DistError> {
        if n == 0 {
            return Err(DistError::NoCustomers);
        }
        if !s.is_finite() || s <= 0.0 {
            return Err(DistError::BadExponent(s));
        }
        let mut cdf = Vec::with_capacity(n as usize);
        let mut total = 0.0;
        for k in 1..=n {
            total += 1.0 / (k as f64).powf(s);
            cdf.push(total);
        }
        for c in &mut cdf {
            *c /= total;
        }
        // Guard against rounding leaving the last entry below 1.
        if let Some(last) = cdf.last_mut() {
            *last = 1.0;
        }
        Ok(Distribution::Zipf { cdf })
    }

    /// `uniform` or `zipf` by name.
    pub fn by_name(name: &str, n: u64, s: f64) -> Result<Distribution, DistError> {
        match name {
            "uniform" => Distribution::uniform(n),
            "zipf" => Distribution::zipf(n, s),
            other => Err(DistError::Unknown(other.to_string())),
        }
    }

    pub fn customers(&self) -> u64 {
        match self {
            Distribution::Uniform { n } => *n,
            Distribution::Zipf { cdf } => cdf.len() as u64,
        }
    }

    /// A rank in `0..customers()`; rank 0 is the most frequent under Zipf.
    pub fn sample(&self, rng: &mut Rng) -> u64 {
        match self {
            Distribution::Uniform { n } => rng.below(*n),
            Distribution::Zipf { cdf } => {
                let u = rng.next_f64();
                let i = cdf.partition_point(|&c| c <= u);
                i.min(cdf.len() - 1) as u64
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frequencies(d: &Distribution, draws: usize) -> Vec<f64> {
        let mut counts = vec![0u64; d.customers() as usize];
        let mut rng = Rng::new(42);
        for _ in 0..draws {
            counts[d.sample(&mut rng) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    #[test]
    fn zipf_matches_its_probabilities() {
        let n = 100u64;
        let d = Distribution::zipf(n, 1.0).unwrap();
        let h: f64 = (1..=n).map(|k| 1.0 / k as f64).sum();
        let f = frequencies(&d, 1_000_000);
        for k in [0usize, 1, 2, 9, 99] {
            let expected = 1.0 / ((k + 1) as f64 * h);
            let rel = (f[k] - expected).abs() / expected;
            assert!(rel < 0.05, "rank {k}: got {} expected {expected}", f[k]);
        }
        // Ranks are ordered by popularity.
        assert!(f[0] > f[1] && f[1] > f[9] && f[9] > f[99]);
    }

    #[test]
    fn zipf_with_larger_exponent_is_more_skewed() {
        let a = frequencies(&Distribution::zipf(1000, 0.8).unwrap(), 200_000);
        let b = frequencies(&Distribution::zipf(1000, 1.2).unwrap(), 200_000);
        assert!(b[0] > a[0] * 1.5, "{} vs {}", b[0], a[0]);
    }

    #[test]
    fn uniform_is_flat() {
        let f = frequencies(&Distribution::uniform(10).unwrap(), 200_000);
        for (k, p) in f.iter().enumerate() {
            assert!((p - 0.1).abs() < 0.005, "rank {k}: {p}");
        }
    }

    #[test]
    fn samples_stay_in_range_for_one_customer() {
        let mut rng = Rng::new(3);
        for d in [Distribution::zipf(1, 1.0).unwrap(), Distribution::uniform(1).unwrap()] {
            for _ in 0..1000 {
                assert_eq!(d.sample(&mut rng), 0);
            }
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        assert_eq!(Distribution::zipf(0, 1.0).unwrap_err(), DistError::NoCustomers);
        assert!(matches!(Distribution::zipf(10, 0.0), Err(DistError::BadExponent(_))));
        assert!(matches!(Distribution::zipf(10, f64::NAN), Err(DistError::BadExponent(_))));
        assert!(matches!(Distribution::by_name("pareto", 10, 1.0), Err(DistError::Unknown(_))));
    }
}
