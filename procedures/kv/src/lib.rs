//! Generic operations on arbitrary keys, as procedures: reads and writes of UTF-8 text
//! values, compare-and-swap, and counters. Useful from the CLI and as a test workload.
//!
//! | procedure | arguments (JSON) | result |
//! |---|---|---|
//! | `get` | `{"key":"k"}` | the value, or `null` |
//! | `put` | `{"key":"k","value":"v"}` | `null` |
//! | `delete` | `{"key":"k"}` | whether the key existed |
//! | `cas` | `{"key":"k","expected":"old","new":"v"}` | whether the swap happened; `expected: null` means "absent", `new: null` deletes |
//! | `increment` | `{"key":"k","by":1}` | the new value (a missing key counts as 0) |
//! | `list_txn` | `{"ops":[{"Append":{"key":"k","value":1}},{"Read":{"key":"k"}}]}` | per op: the list read (`[1]`), or `null` for an append |
//!
//! `list_txn` runs a list-append transaction (the workload of Elle-style serializability
//! checkers): lists of integers stored as decimal numbers separated by commas (`"1,2,3"`), a
//! missing key being the empty list.
#![no_std]

use transdb_guest::prelude::*;

/// Arguments naming one key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Key {
    /// The key.
    pub key: String,
}

/// Arguments of `put`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Put {
    /// The key.
    pub key: String,
    /// The value (UTF-8 text).
    pub value: String,
}

/// Arguments of `cas`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CompareAndSwap {
    /// The key.
    pub key: String,
    /// The value the key must have (`None`: must be absent).
    pub expected: Option<String>,
    /// The value to set (`None`: delete).
    pub new: Option<String>,
}

/// Arguments of `increment`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Increment {
    /// The key, holding a decimal integer or absent.
    pub key: String,
    /// How much to add (may be negative).
    pub by: i64,
}

/// One micro-operation of a `list_txn` transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ListOp {
    /// Appends `value` to the list at `key`.
    Append {
        /// The key.
        key: String,
        /// The element to append.
        value: i64,
    },
    /// Reads the list at `key` (with the transaction's own earlier appends).
    Read {
        /// The key.
        key: String,
    },
}

/// Arguments of `list_txn`: micro-operations applied in order, as one transaction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListTxn {
    /// The micro-operations.
    pub ops: Vec<ListOp>,
}

/// Decodes a list as `list_txn` stores it (`"1,2,3"`; the empty text is the empty list), or
/// `None` if `bytes` is not such a list.
pub fn decode_list(bytes: &[u8]) -> Option<Vec<i64>> {
    let text = core::str::from_utf8(bytes).ok()?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(',').map(|number| number.parse().ok()).collect()
}

/// Encodes a list as `list_txn` stores it: decimal numbers separated by commas.
pub fn encode_list(list: &[i64]) -> String {
    let mut text = String::new();
    for (i, element) in list.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&element.to_string());
    }
    text
}

fn list(tx: &mut Tx, key: &str) -> Vec<i64> {
    match tx.get(key) {
        None => Vec::new(),
        Some(bytes) => decode_list(&bytes)
            .unwrap_or_else(|| abort(&format!("the value of {key:?} is not a list of integers"))),
    }
}

fn text(tx: &mut Tx, key: &str) -> Option<String> {
    let bytes = tx.get(key)?;
    match String::from_utf8(bytes) {
        Ok(text) => Some(text),
        Err(_) => abort(&format!("the value of {key:?} is not UTF-8 text")),
    }
}

/// Reads a key.
pub fn get(tx: &mut Tx, args: Key) -> Result<Option<String>, Abort> {
    Ok(text(tx, &args.key))
}

/// Writes a key.
pub fn put(tx: &mut Tx, args: Put) -> Result<(), Abort> {
    tx.put(&args.key, args.value.as_bytes());
    Ok(())
}

/// Deletes a key.
pub fn delete(tx: &mut Tx, args: Key) -> Result<bool, Abort> {
    Ok(tx.delete(&args.key))
}

/// Compare-and-swap.
pub fn cas(tx: &mut Tx, args: CompareAndSwap) -> Result<bool, Abort> {
    if text(tx, &args.key) != args.expected {
        return Ok(false);
    }
    match &args.new {
        Some(value) => tx.put(&args.key, value.as_bytes()),
        None => {
            tx.delete(&args.key);
        }
    }
    Ok(true)
}

/// Adds to a counter.
pub fn increment(tx: &mut Tx, args: Increment) -> Result<i64, Abort> {
    let current = tx.get_i64(&args.key).unwrap_or(0);
    let updated = current
        .checked_add(args.by)
        .ok_or_else(|| Abort::new("the counter would overflow"))?;
    tx.put_i64(&args.key, updated);
    Ok(updated)
}

/// Runs a list-append transaction: for each op in order, `Some(list)` for a read (seeing the
/// transaction's own earlier appends), `None` for an append.
pub fn list_txn(tx: &mut Tx, args: ListTxn) -> Result<Vec<Option<Vec<i64>>>, Abort> {
    let mut results = Vec::with_capacity(args.ops.len());
    for op in args.ops {
        match op {
            ListOp::Append { key, value } => {
                let mut current = list(tx, &key);
                current.push(value);
                tx.put(&key, encode_list(&current).as_bytes());
                results.push(None);
            }
            ListOp::Read { key } => results.push(Some(list(tx, &key))),
        }
    }
    Ok(results)
}

/// Keys of `get`.
pub fn read_key(args: &Key, keys: &mut KeySet) {
    keys.read(&args.key);
}

/// Keys of `delete`.
pub fn write_key(args: &Key, keys: &mut KeySet) {
    keys.write(&args.key);
}

/// Keys of `put`.
pub fn put_keys(args: &Put, keys: &mut KeySet) {
    keys.write(&args.key);
}

/// Keys of `cas`.
pub fn cas_keys(args: &CompareAndSwap, keys: &mut KeySet) {
    keys.write(&args.key);
}

/// Keys of `increment`.
pub fn increment_keys(args: &Increment, keys: &mut KeySet) {
    keys.write(&args.key);
}

/// Keys of `list_txn`: written for appends, read for reads.
pub fn list_txn_keys(args: &ListTxn, keys: &mut KeySet) {
    for op in &args.ops {
        match op {
            ListOp::Append { key, .. } => keys.write(key),
            ListOp::Read { key } => keys.read(key),
        }
    }
}

procedure!(get, keys = read_key);
procedure!(put, keys = put_keys);
procedure!(delete, keys = write_key);
procedure!(cas, keys = cas_keys);
procedure!(increment, keys = increment_keys);
procedure!(list_txn, keys = list_txn_keys);

#[cfg(test)]
mod tests {
    use super::*;
    use transdb_guest::testing::MemoryStore;

    #[test]
    fn cas_swaps_only_on_a_match() {
        let mut store = MemoryStore::new();
        let swap = |expected: Option<&str>, new: Option<&str>| CompareAndSwap {
            key: "k".into(),
            expected: expected.map(Into::into),
            new: new.map(Into::into),
        };
        assert_eq!(
            store.call_with_keys(cas, cas_keys, swap(None, Some("a"))),
            Ok(true)
        );
        assert_eq!(
            store.call_with_keys(cas, cas_keys, swap(None, Some("b"))),
            Ok(false)
        );
        assert_eq!(
            store.call_with_keys(cas, cas_keys, swap(Some("a"), Some("b"))),
            Ok(true)
        );
        assert_eq!(store.get("k"), Some(&b"b"[..]));
        assert_eq!(
            store.call_with_keys(cas, cas_keys, swap(Some("b"), None)),
            Ok(true)
        );
        assert_eq!(store.get("k"), None);
    }

    #[test]
    fn increment_counts_from_zero_and_refuses_overflow() {
        let mut store = MemoryStore::new();
        let by = |by| Increment {
            key: "n".into(),
            by,
        };
        assert_eq!(
            store.call_with_keys(increment, increment_keys, by(2)),
            Ok(2)
        );
        assert_eq!(
            store.call_with_keys(increment, increment_keys, by(-5)),
            Ok(-3)
        );
        assert!(store.call(increment, by(i64::MAX)).is_ok());
        assert_eq!(store.call(increment, by(3)), Ok(i64::MAX));
        assert!(store.call(increment, by(1)).is_err());
    }

    #[test]
    fn list_txn_appends_and_reads_its_own_appends() {
        let mut store = MemoryStore::new();
        store.put("x", b"1,2");
        let append = |key: &str, value| ListOp::Append {
            key: key.into(),
            value,
        };
        let read = |key: &str| ListOp::Read { key: key.into() };
        let txn = ListTxn {
            ops: vec![
                read("x"),
                read("y"),
                append("x", 3),
                append("y", -4),
                read("x"),
                append("y", 5),
                read("y"),
            ],
        };
        assert_eq!(
            store.call_with_keys(list_txn, list_txn_keys, txn),
            Ok(vec![
                Some(vec![1, 2]),
                Some(vec![]),
                None,
                None,
                Some(vec![1, 2, 3]),
                None,
                Some(vec![-4, 5]),
            ])
        );
        assert_eq!(store.get("x"), Some(&b"1,2,3"[..]));
        assert_eq!(store.get("y"), Some(&b"-4,5"[..]));
        assert_eq!(
            store.call_json(list_txn, r#"{"ops":[{"Read":{"key":"y"}}]}"#),
            Ok("[[-4,5]]".into())
        );
        // A value that is not a list fails the call and writes nothing.
        store.put("bad", b"1,two");
        let txn = ListTxn {
            ops: vec![append("x", 9), read("bad")],
        };
        assert!(store.call_with_keys(list_txn, list_txn_keys, txn).is_err());
        assert_eq!(store.get("x"), Some(&b"1,2,3"[..]));
    }

    #[test]
    fn lists_round_trip_through_their_text() {
        for list in [vec![], vec![7], vec![1, -2, i64::MAX, i64::MIN]] {
            assert_eq!(decode_list(encode_list(&list).as_bytes()), Some(list));
        }
        assert_eq!(decode_list(b""), Some(vec![]));
        assert_eq!(decode_list(b"1,,2"), None);
        assert_eq!(decode_list(b"x"), None);
        assert_eq!(decode_list(&[0xff]), None);
    }

    #[test]
    fn get_put_delete_via_json() {
        let mut store = MemoryStore::new();
        assert_eq!(store.call_json(get, r#"{"key":"k"}"#), Ok("null".into()));
        assert_eq!(
            store.call_json(put, r#"{"key":"k","value":"v"}"#),
            Ok("null".into())
        );
        assert_eq!(store.call_json(get, r#"{"key":"k"}"#), Ok(r#""v""#.into()));
        assert_eq!(store.call_json(delete, r#"{"key":"k"}"#), Ok("true".into()));
        assert_eq!(
            store.call_json(delete, r#"{"key":"k"}"#),
            Ok("false".into())
        );
    }
}
