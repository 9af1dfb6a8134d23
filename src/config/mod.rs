//! Configuration: one TOML file, TiKV's key names, strict validation.
//!
//! A store reads its configuration once, at start. Every key has a default, so an empty file is
//! a valid configuration; `etc/config-template.toml` lists every key with its default and a test
//! keeps the two in step. Keys use TiKV's names where TiKV has the same knob
//! (`rocksdb.write-buffer-limit`, `coprocessor.region-split-size`, ...), so an operator's
//! knowledge carries over.
//!
//! Errors always name the key: an unknown key, a value of the wrong type or an out-of-range
//! value is a [`ConfigError`] whose `key` is the dotted path (`rocksdb.write-buffer-limit`) and
//! whose `reason` says what is wrong. Parsing tracks the path with `serde_path_to_error`;
//! semantic checks run afterwards in [`Config::validate`].

mod units;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use units::{ReadableDuration, ReadableSize};

/// Which storage engine holds the Regions' data on a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum EngineKind {
    /// One RocksDB instance ("tablet") per Region replica; no WAL, atomic flush.
    #[default]
    PartitionedRaftKv,
    /// All Regions in one RocksDB with its WAL on: TiKV's classic layout, our baseline.
    RaftKv,
}

impl EngineKind {
    /// The name used in the config file and in `store.toml`.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::PartitionedRaftKv => "partitioned-raft-kv",
            EngineKind::RaftKv => "raft-kv",
        }
    }
}

impl std::fmt::Display for EngineKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EngineKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "partitioned-raft-kv" => Ok(EngineKind::PartitionedRaftKv),
            "raft-kv" => Ok(EngineKind::RaftKv),
            other => Err(format!(
                "unknown engine {other:?}, expected \"partitioned-raft-kv\" or \"raft-kv\""
            )),
        }
    }
}

/// A configuration error, always naming the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config syntax error: {0}")]
    Syntax(String),
    #[error("invalid config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    fn invalid(key: &str, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    /// The dotted key this error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Config {
    pub storage: StorageConfig,
    pub rocksdb: RocksDbConfig,
    pub raft_engine: RaftEngineConfig,
    pub raftstore: RaftstoreConfig,
    pub coprocessor: CoprocessorConfig,
    pub server: ServerConfig,
    pub pd: PdConfig,
    pub gc: GcConfig,
}

/// `[gc]`: removing old MVCC versions below PD's GC safe point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct GcConfig {
    /// How often the store asks PD for the GC safe point, and collects its leaders' Regions
    /// up to it when it moved.
    pub poll_safe_point_interval: ReadableDuration,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            // TiKV's: the safe point moves every few minutes; ten seconds of lag is nothing.
            poll_safe_point_interval: ReadableDuration::millis(10_000),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct StorageConfig {
    /// Root of everything the store writes (see `docs/architecture.md`, "Storage layout").
    pub data_dir: PathBuf,
    /// Engine kind; fixed when the data dir is bootstrapped.
    pub engine: EngineKind,
    /// 1: raw keys as given; 2: keys carry a keyspace prefix (`r` + 3-byte keyspace id for
    /// RawKV). Fixed when the data dir is bootstrapped.
    pub api_version: u8,
    /// RawKV puts may carry a time to live (always on with API v2). Fixed at bootstrap: it
    /// changes how values are stored.
    pub enable_ttl: bool,
    /// Largest key a request may write; bigger keys are rejected before they reach Raft.
    pub max_key_size: ReadableSize,
    /// Free space the store keeps on its disk: below it, data writes are refused with
    /// `DiskFull` (reads, deletes and Raft go on) until space returns. 0 turns it off.
    pub reserve_space: ReadableSize,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: PathBuf::from("./prkv-data"),
            engine: EngineKind::default(),
            api_version: 1,
            enable_ttl: false,
            // TiKV's default: keys are index entries and row ids, not payloads.
            max_key_size: ReadableSize::kib(8),
            // TiKV's default: room for compactions to finish and Raft logs to be applied and
            // collected after writes stop, so that space can come back.
            reserve_space: ReadableSize::gib(5),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RocksDbConfig {
    /// Memtable memory shared by every tablet (or the one raft-kv DB).
    pub write_buffer_limit: ReadableSize,
    /// When the limit is hit, flush the tablet holding the oldest unflushed write (true) or
    /// the one with the largest memtables (false).
    pub write_buffer_flush_oldest_first: bool,
    /// Size of one memtable. It is also the slack above `write-buffer-limit`: the limit holds
    /// to within one memtable.
    pub write_buffer_size: ReadableSize,
    /// Open SST files per tablet (per DB in raft-kv mode). RocksDB raises values below 20 to 20
    /// and keeps 10 of them for itself, so 20 means "at most 10 SSTs open per tablet".
    pub max_open_files: i32,
    /// Block cache shared by every tablet.
    pub block_cache_size: ReadableSize,
    /// Background flush and compaction threads, shared by every tablet through one Env.
    pub max_background_jobs: i32,
    /// Tablets kept open at most; beyond it the least recently used are parked (flushed and
    /// closed until their next use, `storage::park`). 0: no limit. An idle tablet holds about
    /// 6 file descriptors and 1 MiB of memory, a busy one up to `max-open-files + 4`
    /// descriptors: 1,000 keep a store within 20,000 descriptors and about 1 GiB whatever its
    /// Region count.
    pub max_open_tablets: usize,
    /// A tablet unused (no read or write of its data) for this long is parked. 0s: only the
    /// cap parks.
    pub tablet_idle_timeout: ReadableDuration,
    /// Test-only: close without flushing memtables, so that a clean stop loses exactly what a
    /// crash would (tablets write no WAL). Not a config key.
    #[serde(skip)]
    #[doc(hidden)]
    pub skip_flush_on_close: bool,
}

impl Default for RocksDbConfig {
    fn default() -> Self {
        RocksDbConfig {
            write_buffer_limit: ReadableSize::mib(1024),
            write_buffer_flush_oldest_first: true,
            write_buffer_size: ReadableSize::mib(32),
            max_open_files: 20,
            block_cache_size: ReadableSize::mib(512),
            max_background_jobs: 4,
            max_open_tablets: 1000,
            tablet_idle_timeout: ReadableDuration::secs(600),
            skip_flush_on_close: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftEngineConfig {
    /// Defaults to `<storage.data-dir>/raft-engine` when empty.
    pub dir: String,
    /// Size at which a log file is sealed and a new one started.
    pub target_file_size: ReadableSize,
    /// Total log size above which purging obsolete files starts.
    pub purge_threshold: ReadableSize,
}

impl Default for RaftEngineConfig {
    fn default() -> Self {
        RaftEngineConfig {
            dir: String::new(),
            target_file_size: ReadableSize::mib(128),
            purge_threshold: ReadableSize::gib(10),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct RaftstoreConfig {
    /// One Raft tick.
    pub raft_base_tick_interval: ReadableDuration,
    pub raft_heartbeat_ticks: usize,
    pub raft_election_timeout_ticks: usize,
    /// Largest Raft entry a proposal may produce; larger proposals get `RaftEntryTooLarge`.
    pub raft_entry_max_size: ReadableSize,
    /// Upper bound of a leader's read lease; must stay below the election timeout.
    pub raft_store_max_leader_lease: ReadableDuration,
    pub raft_log_gc_tick_interval: ReadableDuration,
    /// Compact the log when this many entries are applied beyond the truncated index.
    pub raft_log_gc_threshold: u64,
    /// Force compaction when the log holds more entries than this.
    pub raft_log_gc_count_limit: u64,
    /// Force compaction when the log is larger than this.
    pub raft_log_gc_size_limit: ReadableSize,
    /// Idle Regions stop ticking until a message or proposal arrives.
    pub hibernate_regions: bool,
    pub split_region_check_tick_interval: ReadableDuration,
    /// Check a Region for split only after it grew by this much.
    pub region_split_check_diff: ReadableSize,
    /// How often every leader reports its Region to PD (also on each leadership and
    /// membership change, and every tick while a replica catches up).
    pub pd_heartbeat_tick_interval: ReadableDuration,
    /// How often the store reports its own state to PD.
    pub pd_store_heartbeat_tick_interval: ReadableDuration,
}

impl Default for RaftstoreConfig {
    fn default() -> Self {
        RaftstoreConfig {
            raft_base_tick_interval: ReadableDuration::millis(1000),
            raft_heartbeat_ticks: 2,
            raft_election_timeout_ticks: 10,
            raft_entry_max_size: ReadableSize::mib(8),
            raft_store_max_leader_lease: ReadableDuration::millis(9000),
            raft_log_gc_tick_interval: ReadableDuration::millis(3000),
            raft_log_gc_threshold: 50,
            raft_log_gc_count_limit: 73728,
            raft_log_gc_size_limit: ReadableSize::mib(72),
            hibernate_regions: true,
            split_region_check_tick_interval: ReadableDuration::millis(10_000),
            region_split_check_diff: ReadableSize::mib(16),
            pd_heartbeat_tick_interval: ReadableDuration::millis(10_000),
            pd_store_heartbeat_tick_interval: ReadableDuration::millis(10_000),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct CoprocessorConfig {
    pub region_split_size: ReadableSize,
    pub region_max_size: ReadableSize,
    pub region_split_keys: u64,
    pub region_max_keys: u64,
    /// At most this many split keys from one split check (TiKV's name and default). A Region
    /// far past its limits is cut in steps, one check after another: each split's apply
    /// (a checkpoint per new Region, on the store loop) stays short, and the new tablets
    /// arrive at the pace the parker can close them. 256 pieces at once stalled a store's
    /// loop for a minute under a low descriptor limit (`tests/fd_budget.rs`).
    pub batch_split_limit: u64,
}

impl Default for CoprocessorConfig {
    fn default() -> Self {
        // Partitioned Raft KV makes big Regions cheap (TiKV uses 10GiB for it): a split is a
        // checkpoint, not a copy, so there is no reason to keep Regions small.
        CoprocessorConfig {
            region_split_size: ReadableSize::gib(10),
            region_max_size: ReadableSize::gib(15),
            region_split_keys: 100_000_000,
            region_max_keys: 150_000_000,
            batch_split_limit: 10,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ServerConfig {
    /// Where the store listens for gRPC (clients and other stores).
    pub addr: String,
    /// The gRPC address other stores and clients are told (default: `addr`).
    pub advertise_addr: String,
    /// Where the store serves HTTP `/metrics` and `/status`.
    pub status_addr: String,
    /// Largest gRPC message the store accepts or sends.
    pub max_grpc_msg_len: ReadableSize,
    /// Bandwidth all outgoing snapshot transfers of the store share, so that moving Regions
    /// never starves foreground traffic (TiKV's `server.snap-io-max-bytes-per-sec`).
    pub snap_io_max_bytes_per_sec: ReadableSize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:20160".into(),
            advertise_addr: String::new(),
            status_addr: "127.0.0.1:20180".into(),
            // Above raftstore.raft-entry-max-size (8MiB) with room for a batch's framing.
            max_grpc_msg_len: ReadableSize::mib(16),
            snap_io_max_bytes_per_sec: ReadableSize::mib(100),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PdConfig {
    pub endpoints: Vec<String>,
}

impl Default for PdConfig {
    fn default() -> Self {
        PdConfig {
            endpoints: vec!["127.0.0.1:2379".into()],
        }
    }
}

impl Config {
    /// Parses and validates a TOML document.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::new(text);
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let reason = inner.message().to_string();
            if key.is_empty() || key == "." {
                ConfigError::Syntax(inner.to_string())
            } else {
                ConfigError::Invalid { key, reason }
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a config file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// Checks the relations between values that the types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.gc.poll_safe_point_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                "gc.poll-safe-point-interval",
                "must be > 0",
            ));
        }
        let r = &self.rocksdb;
        if r.write_buffer_size.0 == 0 {
            return Err(ConfigError::invalid(
                "rocksdb.write-buffer-size",
                "must be > 0",
            ));
        }
        if r.write_buffer_limit.0 < r.write_buffer_size.0 {
            return Err(ConfigError::invalid(
                "rocksdb.write-buffer-limit",
                format!(
                    "{} is below rocksdb.write-buffer-size ({}): not even one memtable fits",
                    r.write_buffer_limit, r.write_buffer_size
                ),
            ));
        }
        if r.max_open_files != -1 && r.max_open_files < 20 {
            return Err(ConfigError::invalid(
                "rocksdb.max-open-files",
                format!(
                    "{} is neither -1 (unlimited) nor >= 20 (RocksDB's minimum)",
                    r.max_open_files
                ),
            ));
        }
        if !(1..=64).contains(&r.max_background_jobs) {
            return Err(ConfigError::invalid(
                "rocksdb.max-background-jobs",
                "must be in 1..=64",
            ));
        }
        let rs = &self.raftstore;
        if rs.raft_base_tick_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                "raftstore.raft-base-tick-interval",
                "must be > 0",
            ));
        }
        if rs.raft_heartbeat_ticks == 0 {
            return Err(ConfigError::invalid(
                "raftstore.raft-heartbeat-ticks",
                "must be > 0",
            ));
        }
        if rs.raft_election_timeout_ticks <= rs.raft_heartbeat_ticks {
            return Err(ConfigError::invalid(
                "raftstore.raft-election-timeout-ticks",
                "must be greater than raftstore.raft-heartbeat-ticks",
            ));
        }
        // A lease longer than the election timeout could outlive the leadership it stands for:
        // a new leader may be elected while the old one still believes its lease (Raft thesis
        // section 6.4).
        let election = rs.raft_base_tick_interval.0 * rs.raft_election_timeout_ticks as u32;
        if rs.raft_store_max_leader_lease.0 >= election {
            return Err(ConfigError::invalid(
                "raftstore.raft-store-max-leader-lease",
                format!(
                    "{} must be shorter than the election timeout ({})",
                    rs.raft_store_max_leader_lease,
                    ReadableDuration(election)
                ),
            ));
        }
        if rs.raft_entry_max_size.0 == 0 || rs.raft_entry_max_size.0 > ReadableSize::gib(1).0 {
            return Err(ConfigError::invalid(
                "raftstore.raft-entry-max-size",
                "must be in (0, 1GiB]",
            ));
        }
        if rs.pd_heartbeat_tick_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                "raftstore.pd-heartbeat-tick-interval",
                "must be > 0",
            ));
        }
        if rs.pd_store_heartbeat_tick_interval.0.is_zero() {
            return Err(ConfigError::invalid(
                "raftstore.pd-store-heartbeat-tick-interval",
                "must be > 0",
            ));
        }
        let st = &self.storage;
        if st.api_version != 1 && st.api_version != 2 {
            return Err(ConfigError::invalid(
                "storage.api-version",
                format!("{} is neither 1 nor 2", st.api_version),
            ));
        }
        if st.max_key_size.0 == 0 || st.max_key_size.0 > ReadableSize::mib(1).0 {
            return Err(ConfigError::invalid(
                "storage.max-key-size",
                "must be in (0, 1MiB]",
            ));
        }
        let sv = &self.server;
        for (key, addr) in [
            ("server.addr", &sv.addr),
            ("server.status-addr", &sv.status_addr),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return Err(ConfigError::invalid(
                    key,
                    format!("{addr:?} is not an ip:port address"),
                ));
            }
        }
        if sv.max_grpc_msg_len.0 <= rs.raft_entry_max_size.0 {
            return Err(ConfigError::invalid(
                "server.max-grpc-msg-len",
                format!(
                    "{} must exceed raftstore.raft-entry-max-size ({})",
                    sv.max_grpc_msg_len, rs.raft_entry_max_size
                ),
            ));
        }
        if sv.snap_io_max_bytes_per_sec.0 < 1 << 20 {
            return Err(ConfigError::invalid(
                "server.snap-io-max-bytes-per-sec",
                "must be at least 1MiB: below that a Region snapshot takes hours",
            ));
        }
        if self.pd.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "pd.endpoints",
                "must list at least one PD",
            ));
        }
        let c = &self.coprocessor;
        if c.region_split_size.0 == 0 {
            return Err(ConfigError::invalid(
                "coprocessor.region-split-size",
                "must be > 0",
            ));
        }
        if c.region_max_size.0 < c.region_split_size.0 {
            return Err(ConfigError::invalid(
                "coprocessor.region-max-size",
                format!(
                    "{} is below coprocessor.region-split-size ({})",
                    c.region_max_size, c.region_split_size
                ),
            ));
        }
        if c.region_split_keys == 0 {
            return Err(ConfigError::invalid(
                "coprocessor.region-split-keys",
                "must be > 0",
            ));
        }
        if c.batch_split_limit == 0
            || c.batch_split_limit > crate::raftstore::split::MAX_SPLIT_KEYS as u64
        {
            return Err(ConfigError::invalid(
                "coprocessor.batch-split-limit",
                format!("must be 1..={}", crate::raftstore::split::MAX_SPLIT_KEYS),
            ));
        }
        if c.region_max_keys < c.region_split_keys {
            return Err(ConfigError::invalid(
                "coprocessor.region-max-keys",
                "is below coprocessor.region-split-keys",
            ));
        }
        check_addr("server.addr", &self.server.addr)?;
        check_addr("server.status-addr", &self.server.status_addr)?;
        if self.pd.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "pd.endpoints",
                "needs at least one endpoint",
            ));
        }
        for e in &self.pd.endpoints {
            let hostport = e.strip_prefix("http://").unwrap_or(e);
            check_addr("pd.endpoints", hostport)?;
        }
        Ok(())
    }

    /// The raft-engine directory: `raft-engine.dir` or `<data-dir>/raft-engine`.
    pub fn raft_engine_dir(&self) -> PathBuf {
        if self.raft_engine.dir.is_empty() {
            self.storage.data_dir.join("raft-engine")
        } else {
            PathBuf::from(&self.raft_engine.dir)
        }
    }
}

/// Checks that `value` is `host:port` with a valid port.
fn check_addr(key: &str, value: &str) -> Result<(), ConfigError> {
    let Some((host, port)) = value.rsplit_once(':') else {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?} is not host:port"),
        ));
    };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ConfigError::invalid(
            key,
            format!("{value:?} is not host:port"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        assert_eq!(Config::from_toml("").unwrap(), Config::default());
    }

    #[test]
    fn template_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/config-template.toml");
        let text = std::fs::read_to_string(path).unwrap();
        let config = Config::from_toml(&text).unwrap();
        assert_eq!(
            config,
            Config::default(),
            "etc/config-template.toml drifted from defaults"
        );
    }

    #[test]
    fn template_documents_every_key() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/config-template.toml");
        let template = std::fs::read_to_string(path).unwrap();
        let defaults = toml::Value::try_from(Config::default()).unwrap();
        for (section, table) in defaults.as_table().unwrap() {
            assert!(
                template.contains(&format!("[{section}]")),
                "template lacks [{section}]"
            );
            for key in table.as_table().unwrap().keys() {
                let line = format!("\n{key} = ");
                assert!(template.contains(&line), "template lacks {section}.{key}");
            }
        }
    }

    #[test]
    fn sizes_and_durations() {
        let c = Config::from_toml(
            "[rocksdb]\nwrite-buffer-limit = \"10GiB\"\nwrite-buffer-size = \"256MiB\"\n\
             [raftstore]\nraft-log-gc-tick-interval = \"5s\"\n",
        )
        .unwrap();
        assert_eq!(c.rocksdb.write_buffer_limit.0, 10 << 30);
        assert_eq!(c.rocksdb.write_buffer_size.0, 256 << 20);
        assert_eq!(
            c.raftstore.raft_log_gc_tick_interval.0,
            std::time::Duration::from_secs(5)
        );
        let c = Config::from_toml("[storage]\nengine = \"raft-kv\"\n").unwrap();
        assert_eq!(c.storage.engine, EngineKind::RaftKv);
    }

    /// Each bad value must produce an error that names exactly its key.
    #[test]
    fn invalid_values_name_their_key() {
        let cases = [
            (
                "[rocksdb]\nwrite-buffer-limit = \"lots\"",
                "rocksdb.write-buffer-limit",
            ),
            (
                "[rocksdb]\nwrite-buffer-limit = \"12XB\"",
                "rocksdb.write-buffer-limit",
            ),
            (
                "[rocksdb]\nwrite-buffer-limit = -5",
                "rocksdb.write-buffer-limit",
            ),
            (
                "[rocksdb]\nwrite-buffer-limit = \"1MiB\"",
                "rocksdb.write-buffer-limit",
            ),
            (
                "[rocksdb]\nwrite-buffer-flush-oldest-first = \"yes\"",
                "rocksdb.write-buffer-flush-oldest-first",
            ),
            ("[rocksdb]\nmax-open-files = 5", "rocksdb.max-open-files"),
            ("[rocksdb]\nno-such-key = 1", "rocksdb.no-such-key"),
            ("[storage]\nengine = \"btree\"", "storage.engine"),
            ("[storage]\ndata-dir = 7", "storage.data-dir"),
            (
                "[raftstore]\nraft-base-tick-interval = \"soon\"",
                "raftstore.raft-base-tick-interval",
            ),
            (
                "[raftstore]\nraft-store-max-leader-lease = \"20s\"",
                "raftstore.raft-store-max-leader-lease",
            ),
            (
                "[raftstore]\nraft-election-timeout-ticks = 1",
                "raftstore.raft-election-timeout-ticks",
            ),
            (
                "[raftstore]\nraft-entry-max-size = \"0B\"",
                "raftstore.raft-entry-max-size",
            ),
            (
                "[coprocessor]\nregion-max-size = \"1MiB\"",
                "coprocessor.region-max-size",
            ),
            (
                "[coprocessor]\nregion-split-keys = 0",
                "coprocessor.region-split-keys",
            ),
            (
                "[coprocessor]\nbatch-split-limit = 0",
                "coprocessor.batch-split-limit",
            ),
            (
                "[coprocessor]\nbatch-split-limit = 257",
                "coprocessor.batch-split-limit",
            ),
            ("[server]\naddr = \"nowhere\"", "server.addr"),
            ("[pd]\nendpoints = []", "pd.endpoints"),
            ("[pd]\nendpoints = [\"127.0.0.1:99999\"]", "pd.endpoints"),
            ("[nonsense]\na = 1", "nonsense"),
        ];
        for (text, key) in cases {
            let err = Config::from_toml(text).expect_err(text);
            let shown = err.to_string();
            assert_eq!(err.key(), Some(key), "{text:?}: {shown}");
            assert!(shown.contains(key), "{text:?}: {shown}");
        }
        let err = Config::from_toml("[rocksdb]\nno-such-key = 1").unwrap_err();
        assert!(err.to_string().contains("no-such-key"), "{err}");
    }

    #[test]
    fn syntax_error_is_reported() {
        let err = Config::from_toml("[rocksdb\n").unwrap_err();
        assert!(matches!(err, ConfigError::Syntax(_)), "{err}");
    }
}
