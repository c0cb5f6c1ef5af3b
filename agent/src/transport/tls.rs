//! Mutual TLS for the QUIC transport: both sides present a host certificate signed by the
//! cluster CA and verify the other's against it. TLS 1.3 only (QUIC requires it), ring as the
//! crypto provider (passed explicitly so no process-wide default is needed), ALPN `bitferry/1`.
//!
//! The peer's *name* is its certificate's subject common name (what `bitferry cert issue --name`
//! wrote), falling back to the first DNS subject alternative name. The agent authorizes by it.

use super::error::TransportError;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::RootCertStore;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use std::path::Path;
use std::sync::Arc;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The ALPN protocol id both sides require; a peer speaking anything else fails the handshake.
pub const ALPN: &[u8] = b"bitferry/1";

/// This host's TLS identity and the cluster CA it trusts.
pub struct TlsIdentity {
    provider: Arc<CryptoProvider>,
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    name: String,
}

impl std::fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("TlsIdentity")
            .field("name", &self.name)
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl TlsIdentity {
    /// Load the cluster CA (`ca`, may hold several certificates during a CA rotation), this
    /// host's certificate (`cert`, leaf first, optionally followed by intermediates) and its
    /// private key (`key`) from PEM files, and check that they fit together.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TransportError> {
        let read = |p: &Path| {
            std::fs::read(p).map_err(|e| TransportError::Load {
                path: p.to_path_buf(),
                reason: e.to_string(),
            })
        };
        Self::parse((ca, &read(ca)?), (cert, &read(cert)?), (key, &read(key)?))
    }

    /// The same as [`TlsIdentity::load`] from PEM bytes in memory.
    pub fn from_pem(ca: &[u8], cert: &[u8], key: &[u8]) -> Result<Self, TransportError> {
        Self::parse(
            (Path::new("<ca>"), ca),
            (Path::new("<cert>"), cert),
            (Path::new("<key>"), key),
        )
    }

    fn parse(
        (ca_path, ca): (&Path, &[u8]),
        (cert_path, cert): (&Path, &[u8]),
        (key_path, key): (&Path, &[u8]),
    ) -> Result<Self, TransportError> {
        let load_err = |p: &Path, reason: String| TransportError::Load {
            path: p.to_path_buf(),
            reason,
        };
        let certs = |p: &Path, pem: &[u8]| -> Result<Vec<CertificateDer<'static>>, _> {
            let v = CertificateDer::pem_slice_iter(pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| load_err(p, e.to_string()))?;
            if v.is_empty() {
                return Err(load_err(p, "no CERTIFICATE section".into()));
            }
            Ok(v)
        };
        let mut roots = RootCertStore::empty();
        for c in certs(ca_path, ca)? {
            roots
                .add(c)
                .map_err(|e| load_err(ca_path, format!("not a usable CA certificate: {e}")))?;
        }
        let chain = certs(cert_path, cert)?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| load_err(key_path, format!("no usable private key: {e}")))?;
        let name = peer_name(&chain)
            .ok_or_else(|| load_err(cert_path, "the certificate carries no name".into()))?;
        let id = TlsIdentity {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            roots: Arc::new(roots),
            chain,
            key,
            name,
        };
        id.check_own_chain(cert_path, ca_path)?;
        // Building both configurations checks that the key belongs to the certificate.
        id.server_config()?;
        id.client_config()?;
        Ok(id)
    }

    /// Fail at start-up, not at the first migration, when this host's certificate would be
    /// refused by its peers: not signed by the cluster CA, expired, or lacking client or server
    /// authentication usage.
    fn check_own_chain(&self, cert_path: &Path, ca_path: &Path) -> Result<(), TransportError> {
        let now = UnixTime::now();
        let refused = |role: &str, e: rustls::Error| {
            TransportError::TlsConfig(format!(
                "{} would be refused as a {role} certificate by peers trusting {}: {e}",
                cert_path.display(),
                ca_path.display()
            ))
        };
        self.client_verifier()?
            .verify_client_cert(&self.chain[0], &self.chain[1..], now)
            .map_err(|e| refused("client", e))?;
        // Any valid server name proves the chain and usage; whether the name matches what
        // clients dial is their business (checked at connect).
        let any_name = ServerName::try_from("bitferry.invalid").expect("valid name");
        match self.server_verifier()?.verify_server_cert(
            &self.chain[0],
            &self.chain[1..],
            &any_name,
            &[],
            now,
        ) {
            Ok(_) => Ok(()),
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName
                | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(()),
            Err(e) => Err(refused("server", e)),
        }
    }

    /// This host's name (its certificate's common name).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn client_verifier(
        &self,
    ) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TransportError> {
        WebPkiClientVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TransportError::TlsConfig(e.to_string()))
    }

    fn server_verifier(&self) -> Result<Arc<WebPkiServerVerifier>, TransportError> {
        WebPkiServerVerifier::builder_with_provider(self.roots.clone(), self.provider.clone())
            .build()
            .map_err(|e| TransportError::TlsConfig(e.to_string()))
    }

    /// The QUIC server crypto configuration: client certificates are required and must chain
    /// to the cluster CA.
    pub fn server_config(&self) -> Result<QuicServerConfig, TransportError> {
        let cfg_err = |e: rustls::Error| TransportError::TlsConfig(e.to_string());
        let mut cfg = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_client_cert_verifier(self.client_verifier()?)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        QuicServerConfig::try_from(cfg).map_err(|e| TransportError::TlsConfig(e.to_string()))
    }

    /// The QUIC client crypto configuration: the server must present a certificate from the
    /// cluster CA valid for the name we dial; we present ours.
    pub fn client_config(&self) -> Result<QuicClientConfig, TransportError> {
        let cfg_err = |e: rustls::Error| TransportError::TlsConfig(e.to_string());
        let mut cfg = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(cfg_err)?
            .with_webpki_verifier(self.server_verifier()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
            .map_err(cfg_err)?;
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        QuicClientConfig::try_from(cfg).map_err(|e| TransportError::TlsConfig(e.to_string()))
    }
}

/// The name of the holder of a certificate chain (leaf first): the leaf's subject common name,
/// or its first DNS subject alternative name when it has no common name.
pub fn peer_name(chain: &[CertificateDer<'_>]) -> Option<String> {
    let (_, x509) = X509Certificate::from_der(chain.first()?).ok()?;
    if let Some(cn) = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
    {
        return Some(cn.to_string());
    }
    let san = x509.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|g| match g {
        GeneralName::DNSName(d) => Some(d.to_string()),
        _ => None,
    })
}
