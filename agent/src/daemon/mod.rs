//! `bitferry agent`: the daemon. It holds the store locked, tracks its disks live, serves the
//! control socket, exports metrics, and (with the transport) listens for migrations over QUIC.

pub mod check;
pub mod config;
pub mod control_server;
pub mod limits;
pub mod metrics_http;
pub mod rebuild;
pub mod reload;
pub mod state;

use anyhow::{Context, Result, bail};
use config::Config;
use state::AgentState;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;

/// Shared handle to the agent's state.
pub type Shared = Arc<Mutex<AgentState>>;

/// The agent's network identity: its QUIC endpoint and certificate name.
pub struct Net {
    /// Listens for migrations and connects to other agents.
    pub endpoint: crate::transport::Endpoint,
    /// This host's name (its certificate's common name).
    pub name: String,
}

/// Run the agent until SIGINT, SIGTERM or a `shutdown` request; then commit everything.
/// SIGHUP reloads the config from `config_path` ([`reload`]).
pub fn run(config: Config, config_path: std::path::PathBuf) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(serve(config, config_path))
}

async fn serve(mut config: Config, config_path: std::path::PathBuf) -> Result<()> {
    // Handlers first: from here on SIGHUP, SIGINT and SIGTERM are delivered to the loop below
    // (queued until it runs) instead of killing the agent without a last commit.
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    match crate::logging::apply_config(config.log.as_deref()) {
        Ok(crate::logging::Applied::Pinned { by, current }) if config.log.is_some() => {
            tracing::info!(set_by = by, filter = %current, "the config's `log` is not used: {by} sets the log filter");
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "`log` not applied"),
    }
    for p in check::reference_problems(&config.reference) {
        tracing::warn!(problem = %p, "a [[reference]] cannot be used as it is");
    }
    let (nofile, raise_failed) = limits::raise_nofile();
    let shown = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
    if let Some(e) = raise_failed {
        tracing::warn!(soft = %shown(nofile.soft), hard = %shown(nofile.hard), error = %e, "could not raise the descriptor limit to its hard limit");
    }
    let configured = &config.control_limits;
    let max_connections = limits::control_connections(nofile.soft, configured.max_connections);
    tracing::info!(
        before = %shown(nofile.before),
        soft = %shown(nofile.soft),
        hard = %shown(nofile.hard),
        control_connections = max_connections,
        "descriptor limit"
    );
    if max_connections < configured.max_connections {
        tracing::warn!(
            configured = configured.max_connections,
            used = max_connections,
            descriptors = %shown(nofile.soft),
            "control_limits.max_connections lowered to leave descriptors for the store and QUIC; raise LimitNOFILE (docs/operations.md §Limits)"
        );
    }
    let control_limits = control_server::Limits {
        max_connections,
        lowered: max_connections < configured.max_connections,
        idle_timeout: Duration::from_millis(configured.idle_timeout_ms),
        request_timeout: Duration::from_millis(configured.request_timeout_ms),
        max_line: configured.max_line_bytes,
        max_buffered: configured.max_buffered_bytes,
    };
    let store = crate::store::Store::open(&config.store, crate::store::Access::ReadWrite)?;
    let mut state = AgentState::open(store, config.expect.clone())?;
    state.set_store_dir(&config.store);
    state.configure_rebuilds(&config.store, config.reference.clone());
    state.start_pending_rebuilds();
    let shared: Shared = Arc::new(Mutex::new(state));
    let stop = Arc::new(Notify::new());

    if let Some(addr) = config.metrics {
        let (handle, listener) = metrics_http::bind(addr)
            .await
            .context("starting the metrics endpoint")?;
        tokio::spawn(metrics_http::serve(listener, handle));
    }

    let tls =
        crate::transport::TlsIdentity::load(&config.tls.ca, &config.tls.cert, &config.tls.key)
            .context("loading the agent's TLS identity")?;
    let opts = crate::transport::TransportOptions {
        idle_timeout: Duration::from_millis(config.transport.idle_timeout_ms),
        keep_alive: Duration::from_millis(config.transport.keep_alive_ms),
        disable_gso: config.transport.disable_gso,
        // The protocol's own bounds (docs/protocol.md §3), so the transport refuses the same.
        limits: crate::transport::stream::Limits {
            max_frame: wire::proto::MAX_FRAME,
            max_payload: wire::proto::MAX_PAYLOAD,
            frame_stall: Duration::from_millis(config.transport.frame_stall_ms),
            switchover_silence: Duration::from_millis(config.transport.switchover_silence_ms),
        },
        ..Default::default()
    };
    let endpoint = crate::transport::Endpoint::server(config.listen, &tls, opts)
        .with_context(|| format!("listening on {}", config.listen))?;
    let net = Arc::new(Net {
        endpoint: endpoint.clone(),
        name: tls.name().to_string(),
    });
    tokio::spawn(crate::migrate::dest::accept_loop(
        endpoint.clone(),
        shared.clone(),
    ));

    let listener = control_server::bind(&config.control)?;
    tokio::spawn(control_server::serve(
        listener,
        shared.clone(),
        net.clone(),
        stop.clone(),
        control_limits,
    ));

    let flusher = {
        let shared = shared.clone();
        let every = Duration::from_millis(config.flush_interval_ms);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            // A full or failing store fails every flush until it recovers: say so when it
            // starts, every minute while it lasts, and when it ends (the marks stay in memory
            // and are retried; nothing is dropped).
            let mut failing_since: Option<tokio::time::Instant> = None;
            let mut last_said = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let r = shared.lock().expect("state lock").flush();
                match (r, failing_since) {
                    (Ok(()), Some(since)) => {
                        tracing::info!(after = ?since.elapsed(), "the store accepts commits again; every held mark is written");
                        failing_since = None;
                    }
                    (Ok(()), None) => {}
                    (Err(e), None) => {
                        tracing::error!(error = %e.detailed(), "flushing the store failed; marks are kept in memory and retried");
                        failing_since = Some(tokio::time::Instant::now());
                        last_said = tokio::time::Instant::now();
                    }
                    (Err(e), Some(since)) if last_said.elapsed() >= Duration::from_secs(60) => {
                        tracing::error!(error = %e.detailed(), failing_for = ?since.elapsed(), "the store still fails; marks are kept in memory");
                        last_said = tokio::time::Instant::now();
                    }
                    (Err(_), Some(_)) => {}
                }
            }
        })
    };

    let rebuild_poller = {
        let shared = shared.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                shared.lock().expect("state lock").poll_rebuilds();
            }
        })
    };

    tracing::info!(
        name = %net.name,
        listen = %endpoint.local_addr()?,
        control = %config.control.display(),
        store = %config.store.display(),
        "agent ready"
    );
    loop {
        tokio::select! {
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            _ = stop.notified() => {
                tracing::info!("shutdown requested");
                break;
            }
            _ = hup.recv() => {
                let (path, mut running, shared) = (config_path.clone(), config.clone(), shared.clone());
                // Reads files and takes the state lock: off the reactor.
                match tokio::task::spawn_blocking(move || {
                    reload::reload(&path, &mut running, &shared);
                    running
                })
                .await
                {
                    Ok(reloaded) => config = reloaded,
                    Err(e) => tracing::error!(error = %e, "config reload failed; the running config stays in force"),
                }
            }
        }
    }
    flusher.abort();
    rebuild_poller.abort();
    let closed = shared.lock().expect("state lock").close();
    let _ = std::fs::remove_file(&config.control);
    endpoint.close(crate::transport::endpoint::CLOSE_OK, "agent stopping");
    if let Err(e) = closed {
        bail!("final commit failed: {e}");
    }
    Ok(())
}
