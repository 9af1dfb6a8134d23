//! Process-wide Prometheus metrics. Each counter names what it counts and its unit.

use std::sync::LazyLock;

use prometheus::{IntCounter, IntGauge, Registry};

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

/// Open tablets.
pub static TABLETS_OPEN: LazyLock<IntGauge> =
    LazyLock::new(|| gauge("prkv_engine_tablets_open", "Tablets currently open"));

/// Flushes scheduled by the write-buffer controller.
pub static MEMORY_FLUSHES: LazyLock<IntCounter> = LazyLock::new(|| {
    counter(
        "prkv_engine_memory_flushes_total",
        "Tablet flushes scheduled to keep memtables under rocksdb.write-buffer-limit",
    )
});

/// Renders every metric in the Prometheus text format.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&REGISTRY.gather(), &mut buf) {
        return format!("# encoding metrics failed: {e}\n");
    }
    String::from_utf8(buf).unwrap_or_default()
}

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
