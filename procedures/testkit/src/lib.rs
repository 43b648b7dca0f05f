//! Procedures that exercise the SDK's and server's edges, for the end-to-end tests: a panic,
//! logging, an echo of the arguments, a read of a value that does not decode, and a
//! procedure whose keys depend on the state.
#![no_std]

use transdb_guest::prelude::*;

/// Arguments carrying a message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Message {
    /// The message.
    pub message: String,
}

/// Arguments naming a key.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Key {
    /// The key.
    pub key: String,
}

/// A value with a few field kinds, to check both encodings end to end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Echo {
    /// Text.
    pub text: String,
    /// A number.
    pub number: i64,
    /// A list.
    pub list: Vec<u32>,
    /// An optional flag.
    pub flag: Option<bool>,
}

/// Panics with the message.
pub fn panic(_tx: &mut Tx, args: Message) -> Result<(), Abort> {
    panic!("{}", args.message)
}

/// Writes the message to the server log at info level and returns it.
pub fn log(_tx: &mut Tx, args: Message) -> Result<String, Abort> {
    transdb_guest::info!("testkit says: {}", args.message);
    Ok(args.message)
}

/// Returns its arguments.
pub fn echo(_tx: &mut Tx, args: Echo) -> Result<Echo, Abort> {
    Ok(args)
}

/// Reads the key as an integer (fails the call if it is not one).
pub fn read_number(tx: &mut Tx, args: Key) -> Result<Option<i64>, Abort> {
    Ok(tx.get_i64(&args.key))
}

/// Arguments of `follow`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Follow {
    /// The key whose value names the counter to increment.
    pub pointer: String,
}

/// Increments the counter named by the value of `pointer` and returns its new value. Its
/// keys depend on the state, so it has no key function: the server discovers them.
pub fn follow(tx: &mut Tx, args: Follow) -> Result<i64, Abort> {
    let target = tx
        .get(&args.pointer)
        .ok_or_else(|| Abort::new("the pointer is not set"))?;
    let target = String::from_utf8(target).map_err(|_| Abort::new("the pointer is not UTF-8"))?;
    let value = tx.get_i64(&target).unwrap_or(0) + 1;
    tx.put_i64(&target, value);
    Ok(value)
}

procedure!(panic);
procedure!(follow);
procedure!(log);
procedure!(echo);
procedure!(read_number);
