//! Counting an event or a decision by meter allocates nothing once the meter's
//! series are registered (the `meter` label is on the hot path of every
//! ingest and check). A counting allocator, per thread, around the calls.

#[path = "common/counting_alloc.rs"]
mod counting_alloc;

use counting_alloc::allocations;

#[test]
fn counting_by_meter_allocates_nothing() {
    use meterd::telemetry::{decision, events, prometheus, register_known, Known};
    let handle = prometheus();
    register_known(&Known { meters: vec![(0, "tokens"), (1, "seats")], ..Known::default() });
    let batch = [(0, "tokens"), (0, "tokens"), (1, "seats"), (0, "tokens")];
    // Warm: anything lazily set up on first use happens here.
    events("accepted", batch);
    decision("within_limit", false, 1, "seats");
    let before = allocations();
    for _ in 0..1000 {
        events("accepted", batch);
        events("duplicate", [(1, "seats")]);
        decision("within_limit", false, 1, "seats");
        decision("limit_exceeded", true, 0, "tokens");
    }
    let spent = allocations() - before;
    assert_eq!(spent, 0, "{spent} allocations for 4,000 calls");
    // And they counted (the control: the same calls do reach the series).
    let text = handle.render();
    assert!(text.contains("meterd_events_total{meter=\"tokens\",result=\"accepted\"} 3003"), "{text}");
    assert!(text.contains("meterd_decisions_total{meter=\"seats\",reason=\"within_limit\",consume=\"false\"} 1001"), "{text}");
    // An unregistered meter takes the macro path, which allocates its label.
    let before = allocations();
    decision("within_limit", false, 7, "unregistered");
    assert!(allocations() > before, "the control path is measured too");
}
