//! The agent's TOML configuration. Every key is documented in docs/operations.md §Configuration.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// `bitferry agent --config FILE`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// QUIC listen address (UDP).
    pub listen: SocketAddr,
    /// Store directory; the agent holds it locked while it runs.
    pub store: PathBuf,
    /// Unix socket for the CLI and hooks.
    pub control: PathBuf,
    /// Prometheus metrics listen address (HTTP); off when absent.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// How often marks recorded in memory are committed to the store, in milliseconds.
    #[serde(default = "default_flush_ms")]
    pub flush_interval_ms: u64,
    /// Mutual TLS material.
    pub tls: TlsPaths,
    /// Disks this agent accepts as a migration destination without a runtime `expect`.
    #[serde(default)]
    pub expect: Vec<Expectation>,
    /// QUIC tuning.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Rebuild references: the agent rebuilds these disks by itself when their bitmap is lost.
    #[serde(default)]
    pub reference: Vec<Reference>,
    /// Bounds on what control-socket clients may hold (connections, idle time, buffered
    /// request bytes).
    #[serde(default)]
    pub control_limits: ControlLimits,
    /// Log filter (`info`, `bitferry=debug`, …) when neither -v/-q nor BITFERRY_LOG sets one;
    /// `warn` when absent. Reloaded on SIGHUP.
    #[serde(default)]
    pub log: Option<String>,
}

/// `[control_limits]`: what control-socket clients together may hold, so a leaked, stuck or
/// hostile client cannot exhaust the agent's descriptors or memory (docs/security.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlLimits {
    /// Most control connections served at once; past it a client gets a one-line refusal. The
    /// agent lowers it at start-up if its descriptor limit cannot hold this many next to the
    /// descriptors kept for the store, rebuilds and QUIC.
    pub max_connections: usize,
    /// Milliseconds a connection may wait between requests (saying nothing) before it is closed.
    pub idle_timeout_ms: u64,
    /// Milliseconds from a request's first byte to its newline; a slower request is refused
    /// and its connection closed.
    pub request_timeout_ms: u64,
    /// Longest request line in bytes.
    pub max_line_bytes: usize,
    /// Bytes of unfinished and in-flight requests all connections together may buffer beyond
    /// the first 64 KiB of each one; a request that would need more is refused.
    pub max_buffered_bytes: usize,
}

impl Default for ControlLimits {
    fn default() -> Self {
        ControlLimits {
            max_connections: 256,
            idle_timeout_ms: 60_000,
            request_timeout_ms: 10_000,
            max_line_bytes: crate::control::MAX_LINE,
            max_buffered_bytes: 64 << 20,
        }
    }
}

impl ControlLimits {
    fn check(&self) -> Result<(), String> {
        if self.max_connections == 0 {
            return Err("control_limits.max_connections must be at least 1".into());
        }
        if self.idle_timeout_ms == 0 || self.request_timeout_ms == 0 {
            return Err(
                "control_limits.idle_timeout_ms and request_timeout_ms must be at least 1".into(),
            );
        }
        if !(4096..=1 << 30).contains(&self.max_line_bytes) {
            return Err("control_limits.max_line_bytes must be between 4096 and 1 GiB".into());
        }
        if self.max_buffered_bytes < self.max_line_bytes || self.max_buffered_bytes > 1 << 40 {
            return Err(
                "control_limits.max_buffered_bytes must be at least max_line_bytes (and at most \
                 1 TiB)"
                    .into(),
            );
        }
        Ok(())
    }
}

/// `[[reference]]`: what to compare a disk's live image with when its bitmap must be rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Reference {
    /// Disk id.
    pub disk: wire::DiskId,
    /// The live disk image (raw file or block device).
    pub image: PathBuf,
    /// Block manifest of the last backup (only the live image is read).
    #[serde(default)]
    pub manifest: Option<PathBuf>,
    /// Raw backup image (both images are read).
    #[serde(default)]
    pub backup: Option<PathBuf>,
    /// Block size of the rebuilt bitmap; the disk's when absent.
    #[serde(default)]
    pub granularity: Option<u64>,
    /// Read at most this many bytes per second; unlimited when absent.
    #[serde(default)]
    pub rate: Option<u64>,
}

fn default_flush_ms() -> u64 {
    1000
}

/// Paths of the cluster CA and this host's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsPaths {
    /// Cluster CA certificate (`bitferry cert init`).
    pub ca: PathBuf,
    /// This host's certificate (`bitferry cert issue`).
    pub cert: PathBuf,
    /// This host's private key.
    pub key: PathBuf,
}

/// "Accept disk D, optionally only from the peer whose certificate names P."
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    /// Disk id.
    pub disk: wire::DiskId,
    /// Peer certificate name; any peer of the cluster CA when absent.
    #[serde(default)]
    pub from: Option<String>,
}

/// QUIC transport settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportConfig {
    /// Idle timeout in milliseconds (the smaller of both peers' applies).
    pub idle_timeout_ms: u64,
    /// Keep-alive interval in milliseconds (below the idle timeout).
    pub keep_alive_ms: u64,
    /// Turn off UDP generic segmentation offload (some virtual NICs mishandle it).
    pub disable_gso: bool,
    /// Longest silence in milliseconds inside a migration frame (from its first byte to the
    /// end of its payload) before the session fails as stalled. Between frames there is no
    /// limit.
    pub frame_stall_ms: u64,
    /// Longest silence in milliseconds from the peer after a switchover while this side waits
    /// for it (source: for `Committed`; post-copy destination: for the next chunk) before the
    /// peer counts as lost.
    pub switchover_silence_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            idle_timeout_ms: 30_000,
            keep_alive_ms: 5_000,
            disable_gso: false,
            frame_stall_ms: 30_000,
            switchover_silence_ms: 120_000,
        }
    }
}

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading config {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid configuration.
    #[error("config {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong, with line and column.
        message: String,
    },
}

impl Config {
    /// Load a config file; relative paths inside resolve against the file's directory.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse and check the text of the config file at `path` (which names it in errors and
    /// anchors relative paths). Pure (fuzzed: docs/fuzzing.md).
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut c: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut c.store,
            &mut c.control,
            &mut c.tls.ca,
            &mut c.tls.cert,
            &mut c.tls.key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        for r in &mut c.reference {
            for p in [Some(&mut r.image), r.manifest.as_mut(), r.backup.as_mut()]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if r.manifest.is_some() == r.backup.is_some() {
                return Err(ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: format!(
                        "[[reference]] for disk {}: give exactly one of manifest and backup",
                        r.disk
                    ),
                });
            }
        }
        if let Err(message) = c.control_limits.check() {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message,
            });
        }
        if let Some(spec) = &c.log
            && let Err(e) = crate::logging::parse(spec, "log")
        {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            });
        }
        if c.flush_interval_ms == 0 {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "flush_interval_ms must be at least 1".into(),
            });
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_from_the_brief_parses_and_resolves_paths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        std::fs::write(
            &p,
            r#"
listen  = "127.0.0.1:7400"
store   = "/var/lib/bitferry"
control = "run/control.sock"

[tls]
ca   = "ca.pem"
cert = "host.pem"
key  = "host.key"
"#,
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.store, PathBuf::from("/var/lib/bitferry"));
        assert_eq!(c.control, dir.path().join("run/control.sock"));
        assert_eq!(c.tls.ca, dir.path().join("ca.pem"));
        assert_eq!(c.flush_interval_ms, 1000);
        std::fs::write(&p, "listen = 1\n").unwrap();
        let e = Config::load(&p).unwrap_err().to_string();
        assert!(e.contains("agent.toml"), "{e}");
        std::fs::write(&p, "bogus = 1\n").unwrap();
        assert!(Config::load(&p).is_err());
    }

    #[test]
    fn control_limits_have_defaults_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        let base = "listen = \"127.0.0.1:7400\"\nstore = \"s\"\ncontrol = \"c.sock\"\n";
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"h.pem\"\nkey = \"h.key\"\n";
        std::fs::write(&p, format!("{base}{tls}")).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.control_limits, ControlLimits::default());
        assert_eq!(c.control_limits.max_connections, 256);
        assert_eq!(c.control_limits.max_buffered_bytes, 64 << 20);
        let with = |l: &str| format!("{base}[control_limits]\n{l}\n{tls}");
        std::fs::write(&p, with("max_connections = 8\nidle_timeout_ms = 500")).unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.control_limits.max_connections, 8);
        assert_eq!(c.control_limits.idle_timeout_ms, 500);
        assert_eq!(c.control_limits.request_timeout_ms, 10_000);
        for bad in [
            "max_connections = 0",
            "idle_timeout_ms = 0",
            "request_timeout_ms = 0",
            "max_line_bytes = 100",
            "max_line_bytes = 1048576\nmax_buffered_bytes = 65536",
            "connections = 3",
        ] {
            std::fs::write(&p, with(bad)).unwrap();
            assert!(Config::load(&p).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn references_resolve_paths_and_need_exactly_one_reference() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.toml");
        let base = "listen = \"127.0.0.1:7400\"\nstore = \"s\"\ncontrol = \"c.sock\"\n";
        let tls = "[tls]\nca = \"ca.pem\"\ncert = \"h.pem\"\nkey = \"h.key\"\n";
        let with = |r: &str| format!("{base}[[reference]]\ndisk = \"vm/a\"\n{r}\n{tls}");
        std::fs::write(
            &p,
            with("image = \"live.img\"\nmanifest = \"/b/m\"\ngranularity = 65536\nrate = 1000"),
        )
        .unwrap();
        let c = Config::load(&p).unwrap();
        assert_eq!(c.reference.len(), 1);
        let r = &c.reference[0];
        assert_eq!(r.image, dir.path().join("live.img"));
        assert_eq!(r.manifest, Some(PathBuf::from("/b/m")));
        assert_eq!((r.granularity, r.rate), (Some(65536), Some(1000)));
        for bad in [
            "image = \"l\"",
            "image = \"l\"\nmanifest = \"m\"\nbackup = \"b\"",
            "image = \"l\"\nmanifest = \"m\"\nspeed = 1",
        ] {
            std::fs::write(&p, with(bad)).unwrap();
            assert!(Config::load(&p).is_err(), "{bad} accepted");
        }
    }
}
