//! An in-memory cluster with Ed25519 keys for the suite.
//!
//! Why not `agent::transport::bench::ephemeral_cluster`: it issues ECDSA certificates, whose
//! signatures are randomised and vary in length by a byte or two, so handshake datagrams can
//! change size from one run of a seed to the next. Ed25519 signatures are deterministic and of
//! fixed length, and the serial numbers here are fixed, so a seed's datagram sizes do not
//! depend on the certificates (and Ed25519 is cheaper). The certificate profile is the agent's
//! (`agent::cert::issue`): CN = host name, the name as DNS SAN, server and client auth.

use agent::transport::TlsIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ED25519, SanType, SerialNumber,
};

/// A fresh CA and one identity per name, all trusting the CA.
pub fn cluster(names: &[&str]) -> Vec<TlsIdentity> {
    let ca_key = KeyPair::generate_for(&PKCS_ED25519).expect("Ed25519 key");
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "bitferry turmoil CA");
    ca.distinguished_name = dn;
    ca.serial_number = Some(SerialNumber::from(1u64));
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let ca_pem = ca_cert.pem();
    let issuer = Issuer::new(ca, ca_key);
    names
        .iter()
        .zip(2u64..)
        .map(|(name, serial)| {
            let key = KeyPair::generate_for(&PKCS_ED25519).expect("Ed25519 key");
            let mut p = CertificateParams::default();
            let mut dn = DistinguishedName::new();
            dn.push(DnType::CommonName, *name);
            p.distinguished_name = dn;
            p.subject_alt_names = vec![SanType::DnsName((*name).try_into().expect("DNS name"))];
            p.serial_number = Some(SerialNumber::from(serial));
            p.is_ca = IsCa::ExplicitNoCa;
            p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            p.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            p.use_authority_key_identifier_extension = true;
            let cert = p.signed_by(&key, &issuer).expect("host certificate");
            TlsIdentity::from_pem(
                ca_pem.as_bytes(),
                cert.pem().as_bytes(),
                key.serialize_pem().as_bytes(),
            )
            .expect("identity")
        })
        .collect()
}
