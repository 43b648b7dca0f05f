//! The bank: accounts with integer balances, moved between atomically.
//!
//! A balance lives at key `account:<name>` as decimal text, so `transdb get account:alice`
//! shows it. Every procedure declares its keys up front, so the server knows a call's key
//! set before running it.
//!
//! | procedure | arguments (JSON) | result |
//! |---|---|---|
//! | `open` | `{"account":"alice","balance":100}` | `null`; aborts if the account exists or the balance is negative |
//! | `deposit` | `{"account":"alice","amount":5}` | the new balance |
//! | `withdraw` | `{"account":"alice","amount":5}` | the new balance; aborts on insufficient funds |
//! | `transfer` | `{"from":"alice","to":"bob","amount":30}` | `null`; aborts on an unknown account, insufficient funds or a non-positive amount; a transfer to oneself changes nothing |
//! | `balance` | `{"account":"alice"}` | the balance |
//! | `total` | `{"accounts":["alice","bob"]}` | the sum of the balances, read in one transaction |
#![no_std]

use transdb_guest::prelude::*;

/// The key of an account's balance.
pub fn account_key(account: &str) -> String {
    format!("account:{account}")
}

/// Arguments of `open`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Open {
    /// Account name.
    pub account: String,
    /// Initial balance, at least 0.
    pub balance: i64,
}

/// Arguments of `deposit` and `withdraw`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Movement {
    /// Account name.
    pub account: String,
    /// Units to move, more than 0.
    pub amount: i64,
}

/// Arguments of `transfer`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Transfer {
    /// Account debited.
    pub from: String,
    /// Account credited.
    pub to: String,
    /// Units to move, more than 0.
    pub amount: i64,
}

/// Arguments of `balance`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    /// Account name.
    pub account: String,
}

/// Arguments of `total`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Accounts {
    /// Account names.
    pub accounts: Vec<String>,
}

fn positive(amount: i64) -> Result<(), Abort> {
    if amount <= 0 {
        return Err(Abort::new(format!("amount must be positive, got {amount}")));
    }
    Ok(())
}

fn existing(tx: &mut Tx, account: &str) -> Result<i64, Abort> {
    tx.get_i64(&account_key(account))
        .ok_or_else(|| Abort::new(format!("unknown account {account:?}")))
}

/// Creates an account.
pub fn open(tx: &mut Tx, args: Open) -> Result<(), Abort> {
    if args.balance < 0 {
        return Err(Abort::new(format!(
            "initial balance must not be negative, got {}",
            args.balance
        )));
    }
    let key = account_key(&args.account);
    if tx.contains(&key) {
        return Err(Abort::new(format!(
            "account {:?} already exists",
            args.account
        )));
    }
    tx.put_i64(&key, args.balance);
    Ok(())
}

/// Adds to a balance.
pub fn deposit(tx: &mut Tx, args: Movement) -> Result<i64, Abort> {
    positive(args.amount)?;
    let balance = existing(tx, &args.account)?;
    let updated = balance
        .checked_add(args.amount)
        .ok_or_else(|| Abort::new("the balance would overflow"))?;
    tx.put_i64(&account_key(&args.account), updated);
    Ok(updated)
}

/// Takes from a balance.
pub fn withdraw(tx: &mut Tx, args: Movement) -> Result<i64, Abort> {
    positive(args.amount)?;
    let balance = existing(tx, &args.account)?;
    if balance < args.amount {
        return Err(Abort::new(format!(
            "insufficient funds: {:?} has {balance}, needs {}",
            args.account, args.amount
        )));
    }
    tx.put_i64(&account_key(&args.account), balance - args.amount);
    Ok(balance - args.amount)
}

/// Moves `amount` from one account to another.
pub fn transfer(tx: &mut Tx, args: Transfer) -> Result<(), Abort> {
    positive(args.amount)?;
    let from = existing(tx, &args.from)?;
    if args.from == args.to {
        return Ok(());
    }
    let to = existing(tx, &args.to)?;
    if from < args.amount {
        return Err(Abort::new(format!(
            "insufficient funds: {:?} has {from}, needs {}",
            args.from, args.amount
        )));
    }
    let credited = to
        .checked_add(args.amount)
        .ok_or_else(|| Abort::new("the balance would overflow"))?;
    tx.put_i64(&account_key(&args.from), from - args.amount);
    tx.put_i64(&account_key(&args.to), credited);
    Ok(())
}

/// An account's balance.
pub fn balance(tx: &mut Tx, args: Account) -> Result<i64, Abort> {
    existing(tx, &args.account)
}

/// The sum of several balances, all read in one transaction.
pub fn total(tx: &mut Tx, args: Accounts) -> Result<i64, Abort> {
    let mut sum: i64 = 0;
    for account in &args.accounts {
        sum = sum
            .checked_add(existing(tx, account)?)
            .ok_or_else(|| Abort::new("the total would overflow"))?;
    }
    Ok(sum)
}

/// Keys of `open`.
pub fn open_keys(args: &Open, keys: &mut KeySet) {
    keys.write(&account_key(&args.account));
}

/// Keys of `deposit` and `withdraw`.
pub fn movement_keys(args: &Movement, keys: &mut KeySet) {
    keys.write(&account_key(&args.account));
}

/// Keys of `transfer`.
pub fn transfer_keys(args: &Transfer, keys: &mut KeySet) {
    keys.write(&account_key(&args.from));
    keys.write(&account_key(&args.to));
}

/// Keys of `balance`.
pub fn balance_keys(args: &Account, keys: &mut KeySet) {
    keys.read(&account_key(&args.account));
}

/// Keys of `total`.
pub fn total_keys(args: &Accounts, keys: &mut KeySet) {
    for account in &args.accounts {
        keys.read(&account_key(account));
    }
}

procedure!(open, keys = open_keys);
procedure!(deposit, keys = movement_keys);
procedure!(withdraw, keys = movement_keys);
procedure!(transfer, keys = transfer_keys);
procedure!(balance, keys = balance_keys);
procedure!(total, keys = total_keys);

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use transdb_guest::testing::{CallError, MemoryStore};

    fn bank(accounts: &[(&str, i64)]) -> MemoryStore {
        let mut store = MemoryStore::new();
        for (account, balance) in accounts {
            let args = Open {
                account: (*account).into(),
                balance: *balance,
            };
            store.call_with_keys(open, open_keys, args).unwrap();
        }
        store
    }

    fn move_units(
        store: &mut MemoryStore,
        from: &str,
        to: &str,
        amount: i64,
    ) -> Result<(), CallError> {
        store.call_with_keys(
            transfer,
            transfer_keys,
            Transfer {
                from: from.into(),
                to: to.into(),
                amount,
            },
        )
    }

    #[test]
    fn transfer_moves_money_and_keeps_the_total() {
        let mut store = bank(&[("alice", 100), ("bob", 50)]);
        move_units(&mut store, "alice", "bob", 30).unwrap();
        assert_eq!(store.get("account:alice"), Some(&b"70"[..]));
        assert_eq!(store.get("account:bob"), Some(&b"80"[..]));
        let total_args = Accounts {
            accounts: vec!["alice".into(), "bob".into()],
        };
        assert_eq!(store.call_with_keys(total, total_keys, total_args), Ok(150));
    }

    #[test]
    fn transfer_refusals_change_nothing() {
        let mut store = bank(&[("alice", 10), ("bob", 0)]);
        let before = store.clone();
        let insufficient = move_units(&mut store, "alice", "bob", 11).unwrap_err();
        assert!(
            matches!(&insufficient, CallError::Aborted(message) if message.contains("insufficient funds")),
            "{insufficient:?}"
        );
        let unknown = move_units(&mut store, "alice", "carol", 1).unwrap_err();
        assert!(
            matches!(&unknown, CallError::Aborted(message) if message.contains("unknown account")),
            "{unknown:?}"
        );
        for amount in [0, -5] {
            let refused = move_units(&mut store, "alice", "bob", amount).unwrap_err();
            assert!(
                matches!(&refused, CallError::Aborted(message) if message.contains("positive")),
                "{refused:?}"
            );
        }
        assert_eq!(store, before);
    }

    #[test]
    fn a_transfer_to_oneself_changes_nothing() {
        let mut store = bank(&[("alice", 10)]);
        let before = store.clone();
        move_units(&mut store, "alice", "alice", 5).unwrap();
        move_units(&mut store, "alice", "alice", 500).unwrap();
        assert_eq!(store, before);
    }

    #[test]
    fn open_refuses_an_existing_account_and_a_negative_balance() {
        let mut store = bank(&[("alice", 10)]);
        let again = store
            .call(
                open,
                Open {
                    account: "alice".into(),
                    balance: 5,
                },
            )
            .unwrap_err();
        assert!(
            matches!(&again, CallError::Aborted(message) if message.contains("already exists")),
            "{again:?}"
        );
        assert_eq!(store.get("account:alice"), Some(&b"10"[..]));
        assert!(
            store
                .call(
                    open,
                    Open {
                        account: "bob".into(),
                        balance: -1
                    }
                )
                .is_err()
        );
    }

    #[test]
    fn deposit_and_withdraw_return_the_new_balance() {
        let mut store = bank(&[("alice", 10)]);
        assert_eq!(
            store.call(
                deposit,
                Movement {
                    account: "alice".into(),
                    amount: 5
                }
            ),
            Ok(15)
        );
        assert_eq!(
            store.call(
                withdraw,
                Movement {
                    account: "alice".into(),
                    amount: 15
                }
            ),
            Ok(0)
        );
        assert!(
            store
                .call(
                    withdraw,
                    Movement {
                        account: "alice".into(),
                        amount: 1
                    }
                )
                .is_err()
        );
        assert!(
            store
                .call(
                    deposit,
                    Movement {
                        account: "alice".into(),
                        amount: i64::MAX
                    }
                )
                .is_ok()
        );
        let overflow = store
            .call(
                deposit,
                Movement {
                    account: "alice".into(),
                    amount: 1,
                },
            )
            .unwrap_err();
        assert!(matches!(&overflow, CallError::Aborted(message) if message.contains("overflow")));
    }

    #[test]
    fn the_documented_json_shapes_work() {
        let mut store = MemoryStore::new();
        assert_eq!(
            store.call_json(open, r#"{"account":"alice","balance":100}"#),
            Ok("null".into())
        );
        assert_eq!(
            store.call_json(open, r#"{"account":"bob","balance":0}"#),
            Ok("null".into())
        );
        assert_eq!(
            store.call_json(deposit, r#"{"account":"alice","amount":5}"#),
            Ok("105".into())
        );
        assert_eq!(
            store.call_json(withdraw, r#"{"account":"alice","amount":5}"#),
            Ok("100".into())
        );
        assert_eq!(
            store.call_json(transfer, r#"{"from":"alice","to":"bob","amount":30}"#),
            Ok("null".into())
        );
        assert_eq!(
            store.call_json(balance, r#"{"account":"alice"}"#),
            Ok("70".into())
        );
        assert_eq!(
            store.call_json(total, r#"{"accounts":["alice","bob"]}"#),
            Ok("100".into())
        );
        let bad = store
            .call_json(transfer, r#"{"from":"alice"}"#)
            .unwrap_err();
        assert!(
            matches!(&bad, CallError::InvalidArguments(message) if message.contains("missing field")),
            "{bad:?}"
        );
    }

    #[test]
    fn every_procedure_stays_inside_its_declared_keys() {
        let mut store = bank(&[("alice", 10), ("bob", 10)]);
        store
            .call_with_keys(
                deposit,
                movement_keys,
                Movement {
                    account: "alice".into(),
                    amount: 1,
                },
            )
            .unwrap();
        store
            .call_with_keys(
                withdraw,
                movement_keys,
                Movement {
                    account: "alice".into(),
                    amount: 1,
                },
            )
            .unwrap();
        store
            .call_with_keys(
                balance,
                balance_keys,
                Account {
                    account: "bob".into(),
                },
            )
            .unwrap();
        move_units(&mut store, "alice", "bob", 3).unwrap();
    }
}
