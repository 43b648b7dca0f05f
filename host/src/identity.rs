//! The server's TLS identity: a certificate chain and its private key.
//!
//! Either given (`--cert` / `--key`, PEM or DER) or, by default, a self-signed certificate
//! for `localhost`, `127.0.0.1` and `::1` generated on first start and kept in the data
//! directory (`cert.pem`, `key.pem` with mode 0600), so that restarts keep the identity
//! clients already trust. The key is written before the certificate, each through a
//! temporary file and a rename, so a crash never leaves a certificate without its key.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// File name of the generated certificate in the data directory.
pub const CERTIFICATE_FILE: &str = "cert.pem";
/// File name of the generated private key in the data directory.
pub const KEY_FILE: &str = "key.pem";

/// Names the generated certificate is valid for.
const GENERATED_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// A certificate chain and its key.
pub struct Identity {
    /// The chain, leaf first.
    pub certificates: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the leaf certificate lives (what clients pass as `--ca` for a self-signed one).
    pub certificate_path: PathBuf,
}

impl Identity {
    /// Loads `--cert` / `--key` files (PEM or DER each).
    pub fn load(certificate_path: &Path, key_path: &Path) -> Result<Identity> {
        let certificates = transdb_client::tls::load_certificates(certificate_path)?;
        let key_bytes = fs::read(key_path)
            .with_context(|| format!("cannot read key file {}", key_path.display()))?;
        let key =
            parse_key(&key_bytes).with_context(|| format!("key file {}", key_path.display()))?;
        Ok(Identity {
            certificates,
            key,
            certificate_path: certificate_path.to_owned(),
        })
    }

    /// Loads the generated identity of `data_dir`, generating it on first use.
    pub fn load_or_generate(data_dir: &Path) -> Result<Identity> {
        let certificate_path = data_dir.join(CERTIFICATE_FILE);
        let key_path = data_dir.join(KEY_FILE);
        match (certificate_path.exists(), key_path.exists()) {
            (true, true) => Identity::load(&certificate_path, &key_path),
            (true, false) => bail!(
                "{} exists but {} does not: restore the key, or delete the certificate to generate a new \
                 identity (clients will then have to trust the new certificate)",
                certificate_path.display(),
                key_path.display()
            ),
            // A key without a certificate is a generation that crashed half-way: no client
            // can trust it yet, so it is replaced.
            (false, _) => {
                let generated =
                    rcgen::generate_simple_self_signed(GENERATED_NAMES.map(String::from).to_vec())
                        .context("generating a self-signed certificate")?;
                write_atomically(
                    &key_path,
                    generated.signing_key.serialize_pem().as_bytes(),
                    0o600,
                )?;
                write_atomically(&certificate_path, generated.cert.pem().as_bytes(), 0o644)?;
                tracing::info!(certificate = %certificate_path.display(), "generated a self-signed certificate");
                Identity::load(&certificate_path, &key_path)
            }
        }
    }

    /// The QUIC server crypto configuration for this identity, offering only our ALPN.
    /// With `client_verifier`, clients may present a certificate (mutual TLS).
    pub fn quic_server_config(
        &self,
        client_verifier: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
    ) -> Result<Arc<quinn::crypto::rustls::QuicServerConfig>> {
        let builder =
            rustls::ServerConfig::builder_with_provider(transdb_client::tls::crypto_provider())
                .with_protocol_versions(&[&rustls::version::TLS13])?;
        let builder = match client_verifier {
            Some(verifier) => builder.with_client_cert_verifier(verifier),
            None => builder.with_no_client_auth(),
        };
        let mut tls = builder
            .with_single_cert(self.certificates.clone(), self.key.clone_key())
            .with_context(|| {
                format!(
                    "certificate {} does not fit its key",
                    self.certificate_path.display()
                )
            })?;
        tls.alpn_protocols = vec![transdb_proto::ALPN.to_vec()];
        tls.max_early_data_size = 0;
        Ok(Arc::new(quinn::crypto::rustls::QuicServerConfig::try_from(
            tls,
        )?))
    }
}

fn parse_key(bytes: &[u8]) -> Result<PrivateKeyDer<'static>> {
    transdb_client::tls::parse_private_key(bytes).map_err(anyhow::Error::msg)
}

/// Writes `bytes` to `path` through a synced temporary file and a rename.
pub(crate) fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let temporary = path.with_extension("tmp");
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(&temporary)
        .with_context(|| format!("cannot create {}", temporary.display()))?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&temporary, path).with_context(|| {
        format!(
            "cannot rename {} to {}",
            temporary.display(),
            path.display()
        )
    })?;
    if let Some(directory) = path.parent() {
        fs::File::open(directory)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_is_kept_across_loads() {
        let directory = tempfile::tempdir().unwrap();
        let first = Identity::load_or_generate(directory.path()).unwrap();
        let second = Identity::load_or_generate(directory.path()).unwrap();
        assert_eq!(first.certificates, second.certificates);
        assert_eq!(first.key.secret_der(), second.key.secret_der());
        first.quic_server_config(None).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn generated_key_is_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let directory = tempfile::tempdir().unwrap();
        Identity::load_or_generate(directory.path()).unwrap();
        let mode = fs::metadata(directory.path().join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_certificate_without_its_key_is_an_error_not_a_new_identity() {
        let directory = tempfile::tempdir().unwrap();
        Identity::load_or_generate(directory.path()).unwrap();
        fs::remove_file(directory.path().join(KEY_FILE)).unwrap();
        let error = Identity::load_or_generate(directory.path())
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("key.pem does not"), "{error}");
    }

    #[test]
    fn der_files_load_like_pem_files() {
        let directory = tempfile::tempdir().unwrap();
        let generated = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let certificate = directory.path().join("c.der");
        let key = directory.path().join("k.der");
        fs::write(&certificate, generated.cert.der()).unwrap();
        fs::write(&key, generated.signing_key.serialize_der()).unwrap();
        let identity = Identity::load(&certificate, &key).unwrap();
        assert_eq!(
            identity.certificates[0].as_ref(),
            generated.cert.der().as_ref()
        );
        identity.quic_server_config(None).unwrap();
    }

    #[test]
    fn mismatched_certificate_and_key_are_refused() {
        let directory = tempfile::tempdir().unwrap();
        let one = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let certificate = directory.path().join("c.pem");
        let key = directory.path().join("k.pem");
        fs::write(&certificate, one.cert.pem()).unwrap();
        fs::write(&key, two.signing_key.serialize_pem()).unwrap();
        let identity = Identity::load(&certificate, &key).unwrap();
        assert!(identity.quic_server_config(None).is_err());
    }
}
