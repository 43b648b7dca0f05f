//! Authentication and roles: bearer tokens kept in the data directory, and client
//! certificates (mutual TLS).
//!
//! Model:
//! - every connection authenticates before its first request, with a token
//!   (`Authenticate { token }`) or with a client certificate issued by a CA the operator
//!   named with `--client-ca ROLE=FILE`; the connection then has that token's or CA's role;
//! - a token is `tdb_<id>_<secret>`: a 16-hex-digit id (public: it names the token in
//!   listings and revocation) and a 64-hex-digit secret (256 random bits). The server keeps
//!   only the SHA-256 of the secret, in `tokens.json` (mode 0600), and compares digests in
//!   constant time;
//! - on first start (no `tokens.json`) the server creates an admin token and writes it to
//!   `admin.token` (mode 0600) in the data directory, which the CLI run from the same
//!   directory uses by default;
//! - revoking a token removes it from the file and marks it revoked in memory: every
//!   connection authenticated with it is refused its next request and closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use parking_lot::{Mutex, RwLock};
use ring::rand::SecureRandom;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use transdb_proto::message::TokenInfo;
use transdb_proto::{ErrorCode, ErrorResponse, Role};

use crate::hex;

pub use transdb_client::ADMIN_TOKEN_FILE;

/// File in the data directory holding the tokens (ids, names, roles, digests of secrets).
pub const TOKENS_FILE: &str = "tokens.json";
/// Most tokens a server keeps.
pub const MAX_TOKENS: usize = 10_000;
/// Longest token name, in bytes.
pub const MAX_TOKEN_NAME_BYTES: usize = 64;

const TOKEN_PREFIX: &str = "tdb_";
const ID_BYTES: usize = 8;
const SECRET_BYTES: usize = 32;

/// One token the server accepts.
pub struct TokenEntry {
    info: TokenInfo,
    digest: [u8; 32],
    revoked: AtomicBool,
}

#[derive(Serialize, Deserialize)]
struct StoredToken {
    id: String,
    name: String,
    role: String,
    created_unix_secs: u64,
    /// Hex SHA-256 of the secret part.
    sha256: String,
}

#[derive(Serialize, Deserialize)]
struct TokensFile {
    tokens: Vec<StoredToken>,
}

/// The server's tokens.
pub struct Tokens {
    path: PathBuf,
    entries: RwLock<BTreeMap<String, Arc<TokenEntry>>>,
    /// Serialises changes, so the file is always written from the newest set.
    changing: Mutex<()>,
}

/// Who a connection is: its role, and the token it used (if any), which can be revoked.
pub struct Principal {
    /// What the connection may do.
    pub role: Role,
    token: Option<Arc<TokenEntry>>,
}

impl Principal {
    /// A connection authenticated by a client certificate.
    pub fn certificate(role: Role) -> Principal {
        Principal { role, token: None }
    }

    /// Whether the token it authenticated with has been revoked since.
    pub fn revoked(&self) -> bool {
        self.token
            .as_ref()
            .is_some_and(|token| token.revoked.load(Ordering::Relaxed))
    }

    /// The token's id, if it authenticated with a token.
    pub fn token_id(&self) -> Option<&str> {
        self.token.as_ref().map(|token| token.info.id.as_str())
    }
}

impl Tokens {
    /// Loads `tokens.json` from `data_dir`; on first start (no such file), creates an admin
    /// token and writes it to `admin.token`.
    pub fn open(data_dir: &Path) -> Result<Tokens> {
        let path = data_dir.join(TOKENS_FILE);
        let tokens = Tokens {
            path: path.clone(),
            entries: RwLock::new(BTreeMap::new()),
            changing: Mutex::new(()),
        };
        if !path.exists() {
            let (token, info) = tokens.create("admin", Role::Admin)?;
            // The token file is written after the tokens file: a crash in between leaves
            // a server whose admin token nobody has, which the README's recovery (delete
            // tokens.json and restart) fixes; the other order could hand out a token the
            // server does not know.
            crate::identity::write_atomically(
                &data_dir.join(ADMIN_TOKEN_FILE),
                format!("{token}\n").as_bytes(),
                0o600,
            )?;
            tracing::info!(id = %info.id, file = %data_dir.join(ADMIN_TOKEN_FILE).display(), "created the admin token");
            return Ok(tokens);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: TokensFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is not a valid tokens file: restore it from a backup, or delete it and restart \
                 to revoke every token and create a new admin token",
                path.display()
            )
        })?;
        let mut entries = BTreeMap::new();
        for stored in file.tokens {
            let role = Role::from_name(&stored.role)
                .with_context(|| format!("{}: unknown role {:?}", path.display(), stored.role))?;
            let digest = decode_hex::<32>(&stored.sha256).with_context(|| {
                format!("{}: bad digest of token {}", path.display(), stored.id)
            })?;
            entries.insert(
                stored.id.clone(),
                Arc::new(TokenEntry {
                    info: TokenInfo {
                        id: stored.id,
                        name: stored.name,
                        role,
                        created_unix_secs: stored.created_unix_secs,
                    },
                    digest,
                    revoked: AtomicBool::new(false),
                }),
            );
        }
        *tokens.entries.write() = entries;
        Ok(tokens)
    }

    /// The principal `token` authenticates, or `None` for a malformed, unknown or revoked
    /// token (the caller answers all of these alike).
    pub fn verify(&self, token: &str) -> Option<Principal> {
        let (id, secret) = split_token(token)?;
        let entry = self.entries.read().get(id).cloned();
        // Hash even for an unknown id, so both take the same time.
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        let entry = entry?;
        if bool::from(digest.ct_eq(&entry.digest)) && !entry.revoked.load(Ordering::Relaxed) {
            Some(Principal {
                role: entry.info.role,
                token: Some(entry),
            })
        } else {
            None
        }
    }

    /// Creates a token; returns it (shown once) and its listing.
    pub fn create(&self, name: &str, role: Role) -> Result<(String, TokenInfo), ErrorResponse> {
        check_token_name(name)?;
        let _changing = self.changing.lock();
        if self.entries.read().len() >= MAX_TOKENS {
            return Err(ErrorResponse::new(
                ErrorCode::PERMISSION_DENIED,
                format!(
                    "the server holds {MAX_TOKENS} tokens (MAX_TOKENS): revoke unused ones first"
                ),
            ));
        }
        let random = ring::rand::SystemRandom::new();
        let mut id = [0u8; ID_BYTES];
        let mut secret = [0u8; SECRET_BYTES];
        random
            .fill(&mut id)
            .and_then(|()| random.fill(&mut secret))
            .map_err(|_| internal("the system random number generator failed"))?;
        let id = hex(&id);
        let secret = hex(&secret);
        let info = TokenInfo {
            id: id.clone(),
            name: name.to_string(),
            role,
            created_unix_secs: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |elapsed| elapsed.as_secs()),
        };
        let entry = Arc::new(TokenEntry {
            info: info.clone(),
            digest: Sha256::digest(secret.as_bytes()).into(),
            revoked: AtomicBool::new(false),
        });
        let mut next = self.entries.read().clone();
        next.insert(id.clone(), entry);
        self.persist(&next)?;
        *self.entries.write() = next;
        Ok((format!("{TOKEN_PREFIX}{id}_{secret}"), info))
    }

    /// Revokes the token `id`; returns whether it existed.
    pub fn revoke(&self, id: &str) -> Result<bool, ErrorResponse> {
        let _changing = self.changing.lock();
        let mut next = self.entries.read().clone();
        let Some(entry) = next.remove(id) else {
            return Ok(false);
        };
        self.persist(&next)?;
        entry.revoked.store(true, Ordering::Relaxed);
        *self.entries.write() = next;
        Ok(true)
    }

    /// Every token, by id.
    pub fn list(&self) -> Vec<TokenInfo> {
        self.entries
            .read()
            .values()
            .map(|entry| entry.info.clone())
            .collect()
    }

    fn persist(&self, entries: &BTreeMap<String, Arc<TokenEntry>>) -> Result<(), ErrorResponse> {
        let file = TokensFile {
            tokens: entries
                .values()
                .map(|entry| StoredToken {
                    id: entry.info.id.clone(),
                    name: entry.info.name.clone(),
                    role: entry.info.role.name().to_string(),
                    created_unix_secs: entry.info.created_unix_secs,
                    sha256: hex(&entry.digest),
                })
                .collect(),
        };
        let text = serde_json::to_string_pretty(&file).expect("tokens serialise");
        crate::identity::write_atomically(&self.path, text.as_bytes(), 0o600).map_err(|error| {
            tracing::error!(%error, "cannot write the tokens file");
            internal(&format!("cannot write {}: {error:#}", self.path.display()))
        })
    }
}

/// The roles granted to client certificates: one verifier per CA file.
pub struct CertificateRoles {
    verifiers: Vec<(Role, Arc<dyn ClientCertVerifier>)>,
    /// Accepts a certificate of any of the CAs (or none: the token then decides).
    combined: Arc<dyn ClientCertVerifier>,
}

impl CertificateRoles {
    /// Verifiers for `(role, CA file)` pairs; `None` if there are none.
    pub fn new(cas: &[(Role, PathBuf)]) -> Result<Option<CertificateRoles>> {
        if cas.is_empty() {
            return Ok(None);
        }
        let provider = transdb_client::tls::crypto_provider();
        let mut all = rustls::RootCertStore::empty();
        let mut verifiers = Vec::new();
        for (role, path) in cas {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in transdb_client::tls::load_certificates(path)? {
                roots
                    .add(certificate.clone())
                    .with_context(|| format!("client CA {}", path.display()))?;
                all.add(certificate)?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                    .build()
                    .with_context(|| format!("client CA {}", path.display()))?;
            verifiers.push((*role, verifier));
        }
        // Strongest role first: a certificate that several CAs vouch for gets the strongest.
        verifiers.sort_by_key(|(role, _)| std::cmp::Reverse(*role));
        let combined = WebPkiClientVerifier::builder_with_provider(Arc::new(all), provider)
            .allow_unauthenticated()
            .build()?;
        Ok(Some(CertificateRoles {
            verifiers,
            combined,
        }))
    }

    /// The verifier for the TLS handshake.
    pub fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.combined.clone()
    }

    /// The role of a connection whose client presented `chain` (already verified by the
    /// handshake against one of the CAs).
    pub fn role(&self, chain: &[CertificateDer<'static>]) -> Option<Role> {
        let (end_entity, intermediates) = chain.split_first()?;
        let now = UnixTime::now();
        self.verifiers.iter().find_map(|(role, verifier)| {
            verifier
                .verify_client_cert(end_entity, intermediates, now)
                .is_ok()
                .then_some(*role)
        })
    }
}

/// Parses `ROLE=FILE` (the `--client-ca` flag).
pub fn parse_client_ca(text: &str) -> Result<(Role, PathBuf)> {
    let Some((role, file)) = text.split_once('=') else {
        bail!("expected ROLE=FILE (e.g. write=clients-ca.pem), got {text:?}");
    };
    let role = Role::from_name(role)
        .with_context(|| format!("unknown role {role:?}: use read, write or admin"))?;
    Ok((role, PathBuf::from(file)))
}

fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    (id.len() == ID_BYTES * 2 && secret.len() == SECRET_BYTES * 2).then_some((id, secret))
}

fn check_token_name(name: &str) -> Result<(), ErrorResponse> {
    let valid = !name.is_empty()
        && name.len() <= MAX_TOKEN_NAME_BYTES
        && name
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || b"_-.@".contains(&byte));
    if valid {
        Ok(())
    } else {
        Err(ErrorResponse::new(
            ErrorCode::INVALID_NAME,
            format!(
                "invalid token name {name:?}: use 1 to {MAX_TOKEN_NAME_BYTES} ASCII letters, digits, _, -, . or @"
            ),
        ))
    }
}

fn internal(message: &str) -> ErrorResponse {
    ErrorResponse::new(ErrorCode::INTERNAL, message)
}

fn decode_hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2 {
        return None;
    }
    let mut out = [0u8; N];
    for (index, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(index * 2..index * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_start_writes_an_admin_token_that_verifies_and_survives_a_restart() {
        let directory = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(directory.path()).unwrap();
        let admin = std::fs::read_to_string(directory.path().join(ADMIN_TOKEN_FILE)).unwrap();
        let admin = admin.trim();
        assert_eq!(tokens.verify(admin).unwrap().role, Role::Admin);
        drop(tokens);
        let reopened = Tokens::open(directory.path()).unwrap();
        assert_eq!(reopened.verify(admin).unwrap().role, Role::Admin);
        assert_eq!(reopened.list().len(), 1);
        // The file holds digests, never the secret.
        let file = std::fs::read_to_string(directory.path().join(TOKENS_FILE)).unwrap();
        let secret = admin.rsplit('_').next().unwrap();
        assert!(!file.contains(secret));
    }

    #[cfg(unix)]
    #[test]
    fn token_files_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        Tokens::open(directory.path()).unwrap();
        for file in [ADMIN_TOKEN_FILE, TOKENS_FILE] {
            let mode = std::fs::metadata(directory.path().join(file))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{file}");
        }
    }

    #[test]
    fn wrong_malformed_and_revoked_tokens_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(directory.path()).unwrap();
        let (token, info) = tokens.create("ci", Role::Write).unwrap();
        let principal = tokens.verify(&token).unwrap();
        assert_eq!(principal.role, Role::Write);
        let mut wrong = token.clone();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert!(tokens.verify(&wrong).is_none());
        for malformed in ["", "tdb_", "tdb_x_y", &token[..token.len() - 1], "Bearer x"] {
            assert!(tokens.verify(malformed).is_none(), "{malformed:?}");
        }
        assert!(tokens.revoke(&info.id).unwrap());
        assert!(principal.revoked());
        assert!(tokens.verify(&token).is_none());
        assert!(!tokens.revoke(&info.id).unwrap());
        let reopened = Tokens::open(directory.path()).unwrap();
        assert!(reopened.verify(&token).is_none());
    }

    #[test]
    fn bad_names_and_a_corrupt_file_get_clear_errors() {
        let directory = tempfile::tempdir().unwrap();
        let tokens = Tokens::open(directory.path()).unwrap();
        for name in ["", "has space", &"x".repeat(65)] {
            assert_eq!(
                tokens.create(name, Role::Read).unwrap_err().code,
                ErrorCode::INVALID_NAME
            );
        }
        std::fs::write(directory.path().join(TOKENS_FILE), "{").unwrap();
        let error = Tokens::open(directory.path()).err().unwrap();
        assert!(
            format!("{error:#}").contains("delete it and restart"),
            "{error:#}"
        );
    }

    #[test]
    fn client_ca_flags_parse() {
        assert_eq!(
            parse_client_ca("write=ca.pem").unwrap(),
            (Role::Write, PathBuf::from("ca.pem"))
        );
        assert!(parse_client_ca("ca.pem").is_err());
        assert!(parse_client_ca("root=ca.pem").is_err());
    }
}
