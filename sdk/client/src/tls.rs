//! Certificates and the QUIC/TLS configuration of a client.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::Error;

/// Reads certificates from a file in PEM (one or more `CERTIFICATE` blocks) or DER (exactly
/// one certificate) form; the form is recognised from the content.
///
/// # Errors
/// [`Error::Config`] naming the file if it cannot be read or holds no certificate.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let bytes = std::fs::read(path).map_err(|error| {
        Error::Config(format!(
            "cannot read certificate file {}: {error}",
            path.display()
        ))
    })?;
    parse_certificates(&bytes)
        .map_err(|reason| Error::Config(format!("certificate file {}: {reason}", path.display())))
}

/// Parses certificates in PEM or DER form (see [`load_certificates`]).
pub fn parse_certificates(bytes: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    if is_pem(bytes) {
        let certificates = CertificateDer::pem_slice_iter(bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| format!("invalid PEM: {error}"))?;
        if certificates.is_empty() {
            return Err("PEM file holds no CERTIFICATE block".into());
        }
        Ok(certificates)
    } else if bytes.first() == Some(&0x30) {
        // A DER certificate is an ASN.1 SEQUENCE (tag 0x30); rustls checks the rest.
        Ok(vec![CertificateDer::from(bytes.to_vec())])
    } else {
        Err("neither PEM (-----BEGIN CERTIFICATE-----) nor DER".into())
    }
}

/// Whether `bytes` look like PEM rather than DER.
pub fn is_pem(bytes: &[u8]) -> bool {
    bytes.trim_ascii_start().starts_with(b"-----BEGIN")
}

/// The rustls crypto provider used by both ends: *ring*, TLS 1.3 only (QUIC requires it).
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a private key from a file in PEM or DER (PKCS#8, PKCS#1 or SEC1) form.
///
/// # Errors
/// [`Error::Config`] naming the file if it cannot be read or holds no key.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    let bytes = std::fs::read(path).map_err(|error| {
        Error::Config(format!("cannot read key file {}: {error}", path.display()))
    })?;
    parse_private_key(&bytes)
        .map_err(|reason| Error::Config(format!("key file {}: {reason}", path.display())))
}

/// Parses a private key in PEM or DER form (see [`load_private_key`]).
pub fn parse_private_key(bytes: &[u8]) -> Result<PrivateKeyDer<'static>, String> {
    if is_pem(bytes) {
        PrivateKeyDer::from_pem_slice(bytes)
            .map_err(|error| format!("no usable PEM private key: {error}"))
    } else {
        PrivateKeyDer::try_from(bytes.to_vec())
            .map_err(|error| format!("neither a PEM nor a DER private key: {error}"))
    }
}

pub(crate) fn quinn_client_config(
    trusted: &[CertificateDer<'static>],
    identity: Option<&crate::ClientIdentity>,
    keep_alive_interval: Duration,
    idle_timeout: Duration,
) -> Result<quinn::ClientConfig, Error> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in trusted {
        roots
            .add(certificate.clone())
            .map_err(|error| Error::Config(format!("cannot trust certificate: {error}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Config(
            "no trusted certificate: pass the server's certificate or CA (e.g. --ca transdb-data/cert.pem)".into(),
        ));
    }
    let tls = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|error| Error::Config(format!("TLS configuration: {error}")))?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(identity) => tls
            .with_client_auth_cert(identity.certificates.clone(), identity.key.clone_key())
            .map_err(|error| Error::Config(format!("client certificate: {error}")))?,
        None => tls.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![transdb_proto::ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|error| Error::Config(format!("QUIC TLS configuration: {error}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(keep_alive_interval));
    transport.max_idle_timeout(Some(
        idle_timeout
            .try_into()
            .map_err(|_| Error::Config("idle timeout is too long".into()))?,
    ));
    transport.max_concurrent_uni_streams(0u32.into());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_and_der_are_told_apart() {
        assert!(is_pem(b"\n-----BEGIN CERTIFICATE-----\n"));
        assert!(!is_pem(&[0x30, 0x82]));
        assert_eq!(parse_certificates(&[0x30, 1, 2]).unwrap().len(), 1);
        assert!(
            parse_certificates(b"hello")
                .unwrap_err()
                .contains("neither PEM")
        );
        assert!(
            parse_certificates(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
                .unwrap_err()
                .contains("no CERTIFICATE")
        );
    }
}
