//! The placement driver: one process that knows the whole cluster.
//!
//! PD hands out ids (stores, Regions, peers) and timestamps ([`tso`]), keeps the routing table
//! that clients ask "which Region holds key k, and who leads it" ([`cluster`]), learns the
//! cluster's state from store and Region heartbeats, and answers leaders' heartbeats with
//! operators (the replica checker: add a learner, promote it). Everything it must not forget
//! is persisted in [`meta`] before it is acknowledged.
//!
//! One port serves gRPC (`pdpb.PD`, `keyspacepb.Keyspace`, see [`service`]) and the JSON HTTP
//! API ([`http`]). prkv runs a single PD member; PD high availability (an etcd-like replicated
//! PD) is not built.

pub mod cluster;
pub mod http;
pub mod meta;
pub mod schedule;
pub mod service;
pub mod tso;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prkv_proto::keyspacepb::keyspace_server::KeyspaceServer;
use prkv_proto::pdpb;
use prkv_proto::pdpb::pd_server::PdServer;

use self::cluster::Cluster;
use self::meta::MetaStore;
use self::service::{PdService, PdState};
use self::tso::Tso;

/// How a PD process is started (`prkv pd`).
#[derive(Clone, Debug)]
pub struct PdOptions {
    /// Where to listen (gRPC and HTTP).
    pub addr: SocketAddr,
    /// The address clients are told to use; defaults to `addr`.
    pub advertise_addr: Option<String>,
    pub data_dir: PathBuf,
    pub config: PdConfig,
}

/// PD's config file (`prkv pd --config`), with PD's section and key names.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct PdConfig {
    pub replication: ReplicationConfig,
    pub schedule: schedule::ScheduleConfig,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReplicationConfig {
    /// Replicas per Region the replica checker maintains.
    pub max_replicas: usize,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig { max_replicas: 3 }
    }
}

impl PdConfig {
    /// Parses and checks a PD config; errors name the key.
    pub fn from_toml(text: &str) -> Result<PdConfig, crate::config::ConfigError> {
        use crate::config::ConfigError;
        let de = toml::Deserializer::new(text);
        let cfg: PdConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            if key.is_empty() || key == "." {
                ConfigError::Syntax(inner.to_string())
            } else {
                ConfigError::Invalid {
                    key,
                    reason: inner.message().to_string(),
                }
            }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        use crate::config::ConfigError;
        let bad = |key: &str, reason: String| ConfigError::Invalid {
            key: key.into(),
            reason,
        };
        let r = self.replication.max_replicas;
        if r == 0 || r > 9 {
            return Err(bad(
                "replication.max-replicas",
                format!("{r} is outside 1..=9"),
            ));
        }
        let s = &self.schedule;
        for (key, v) in [
            ("schedule.region-schedule-limit", s.region_schedule_limit),
            ("schedule.store-limit", s.store_limit),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if s.max_store_down_time < std::time::Duration::from_secs(1) {
            return Err(bad(
                "schedule.max-store-down-time",
                "must be at least 1s".into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PdError {
    #[error("PD data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Meta(#[from] meta::MetaError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("invalid option {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Opens PD's state and serves until `shutdown` resolves.
pub async fn serve(
    opts: PdOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), PdError> {
    opts.config.validate().map_err(|e| PdError::Invalid {
        key: "config",
        reason: e.to_string(),
    })?;
    std::fs::create_dir_all(&opts.data_dir).map_err(|source| PdError::DataDir {
        path: opts.data_dir.clone(),
        source,
    })?;
    let meta = Arc::new(MetaStore::open(&opts.data_dir.join("meta"))?);
    let cluster = Cluster::open(
        meta.clone(),
        opts.config.replication.max_replicas,
        opts.config.schedule.clone(),
    )?;
    let tso = Tso::recover(&meta)?;
    let advertise = opts
        .advertise_addr
        .clone()
        .unwrap_or_else(|| opts.addr.to_string());
    let member = pdpb::Member {
        name: "pd".into(),
        member_id: cluster.id ^ 0x5044,
        peer_urls: vec![format!("http://{advertise}")],
        client_urls: vec![format!("http://{advertise}")],
        binary_version: env!("CARGO_PKG_VERSION").into(),
        ..Default::default()
    };
    let cluster_id = cluster.id;
    let state = Arc::new(PdState::new(cluster, tso, meta, member));
    let svc = PdService {
        state: state.clone(),
    };
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|source| PdError::Listen {
            addr: opts.addr,
            source,
        })?;
    let incoming = crate::server::accept_nodelay(listener);
    tracing::info!(addr = %opts.addr, cluster_id, "PD serving");
    // Bounded graceful shutdown: clients' TSO and heartbeat streams would otherwise hold the
    // server open for as long as those clients live.
    let (sig_tx, mut sig_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = sig_tx.send(true);
    });
    let mut sig_rx2 = sig_rx.clone();
    let serve = tonic::transport::Server::builder()
        .accept_http1(true)
        .add_service(PdServer::new(svc.clone()))
        .add_service(KeyspaceServer::new(svc))
        .add_service(http::PdHttp { state })
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = sig_rx2.wait_for(|v| *v).await;
        });
    tokio::pin!(serve);
    tokio::select! {
        r = &mut serve => r?,
        _ = async {
            let _ = sig_rx.wait_for(|v| *v).await;
            tokio::time::sleep(crate::server::SHUTDOWN_GRACE).await;
        } => {}
    }
    tracing::info!("PD stopped");
    Ok(())
}
