//! The store's personal parameters (user biases and factors; for demand tasks the store's levels
//! and coefficient offsets), kept on disk between rounds and restarts. They are local by design:
//! nothing in this module is ever sent.

use fedretail_core::model::demand::DemandLocal;
use fedretail_core::model::mf::MfLocal;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// File name inside the state directory.
pub const FILE: &str = "personal.json";

#[derive(Serialize, Deserialize)]
struct OnDisk {
    dim: usize,
    /// Per user id: `[bias, factor_0, .., factor_{dim-1}]`.
    users: BTreeMap<String, Vec<f32>>,
}

/// File name of a demand task's personal parameters.
pub const DEMAND_FILE: &str = "personal-demand.json";

#[derive(Serialize, Deserialize)]
struct DemandOnDisk {
    store_level: f32,
    store_weights: Vec<f32>,
    /// Per product group: the series level.
    series: BTreeMap<String, f32>,
    /// Per product group: the series' seasonal offsets.
    #[serde(default)]
    seasons: BTreeMap<String, Vec<f32>>,
}

/// Errors reading or writing the personal parameters.
#[derive(Debug, thiserror::Error)]
pub enum PersonalError {
    /// I/O failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not what this version writes.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// Writes `local` for `user_keys` atomically (temporary file, fsync, rename), so a crash leaves
/// either the old or the new file.
///
/// # Errors
///
/// I/O errors.
pub fn save(dir: &Path, user_keys: &[String], local: &MfLocal) -> Result<(), PersonalError> {
    let dim = local.user_factors.ncols();
    let users = user_keys
        .iter()
        .enumerate()
        .map(|(u, key)| {
            let mut v = Vec::with_capacity(dim + 1);
            v.push(local.user_bias[u]);
            v.extend(local.user_factors.row(u).iter());
            (key.clone(), v)
        })
        .collect();
    let bytes = serde_json::to_vec(&OnDisk { dim, users }).expect("plain data serialises");
    write_atomically(dir, FILE, &bytes)
}

/// The saved value at `path`, or `None` if there is no file yet.
fn read_saved<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, PersonalError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersonalError::Io { path: path.into(), source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| PersonalError::Corrupt { path: path.into(), message: e.to_string() })
}

/// Writes `file` in `dir` so that a crash leaves the old or the new version: a private (0600)
/// temporary file named for this process, synced, renamed over the old one, and the directory
/// synced so the rename itself survives a crash (L5, L6).
fn write_atomically(dir: &Path, file: &str, bytes: &[u8]) -> Result<(), PersonalError> {
    let path = dir.join(file);
    let io = |source| PersonalError::Io { path: path.clone(), source };
    let tmp = dir.join(format!("{file}.{}.tmp", std::process::id()));
    {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut f = options.open(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, &path).map_err(io)?;
    #[cfg(unix)]
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok(())
}

/// Writes a demand store's `local` (one store; `groups[i]` names series `i`) atomically.
///
/// # Errors
///
/// I/O errors.
pub fn save_demand(dir: &Path, groups: &[&str], local: &DemandLocal) -> Result<(), PersonalError> {
    let disk = DemandOnDisk {
        store_level: local.store_level.first().copied().unwrap_or(0.0),
        store_weights: local.store_weights.clone(),
        series: groups
            .iter()
            .map(|g| g.to_string())
            .zip(local.series_level.iter().copied())
            .collect(),
        seasons: groups
            .iter()
            .map(|g| g.to_string())
            .zip(local.series_season.chunks(season_width(local)).map(<[f32]>::to_vec))
            .collect(),
    };
    let bytes = serde_json::to_vec(&disk).expect("plain data serialises");
    write_atomically(dir, DEMAND_FILE, &bytes)
}

/// Reads a demand store's saved parameters into `fresh` (series matched by group name; groups
/// without saved values keep theirs). Returns `None` if there is no file yet.
///
/// # Errors
///
/// I/O errors, or offsets of another length (the task's features changed).
pub fn load_demand(
    dir: &Path,
    groups: &[&str],
    mut fresh: DemandLocal,
) -> Result<Option<DemandLocal>, PersonalError> {
    let path = dir.join(DEMAND_FILE);
    let Some(disk) = read_saved::<DemandOnDisk>(&path)? else { return Ok(None) };
    let corrupt = |message: String| PersonalError::Corrupt { path: path.clone(), message };
    if disk.store_weights.len() != fresh.store_weights.len() || fresh.store_level.len() != 1 {
        return Err(corrupt(format!(
            "saved {} coefficient offsets for one store, the task has {}",
            disk.store_weights.len(),
            fresh.store_weights.len()
        )));
    }
    fresh.store_level[0] = disk.store_level;
    fresh.store_weights = disk.store_weights;
    for (level, group) in fresh.series_level.iter_mut().zip(groups) {
        if let Some(saved) = disk.series.get(*group) {
            *level = *saved;
        }
    }
    let width = season_width(&fresh);
    for (season, group) in fresh.series_season.chunks_mut(width).zip(groups) {
        if let Some(saved) = disk.seasons.get(*group).filter(|v| v.len() == season.len()) {
            season.copy_from_slice(saved);
        }
    }
    Ok(Some(fresh))
}

/// Seasonal offsets per series (at least 1, so `chunks` never sees 0).
fn season_width(local: &DemandLocal) -> usize {
    (local.series_season.len() / local.series_level.len().max(1)).max(1)
}

/// Reads the saved parameters and lays them out for `user_keys`; users without saved values
/// keep theirs from `fresh`. Returns `None` if there is no file yet.
///
/// # Errors
///
/// I/O errors, or a file of another dimension or shape.
pub fn load(
    dir: &Path,
    user_keys: &[String],
    mut fresh: MfLocal,
) -> Result<Option<MfLocal>, PersonalError> {
    let path = dir.join(FILE);
    let Some(disk) = read_saved::<OnDisk>(&path)? else { return Ok(None) };
    let corrupt = |message: String| PersonalError::Corrupt { path: path.clone(), message };
    let dim = fresh.user_factors.ncols();
    if disk.dim != dim {
        return Err(corrupt(format!("saved for dimension {}, the task uses {dim}", disk.dim)));
    }
    for (u, key) in user_keys.iter().enumerate() {
        if let Some(v) = disk.users.get(key) {
            if v.len() != dim + 1 {
                return Err(corrupt(format!(
                    "user {key:?} has {} values, expected {}",
                    v.len(),
                    dim + 1
                )));
            }
            fresh.user_bias[u] = v[0];
            fresh.user_factors.row_mut(u).iter_mut().zip(&v[1..]).for_each(|(x, y)| *x = *y);
        }
    }
    Ok(Some(fresh))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(n: usize, dim: usize, fill: f32) -> MfLocal {
        MfLocal {
            user_bias: vec![fill; n],
            user_factors: ndarray::Array2::from_elem((n, dim), fill),
        }
    }

    #[test]
    fn saved_parameters_come_back_by_user_id() {
        let dir = tempfile::tempdir().unwrap();
        let keys = vec!["a".to_string(), "b".to_string()];
        let mut l = local(2, 3, 0.0);
        l.user_bias[1] = 0.5;
        l.user_factors[[1, 2]] = -1.5;
        save(dir.path(), &keys, &l).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "customers' parameters are private to the store (L5)");
        }
        // A new user "c" joins and "a" leaves: "b" keeps its parameters at its new index.
        let keys2 = vec!["b".to_string(), "c".to_string()];
        let got = load(dir.path(), &keys2, local(2, 3, 9.0)).unwrap().unwrap();
        assert_eq!(got.user_bias, vec![0.5, 9.0]);
        assert_eq!(got.user_factors[[0, 2]], -1.5);
        assert_eq!(got.user_factors[[1, 0]], 9.0);
        assert!(
            load(tempfile::tempdir().unwrap().path(), &keys2, local(2, 3, 0.0)).unwrap().is_none()
        );
        let err = load(dir.path(), &keys2, local(2, 4, 0.0)).unwrap_err().to_string();
        assert!(err.ends_with("saved for dimension 3, the task uses 4"), "{err}");
    }

    #[test]
    fn demand_levels_come_back_by_group() {
        let dir = tempfile::tempdir().unwrap();
        let saved = DemandLocal {
            store_level: vec![0.5],
            series_level: vec![1.0, 2.0],
            series_season: vec![1.5, 1.5, 2.5, 2.5],
            store_weights: vec![0.1, 0.2, 0.3],
        };
        save_demand(dir.path(), &["Paper", "Chairs"], &saved).unwrap();
        // The store now sells Tables too, listed first: Chairs keeps its level, Tables is fresh.
        let fresh = DemandLocal {
            store_level: vec![0.0],
            series_level: vec![0.0; 3],
            series_season: vec![0.0; 6],
            store_weights: vec![0.0; 3],
        };
        let got = load_demand(dir.path(), &["Tables", "Chairs", "Paper"], fresh.clone())
            .unwrap()
            .unwrap();
        assert_eq!(got.series_level, vec![0.0, 2.0, 1.0]);
        assert_eq!(got.series_season, vec![0.0, 0.0, 2.5, 2.5, 1.5, 1.5]);
        assert_eq!((got.store_level[0], got.store_weights.clone()), (0.5, vec![0.1, 0.2, 0.3]));
        let wider = DemandLocal { store_weights: vec![0.0; 4], ..fresh };
        let err = load_demand(dir.path(), &["Paper"], wider).unwrap_err().to_string();
        assert!(
            err.ends_with("saved 3 coefficient offsets for one store, the task has 4"),
            "{err}"
        );
    }
}
