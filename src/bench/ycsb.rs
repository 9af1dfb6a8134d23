//! `prkv bench ycsb`: YCSB's core workloads against a prkv cluster (through PD, with the
//! official TiKV client, RawKV or transactions) or an etcd cluster (the `etcd-client` crate):
//! the same generator for both, so their numbers compare.
//!
//! | workload | mix | key choice |
//! |---|---|---|
//! | `load` | 100% insert of `--records` keys | sequential |
//! | `a` | 50% read, 50% update | zipfian |
//! | `b` | 95% read, 5% update | zipfian |
//! | `c` | 100% read | zipfian |
//! | `d` | 95% read, 5% insert | latest |
//! | `e` | 95% scan (1-100 keys), 5% insert | zipfian |
//! | `f` | 50% read, 50% read-modify-write | zipfian |
//! | `insert` | 100% insert of new keys | sequential |
//!
//! `--threads` clients run concurrently (tokio tasks, one connection pool); each operation's
//! latency goes into an HDR histogram (1 µs to 60 s, 3 significant digits). A progress bar shows
//! ops/s and errors once a second; the result is a table and, with `--json`, a JSON file.
//! Reads are linearizable on both targets (prkv: lease or ReadIndex; etcd: the default
//! `serializable = false` range).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Where the load goes.
#[derive(Clone, Debug)]
pub enum TargetSpec {
    /// PD endpoints of a prkv cluster.
    Prkv(Vec<String>),
    /// etcd client endpoints.
    Etcd(Vec<String>),
}

impl TargetSpec {
    /// `prkv://host:port,...` or `etcd://host:port,...`.
    pub fn parse(s: &str) -> Result<TargetSpec, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("--target {s:?}: expected prkv://PD,... or etcd://HOST,..."))?;
        let eps: Vec<String> = rest
            .split(',')
            .filter(|e| !e.is_empty())
            .map(String::from)
            .collect();
        if eps.is_empty() {
            return Err(format!("--target {s:?} names no endpoint"));
        }
        match scheme {
            "prkv" => Ok(TargetSpec::Prkv(eps)),
            "etcd" => Ok(TargetSpec::Etcd(eps)),
            other => Err(format!("--target: unknown system {other:?} (prkv or etcd)")),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Mode {
    Raw,
    /// Raw, sent through `BatchCommands` streams (`bench::batch_client`), as TiKV's Go client
    /// sends.
    RawBatch,
    Txn,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Distribution {
    Uniform,
    Zipfian,
    Latest,
}

#[derive(Clone, Debug)]
pub struct YcsbOptions {
    pub target: TargetSpec,
    pub workload: String,
    pub mode: Mode,
    pub records: u64,
    /// Stop after this many operations (0: run for `duration`).
    pub operations: u64,
    pub duration: Duration,
    pub threads: usize,
    pub key_size: usize,
    pub value_size: usize,
    /// Overrides the workload's own key distribution.
    pub distribution: Option<Distribution>,
}

#[derive(Debug, Serialize)]
pub struct OpStats {
    pub op: String,
    pub count: u64,
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

#[derive(Debug, Serialize)]
pub struct YcsbResult {
    pub target: String,
    pub workload: String,
    pub mode: Mode,
    pub threads: usize,
    pub value_size: usize,
    pub seconds: f64,
    pub ops: u64,
    pub errors: u64,
    pub ops_per_sec: f64,
    pub per_op: Vec<OpStats>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    Read,
    Update,
    Insert,
    Scan,
    ReadModifyWrite,
}

impl Op {
    const ALL: [Op; 5] = [
        Op::Read,
        Op::Update,
        Op::Insert,
        Op::Scan,
        Op::ReadModifyWrite,
    ];

    fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Update => "update",
            Op::Insert => "insert",
            Op::Scan => "scan",
            Op::ReadModifyWrite => "rmw",
        }
    }
}

/// The operation mix (weights in percent) and key distribution of a workload.
fn workload(name: &str) -> Result<(Vec<(Op, u32)>, Distribution), String> {
    use Op::*;
    Ok(match name {
        "load" | "insert" => (vec![(Insert, 100)], Distribution::Uniform),
        "a" => (vec![(Read, 50), (Update, 50)], Distribution::Zipfian),
        "b" => (vec![(Read, 95), (Update, 5)], Distribution::Zipfian),
        "c" => (vec![(Read, 100)], Distribution::Zipfian),
        "d" => (vec![(Read, 95), (Insert, 5)], Distribution::Latest),
        "e" => (vec![(Scan, 95), (Insert, 5)], Distribution::Zipfian),
        "f" => (
            vec![(Read, 50), (ReadModifyWrite, 50)],
            Distribution::Zipfian,
        ),
        other => return Err(format!("--workload {other:?}: one of load, insert, a-f")),
    })
}

/// A small, fast PRNG (xorshift64*): the generator must not be the bottleneck.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// YCSB's zipfian generator (Gray et al.), constant 0.99, over `n` items; item 0 is hottest.
struct Zipf {
    n: u64,
    theta: f64,
    alpha: f64,
    zetan: f64,
    eta: f64,
}

impl Zipf {
    fn new(n: u64) -> Zipf {
        let theta = 0.99;
        // zeta(n) summed directly: n is the record count (at most a few million here).
        let zeta = |n: u64| (1..=n).map(|i| 1.0 / (i as f64).powf(theta)).sum::<f64>();
        let zetan = zeta(n.max(1));
        let zeta2 = zeta(2);
        Zipf {
            n: n.max(1),
            theta,
            alpha: 1.0 / (1.0 - theta),
            zetan,
            eta: (1.0 - (2.0 / n.max(2) as f64).powf(1.0 - theta)) / (1.0 - zeta2 / zetan),
        }
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.unit();
        let uz = u * self.zetan;
        if uz < 1.0 {
            return 0;
        }
        if uz < 1.0 + 0.5f64.powf(self.theta) {
            return 1;
        }
        ((self.n as f64) * (self.eta * u - self.eta + 1.0).powf(self.alpha)) as u64 % self.n
    }
}

/// Record `i`'s key: `user` + a hash of `i`, padded to `key_size` (YCSB hashes so that hot keys
/// spread over the key space, and so over Regions).
fn key_of(i: u64, key_size: usize) -> Vec<u8> {
    // Multiplying by an odd constant is a bijection on u64: distinct records, distinct keys.
    let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut k = b"user".to_vec();
    k.extend_from_slice(&h.to_be_bytes());
    k.resize(key_size.max(12), b'0');
    k
}

fn value_of(rng: &mut Rng, size: usize) -> Vec<u8> {
    // Half random, half repeated: roughly as compressible as YCSB's values.
    let mut v = Vec::with_capacity(size);
    while v.len() < size / 2 {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.resize(size, b'x');
    v
}

enum Client {
    Raw(tikv_client::RawClient),
    Batch(super::batch_client::BatchClient),
    Txn(tikv_client::TransactionClient),
    Etcd(etcd_client::KvClient),
}

impl Client {
    async fn connect(target: &TargetSpec, mode: Mode) -> Result<Client, String> {
        match target {
            TargetSpec::Prkv(pd) => match mode {
                Mode::Raw => tikv_client::RawClient::new(pd.clone())
                    .await
                    .map(Client::Raw)
                    .map_err(|e| format!("connecting to prkv: {e}")),
                Mode::RawBatch => super::batch_client::BatchClient::connect(pd)
                    .await
                    .map(Client::Batch)
                    .map_err(|e| format!("connecting to prkv: {e}")),
                Mode::Txn => tikv_client::TransactionClient::new(pd.clone())
                    .await
                    .map(Client::Txn)
                    .map_err(|e| format!("connecting to prkv: {e}")),
            },
            TargetSpec::Etcd(eps) => etcd_client::Client::connect(eps.clone(), None)
                .await
                .map(|c| Client::Etcd(c.kv_client()))
                .map_err(|e| format!("connecting to etcd: {e}")),
        }
    }

    async fn read(&self, key: Vec<u8>) -> Result<Option<Vec<u8>>, String> {
        match self {
            Client::Raw(c) => c.get(key).await.map_err(|e| e.to_string()),
            Client::Batch(c) => c.get(key).await,
            Client::Txn(c) => {
                let ts = c.current_timestamp().await.map_err(|e| e.to_string())?;
                let mut s = c.snapshot(ts, tikv_client::TransactionOptions::new_optimistic());
                s.get(key).await.map_err(|e| e.to_string())
            }
            Client::Etcd(c) => {
                let mut c = c.clone();
                let r = c.get(key, None).await.map_err(|e| e.to_string())?;
                Ok(r.kvs().first().map(|kv| kv.value().to_vec()))
            }
        }
    }

    async fn write(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Client::Raw(c) => c.put(key, value).await.map_err(|e| e.to_string()),
            Client::Batch(c) => c.put(key, value).await,
            Client::Txn(c) => {
                let mut t = c.begin_optimistic().await.map_err(|e| e.to_string())?;
                t.put(key, value).await.map_err(|e| e.to_string())?;
                t.commit().await.map(|_| ()).map_err(|e| e.to_string())
            }
            Client::Etcd(c) => {
                let mut c = c.clone();
                c.put(key, value, None)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn scan(&self, from: Vec<u8>, n: u32) -> Result<usize, String> {
        let mut end = from.clone();
        end.push(0xff);
        match self {
            Client::Batch(_) => Err("--mode raw-batch does not scan yet (workload E)".into()),
            Client::Raw(c) => c
                .scan(from.., n)
                .await
                .map(|v| v.len())
                .map_err(|e| e.to_string()),
            Client::Txn(c) => {
                let ts = c.current_timestamp().await.map_err(|e| e.to_string())?;
                let mut s = c.snapshot(ts, tikv_client::TransactionOptions::new_optimistic());
                s.scan(from.., n)
                    .await
                    .map(|it| it.count())
                    .map_err(|e| e.to_string())
            }
            Client::Etcd(c) => {
                let mut c = c.clone();
                let opts = etcd_client::GetOptions::new()
                    .with_from_key()
                    .with_limit(n as i64);
                c.get(from, Some(opts))
                    .await
                    .map(|r| r.kvs().len())
                    .map_err(|e| e.to_string())
            }
        }
    }

    async fn read_modify_write(&self, key: Vec<u8>, value: Vec<u8>) -> Result<(), String> {
        match self {
            Client::Txn(c) => {
                let mut t = c.begin_optimistic().await.map_err(|e| e.to_string())?;
                t.get(key.clone()).await.map_err(|e| e.to_string())?;
                t.put(key, value).await.map_err(|e| e.to_string())?;
                t.commit().await.map(|_| ()).map_err(|e| e.to_string())
            }
            _ => {
                self.read(key.clone()).await?;
                self.write(key, value).await
            }
        }
    }
}

/// Runs one benchmark and returns its result.
pub fn run(opts: &YcsbOptions) -> Result<YcsbResult, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run_async(opts))
}

async fn run_async(opts: &YcsbOptions) -> Result<YcsbResult, String> {
    let (mix, default_dist) = workload(&opts.workload)?;
    if opts.threads == 0 || opts.records == 0 {
        return Err("--threads and --records must be > 0".into());
    }
    let dist = opts.distribution.unwrap_or(default_dist);
    let client = Arc::new(Client::connect(&opts.target, opts.mode).await?);
    let loading = opts.workload == "load";
    let total_ops = if loading {
        opts.records
    } else {
        opts.operations
    };
    // Inserts take fresh record numbers: after the loaded ones.
    let next_insert = Arc::new(AtomicU64::new(if loading { 0 } else { opts.records }));
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let zipf = Arc::new(Zipf::new(opts.records));
    let deadline = if total_ops == 0 {
        Some(Instant::now() + opts.duration)
    } else {
        None
    };
    let bar = indicatif::ProgressBar::new(total_ops.max(1));
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos} ops {msg}")
            .map_err(|e| e.to_string())?,
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..opts.threads {
        let (client, next_insert, done, errors, zipf) = (
            client.clone(),
            next_insert.clone(),
            done.clone(),
            errors.clone(),
            zipf.clone(),
        );
        let mix = mix.clone();
        let (key_size, value_size, records) = (opts.key_size, opts.value_size, opts.records);
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9 ^ (t as u64 + 1).wrapping_mul(0x1234_5678_9ABC_DEF1));
            let mut hists: Vec<Histogram<u64>> = Op::ALL
                .iter()
                .map(|_| Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"))
                .collect();
            loop {
                if let Some(d) = deadline {
                    if Instant::now() >= d {
                        break;
                    }
                } else if done.fetch_add(1, Ordering::Relaxed) >= total_ops {
                    break;
                }
                let roll = (rng.next() % 100) as u32;
                let mut acc = 0;
                let op = mix
                    .iter()
                    .find(|(_, w)| {
                        acc += w;
                        roll < acc
                    })
                    .map_or(mix[0].0, |(op, _)| *op);
                let inserted = next_insert.load(Ordering::Relaxed).max(1);
                let pick = |rng: &mut Rng| match dist {
                    Distribution::Uniform => rng.next() % records,
                    Distribution::Zipfian => zipf.sample(rng),
                    Distribution::Latest => inserted - 1 - zipf.sample(rng).min(inserted - 1),
                };
                let t0 = Instant::now();
                let res = match op {
                    Op::Read => client
                        .read(key_of(pick(&mut rng), key_size))
                        .await
                        .map(|_| ()),
                    Op::Update => {
                        let v = value_of(&mut rng, value_size);
                        client.write(key_of(pick(&mut rng), key_size), v).await
                    }
                    Op::Insert => {
                        let i = next_insert.fetch_add(1, Ordering::Relaxed);
                        let v = value_of(&mut rng, value_size);
                        client.write(key_of(i, key_size), v).await
                    }
                    Op::Scan => {
                        let n = 1 + (rng.next() % 100) as u32;
                        client
                            .scan(key_of(pick(&mut rng), key_size), n)
                            .await
                            .map(|_| ())
                    }
                    Op::ReadModifyWrite => {
                        let v = value_of(&mut rng, value_size);
                        client
                            .read_modify_write(key_of(pick(&mut rng), key_size), v)
                            .await
                    }
                };
                let us = t0.elapsed().as_micros().clamp(1, 60_000_000) as u64;
                match res {
                    Ok(()) => {
                        let i = Op::ALL.iter().position(|o| *o == op).expect("listed");
                        let _ = hists[i].record(us);
                    }
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if deadline.is_some() {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
            hists
        }));
    }
    // Progress, once a second.
    let progress = {
        let (done, errors, bar) = (done.clone(), errors.clone(), bar.clone());
        tokio::spawn(async move {
            let mut last = (0u64, Instant::now());
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let n = done.load(Ordering::Relaxed);
                let rate = (n - last.0.min(n)) as f64 / last.1.elapsed().as_secs_f64();
                last = (n, Instant::now());
                bar.set_position(n);
                bar.set_message(format!(
                    "{rate:.0} ops/s, {} errors",
                    errors.load(Ordering::Relaxed)
                ));
            }
        })
    };
    let mut merged: Vec<Histogram<u64>> = Op::ALL
        .iter()
        .map(|_| Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds"))
        .collect();
    for t in tasks {
        let hists = t.await.map_err(|e| e.to_string())?;
        for (m, h) in merged.iter_mut().zip(hists) {
            m.add(h).map_err(|e| e.to_string())?;
        }
    }
    progress.abort();
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let ops: u64 = merged.iter().map(|h| h.len()).sum();
    let per_op = Op::ALL
        .iter()
        .zip(&merged)
        .filter(|(_, h)| !h.is_empty())
        .map(|(op, h)| OpStats {
            op: op.name().to_string(),
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
        .collect();
    Ok(YcsbResult {
        target: match &opts.target {
            TargetSpec::Prkv(e) => format!("prkv://{}", e.join(",")),
            TargetSpec::Etcd(e) => format!("etcd://{}", e.join(",")),
        },
        workload: opts.workload.clone(),
        mode: opts.mode,
        threads: opts.threads,
        value_size: opts.value_size,
        seconds,
        ops,
        errors: errors.load(Ordering::Relaxed),
        ops_per_sec: ops as f64 / seconds,
        per_op,
    })
}

/// The result as a table.
pub fn render_table(r: &YcsbResult) -> String {
    let mut out = format!(
        "{} workload {} ({:?}, {} clients, {} B values): {:.0} ops/s, {} ops, {} errors in {:.1} s\n",
        r.target, r.workload, r.mode, r.threads, r.value_size, r.ops_per_sec, r.ops, r.errors, r.seconds
    );
    out.push_str(
        "| op | count | p50 µs | p99 µs | p99.9 µs | max µs |\n|---|---|---|---|---|---|\n",
    );
    for s in &r.per_op {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            s.op, s.count, s.p50_us, s.p99_us, s.p999_us, s.max_us
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipfian_prefers_hot_items_and_stays_in_range() {
        let z = Zipf::new(1000);
        let mut rng = Rng(42);
        let mut hits = vec![0u32; 1000];
        for _ in 0..100_000 {
            let i = z.sample(&mut rng);
            assert!(i < 1000);
            hits[i as usize] += 1;
        }
        assert!(hits[0] > hits[500] * 10, "item 0 is hottest");
    }

    #[test]
    fn targets_and_workloads_parse() {
        assert!(
            matches!(TargetSpec::parse("etcd://a:1,b:2"), Ok(TargetSpec::Etcd(v)) if v.len() == 2)
        );
        assert!(TargetSpec::parse("redis://x").is_err());
        assert!(TargetSpec::parse("prkv://").is_err());
        assert!(workload("g").is_err());
        assert_eq!(key_of(7, 16).len(), 16);
        assert_ne!(key_of(7, 16), key_of(8, 16));
    }
}
