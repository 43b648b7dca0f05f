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

procedure!(get, keys = read_key);
procedure!(put, keys = put_keys);
procedure!(delete, keys = write_key);
procedure!(cas, keys = cas_keys);
procedure!(increment, keys = increment_keys);

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
