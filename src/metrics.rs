//! Process-wide Prometheus metrics. Each counter names what it counts and its unit.

use std::sync::LazyLock;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Registry};

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn gauge(name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter(name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

/// Bytes in all memtables of the store (the shared write buffer).
pub static MEMTABLE_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_engine_memtable_bytes",
        "Bytes held by all memtables of the store",
    )
});

/// Bytes RocksDB read or wrote since the store started, by kind (`flush_write`,
/// `compaction_write`, `compaction_read`, `wal_write`), all instances of the store summed;
/// refreshed at each scrape from RocksDB's statistics.
pub static ENGINE_BYTES: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "prkv_engine_bytes",
        "Bytes RocksDB flushed, compacted or logged since start, by kind",
        &["kind"],
    )
});

/// Microseconds writers waited in RocksDB's write stalls and slowdowns since the store
/// started (too many L0 files or unflushed memtables), all instances summed.
/// An apply waiting here holds up the whole store loop.
pub static ENGINE_WRITE_STALL_MICROS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_engine_write_stall_micros",
        "Microseconds RocksDB writes waited in stalls since start",
    )
});

/// Tablets open now (their RocksDB running).
pub static TABLETS_OPEN: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("prkv_engine_tablets_open", "Tablets currently open"));

/// Tablets parked now: closed while idle, reopened on their next use (`storage::park`).
pub static TABLETS_PARKED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_engine_tablets_parked",
        "Tablets closed while idle, reopened on their next use",
    )
});

/// Tablets parked since start.
pub static TABLET_PARKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_engine_tablet_parks_total",
        "Tablets closed because they were idle or over rocksdb.max-open-tablets",
    )
});

/// Parked tablets opened again since start (by a read or write of their data).
pub static TABLET_UNPARKS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_engine_tablet_unparks_total",
        "Parked tablets opened again for a read or write",
    )
});

/// Free bytes on the data directory's file system (measured once a second when
/// `storage.reserve-space` is set).
pub static DISK_AVAILABLE_BYTES: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_disk_available_bytes",
        "Bytes available on the file system of the data directory",
    )
});

/// 1 while free space is below `storage.reserve-space` and writes are refused.
pub static DISK_FULL: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_disk_full",
        "1 while free disk space is below storage.reserve-space (writes refused)",
    )
});

/// Replicas of this store not ticking because their Region is idle (see hibernation in
/// `raftstore/peer.rs`), as of the last tick.
pub static HIBERNATED_REGIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_hibernated_regions",
        "Replicas not ticking because their Region is idle",
    )
});

/// Replicas refused because their data failed a check at start-up, until PD replaces them.
pub static DAMAGED_REPLICAS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_damaged_replicas",
        "Replicas refused because their data on disk failed a check, waiting to be rebuilt",
    )
});

/// Flushes scheduled by the write-buffer controller.
pub static MEMORY_FLUSHES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_engine_memory_flushes_total",
        "Tablet flushes scheduled to keep memtables under rocksdb.write-buffer-limit",
    )
});

/// Tablet flushes prkv asked for, by why: `gc_limit` (a tablet's unflushed log passed the GC
/// limits), `purge` (it pins raft-engine's oldest files), `region_state` (before an epoch or
/// merge-state change), `split` (the parent, before its checkpoints), `trim`. Memory flushes
/// are `prkv_engine_memory_flushes_total`; RocksDB's own (a full memtable) are not counted.
pub static TABLET_FLUSHES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_tablet_flushes_total",
        "Tablet flushes requested by prkv, by reason",
        &["reason"],
    )
});

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(prometheus::Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(g.clone()))
        .expect("metric registered once");
    g
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(prometheus::Opts::new(name, help), labels).expect("valid metric");
    REGISTRY
        .register(Box::new(c.clone()))
        .expect("metric registered once");
    c
}

/// Timestamp requests PD answered (one per TSO batch, whatever its count).
pub static PD_TSO_REQUESTS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("prkv_pd_tso_requests_total", "TSO batches PD answered"));

/// Region heartbeats PD received.
pub static PD_REGION_HEARTBEATS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_pd_region_heartbeats_total",
        "Region heartbeats PD received",
    )
});

/// gRPC requests a store served, by method.
pub static GRPC_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_grpc_requests_total",
        "KV requests served, by method",
        &["method"],
    )
});

/// Linearizable reads the gRPC service tried to serve from a lease on its own thread, by
/// result: `served`, or why the read went to the store loop instead (`not_readable`,
/// `lease_expired`, `epoch`, `parked`, `no_replica`; see `raftstore::local_read`).
pub static LOCAL_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_local_reads_total",
        "Reads tried from a leader's lease without the store loop, by result",
        &["result"],
    )
});

/// Raft entries (or their terms) Raft read back from a Region's log, by where they came from:
/// the entry cache of persisted, unapplied entries, or raft-engine's files
/// (`raftlog::region_log`). Resolved once: these are counted on the store thread's hot path.
pub static RAFT_ENTRY_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_raft_entry_reads_total",
        "Raft log reads (entries or terms), by source",
        &["source"],
    )
});
pub static RAFT_ENTRY_READS_CACHE: LazyLock<IntCounter> =
    LazyLock::new(|| RAFT_ENTRY_READS.with_label_values(&["cache"]));
pub static RAFT_ENTRY_READS_ENGINE: LazyLock<IntCounter> =
    LazyLock::new(|| RAFT_ENTRY_READS.with_label_values(&["raft_engine"]));

/// `BatchCommands` traffic, by what was counted: `requests`, the `request_messages` that
/// carried them, and the `response_messages` that carried their answers. Requests per message
/// is how much batching the clients did; answers per message, how much the store did.
pub static BATCH_COMMANDS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_batch_commands_total",
        "BatchCommands requests and the stream messages carrying them and their answers",
        &["what"],
    )
});

/// Region errors returned to clients, by kind (not_leader, epoch_not_match, ...).
pub static REGION_ERRORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_region_errors_total",
        "Region errors answered to clients, by kind",
        &["kind"],
    )
});

/// Raft messages sent to other stores over gRPC, and those dropped (queue full, no
/// connection): Raft retransmits, so drops cost latency, not correctness.
pub static RAFT_MESSAGES_SENT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_raft_messages_sent_total",
        "Raft messages sent to other stores",
    )
});
pub static RAFT_MESSAGES_DROPPED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_raft_messages_dropped_total",
        "Raft messages dropped before reaching another store, by reason",
        &["reason"],
    )
});

/// Regions and leaders on this store (updated with each store heartbeat).
pub static STORE_REGIONS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("prkv_store_regions", "Region replicas on this store"));
pub static STORE_LEADERS: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("prkv_store_leaders", "Region leaders on this store"));

/// Renders every metric in the Prometheus text format: ours, and raft-engine's (registered in
/// the `prometheus` crate's default registry; `raft_engine_write_size` counts the Raft log's
/// bytes).
pub fn render() -> String {
    use prometheus::Encoder;
    crate::storage::export_engine_stats();
    if let Some(n) = crate::storage::fds::open_fds() {
        PROCESS_OPEN_FDS.set(n as i64);
    }
    FD_EXHAUSTED
        .set(crate::storage::fds::EXHAUSTED.load(std::sync::atomic::Ordering::Relaxed) as i64);
    let mut families = REGISTRY.gather();
    families.extend(prometheus::gather());
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&families, &mut buf) {
        return format!("# encoding metrics failed: {e}\n");
    }
    String::from_utf8(buf).unwrap_or_default()
}

/// File descriptors: open now, the limit, the open-tablet cap derived from it, and operations
/// that ran out and waited (`storage::fds`); refreshed at each scrape.
pub static PROCESS_OPEN_FDS: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_process_open_fds",
        "File descriptors this process holds",
    )
});
pub static FD_LIMIT: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_fd_limit",
        "RLIMIT_NOFILE of this process (soft, raised to hard)",
    )
});
pub static TABLET_CAP: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_engine_tablet_cap",
        "Tablets that may be open at once: rocksdb.max-open-tablets or what descriptors allow",
    )
});
/// Tablet openings that waited for the parker because too many tablets were open.
pub static TABLET_ADMISSION_WAITS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_engine_tablet_admission_waits_total",
        "Tablet openings that waited for parking: open tablets were past the cap",
    )
});
pub static FD_EXHAUSTED: LazyLock<IntGauge> = LazyLock::new(|| {
    gauge(
        "prkv_fd_exhausted_total",
        "Operations that met EMFILE or ENFILE and waited for the parker",
    )
});

/// Region snapshots by event: generated (leader), sent / send_failed (transfer), installed
/// (receiver).
pub static SNAPSHOTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_snapshots_total",
        "Region snapshots generated, sent, failed to send and installed",
        &["event"],
    )
});

/// Bytes of snapshot files streamed to other stores.
pub static SNAPSHOT_BYTES_SENT: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_snapshot_sent_bytes_total",
        "Bytes of snapshot files sent to other stores",
    )
});

/// Region splits applied on this store (one per parent Region, whatever the pieces).
pub static SPLITS: LazyLock<IntCounter> =
    LazyLock::new(|| counter("prkv_splits_total", "Region splits applied on this store"));

pub static MERGES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_merges_total",
        "Region merges applied on this store (as the target)",
    )
});

pub static GC_VERSIONS: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_gc_versions_total",
        "MVCC versions removed by GC below PD's safe point",
    )
});

/// PD operators by outcome (finished, timed out, or cancelled).
pub static PD_OPERATORS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "prkv_pd_operators_total",
        "Scheduling operators that finished, timed out or were cancelled",
        &["outcome"],
    )
});

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_render_in_text_format() {
        super::MEMORY_FLUSHES.inc();
        super::TABLETS_OPEN.get();
        let text = super::render();
        assert!(text.contains("prkv_engine_memory_flushes_total"), "{text}");
        assert!(text.contains("prkv_engine_tablets_open"), "{text}");
    }
}
