//! Retry spacing shared by every background task that talks to something that
//! may be down (the flusher, the Redis syncer and subscriber, the Stripe
//! reporter and client): exponential, capped, with jitter.

use std::time::Duration;

/// How long to wait before the next attempt after `failures` failed ones in a
/// row: exponential from `interval`, capped at 30 s, with ±25 % jitter so that
/// instances recovering together do not retry in lockstep.
pub fn backoff(interval: Duration, failures: u32) -> Duration {
    if failures == 0 {
        return interval;
    }
    let base = interval.saturating_mul(1u32 << failures.min(16)).min(Duration::from_secs(30)).max(interval);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    // A cheap, good-enough spread: the clock's nanoseconds, mixed.
    let spread = (u64::from(nanos).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % 501; // 0..=500 ‰
    base.mul_f64(0.75 + spread as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let i = Duration::from_secs(1);
        assert_eq!(backoff(i, 0), i);
        for failures in 1..40 {
            let d = backoff(i, failures);
            let base = (1u64 << failures.min(16)).min(30) as f64;
            assert!(d.as_secs_f64() >= base * 0.75 - 1e-9 && d.as_secs_f64() <= base * 1.25 + 1e-9, "{failures}: {d:?}");
        }
    }
}
