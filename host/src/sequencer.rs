//! The sequencer: gathers transactions into batches, which are ordered (and, with the
//! command log, made durable) one batch at a time.
//!
//! Adaptive batching, as `DESIGN.md` asks: a batch closes when the previous one has been
//! handed on, or when it reaches [`MAX_BATCH_TRANSACTIONS`] or [`MAX_BATCH_BYTES`]. At low
//! load every transaction is a batch of one and waits for nothing; under load, the
//! transactions that arrive while a batch is being handed on form the next one, so the
//! per-batch costs (the scheduler's mutex today, an fsync with the command log) are shared.
//! Nobody waits for a timer.
//!
//! There is no sequencer thread. The first transaction to find the sequencer idle becomes
//! the *leader*: it hands on batches, its own first, until the queue is empty; the others
//! only enqueue and wait for their grant ([`crate::scheduler`]). The queue is bounded: past
//! `max_queued` transactions waiting to be sequenced, new ones are refused (`OVERLOADED`)
//! before they are ordered — once ordered, a transaction runs.
//!
//! [`Batcher`] is the pure logic (no threads, clocks or I/O), unit-tested below.

use std::collections::VecDeque;

/// Most transactions in one batch: bounds the time a batch holds the scheduler's mutex
/// (about a microsecond per transaction) and, with the command log, a batch's record.
pub const MAX_BATCH_TRANSACTIONS: usize = 1024;
/// Most bytes of ordered input (keys, values, arguments) in one batch, beyond its first
/// transaction: with the command log, what one write-and-fsync carries.
pub const MAX_BATCH_BYTES: usize = 1024 * 1024;

/// The queue of transactions waiting to be sequenced, and who is handing batches on.
#[derive(Debug)]
pub struct Batcher<T> {
    queue: VecDeque<(T, usize)>,
    /// Whether a leader is handing batches on.
    sequencing: bool,
    max_queued: usize,
}

/// The queue is full; the transaction was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueFull;

impl<T> Batcher<T> {
    /// An empty batcher accepting at most `max_queued` waiting transactions.
    pub fn new(max_queued: usize) -> Self {
        Self {
            queue: VecDeque::new(),
            sequencing: false,
            max_queued: max_queued.max(1),
        }
    }

    /// Transactions waiting to be sequenced.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no transaction waits to be sequenced.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// If no leader is active, makes the caller the leader with a batch of one, its own
    /// transaction (not queued: it hands it on directly, then calls
    /// [`Batcher::next_batch`] until it returns `None`). The fast path at low load.
    pub fn lead_alone(&mut self) -> bool {
        if self.sequencing {
            return false;
        }
        debug_assert!(
            self.queue.is_empty(),
            "an idle sequencer has an empty queue"
        );
        self.sequencing = true;
        true
    }

    /// Enqueues `item` of `bytes` ordered input; returns whether the caller must now lead
    /// (call [`Batcher::next_batch`] until it returns `None`).
    pub fn push(&mut self, item: T, bytes: usize) -> Result<bool, QueueFull> {
        if self.queue.len() >= self.max_queued {
            return Err(QueueFull);
        }
        self.queue.push_back((item, bytes));
        let lead = !self.sequencing;
        self.sequencing = true;
        Ok(lead)
    }

    /// For the leader: the next batch, in arrival order, closed at the caps (a batch holds
    /// at least one transaction, however large); `None` when the queue is empty, and the
    /// leader's turn is over.
    pub fn next_batch(&mut self) -> Option<Vec<T>> {
        debug_assert!(self.sequencing, "only the leader takes batches");
        if self.queue.is_empty() {
            self.sequencing = false;
            return None;
        }
        let mut batch = Vec::new();
        let mut bytes = 0usize;
        while let Some((_, size)) = self.queue.front() {
            if !batch.is_empty()
                && (batch.len() >= MAX_BATCH_TRANSACTIONS || bytes + size > MAX_BATCH_BYTES)
            {
                break;
            }
            let (item, size) = self.queue.pop_front().expect("front exists");
            bytes += size;
            batch.push(item);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alone_a_transaction_is_a_batch_of_one_and_its_own_leader() {
        let mut batcher = Batcher::new(10);
        assert_eq!(batcher.push("a", 10), Ok(true));
        assert_eq!(batcher.next_batch(), Some(vec!["a"]));
        assert_eq!(batcher.next_batch(), None, "the leader's turn ends");
        assert_eq!(batcher.push("b", 10), Ok(true), "the next arrival leads");
    }

    #[test]
    fn an_idle_sequencer_lets_a_transaction_lead_alone_and_queues_the_rest() {
        let mut batcher = Batcher::new(10);
        assert!(batcher.lead_alone());
        assert!(!batcher.lead_alone(), "one leader at a time");
        assert_eq!(batcher.push("b", 0), Ok(false), "queued for the leader");
        assert_eq!(batcher.next_batch(), Some(vec!["b"]));
        assert_eq!(batcher.next_batch(), None);
        assert!(batcher.lead_alone(), "idle again");
    }

    #[test]
    fn arrivals_during_a_hand_on_form_the_next_batch() {
        let mut batcher = Batcher::new(10);
        assert_eq!(batcher.push(1, 0), Ok(true));
        assert_eq!(batcher.next_batch(), Some(vec![1]));
        // While batch [1] is handed on, three more arrive; none of them leads.
        for item in 2..5 {
            assert_eq!(batcher.push(item, 0), Ok(false));
        }
        assert_eq!(batcher.next_batch(), Some(vec![2, 3, 4]));
        assert_eq!(batcher.next_batch(), None);
    }

    #[test]
    fn a_batch_closes_at_the_count_cap() {
        let mut batcher = Batcher::new(5000);
        for item in 0..2500 {
            batcher.push(item, 1).unwrap();
        }
        let sizes: Vec<usize> =
            std::iter::from_fn(|| batcher.next_batch().map(|b| b.len())).collect();
        assert_eq!(
            sizes,
            vec![
                MAX_BATCH_TRANSACTIONS,
                MAX_BATCH_TRANSACTIONS,
                2500 - 2 * MAX_BATCH_TRANSACTIONS
            ]
        );
    }

    #[test]
    fn a_batch_closes_at_the_byte_cap_but_always_takes_one() {
        let mut batcher = Batcher::new(10);
        batcher.push("huge", MAX_BATCH_BYTES * 2).unwrap();
        batcher.push("half", MAX_BATCH_BYTES / 2).unwrap();
        batcher.push("half again", MAX_BATCH_BYTES / 2).unwrap();
        batcher.push("one more", 1).unwrap();
        assert_eq!(batcher.next_batch(), Some(vec!["huge"]));
        assert_eq!(batcher.next_batch(), Some(vec!["half", "half again"]));
        assert_eq!(batcher.next_batch(), Some(vec!["one more"]));
        assert_eq!(batcher.next_batch(), None);
    }

    #[test]
    fn past_the_queue_limit_new_transactions_are_refused() {
        let mut batcher = Batcher::new(2);
        assert_eq!(batcher.push(1, 0), Ok(true));
        assert_eq!(batcher.push(2, 0), Ok(false));
        assert_eq!(batcher.push(3, 0), Err(QueueFull));
        assert_eq!(batcher.len(), 2, "the refused one was not queued");
        assert_eq!(batcher.next_batch(), Some(vec![1, 2]));
    }
}
