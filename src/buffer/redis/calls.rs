//! Ids for script calls that a client may send twice. A call whose reply
//! is lost may have run: redis-rs's cluster client sends it again after a
//! dropped connection, and `finish` repeats a failed call itself. Each such
//! call carries an id; Redis keeps its answer, and a repeat with the same
//! id only reads it. Answers are kept from the writer's oldest call still
//! open on, so Redis can let the others go.

use std::collections::BTreeSet;
use std::sync::Mutex;

/// One writer's calls of one kind: the last id handed out, and the ids
/// whose answer has not arrived yet. One lock: no call reads an oldest open
/// id that skips one handed out but not yet open.
#[derive(Default)]
pub(crate) struct CallIds(Mutex<(u64, BTreeSet<u64>)>);

/// One call's id, open until dropped (answered, given up, or its future
/// dropped: nothing repeats it then).
pub(crate) struct Open<'a> {
    pub(crate) id: u64,
    of: &'a CallIds,
}

impl CallIds {
    pub(crate) fn open(&self) -> Open<'_> {
        let mut open = self.lock();
        open.0 += 1;
        let id = open.0;
        open.1.insert(id);
        Open { id, of: self }
    }

    /// The oldest call that may still be repeated: answers before it can go.
    pub(crate) fn oldest(&self) -> u64 {
        self.lock().1.first().copied().unwrap_or(0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, BTreeSet<u64>)> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.of.lock().1.remove(&self.id);
    }
}
