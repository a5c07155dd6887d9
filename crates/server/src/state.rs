//! What the handlers share: the loaded model and its engine, the tenants
//! (API keys), the sessions each tenant owns, and the metrics.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use strata_engine::{Engine, EngineConfig, ModelRunner, SchedulerConfig, SessionId};
use strata_kv::HashKey;
use strata_model::{ChatMessage, ChatTemplate, Gguf, LlamaModel, LoadOptions, Tokenizer};
use strata_store::Arena;
use subtle::ConstantTimeEq;

use crate::cli::{Keys, ServeArgs};
use crate::metrics::Metrics;

/// The model being served.
pub(crate) struct Loaded {
    /// Its engine.
    pub(crate) engine: Engine,
    /// Its tokenizer.
    pub(crate) tokenizer: Arc<Tokenizer>,
    /// Its chat template (chat completions need one).
    pub(crate) template: Option<ChatTemplate>,
    /// The name clients use.
    pub(crate) name: String,
    /// Unix seconds when it was loaded.
    pub(crate) created: u64,
    /// The vocabulary size.
    pub(crate) vocab: usize,
    /// Text longer than this (in bytes) cannot fit the context, whatever it
    /// says: refused before it is tokenized.
    pub(crate) max_prompt_bytes: usize,
    /// OpenAI's `system_fingerprint`: changes when the weights, the KV
    /// layout or Strata's version do.
    pub(crate) fingerprint: String,
    /// Compiles (and caches) structured-output grammars for its tokenizer.
    pub(crate) grammars: strata_model::Grammars,
}

/// One API key: who a request is.
pub(crate) struct Tenant {
    /// BLAKE3 of the key (compared in constant time).
    key_hash: [u8; 32],
    /// The cache salt of its requests (a keyed hash of the key).
    pub(crate) salt: Option<Vec<u8>>,
    /// Its index (sessions record it).
    pub(crate) index: usize,
    /// Its share of [`AppState::heavy`]: with several tenants, one less
    /// than all, so one tenant's flood of long texts always leaves room
    /// for the others.
    heavy: Arc<tokio::sync::Semaphore>,
}

/// Permission to run CPU-heavy work: the tenant's share and the pool's.
pub(crate) struct HeavyPermit {
    _tenant: tokio::sync::OwnedSemaphorePermit,
    _pool: tokio::sync::OwnedSemaphorePermit,
}

/// A session as the server keeps it: the engine's id, the tenant that owns
/// it, and what the chat template needs to continue the conversation.
pub(crate) struct Session {
    /// The engine's session.
    pub(crate) id: SessionId,
    /// The owning tenant's index.
    pub(crate) owner: usize,
    /// The conversation so far (assistant replies as generated).
    pub(crate) history: Vec<ChatMessage>,
    /// Whether the last reply ended with the end-of-sequence token (then
    /// the template's closing marker is already in the session's tokens).
    pub(crate) ended_with_eos: bool,
    /// Created, Unix seconds.
    pub(crate) created: u64,
    /// A turn is running.
    pub(crate) busy: bool,
    /// Continued with raw completions (no chat history).
    pub(crate) raw: bool,
    /// When its last turn ended (or it was created): idle past
    /// `--session-ttl`, it is deleted.
    pub(crate) last_used: std::time::Instant,
}

/// Shared by every handler.
pub(crate) struct AppState {
    /// Set once the model is loaded; until then the API answers 503.
    pub(crate) loaded: OnceLock<Arc<Loaded>>,
    /// The API keys; empty: no authentication, one anonymous tenant.
    pub(crate) tenants: Vec<Tenant>,
    /// BLAKE3 of the admin key (`/admin/*` is off without one).
    admin: Option<[u8; 32]>,
    /// BLAKE3 of the metrics key (`/metrics` is open without one).
    metrics_key: Option<[u8; 32]>,
    /// Tokenizing and rendering templates run on the blocking pool, this
    /// many at once (the cores): a flood of long texts queues here instead
    /// of taking the async workers or spawning hundreds of threads.
    pub(crate) heavy: Arc<tokio::sync::Semaphore>,
    /// The anonymous tenant (used when there are no keys).
    pub(crate) anonymous: Tenant,
    /// Sessions by their public id.
    pub(crate) sessions: Mutex<HashMap<String, Session>>,
    /// Metrics.
    pub(crate) metrics: Metrics,
    /// The configuration.
    pub(crate) args: ServeArgs,
    /// Shutting down: `/health` answers 503.
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl AppState {
    /// The state of a server that is still loading its model.
    pub(crate) fn new(args: ServeArgs, keys: Keys, hash_key: HashKey, metrics: Metrics) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let pool = cores.max(2);
        let share = if keys.tenants.len() > 1 {
            pool - 1
        } else {
            pool
        };
        let share = || Arc::new(tokio::sync::Semaphore::new(share));
        let tenants = keys
            .tenants
            .iter()
            .enumerate()
            .map(|(index, key)| Tenant {
                key_hash: *blake3::hash(key.as_bytes()).as_bytes(),
                salt: Some(
                    blake3::keyed_hash(hash_key.as_bytes(), key.as_bytes())
                        .as_bytes()
                        .to_vec(),
                ),
                index,
                heavy: share(),
            })
            .collect();
        let hash = |k: &String| *blake3::hash(k.as_bytes()).as_bytes();
        Self {
            loaded: OnceLock::new(),
            tenants,
            admin: keys.admin.as_ref().map(hash),
            metrics_key: keys.metrics.as_ref().map(hash),
            heavy: Arc::new(tokio::sync::Semaphore::new(pool)),
            anonymous: Tenant {
                key_hash: [0; 32],
                salt: None,
                index: usize::MAX,
                heavy: share(),
            },
            sessions: Mutex::new(HashMap::new()),
            metrics,
            args,
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Waits for `t`'s share of the heavy pool, then for the pool (FIFO
    /// both): a tenant waits behind its own requests first, so another's
    /// never queue behind a flood it did not send.
    pub(crate) async fn heavy_permit(&self, t: &Tenant) -> Option<HeavyPermit> {
        let tenant = t.heavy.clone().acquire_owned().await.ok()?;
        let pool = self.heavy.clone().acquire_owned().await.ok()?;
        Some(HeavyPermit {
            _tenant: tenant,
            _pool: pool,
        })
    }

    /// The tenant a bearer token names: every key is compared, in constant
    /// time, so the answer's timing says nothing about which one matched or
    /// how close a guess was.
    pub(crate) fn tenant(&self, bearer: Option<&str>) -> Option<&Tenant> {
        if self.tenants.is_empty() {
            return Some(&self.anonymous);
        }
        let given = *blake3::hash(bearer.unwrap_or("").as_bytes()).as_bytes();
        let mut found = None;
        for t in &self.tenants {
            if bool::from(t.key_hash.ct_eq(&given)) {
                found = Some(t);
            }
        }
        bearer.and(found)
    }

    /// Whether `bearer` is the admin key (`None`: there is no admin key,
    /// the admin endpoints are off).
    pub(crate) fn is_admin(&self, bearer: Option<&str>) -> Option<bool> {
        self.admin.map(|want| key_matches(&want, bearer))
    }

    /// Whether `/metrics` may be read with `bearer`.
    pub(crate) fn may_read_metrics(&self, bearer: Option<&str>) -> bool {
        self.metrics_key
            .is_none_or(|want| key_matches(&want, bearer))
    }

    /// Whether `bearer` is the metrics key (false without one).
    pub(crate) fn is_metrics_key(&self, bearer: Option<&str>) -> bool {
        self.metrics_key
            .is_some_and(|want| key_matches(&want, bearer))
    }

    /// Locks the sessions, ignoring poison (no handler panics while holding it).
    pub(crate) fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Whether `bearer` is the key whose BLAKE3 hash is `want` (compared in
/// constant time; no key never matches).
fn key_matches(want: &[u8; 32], bearer: Option<&str>) -> bool {
    bearer.is_some_and(|b| bool::from(want.ct_eq(blake3::hash(b.as_bytes()).as_bytes())))
}

/// `bytes` random bytes in hex (ids that must not be guessed or counted).
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    if getrandom::fill(&mut raw).is_err() {
        // No system randomness (never seen on Linux): unique, if not secret.
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let h = blake3::hash(format!("{n}:{:?}", std::time::SystemTime::now()).as_bytes());
        for (r, b) in raw.iter_mut().zip(h.as_bytes()) {
            *r = *b;
        }
    }
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Unix seconds now.
pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The installation's hash key, kept in the cache directory (created with
/// random bytes the first time, readable by the owner only): cached KV is
/// keyed by it, so it must outlive restarts (the tiers of 7/10) and never
/// leave the machine.
pub(crate) fn hash_key(dir: &Path) -> Result<HashKey, String> {
    let path = dir.join("hash-key");
    match std::fs::read(&path) {
        Ok(b) => {
            let bytes: [u8; 32] = b.as_slice().try_into().map_err(|_| {
                format!(
                    "{} is damaged ({} bytes, expected 32); delete it to make a new one (cached prefixes are then lost)",
                    path.display(),
                    b.len()
                )
            })?;
            Ok(HashKey::from_bytes(bytes))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            getrandom::fill(&mut bytes)
                .map_err(|e| format!("no randomness for the hash key: {e}"))?;
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            // Unique per attempt, not per process: servers started at once
            // in one process (tests do) must not collide on the temp file.
            let tmp = dir.join(format!(
                "hash-key.{}.{}.tmp",
                std::process::id(),
                random_hex(8)
            ));
            write_private(&tmp, &bytes)
                .map_err(|e| format!("cannot write {}: {e}", tmp.display()))?;
            // A hard link appears complete and fails if the key exists (a
            // rename would replace a key another start already uses).
            let linked = std::fs::hard_link(&tmp, &path);
            let _ = std::fs::remove_file(&tmp);
            match linked {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("cannot write {}: {e}", path.display())),
            }
            // Whoever won the race, everyone uses what is there.
            hash_key(dir)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// How the KV cache was sized (logged at start).
pub(crate) struct Sizing {
    /// Blocks.
    pub(crate) blocks: usize,
    /// Bytes.
    pub(crate) bytes: u64,
    /// Context limit in force.
    pub(crate) context: usize,
    /// Compute threads.
    pub(crate) threads: usize,
}

/// Loads the model and starts its engine (blocking: run it off the async
/// runtime).
pub(crate) fn load(
    args: &ServeArgs,
    path: &Path,
    hash_key: &HashKey,
    threads: usize,
) -> Result<(Loaded, Sizing), String> {
    let mut gguf = Gguf::open(path).map_err(|e| e.to_string())?;
    let tokenizer = Arc::new(Tokenizer::from_gguf(gguf.content()).map_err(|e| e.to_string())?);
    let template = match &args.chat_template {
        Some(p) => {
            let source = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read the chat template {}: {e}", p.display()))?;
            Some(
                ChatTemplate::for_tokenizer(&source, &tokenizer)
                    .map_err(|e| format!("the chat template {}: {e}", p.display()))?,
            )
        }
        None => ChatTemplate::from_gguf(gguf.content(), &tokenizer).map_err(|e| e.to_string())?,
    };
    let model = Arc::new(
        LlamaModel::load(
            &mut gguf,
            LoadOptions {
                threads,
                requantize: false,
            },
        )
        .map_err(|e| e.to_string())?,
    );
    let bs = args.block_size as usize;
    let per_block = model.arena_layout(1, bs).block_bytes() as u64;
    let blocks = match args.kv_blocks {
        Some(b) => b,
        None => usize::try_from(args.kv_memory / per_block).unwrap_or(usize::MAX),
    };
    if blocks < 2 {
        return Err(format!(
            "a KV capacity of {blocks} blocks cannot hold a sequence (a block of {bs} tokens takes {per_block} bytes); raise --kv-memory or --kv-blocks"
        ));
    }
    let arena = Arena::new(model.arena_layout(blocks, bs)).map_err(|e| e.to_string())?;
    let cfg = model.config();
    let context = args
        .context
        .unwrap_or(cfg.context_length)
        .min(cfg.context_length);
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        path.file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".gguf").to_string())
            .unwrap_or_else(|| "model".into())
    });
    let vocab = cfg.vocab;
    let tiers = crate::tiers::open(args, &model.fingerprint(bs), hash_key)?;
    let engine = Engine::start_with_tiers(
        ModelRunner::new(model.clone(), arena),
        EngineConfig {
            num_blocks: blocks,
            block_size: bs,
            context,
            vocab,
            eos: tokenizer.eos().to_vec(),
            model_fingerprint: model.fingerprint(bs),
            hash_key: hash_key.clone(),
            scheduler: SchedulerConfig {
                max_step_tokens: args.max_batch_tokens.max(1),
                max_running: args.max_running.max(1),
                sanitize: args.sanitize,
                check_every: args.sanitize_check_every,
            },
            queue_limit: args.queue_limit,
            model_name: name.clone(),
            session_ttl: args.session_ttl,
            tokenizer: Some(tokenizer.clone()),
        },
        tiers,
    )
    .map_err(|e| e.to_string())?;
    let sizing = Sizing {
        blocks,
        bytes: blocks as u64 * per_block,
        context: engine.context(),
        threads,
    };
    let max_prompt_bytes = sizing.context.saturating_mul(tokenizer.max_token_bytes());
    let digest = blake3::hash(
        format!(
            "strata {};{}",
            env!("CARGO_PKG_VERSION"),
            String::from_utf8_lossy(&model.fingerprint(bs))
        )
        .as_bytes(),
    );
    let fingerprint = format!("fp_{}", &digest.to_hex()[..12]);
    let grammars = strata_model::Grammars::new(tokenizer.clone(), vocab)
        .map_err(|e| format!("structured output cannot use this tokenizer: {e}"))?;
    Ok((
        Loaded {
            engine,
            tokenizer,
            template,
            name,
            created: unix_now(),
            vocab,
            max_prompt_bytes,
            fingerprint,
            grammars,
        },
        sizing,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(keys: &[&str]) -> AppState {
        let args = ServeArgs::defaults();
        let keys = Keys {
            tenants: keys.iter().map(|k| k.to_string()).collect(),
            admin: None,
            metrics: None,
        };
        let metrics = Metrics::new(Arc::default(), Arc::default());
        AppState::new(args, keys, HashKey::from_bytes([1; 32]), metrics)
    }

    /// One tenant holding all it may of the heavy pool (and queueing more)
    /// leaves a permit another tenant takes at once; alone, a tenant may
    /// use the whole pool.
    #[test]
    fn a_tenants_flood_of_heavy_work_leaves_room_for_the_others() {
        use futures_util::FutureExt;
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let s = state(&["key-a", "key-b"]);
            let (a, b) = (&s.tenants[0], &s.tenants[1]);
            let pool = s.heavy.available_permits();
            let mut held = Vec::new();
            for _ in 0..pool - 1 {
                held.push(s.heavy_permit(a).await.unwrap());
            }
            let mut queued = Box::pin(s.heavy_permit(a));
            assert!((&mut queued).now_or_never().is_none(), "past its share");
            let other = s.heavy_permit(b).now_or_never().flatten();
            assert!(other.is_some(), "the other tenant waited behind the flood");
            assert!(
                (&mut queued).now_or_never().is_none(),
                "still past its share"
            );
            drop(held.pop());
            assert!(queued.now_or_never().flatten().is_some(), "its turn came");

            let alone = state(&["only"]);
            let mut all = Vec::new();
            for _ in 0..alone.heavy.available_permits() {
                all.push(
                    alone
                        .heavy_permit(&alone.tenants[0])
                        .now_or_never()
                        .flatten(),
                );
            }
            assert!(all.iter().all(Option::is_some), "one tenant uses the pool");
        });
    }

    /// Many servers starting at once on a fresh cache directory (in one
    /// process, as the tests do) all get the key, and the same one.
    #[test]
    fn a_fresh_hash_key_is_made_once_under_concurrent_starts() {
        let dir = std::env::temp_dir().join(format!("strata-hash-key-{}", random_hex(6)));
        let keys: Vec<Result<HashKey, String>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..16).map(|_| s.spawn(|| hash_key(&dir))).collect();
            hs.into_iter()
                .map(|h| h.join().expect("no panic"))
                .collect()
        });
        let first = keys[0]
            .as_ref()
            .expect("the first start got a key")
            .as_bytes();
        for k in &keys {
            assert_eq!(
                k.as_ref().expect("every start gets a key").as_bytes(),
                first
            );
        }
        assert_eq!(hash_key(&dir).expect("read back").as_bytes(), first);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
