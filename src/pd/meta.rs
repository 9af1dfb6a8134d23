//! PD's durable metadata: cluster id, stores, Regions, id and TSO high-water marks, the GC safe
//! point. One small RocksDB with its WAL synced on every write: PD writes rarely (a Region only
//! when its epoch changes, ids and timestamps in windows), so durability costs little here.

use std::path::Path;

use prkv_proto::metapb::{Region, Store};
use prost::Message;

/// What can go wrong reading or writing PD's metadata.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("PD metadata store: {0}")]
    Engine(String),
    #[error("PD metadata is corrupt at key {key}: {detail}")]
    Corrupt { key: String, detail: String },
}

pub type Result<T> = std::result::Result<T, MetaError>;

const CLUSTER_ID: &[u8] = b"m/cluster-id";
const BOOTSTRAPPED: &[u8] = b"m/bootstrapped";
const ID_HIGH_WATER: &[u8] = b"m/id-high-water";
const TSO_HIGH_WATER: &[u8] = b"m/tso-high-water";
const GC_SAFE_POINT: &[u8] = b"m/gc-safe-point";
const STORE_PREFIX: &[u8] = b"s/";
const REGION_PREFIX: &[u8] = b"r/";

pub struct MetaStore {
    db: rocksdb::DB,
}

fn key_with_id(prefix: &[u8], id: u64) -> Vec<u8> {
    let mut k = prefix.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

impl MetaStore {
    pub fn open(dir: &Path) -> Result<MetaStore> {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        // PD's metadata is small: a few files, little memory.
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(2);
        let db = rocksdb::DB::open(&opts, dir).map_err(|e| MetaError::Engine(e.to_string()))?;
        Ok(MetaStore { db })
    }

    fn put(&self, key: &[u8], value: &[u8]) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .put_opt(key, value, &wo)
            .map_err(|e| MetaError::Engine(e.to_string()))
    }

    fn get_u64(&self, key: &[u8]) -> Result<Option<u64>> {
        let v = self
            .db
            .get(key)
            .map_err(|e| MetaError::Engine(e.to_string()))?;
        match v {
            None => Ok(None),
            Some(b) => {
                let arr: [u8; 8] = b.as_slice().try_into().map_err(|_| MetaError::Corrupt {
                    key: String::from_utf8_lossy(key).into_owned(),
                    detail: format!("expected 8 bytes, found {}", b.len()),
                })?;
                Ok(Some(u64::from_be_bytes(arr)))
            }
        }
    }

    fn put_u64(&self, key: &[u8], v: u64) -> Result<()> {
        self.put(key, &v.to_be_bytes())
    }

    pub fn cluster_id(&self) -> Result<Option<u64>> {
        self.get_u64(CLUSTER_ID)
    }
    pub fn set_cluster_id(&self, id: u64) -> Result<()> {
        self.put_u64(CLUSTER_ID, id)
    }
    pub fn bootstrapped(&self) -> Result<bool> {
        Ok(self.get_u64(BOOTSTRAPPED)?.unwrap_or(0) == 1)
    }
    pub fn set_bootstrapped(&self) -> Result<()> {
        self.put_u64(BOOTSTRAPPED, 1)
    }
    pub fn id_high_water(&self) -> Result<u64> {
        Ok(self.get_u64(ID_HIGH_WATER)?.unwrap_or(0))
    }
    pub fn set_id_high_water(&self, v: u64) -> Result<()> {
        self.put_u64(ID_HIGH_WATER, v)
    }
    pub fn tso_high_water(&self) -> Result<u64> {
        Ok(self.get_u64(TSO_HIGH_WATER)?.unwrap_or(0))
    }
    pub fn set_tso_high_water(&self, v: u64) -> Result<()> {
        self.put_u64(TSO_HIGH_WATER, v)
    }
    pub fn gc_safe_point(&self) -> Result<u64> {
        Ok(self.get_u64(GC_SAFE_POINT)?.unwrap_or(0))
    }
    pub fn set_gc_safe_point(&self, v: u64) -> Result<()> {
        self.put_u64(GC_SAFE_POINT, v)
    }

    pub fn put_store(&self, store: &Store) -> Result<()> {
        self.put(&key_with_id(STORE_PREFIX, store.id), &store.encode_to_vec())
    }

    pub fn put_region(&self, region: &Region) -> Result<()> {
        self.put(
            &key_with_id(REGION_PREFIX, region.id),
            &region.encode_to_vec(),
        )
    }

    pub fn delete_region(&self, id: u64) -> Result<()> {
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db
            .delete_opt(key_with_id(REGION_PREFIX, id), &wo)
            .map_err(|e| MetaError::Engine(e.to_string()))
    }

    fn load_all<M: Message + Default>(&self, prefix: &[u8]) -> Result<Vec<M>> {
        let mut out = Vec::new();
        for item in self.db.prefix_iterator(prefix) {
            let (k, v) = item.map_err(|e| MetaError::Engine(e.to_string()))?;
            if !k.starts_with(prefix) {
                break;
            }
            let m = M::decode(v.as_ref()).map_err(|e| MetaError::Corrupt {
                key: format!("{:?}", k),
                detail: e.to_string(),
            })?;
            out.push(m);
        }
        Ok(out)
    }

    pub fn load_stores(&self) -> Result<Vec<Store>> {
        self.load_all(STORE_PREFIX)
    }

    pub fn load_regions(&self) -> Result<Vec<Region>> {
        self.load_all(REGION_PREFIX)
    }
}
