//! FoundationDB's Cycle workload: `nodes` keys form a ring, `cycle:<i>` holding the index
//! of the next node. A step reorders three consecutive nodes after `start`; any mix of
//! concurrent steps keeps a single ring of all `nodes` nodes if, and only if, transactions
//! are serializable.
//!
//! | procedure | arguments (JSON) | result |
//! |---|---|---|
//! | `setup` | `{"nodes":100}` | `null`: node `i` points to `i+1`, the last to 0 |
//! | `step` | `{"start":7}` | `null`: `a → b → c → d` becomes `a → c → b → d` |
//! | `check` | `{"nodes":100}` | `true` if walking from 0 returns to 0 after exactly `nodes` steps |
//!
//! A step's keys depend on what it reads, so it declares none: the server discovers them
//! with a reconnaissance run before locking them.
#![no_std]

use transdb_guest::prelude::*;

/// Largest ring `setup` and `check` accept: bounds the keys of one transaction.
pub const MAX_NODES: u32 = 10_000;

/// The key of node `index`.
pub fn node_key(index: u32) -> String {
    format!("cycle:{index}")
}

/// Arguments of `setup` and `check`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Ring {
    /// Number of nodes, 2 to [`MAX_NODES`].
    pub nodes: u32,
}

/// Arguments of `step`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Step {
    /// The node after which three nodes are reordered.
    pub start: u32,
}

fn ring_size(nodes: u32) -> Result<u32, Abort> {
    if !(2..=MAX_NODES).contains(&nodes) {
        return Err(Abort::new(format!(
            "nodes must be 2 to {MAX_NODES}, got {nodes}"
        )));
    }
    Ok(nodes)
}

fn next(tx: &mut Tx, node: u32) -> Result<u32, Abort> {
    let key = node_key(node);
    let value = tx
        .get_i64(&key)
        .ok_or_else(|| Abort::new(format!("node {node} does not exist: run setup first")))?;
    u32::try_from(value)
        .map_err(|_| Abort::new(format!("node {node} points to {value}, not a node")))
}

/// Creates the ring.
pub fn setup(tx: &mut Tx, args: Ring) -> Result<(), Abort> {
    let nodes = ring_size(args.nodes)?;
    for index in 0..nodes {
        tx.put_i64(&node_key(index), i64::from((index + 1) % nodes));
    }
    Ok(())
}

/// One step: `a → b → c → d` becomes `a → c → b → d`.
pub fn step(tx: &mut Tx, args: Step) -> Result<(), Abort> {
    let a = args.start;
    let b = next(tx, a)?;
    let c = next(tx, b)?;
    let d = next(tx, c)?;
    tx.put_i64(&node_key(a), i64::from(c));
    tx.put_i64(&node_key(c), i64::from(b));
    tx.put_i64(&node_key(b), i64::from(d));
    Ok(())
}

/// Whether the nodes still form one ring of `nodes` nodes.
pub fn check(tx: &mut Tx, args: Ring) -> Result<bool, Abort> {
    let nodes = ring_size(args.nodes)?;
    let mut node = 0;
    for walked in 1..=nodes {
        node = next(tx, node)?;
        if node == 0 {
            return Ok(walked == nodes);
        }
    }
    Ok(false)
}

/// Keys of `setup` and `check`.
pub fn ring_keys(args: &Ring, keys: &mut KeySet) {
    for index in 0..args.nodes.min(MAX_NODES) {
        keys.write(&node_key(index));
    }
}

procedure!(setup, keys = ring_keys);
procedure!(step);
procedure!(check, keys = ring_keys);

#[cfg(test)]
mod tests {
    use super::*;
    use transdb_guest::testing::MemoryStore;

    #[test]
    fn steps_keep_one_ring() {
        let mut store = MemoryStore::new();
        store
            .call_with_keys(setup, ring_keys, Ring { nodes: 10 })
            .unwrap();
        for start in 0..100 {
            store
                .call(
                    step,
                    Step {
                        start: start * 7 % 10,
                    },
                )
                .unwrap();
            assert_eq!(
                store.call_with_keys(check, ring_keys, Ring { nodes: 10 }),
                Ok(true)
            );
        }
    }

    #[test]
    fn check_detects_a_broken_ring() {
        let mut store = MemoryStore::new();
        store.call(setup, Ring { nodes: 5 }).unwrap();
        store.put("cycle:2", b"0"); // 0 → 1 → 2 → 0: a ring of 3
        assert_eq!(store.call(check, Ring { nodes: 5 }), Ok(false));
        assert!(store.call(setup, Ring { nodes: 1 }).is_err());
    }
}
