//! Opening the tiers below the arena from the command line: the host-RAM
//! store (off by default on the CPU backend) and the SSD directory (on by
//! default, in the user's cache directory, with a modest bound), with
//! what recovery found logged.

use std::sync::Arc;

use strata_engine::TierStores;
use strata_store::HostStore;
use strata_store::ssd::{RealIo, SsdConfig, SsdError, SsdStore};

use crate::cli::{RestorePolicy, ServeArgs, TierWrite};

/// The stores `args` ask for (`None`: no tier at all). A named SSD
/// directory that cannot be used is an error; the default one is skipped
/// with a warning (another server on this machine may hold it).
pub(crate) fn open(
    args: &ServeArgs,
    fingerprint: &[u8],
    hash_key: &strata_kv::HashKey,
) -> Result<Option<TierStores>, String> {
    // Records are keyed by the installation's hash key: ones written under
    // another key (a cache directory moved, a key file replaced) can never
    // hit, so they count as another model's and are removed at start
    // instead of lingering. The key's own bytes never reach the disk.
    let mut fingerprint = fingerprint.to_vec();
    let key_id = blake3::keyed_hash(hash_key.as_bytes(), b"strata ssd tier key id");
    fingerprint.extend_from_slice(format!(";hash-key-id={}", &key_id.to_hex()[..16]).as_bytes());
    let fingerprint = fingerprint.as_slice();
    let host = (args.host_cache_size > 0).then(|| {
        tracing::info!(bytes = args.host_cache_size, "host tier on");
        HostStore::new(args.host_cache_size)
    });
    let ssd = if args.ssd_cache_size == 0 {
        tracing::info!("SSD tier off (--ssd-cache-size 0)");
        None
    } else {
        let named = args.ssd_cache_dir.is_some();
        let dir = args
            .ssd_cache_dir
            .clone()
            .unwrap_or_else(crate::cache_cmd::default_ssd_dir);
        let config = SsdConfig {
            dir: dir.clone(),
            capacity: args.ssd_cache_size,
            fingerprint: fingerprint.to_vec(),
            sync: args.ssd_sync,
        };
        match SsdStore::open(config, Arc::new(RealIo)) {
            Ok((store, r)) => {
                tracing::info!(
                    dir = %dir.display(),
                    bound_bytes = args.ssd_cache_size,
                    records = r.records,
                    bytes = r.bytes,
                    temporary_removed = r.temporary_removed,
                    corrupt_removed = r.corrupt_removed,
                    other_model_removed = r.foreign_removed,
                    evicted = r.evicted,
                    "SSD tier on"
                );
                Some(store)
            }
            Err(e @ SsdError::Locked(_)) if !named => {
                tracing::warn!(
                    "{e}: running without an SSD tier (name another with --ssd-cache-dir)"
                );
                None
            }
            Err(e) if !named => {
                tracing::warn!(
                    "the SSD tier's default directory cannot be used ({e}): running without it"
                );
                None
            }
            Err(e) => return Err(format!("--ssd-cache-dir: {e}")),
        }
    };
    if host.is_none() && ssd.is_none() {
        return Ok(None);
    }
    Ok(Some(TierStores {
        host,
        ssd,
        write_back: true,
        write_through: args.tier_write == TierWrite::Through,
        min_chain: args.ssd_min_blocks.max(1),
        restore_policy: args.restore_policy == RestorePolicy::Measured,
        ssd_read_delay: std::time::Duration::ZERO,
        ssd_probe_ns: None,
    }))
}
