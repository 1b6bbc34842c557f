//! How far a split of failing Writes may go while no Write lands.
//!
//! A Write that keeps failing with a 500 (or a proxy's code-less 400)
//! while other Writes land fails for its own tuples, and is split until
//! they are alone (see `Engine::write_chunk_as`). While nothing lands, the
//! server may be failing every Write, so a split stops after a round of
//! parts in which none landed. With one such round allowed, two bad
//! tuples, one in each half, held back every op of their chunk on every
//! retry for good. So the ops of a split that stopped so remember how
//! many such rounds it ran, and their next split may run one more (up to
//! [`MAX_ROUNDS`]): a few bad tuples are parted from the rest within a few
//! retries, and a server failing everything costs a few more requests a
//! retry, after the pauses its failures bring.

use std::collections::HashMap;
use std::sync::Mutex;

/// Rounds with nothing landing a split may run at most: parts of a 100-op
/// chunk down to 7 ops (16 parts), so up to 15 bad tuples however spread.
pub(crate) const MAX_ROUNDS: u8 = 4;

/// Ops remembered at most; all are forgotten past it (they start again at
/// one round: ops a new seq replaced, or written, are never looked up
/// again).
const KEEP: usize = 100_000;

#[derive(Default)]
pub(crate) struct SplitRounds {
    /// By the op's seq: a newer op on the tuple starts afresh.
    ran: Mutex<HashMap<u64, u8>>,
}

impl SplitRounds {
    /// The rounds with nothing landing that a split of the ops `seqs` may
    /// run: one more than any of them ran before.
    pub(crate) fn allowed(&self, seqs: impl IntoIterator<Item = u64>) -> u8 {
        let ran = self.ran.lock().unwrap_or_else(|p| p.into_inner());
        let most = seqs
            .into_iter()
            .filter_map(|s| ran.get(&s).copied())
            .max()
            .unwrap_or(0);
        most.saturating_add(1).min(MAX_ROUNDS)
    }

    /// Notes that a split stopped with the ops `seqs` unwritten after
    /// `rounds` rounds with nothing landing.
    pub(crate) fn stopped(&self, seqs: impl IntoIterator<Item = u64>, rounds: u8) {
        let mut ran = self.ran.lock().unwrap_or_else(|p| p.into_inner());
        if ran.len() >= KEEP {
            ran.clear();
        }
        for s in seqs {
            let r = ran.entry(s).or_default();
            *r = (*r).max(rounds);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stopped_split_allows_the_next_one_round_more_up_to_the_most() {
        let r = SplitRounds::default();
        assert_eq!(r.allowed([1, 2]), 1);
        r.stopped([1, 2], 1);
        // Ops never split before take the most of the chunk they are in.
        assert_eq!(r.allowed([2, 3]), 2);
        assert_eq!(r.allowed([3]), 1);
        for rounds in 2..=MAX_ROUNDS + 2 {
            r.stopped([1], rounds.min(r.allowed([1])));
        }
        assert_eq!(r.allowed([1]), MAX_ROUNDS);
    }
}
