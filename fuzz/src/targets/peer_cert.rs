//! `agent::transport::tls::peer_name`: the name the agent reads out of a peer's certificate
//! (DER from the TLS handshake) for authorization and logs.

use super::{MIB64, Target};
use agent::transport::tls::peer_name;
use rustls_pki_types::CertificateDer;

pub const TARGET: Target = Target {
    name: "peer_cert",
    decoder: "agent::transport::tls::peer_name (x509 DER)",
    run,
    max_alloc: MIB64,
    max_len: 1 << 14,
    smoke_runs: 8000,
    seeds,
};

fn run(data: &[u8]) {
    let chain = [CertificateDer::from(data)];
    let _ = peer_name(&chain);
}

/// A fixed Ed25519 key (a test key, never used elsewhere): Ed25519 signatures are
/// deterministic, so the seed is the same bytes on every run and its committed copy is checked.
const SEED_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEINlBn03Xc8UOXDHma001TBhCOApl2/NH3NqXzyGF5nLs
-----END PRIVATE KEY-----
";

fn seeds() -> Vec<Vec<u8>> {
    let key = rcgen::KeyPair::from_pem(SEED_KEY).expect("the seed key parses");
    let params =
        rcgen::CertificateParams::new(vec!["host-a".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    vec![cert.der().to_vec()]
}
