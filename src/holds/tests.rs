use super::*;
use crate::model::{CheckAnswer, Reason};

fn answer() -> Arc<CheckAnswer> {
    Arc::new(CheckAnswer::bare(true, Reason::WithinLimit))
}

fn held(id: &str, quantity: i64, expires_at: Option<i64>) -> Reservation {
    Reservation {
        id: id.into(),
        customer: "c".into(),
        meter: "m".into(),
        quantity,
        expires_at,
        status: Status::Held,
        settled_quantity: None,
        created_ms: 1,
        finished_ms: 0,
    }
}

#[test]
fn holds_add_up_and_finish_releases_once() {
    let book = HoldBook::in_memory(10);
    book.insert(held("a", 30, None), 1, 2, answer()).expect("insert");
    book.insert(held("b", 12, Some(100)), 1, 2, answer()).expect("insert");
    assert_eq!(book.held(1, 2), 42);
    assert_eq!(book.held(1, 3), 0);
    assert_eq!(book.due(99).len(), 0);
    assert_eq!(book.due(100).iter().map(|d| d.0.as_str()).collect::<Vec<_>>(), ["b"]);
    let done = book.finish("a", Status::Settled, Some(7), 5).expect("finish").expect("held");
    assert_eq!((done.status, done.settled_quantity), (Status::Settled, Some(7)));
    assert_eq!(book.held(1, 2), 12);
    assert!(book.finish("a", Status::Released, None, 6).expect("finish").is_none(), "a finished reservation stays finished");
    assert_eq!(book.held(1, 2), 12);
}

#[test]
fn the_cap_refuses_new_reservations() {
    let book = HoldBook::in_memory(2);
    book.insert(held("a", 1, None), 1, 2, answer()).expect("insert");
    book.insert(held("b", 1, None), 1, 2, answer()).expect("insert");
    assert!(matches!(book.insert(held("c", 1, None), 1, 2, answer()), Err(HoldError::Full(2))));
    assert_eq!(book.held(1, 2), 2);
}

#[test]
fn the_journal_restores_holds_and_drops_old_finished_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let resolve = |_: &str, _: &str| Some((1, 2));
    {
        let book = HoldBook::open(dir.path(), 10, 0, resolve).expect("open");
        book.insert(held("a", 30, None), 1, 2, answer()).expect("insert");
        book.insert(held("b", 5, Some(10)), 1, 2, answer()).expect("insert");
        book.insert(held("c", 7, None), 1, 2, answer()).expect("insert");
        book.finish("c", Status::Released, None, 2).expect("finish");
    }
    let book = HoldBook::open(dir.path(), 10, 3, resolve).expect("reopen");
    assert_eq!(book.held(1, 2), 35);
    assert_eq!(book.get("c").map(|r| r.status), Some(Status::Released));
    let later = HoldBook::open(dir.path(), 10, FINISHED_RETENTION_MS + 10, resolve).expect("reopen");
    assert_eq!(later.held(1, 2), 35);
    assert!(later.get("c").is_none(), "finished past the retention: forgotten");
    assert_eq!(later.len(), 2);
}

#[test]
fn a_customers_reservations_are_listed_newest_first_until_swept() {
    let book = HoldBook::in_memory(10);
    let at = |id: &str, customer: &str, created_ms: i64| Reservation { customer: customer.into(), created_ms, ..held(id, 1, None) };
    book.insert(at("a", "c", 10), 1, 2, answer()).expect("insert");
    book.insert(at("b", "c", 30), 1, 2, answer()).expect("insert");
    book.insert(at("z", "other", 40), 3, 2, answer()).expect("insert");
    book.insert(at("c", "c", 20), 1, 2, answer()).expect("insert");
    let ids = |list: Vec<Reservation>| list.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(book.list("c", |_| true, 10)), ["b", "c", "a"]);
    assert_eq!(ids(book.list("c", |_| true, 2)), ["b", "c"]);
    assert_eq!(ids(book.list("nobody", |_| true, 10)), Vec::<String>::new());
    book.finish("a", Status::Released, None, 50).expect("finish");
    assert_eq!(ids(book.list("c", |r| r.status == Status::Held, 10)), ["b", "c"]);
    assert_eq!(ids(book.list("c", |r| r.status == Status::Released, 10)), ["a"]);
    // A day after it finished, "a" is forgotten, from the listing too.
    book.sweep(50 + FINISHED_RETENTION_MS).expect("sweep");
    assert_eq!(ids(book.list("c", |_| true, 10)), ["b", "c"]);
    for id in ["b", "c"] {
        book.finish(id, Status::Released, None, 60).expect("finish");
    }
    book.sweep(60 + FINISHED_RETENTION_MS).expect("sweep");
    assert!(book.by_customer.get("c").is_none(), "a customer with none left is dropped");
    assert_eq!(ids(book.list("other", |_| true, 10)), ["z"]);
}
