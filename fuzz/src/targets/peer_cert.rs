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

fn seeds() -> Vec<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("key");
    let params =
        rcgen::CertificateParams::new(vec!["host-a".to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("self-signed");
    vec![cert.der().to_vec()]
}
