//! Two-phase commit, as plain state machines: no sockets, threads or clocks. Time comes in
//! as ticks; messages go out as return values; the caller delivers them (in process today,
//! over the network when participants are shards on other nodes).
//!
//! ```text
//! coordinator                     participant (one per shard)
//!   start ── Prepare ──────────────▶ on_prepare: stage the writes, vote
//!         ◀─────────────── Vote ────
//!   all Yes → Commit ──────────────▶ on_decision: apply what was staged
//!   any No, or a deadline passes
//!   with votes missing → Abort ────▶ on_decision: discard what was staged
//! ```
//!
//! Guarantees, each unit-tested below: the decision is made once and never changes;
//! `Commit` only if every participant voted yes; a participant applies only on `Commit` and
//! only what it staged; a silent participant leads to `Abort` at the deadline, so nothing is
//! half-applied; duplicate, late or unknown messages change nothing.

use std::collections::BTreeMap;

/// Identifies a participant (a shard).
pub type ParticipantId = usize;

/// Logical time, advanced by the caller.
pub type Tick = u64;

/// A participant's answer to `Prepare`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vote {
    /// It staged the writes and will apply them if told to commit.
    Yes,
    /// It cannot apply them; the transaction must abort.
    No {
        /// Why, for the caller's error message.
        reason: String,
    },
}

/// The outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Every participant applies its writes.
    Commit,
    /// No participant applies anything.
    Abort {
        /// Why: the first `No`, or the participants that never answered.
        reason: String,
    },
}

/// What the coordinator sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Ask `to` to stage its writes and vote.
    Prepare {
        /// The participant.
        to: ParticipantId,
    },
    /// Tell `to` the outcome.
    Decide {
        /// The participant.
        to: ParticipantId,
        /// The outcome.
        decision: Decision,
    },
}

/// The coordinator of one transaction.
#[derive(Debug)]
pub struct Coordinator {
    votes: BTreeMap<ParticipantId, Option<Vote>>,
    deadline: Tick,
    decision: Option<Decision>,
}

impl Coordinator {
    /// Starts a transaction with `participants` at `now`; votes missing at `now + timeout`
    /// abort it. Returns the `Prepare` messages to send.
    pub fn start(
        participants: impl IntoIterator<Item = ParticipantId>,
        now: Tick,
        timeout: Tick,
    ) -> (Coordinator, Vec<Message>) {
        let votes: BTreeMap<ParticipantId, Option<Vote>> =
            participants.into_iter().map(|id| (id, None)).collect();
        let prepares = votes.keys().map(|&to| Message::Prepare { to }).collect();
        let mut coordinator = Coordinator {
            votes,
            deadline: now.saturating_add(timeout),
            decision: None,
        };
        if coordinator.votes.is_empty() {
            coordinator.decision = Some(Decision::Commit); // nothing to prepare
        }
        (coordinator, prepares)
    }

    /// The decision, once made.
    pub fn decision(&self) -> Option<&Decision> {
        self.decision.as_ref()
    }

    /// Records `from`'s vote; returns the decision messages if this vote decides.
    pub fn on_vote(&mut self, from: ParticipantId, vote: Vote) -> Vec<Message> {
        if self.decision.is_some() {
            return Vec::new(); // late or duplicate: the decision stands
        }
        let Some(slot) = self.votes.get_mut(&from) else {
            return Vec::new(); // not a participant of this transaction
        };
        if slot.is_some() {
            return Vec::new(); // a participant votes once
        }
        if let Vote::No { reason } = &vote {
            let reason = format!("participant {from} refused: {reason}");
            *slot = Some(vote);
            return self.decide(Decision::Abort { reason });
        }
        *slot = Some(vote);
        if self.votes.values().all(|vote| vote == &Some(Vote::Yes)) {
            return self.decide(Decision::Commit);
        }
        Vec::new()
    }

    /// Advances time; at the deadline, missing votes abort the transaction.
    pub fn on_tick(&mut self, now: Tick) -> Vec<Message> {
        if self.decision.is_some() || now < self.deadline {
            return Vec::new();
        }
        let silent: Vec<String> = self
            .votes
            .iter()
            .filter(|(_, vote)| vote.is_none())
            .map(|(id, _)| id.to_string())
            .collect();
        self.decide(Decision::Abort {
            reason: format!(
                "no vote from participant(s) {} before the deadline",
                silent.join(", ")
            ),
        })
    }

    fn decide(&mut self, decision: Decision) -> Vec<Message> {
        debug_assert!(self.decision.is_none(), "a decision is made once");
        self.decision = Some(decision.clone());
        self.votes
            .keys()
            .map(|&to| Message::Decide {
                to,
                decision: decision.clone(),
            })
            .collect()
    }
}

/// One participant's side of one transaction, holding what it staged.
#[derive(Debug)]
pub struct Participant<S> {
    state: ParticipantState<S>,
}

#[derive(Debug)]
enum ParticipantState<S> {
    Waiting,
    Prepared(S),
    Refused,
    Done,
}

impl<S> Default for Participant<S> {
    fn default() -> Self {
        Participant {
            state: ParticipantState::Waiting,
        }
    }
}

impl<S> Participant<S> {
    /// A participant waiting for `Prepare`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Handles `Prepare`: `staged` is what the participant staged, or why it cannot.
    /// A repeated `Prepare` repeats the vote without staging again.
    pub fn on_prepare(&mut self, staged: impl FnOnce() -> Result<S, String>) -> Vote {
        match &self.state {
            ParticipantState::Waiting => match staged() {
                Ok(writes) => {
                    self.state = ParticipantState::Prepared(writes);
                    Vote::Yes
                }
                Err(reason) => {
                    self.state = ParticipantState::Refused;
                    Vote::No { reason }
                }
            },
            ParticipantState::Prepared(_) => Vote::Yes,
            ParticipantState::Refused | ParticipantState::Done => Vote::No {
                reason: "already decided".into(),
            },
        }
    }

    /// Handles the decision: returns the staged writes to apply on `Commit`, nothing on
    /// `Abort` (they are discarded) or if the decision came before.
    pub fn on_decision(&mut self, decision: &Decision) -> Option<S> {
        let state = std::mem::replace(&mut self.state, ParticipantState::Done);
        match (state, decision) {
            (ParticipantState::Prepared(writes), Decision::Commit) => Some(writes),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Delivers messages between one coordinator and participants whose staging succeeds
    /// unless listed in `refusing`, and which never answer if listed in `silent`; returns
    /// what each participant applied.
    fn simulate(
        participants: usize,
        refusing: &[usize],
        silent: &[usize],
        timeout: Tick,
    ) -> (Decision, Vec<Option<String>>) {
        let (mut coordinator, mut outbox) = Coordinator::start(0..participants, 0, timeout);
        let mut sides: Vec<Participant<String>> =
            (0..participants).map(|_| Participant::new()).collect();
        let mut applied = vec![None; participants];
        let mut now = 0;
        while coordinator.decision().is_none() || !outbox.is_empty() {
            if outbox.is_empty() {
                now += 1;
                outbox.extend(coordinator.on_tick(now));
                continue;
            }
            for message in std::mem::take(&mut outbox) {
                match message {
                    Message::Prepare { to } => {
                        let vote = sides[to].on_prepare(|| {
                            if refusing.contains(&to) {
                                Err("no space".into())
                            } else {
                                Ok(format!("writes of {to}"))
                            }
                        });
                        if !silent.contains(&to) {
                            outbox.extend(coordinator.on_vote(to, vote));
                        }
                    }
                    Message::Decide { to, decision } => {
                        applied[to] = sides[to].on_decision(&decision)
                    }
                }
            }
        }
        (coordinator.decision().cloned().unwrap(), applied)
    }

    #[test]
    fn all_yes_commits_everywhere() {
        let (decision, applied) = simulate(3, &[], &[], 10);
        assert_eq!(decision, Decision::Commit);
        assert_eq!(
            applied,
            vec![
                Some("writes of 0".into()),
                Some("writes of 1".into()),
                Some("writes of 2".into())
            ]
        );
    }

    #[test]
    fn a_no_in_prepare_aborts_everywhere() {
        let (decision, applied) = simulate(3, &[1], &[], 10);
        assert!(
            matches!(&decision, Decision::Abort { reason } if reason.contains("participant 1 refused: no space")),
            "{decision:?}"
        );
        assert_eq!(applied, vec![None, None, None], "nothing half-applied");
    }

    #[test]
    fn a_participant_that_never_answers_aborts_at_the_deadline() {
        let (decision, applied) = simulate(3, &[], &[2], 5);
        assert!(
            matches!(&decision, Decision::Abort { reason } if reason.contains("participant(s) 2")),
            "{decision:?}"
        );
        assert_eq!(
            applied,
            vec![None, None, None],
            "the prepared participants discarded their writes"
        );
    }

    #[test]
    fn late_duplicate_and_foreign_votes_change_nothing() {
        let (mut coordinator, _) = Coordinator::start([0, 1], 0, 10);
        assert!(
            coordinator.on_vote(7, Vote::Yes).is_empty(),
            "not a participant"
        );
        assert!(coordinator.on_vote(0, Vote::Yes).is_empty());
        assert!(
            coordinator
                .on_vote(
                    0,
                    Vote::No {
                        reason: "changed my mind".into()
                    }
                )
                .is_empty(),
            "one vote each"
        );
        assert_eq!(coordinator.on_vote(1, Vote::Yes).len(), 2);
        assert_eq!(coordinator.decision(), Some(&Decision::Commit));
        assert!(
            coordinator.on_tick(100).is_empty(),
            "the deadline cannot undo a decision"
        );
        assert!(
            coordinator
                .on_vote(
                    1,
                    Vote::No {
                        reason: "late".into()
                    }
                )
                .is_empty()
        );
        assert_eq!(coordinator.decision(), Some(&Decision::Commit));
    }

    #[test]
    fn a_participant_applies_at_most_once_and_only_after_preparing() {
        let mut participant: Participant<u32> = Participant::new();
        assert_eq!(
            participant.on_decision(&Decision::Commit),
            None,
            "nothing staged"
        );
        let mut participant: Participant<u32> = Participant::new();
        assert_eq!(participant.on_prepare(|| Ok(7)), Vote::Yes);
        assert_eq!(participant.on_prepare(|| panic!("stages once")), Vote::Yes);
        assert_eq!(participant.on_decision(&Decision::Commit), Some(7));
        assert_eq!(
            participant.on_decision(&Decision::Commit),
            None,
            "applied once"
        );
    }

    #[test]
    fn no_participants_commit_at_once() {
        let (coordinator, messages) = Coordinator::start([], 0, 10);
        assert!(messages.is_empty());
        assert_eq!(coordinator.decision(), Some(&Decision::Commit));
    }

    proptest! {
        /// Whatever refuses or stays silent, the outcome is all-or-nothing and Commit only
        /// when every participant voted yes.
        #[test]
        fn outcomes_are_all_or_nothing(
            participants in 1usize..6,
            refusing in proptest::collection::vec(0usize..6, 0..3),
            silent in proptest::collection::vec(0usize..6, 0..3),
        ) {
            let (decision, applied) = simulate(participants, &refusing, &silent, 3);
            let everyone_agreed = (0..participants).all(|id| !refusing.contains(&id) && !silent.contains(&id));
            prop_assert_eq!(decision == Decision::Commit, everyone_agreed);
            let applied_count = applied.iter().filter(|writes| writes.is_some()).count();
            prop_assert!(applied_count == 0 || applied_count == participants, "half applied: {:?}", applied);
            prop_assert_eq!(applied_count == participants, everyone_agreed);
        }
    }
}
