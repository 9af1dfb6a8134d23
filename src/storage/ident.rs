//! `store.toml`: what a data dir is, fixed when it is bootstrapped.
//!
//! The file records the engine kind (and, once PD assigns them, the cluster and store ids). A
//! data dir written by one engine kind is unreadable as the other, so opening it with the other
//! kind must fail before anything is created or modified: [`check_or_bootstrap`] runs first in
//! [`super::Engines::open`].

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{Error, Result};
use crate::config::EngineKind;

pub const IDENT_FILE: &str = "store.toml";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct StoreIdent {
    pub engine: EngineKind,
    #[serde(default)]
    pub cluster_id: u64,
    #[serde(default)]
    pub store_id: u64,
    /// `storage.api-version` and `storage.enable-ttl` the data was written with (set when the
    /// store first joins a cluster; they decide how keys and values are stored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_ttl: Option<bool>,
}

/// Reads the data dir's identity, if it has one.
pub fn load(data_dir: &Path) -> Result<Option<StoreIdent>> {
    let path = data_dir.join(IDENT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => toml::from_str(&text)
            .map(Some)
            .map_err(|e| Error::Corruption {
                what: path.display().to_string(),
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Writes the identity atomically: a temporary file, fsync, rename, fsync of the directory.
pub fn store(data_dir: &Path, ident: &StoreIdent) -> Result<()> {
    let path = data_dir.join(IDENT_FILE);
    let tmp = data_dir.join(format!("{IDENT_FILE}.tmp"));
    let text = toml::to_string(ident).map_err(|e| Error::Other(e.to_string()))?;
    let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(&tmp, e))?;
    f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
    std::fs::File::open(data_dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(data_dir, e))?;
    Ok(())
}

/// Checks that `data_dir` was bootstrapped with `engine`, or bootstraps it.
///
/// A mismatch is [`Error::EngineMismatch`] and touches no file. A data dir that holds engine
/// files but no identity is refused too: guessing its kind could destroy it.
pub fn check_or_bootstrap(data_dir: &Path, engine: EngineKind) -> Result<StoreIdent> {
    if let Some(ident) = load(data_dir)? {
        if ident.engine != engine {
            return Err(Error::EngineMismatch {
                data_dir: data_dir.to_path_buf(),
                configured: engine,
                found: ident.engine,
            });
        }
        return Ok(ident);
    }
    for part in ["tablets", "db", "raft-engine"] {
        if data_dir.join(part).exists() {
            return Err(Error::Corruption {
                what: data_dir.display().to_string(),
                detail: format!(
                    "holds {part}/ but no {IDENT_FILE}; refusing to guess its engine kind"
                ),
            });
        }
    }
    std::fs::create_dir_all(data_dir).map_err(|e| Error::io(data_dir, e))?;
    let ident = StoreIdent {
        engine,
        cluster_id: 0,
        store_id: 0,
        api_version: None,
        enable_ttl: None,
    };
    store(data_dir, &ident)?;
    Ok(ident)
}
