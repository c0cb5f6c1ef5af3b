//! The cluster's certificates: one private CA per cluster, and per-host certificates signed by
//! it that serve for both QUIC client and server authentication (mutual TLS).
//!
//! Keys are ECDSA P-256 (what every TLS stack and `openssl` understand; ring signs and verifies
//! it on both sides). A host certificate's subject common name is the host's *name*: the peer
//! name the agent authorizes by (`expect --from PEER`). Its subject alternative names are the
//! name itself plus the DNS names / IP addresses clients dial (`--to HOST:PORT`).
//!
//! Generation is pure ([`new_ca`], [`issue`]) so tests and benchmarks can mint certificates in
//! memory; [`init_dir`] and [`issue_to_dir`] add the file handling (no silent overwrite, private
//! keys mode 0600, atomic rename).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::time::ASN1Time;

/// Default validity of a cluster CA.
pub const CA_DAYS: u32 = 3650;
/// Default validity of a host certificate. There is no revocation list yet, so a host
/// certificate should not outlive the host by decades; re-issue before it expires.
pub const HOST_DAYS: u32 = 825;
/// Certificates start being valid this long before "now", to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::from_secs(3600);

/// Errors creating, loading or writing certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A host name that cannot serve as file name, common name and DNS name.
    #[error(
        "invalid name {0:?}: use 1-63 letters, digits, '-' and '.', starting with a letter or digit"
    )]
    InvalidName(String),
    /// A `--san` value that is neither an IP address nor a DNS name.
    #[error("invalid subject alternative name {0:?}: use a DNS name or an IP address")]
    InvalidSan(String),
    /// A validity of zero days or beyond what X.509 dates can express.
    #[error("invalid validity of {0} days")]
    InvalidDays(u32),
    /// Issuing into the CA's own files (name `ca` in the CA directory), even with `--force`.
    #[error("{} is the CA itself; choose another name or output directory", .0.display())]
    WouldReplaceCa(PathBuf),
    /// Refusing to replace an existing file without `--force`.
    #[error("{} already exists (use --force to replace it)", .0.display())]
    Exists(PathBuf),
    /// The CA files do not belong together or are not a CA.
    #[error("CA in {dir}: {reason}")]
    BadCa {
        /// The CA directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM.
    pub key_pem: String,
}

/// Check a host name: it becomes a file name, the certificate's common name and a DNS SAN.
pub fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName(name.to_string()))
    }
}

fn san(s: &str) -> Result<SanType, CertError> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if s.len() <= 253 && s.split('.').all(valid_label) {
        let name = s
            .to_string()
            .try_into()
            .map_err(|_| CertError::InvalidSan(s.to_string()))?;
        Ok(SanType::DnsName(name))
    } else {
        Err(CertError::InvalidSan(s.to_string()))
    }
}

/// Validity from now minus a clock-skew allowance to now plus `days`.
fn set_validity(params: &mut CertificateParams, days: u32) -> Result<(), CertError> {
    if days == 0 || days > 100 * 366 {
        return Err(CertError::InvalidDays(days));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let at = |secs: i64| ASN1Time::from_timestamp(secs).map_err(|_| CertError::InvalidDays(days));
    params.not_before = at(now - BACKDATE.as_secs() as i64)?.to_datetime();
    params.not_after = at(now + i64::from(days) * 86_400)?.to_datetime();
    Ok(())
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    // Positive and without a leading zero byte, as RFC 5280 asks of serial numbers.
    b[0] = (b[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&b)
}

/// The subject alternative names of a host certificate: the name itself, then `extra`, or
/// `localhost`, `127.0.0.1` and `::1` when `extra` is empty (a single-host test cluster).
pub fn host_sans(name: &str, extra: &[String]) -> Vec<String> {
    let mut v = vec![name.to_string()];
    if extra.is_empty() {
        v.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    } else {
        v.extend(extra.iter().cloned());
    }
    let mut seen = std::collections::HashSet::new();
    v.retain(|s| seen.insert(s.clone()));
    v
}

/// A new self-signed cluster CA, valid for `days`. Its common name carries a random suffix so
/// that certificates from two clusters are told apart in logs.
pub fn new_ca(days: u32) -> Result<Pair, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, days)?;
    let tag: u32 = rand::random();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("bitferry cluster CA {tag:08x}"));
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    // Path length 0: the CA signs host certificates only, never intermediate CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// A host certificate for `name`, signed by the CA (`ca_cert_pem`, `ca_key_pem`), valid for
/// both client and server authentication. `sans` are its subject alternative names (see
/// [`host_sans`]). Fails if the CA key does not belong to the CA certificate or the certificate
/// is not a CA, since everything it signed would then be refused by every peer.
pub fn issue(
    ca_cert_pem: &str,
    ca_key_pem: &str,
    name: &str,
    sans: &[String],
    days: u32,
) -> Result<Pair, CertError> {
    check_name(name)?;
    let bad = |reason: String| CertError::BadCa {
        dir: PathBuf::new(),
        reason,
    };
    let ca_key =
        KeyPair::from_pem(ca_key_pem).map_err(|e| bad(format!("cannot read the CA key: {e}")))?;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(ca_cert_pem.as_bytes())
        .map_err(|e| bad(format!("cannot read the CA certificate: {e}")))?;
    let (_, x509) = X509Certificate::from_der(&der)
        .map_err(|e| bad(format!("cannot parse the CA certificate: {e}")))?;
    if x509.public_key().raw != ca_key.subject_public_key_info().as_slice() {
        return Err(bad(
            "the CA key does not belong to the CA certificate".into()
        ));
    }
    if !x509.is_ca() {
        return Err(bad("the certificate is not a CA".into()));
    }
    let issuer = Issuer::from_ca_cert_der(&der, ca_key)?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    set_validity(&mut params, days)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.subject_alt_names = sans.iter().map(|s| san(s)).collect::<Result<_, _>>()?;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(Pair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// One file written by [`init_dir`] or [`issue_to_dir`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// Where.
    pub path: PathBuf,
    /// `certificate` or `private_key`.
    pub kind: &'static str,
    /// Unix permission bits, e.g. `0600`.
    pub mode: String,
}

/// The CA certificate and key paths inside a CA directory.
pub fn ca_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("ca.pem"), dir.join("ca.key"))
}

/// Create a cluster CA in `dir` (`ca.pem`, `ca.key` with mode 0600). Existing files are refused
/// unless `force`; nothing is written if any of them exists.
pub fn init_dir(dir: &Path, force: bool, days: u32) -> Result<Vec<Written>, CertError> {
    let (cert, key) = ca_paths(dir);
    let pair = new_ca(days)?;
    write_pair(dir, &cert, &key, &pair, force)
}

/// Issue a certificate for `name` from the CA in `ca_dir` into `out` (`NAME.pem`, `NAME.key`
/// with mode 0600). Existing files are refused unless `force`.
pub fn issue_to_dir(
    ca_dir: &Path,
    name: &str,
    out: &Path,
    sans: &[String],
    force: bool,
    days: u32,
) -> Result<(Vec<Written>, Vec<String>), CertError> {
    check_name(name)?;
    let (ca_cert, ca_key) = ca_paths(ca_dir);
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| CertError::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    let cert_path = out.join(format!("{name}.pem"));
    let key_path = out.join(format!("{name}.key"));
    for (mine, ca) in [(&cert_path, &ca_cert), (&key_path, &ca_key)] {
        if let (Ok(a), Ok(b)) = (mine.canonicalize(), ca.canonicalize())
            && a == b
        {
            return Err(CertError::WouldReplaceCa(mine.clone()));
        }
    }
    let sans = host_sans(name, sans);
    let pair =
        issue(&read(&ca_cert)?, &read(&ca_key)?, name, &sans, days).map_err(|e| match e {
            CertError::BadCa { reason, .. } => CertError::BadCa {
                dir: ca_dir.to_path_buf(),
                reason,
            },
            other => other,
        })?;
    let written = write_pair(out, &cert_path, &key_path, &pair, force)?;
    Ok((written, sans))
}

/// Write key then certificate, each atomically (temporary file, fsync, rename), after checking
/// that neither exists (unless `force`), so a refusal leaves nothing behind.
fn write_pair(
    dir: &Path,
    cert: &Path,
    key: &Path,
    pair: &Pair,
    force: bool,
) -> Result<Vec<Written>, CertError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CertError::Io { path, source }
    };
    if !force {
        for p in [cert, key] {
            if p.symlink_metadata().is_ok() {
                return Err(CertError::Exists(p.to_path_buf()));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_file(dir, key, pair.key_pem.as_bytes(), 0o600, force)?;
    write_file(dir, cert, pair.cert_pem.as_bytes(), 0o644, force)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))?;
    Ok(vec![
        Written {
            path: key.to_path_buf(),
            kind: "private_key",
            mode: "0600".into(),
        },
        Written {
            path: cert.to_path_buf(),
            kind: "certificate",
            mode: "0644".into(),
        },
    ])
}

fn write_file(
    dir: &Path,
    path: &Path,
    data: &[u8],
    mode: u32,
    force: bool,
) -> Result<(), CertError> {
    let err = |source| CertError::Io {
        path: path.to_path_buf(),
        source,
    };
    // tempfile creates the file 0600, so a private key is never readable by others, not even
    // for a moment.
    let mut tmp = tempfile::Builder::new()
        .prefix(".bitferry-cert")
        .tempfile_in(dir)
        .map_err(err)?;
    tmp.write_all(data).map_err(err)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    let persisted = if force {
        tmp.persist(path)
    } else {
        tmp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        if e.error.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_path_buf())
        } else {
            err(e.error)
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "host-1", "node.example.org", "H2"] {
            check_name(ok).unwrap();
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "a_b", "a..b", &"x".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        assert!(san("10.0.0.1").is_ok());
        assert!(san("::1").is_ok());
        assert!(san("host.example").is_ok());
        assert!(san("bad name").is_err());
        assert!(san("-x.example").is_err());
    }

    #[test]
    fn sans_default_and_dedup() {
        assert_eq!(
            host_sans("a", &[]),
            vec!["a", "localhost", "127.0.0.1", "::1"]
        );
        assert_eq!(
            host_sans("a", &["a".into(), "10.1.1.1".into()]),
            vec!["a", "10.1.1.1"]
        );
    }

    #[test]
    fn issue_checks_the_ca() {
        let ca = new_ca(1).unwrap();
        let other = new_ca(1).unwrap();
        issue(&ca.cert_pem, &ca.key_pem, "h", &host_sans("h", &[]), 1).unwrap();
        let e = issue(&ca.cert_pem, &other.key_pem, "h", &[], 1).unwrap_err();
        assert!(e.to_string().contains("does not belong"), "{e}");
        let leaf = issue(&ca.cert_pem, &ca.key_pem, "h", &[], 1).unwrap();
        let e = issue(&leaf.cert_pem, &leaf.key_pem, "h2", &[], 1).unwrap_err();
        assert!(e.to_string().contains("not a CA"), "{e}");
        assert!(matches!(
            issue(&ca.cert_pem, &ca.key_pem, "h", &[], 0),
            Err(CertError::InvalidDays(0))
        ));
    }

    #[test]
    fn files_refuse_overwrite_and_keys_are_private() {
        let d = tempfile::tempdir().unwrap();
        let w = init_dir(d.path(), false, 10).unwrap();
        assert_eq!(w.len(), 2);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&d.path().join("ca.key")), 0o600);
        let before = std::fs::read(d.path().join("ca.pem")).unwrap();
        assert!(matches!(
            init_dir(d.path(), false, 10),
            Err(CertError::Exists(_))
        ));
        assert_eq!(std::fs::read(d.path().join("ca.pem")).unwrap(), before);
        init_dir(d.path(), true, 10).unwrap();
        assert_ne!(std::fs::read(d.path().join("ca.pem")).unwrap(), before);
        assert_eq!(mode(&d.path().join("ca.key")), 0o600);

        let out = d.path().join("hosts");
        let (w, sans) = issue_to_dir(d.path(), "h1", &out, &[], false, 10).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(sans[0], "h1");
        assert_eq!(mode(&out.join("h1.key")), 0o600);
        assert!(matches!(
            issue_to_dir(d.path(), "h1", &out, &[], false, 10),
            Err(CertError::Exists(_))
        ));
        // The CA is never overwritten by a host certificate, not even with force.
        assert!(matches!(
            issue_to_dir(d.path(), "ca", d.path(), &[], true, 10),
            Err(CertError::WouldReplaceCa(_))
        ));
        // No stray temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
