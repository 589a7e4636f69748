//! Counting an event or a decision by meter allocates nothing once the meter's
//! series are registered (the `meter` label is on the hot path of every
//! ingest and check). A counting allocator, per thread, around the calls.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

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
