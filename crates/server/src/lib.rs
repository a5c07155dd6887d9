//! The Strata server: the `strata` command line, the OpenAI-compatible HTTP
//! API over one engine, Prometheus metrics, API keys and tenants.
//!
//! It may depend on every other crate; nothing depends on it. The binary
//! (`main.rs`) parses the command line and calls [`Server::start`]; tests
//! start servers in-process the same way, on port 0.

pub mod cache_cmd;
pub mod cli;

mod api;
mod error;
mod listen;
mod metrics;
mod openai;
mod state;
mod tiers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::cli::ServeArgs;
use crate::state::AppState;

/// A running server.
pub struct Server {
    addr: SocketAddr,
    state: Arc<AppState>,
    stop: watch::Sender<bool>,
    serve: tokio::task::JoinHandle<std::io::Result<()>>,
    ready: Option<oneshot::Receiver<Result<(), String>>>,
}

/// Where the model comes from, and how to say what is happening.
pub type Progress = Box<dyn FnMut(&str) + Send>;

impl Server {
    /// Binds the address, then loads the model in the background (`/health`
    /// answers 503 until it is loaded). `model`: the GGUF file, or `None`
    /// for the default model (fetched once). `say` reports fetching and
    /// loading progress.
    pub async fn start(args: ServeArgs, mut say: Progress) -> Result<Self, String> {
        let keys = args.keys()?;
        let addr = SocketAddr::new(args.host, args.port);
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let cache_dir = strata_model::default_model::cache_dir();
        let hash_key = state::hash_key(&cache_dir)?;
        let stats = Arc::new(OnceLock::new());
        let tier_stats: metrics::TierSource = Arc::new(OnceLock::new());
        let state = Arc::new(AppState::new(
            args.clone(),
            keys,
            hash_key.clone(),
            metrics::Metrics::new(stats.clone(), tier_stats.clone()),
        ));
        let (stop, stopped) = watch::channel(false);
        let app = api::router(state.clone());
        let limits = listen::Limits {
            max_connections: args.max_connections,
            header_timeout: args.header_timeout,
            write_timeout: args.write_timeout,
        };
        let serve = tokio::spawn(listen::serve(listener, app, limits, stopped));
        // Idle sessions are deleted after their time-to-live, checked a few
        // times per TTL (the deletion waits on the scheduler: off the async
        // workers).
        let sweeping = state.clone();
        let mut sweep_stop = stop.subscribe();
        tokio::spawn(async move {
            let every =
                (args.session_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(30));
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = sweep_stop.wait_for(|s| *s) => break,
                }
                let st = sweeping.clone();
                if let Ok(n) = tokio::task::spawn_blocking(move || api::delete_expired(&st)).await
                    && n > 0
                {
                    tracing::info!(sessions = n, "idle sessions deleted");
                }
            }
        });
        let (ready_tx, ready) = oneshot::channel();
        let loading = state.clone();
        std::thread::Builder::new()
            .name("strata-load".into())
            .spawn(move || {
                let result = (|| {
                    let path: PathBuf = match &args.model {
                        Some(p) => p.clone(),
                        None => strata_model::default_model::ensure(&mut *say)
                            .map_err(|e| e.to_string())?,
                    };
                    let threads = args
                        .threads
                        .unwrap_or_else(|| strata_model::free_cores(Duration::from_millis(250)));
                    strata_model::set_compute_threads(threads);
                    say(&format!("loading {}", path.display()));
                    let (loaded, sizing) = state::load(&args, &path, &hash_key, threads)?;
                    tracing::info!(
                        model = %loaded.name,
                        kv_blocks = sizing.blocks,
                        kv_bytes = sizing.bytes,
                        kv_tokens = sizing.blocks * args.block_size as usize,
                        context = sizing.context,
                        threads = sizing.threads,
                        "model loaded"
                    );
                    let loaded = Arc::new(loaded);
                    let reader = loaded.clone();
                    let _ = stats.set(Box::new(move || reader.engine.stats())
                        as Box<dyn Fn() -> strata_engine::EngineStats + Send + Sync>);
                    let reader = loaded.clone();
                    let _ = tier_stats.set(Box::new(move || reader.engine.tier_stats())
                        as Box<dyn Fn() -> strata_engine::TierStats + Send + Sync>);
                    let _ = loading.loaded.set(loaded);
                    Ok(())
                })();
                let _ = ready_tx.send(result);
            })
            .map_err(|e| e.to_string())?;
        Ok(Self {
            addr,
            state,
            stop,
            serve,
            ready: Some(ready),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until the model is loaded (or failed to load).
    pub async fn ready(&mut self) -> Result<(), String> {
        match self.ready.take() {
            Some(rx) => rx
                .await
                .unwrap_or_else(|_| Err("the loader stopped".into())),
            None => Ok(()),
        }
    }

    /// The engine's counters (after the model is loaded).
    pub fn stats(&self) -> Option<strata_engine::EngineStats> {
        self.state.loaded.get().map(|l| l.engine.stats())
    }

    /// Blocks until no request is live and no step is in flight (tests and
    /// tools; never from async code).
    pub fn wait_idle(&self) {
        if let Some(l) = self.state.loaded.get() {
            l.engine.wait_idle();
        }
    }

    /// Stops accepting connections, gives running requests `grace` to
    /// finish, then aborts the rest and waits for the connections to close.
    pub async fn shutdown(mut self, grace: Duration) {
        self.state.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(true);
        if tokio::time::timeout(grace, &mut self.serve).await.is_err() {
            tracing::warn!("grace period over: aborting the requests still running");
            if let Some(l) = self.state.loaded.get() {
                l.engine.abort_all();
            }
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.serve).await;
        }
        // The engine writes the demotions still waiting and closes its
        // tiers (the SSD directory's lock goes with them).
        if let Some(l) = self.state.loaded.get() {
            let l = l.clone();
            let closing = tokio::task::spawn_blocking(move || l.engine.close());
            // A disk that hangs must not hang the exit: past this, the
            // tiers' last writes are given up (a miss after the restart).
            let bound = grace.max(Duration::from_secs(10));
            if tokio::time::timeout(bound, closing).await.is_err() {
                tracing::warn!(
                    "the tiers did not close within {bound:?}: exiting without their last writes"
                );
            }
        }
    }
}
