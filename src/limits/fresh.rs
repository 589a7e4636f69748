//! Bounded staleness of shared totals (issue 16, API.md part 2): with Redis,
//! no check decides on a global total older than two `sync_interval`s.
//!
//! The syncer refreshes every window that changed here or was checked since
//! its last round, stamping `synced_ms`; a customer load and strict or leased
//! answers stamp it too. A window nobody touched for a while is not refreshed
//! by the syncer (that would cost a Redis read per window per round), so a
//! check that finds its windows older than two intervals reads their totals
//! first: one pipelined round trip, the same allowance as a customer's first
//! sight. A hot window never pays it: the syncer keeps it fresh.
//!
//! With Redis, reservations' held totals (issue 19) are read in the same
//! round trip.
//!
//! Redis unreachable: the check answers from what it has (and the refresh is
//! retried by the next check).

use super::LimitsPorts;
use crate::counters::{CounterKey, Counters};
use crate::model::{Aggregation, Meter};
use crate::redis_link::Keys;
use std::sync::atomic::Ordering;

impl LimitsPorts<'_> {
    /// Reads the totals of `name`'s windows on `meter` that are older than two
    /// sync intervals (or were never read here) from Redis.
    pub async fn refresh_stale(&self, name: &str, meter: &Meter) {
        let Some(redis) = self.redis else { return };
        if meter.aggregation == Aggregation::UniqueCount {
            // Issue 25: distinct values are merged by the syncer (`sync::unique`).
            return;
        }
        let Ok(customer) = self.reads.counters.interner.intern(name) else { return };
        let ent = self.reads.entitlements.get(Some(customer));
        let Some(limits) = ent.limits(meter.id) else { return };
        let now = crate::engine::now_ms();
        let stale_before = now - redis.leases.stale_after_ms();
        let mut stale: Vec<CounterKey> = Vec::new();
        for l in limits.iter() {
            let key = Counters::key(customer, meter.id, l.window, now, ent.billing_anchor);
            let synced = self.reads.counters.windows.get(&key, |c| c.synced_ms.load(Ordering::Acquire)).unwrap_or(0);
            if synced < stale_before && !stale.contains(&key) {
                stale.push(key);
            }
        }
        if stale.is_empty() {
            return;
        }
        let field = Keys::instance_field(self.instance_id);
        let mut pipe = ::redis::pipe();
        for key in &stale {
            let cmd = pipe.cmd("HMGET").arg(redis.keys.window(name, &meter.name, key.kind, key.start_ms));
            match meter.aggregation {
                Aggregation::Sum | Aggregation::Count | Aggregation::UniqueCount => cmd.arg("t").arg(&field),
                Aggregation::Max => cmd.arg("m").arg("m"),
                Aggregation::Latest => cmd.arg("l").arg("lt"),
            };
        }
        // Reservations (issue 19): the held total is as old; read with them.
        let shared_holds = self.reads.holds.is_shared();
        if shared_holds {
            pipe.cmd("HMGET").arg(redis.keys.held(name, &meter.name)).arg("t").arg("v");
        }
        let mut conn = redis.conn();
        let mut replies: Vec<Vec<Option<i64>>> = match redis.call("refresh totals", pipe.query_async(&mut conn)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, customer = %name, "could not refresh stale totals; answering from the last synced ones");
                return;
            }
        };
        if shared_holds {
            if let Some(pair) = replies.pop() {
                let (t, v) = (pair.first().copied().flatten(), pair.get(1).copied().flatten());
                let held = crate::holds::shared::Held { total: t.unwrap_or(0), version: v.unwrap_or(0) };
                self.reads.holds.set_shared(customer, meter.id, held);
            }
        }
        for (key, pair) in stale.iter().zip(replies) {
            let (a, b) = (pair.first().copied().flatten(), pair.get(1).copied().flatten());
            if meter.aggregation.is_gauge() {
                // Merged like the syncer does (`sync::gauges`): the global max,
                // or the newest reading.
                let _stripe = (meter.aggregation == Aggregation::Latest).then(|| self.reads.counters.stripe(key.customer, key.meter));
                self.usage.load_shared(*key, crate::usage::Origin::Sync, |cell| {
                    if let (Some(value), Some(ts)) = (a, b) {
                        cell.fold(meter.aggregation, value, if meter.aggregation == Aggregation::Max { 0 } else { ts });
                    }
                    cell.synced_ms.store(now, Ordering::Release);
                });
                continue;
            }
            let (total, part) = (a.unwrap_or(0), b.unwrap_or(0));
            self.usage.load_shared(*key, crate::usage::Origin::Sync, |cell| {
                cell.others.store(total.saturating_sub(part).max(0), Ordering::Release);
                cell.synced_ms.store(now, Ordering::Release);
            });
        }
    }
}
