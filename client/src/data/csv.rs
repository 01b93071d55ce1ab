//! Reads a store's ratings from CSV.
//!
//! Format: a header row naming the columns, then one rating per row. Required columns are
//! `user_id` (any text), `item_id` (an integer below the task's `n_items`) and `rating` (a
//! number); `timestamp` (integer seconds) is optional. Column order is free; other columns are
//! ignored.
//!
//! ```text
//! user_id,item_id,rating,timestamp
//! 196,241,3,881250949
//! ```

use std::path::{Path, PathBuf};

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvRating {
    /// The user's id, as written.
    pub user: String,
    /// Global item id.
    pub item: u32,
    /// The rating.
    pub rating: f32,
    /// Seconds since the epoch, 0 if absent.
    pub timestamp: i64,
}

/// The file cannot be used. Every variant names the file, and the line where there is one.
#[derive(Debug, thiserror::Error)]
pub enum CsvError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is empty or has only a header.
    #[error("{path}: no data rows (the file is empty or has only a header)")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The header lacks a required column.
    #[error("{path}:1: missing column {column:?} (the header has: {header})")]
    MissingColumn {
        /// The file.
        path: PathBuf,
        /// The column.
        column: &'static str,
        /// The header as read.
        header: String,
    },
    /// A field does not parse.
    #[error("{path}:{line}: column {column:?}: {message}")]
    BadValue {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// The column.
        column: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A sales file has no rows for the store.
    #[error("{path}: no rows for store {store:?}; the file has {has}")]
    NoRowsFor {
        /// The file.
        path: PathBuf,
        /// The store asked for.
        store: String,
        /// The stores the file has (the first ten).
        has: String,
    },
    /// The header names a column the format does not have.
    #[error("{path}:1: unknown column {column:?} (expected {expected})")]
    UnknownColumn {
        /// The file.
        path: PathBuf,
        /// The column as written.
        column: String,
        /// The columns the format has.
        expected: &'static str,
    },
    /// A row is not valid CSV (for example a wrong number of fields).
    #[error("{path}:{line}: {message}")]
    BadRow {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },
}

/// Reads every rating in `path`.
///
/// # Errors
///
/// See [`CsvError`]: each names the file and, where it applies, the line.
pub fn load_ratings(path: &Path) -> Result<Vec<CsvRating>, CsvError> {
    let io = |source| CsvError::Io { path: path.into(), source };
    let file = std::fs::File::open(path).map_err(io)?;
    read_ratings(file, path)
}

/// [`load_ratings`] from any reader; `path` names it in errors.
///
/// # Errors
///
/// See [`CsvError`].
pub fn read_ratings(reader: impl std::io::Read, path: &Path) -> Result<Vec<CsvRating>, CsvError> {
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(reader);
    let row_err = |e| row_error(e, path);
    let header = rdr.headers().map_err(row_err)?.clone();
    if header.is_empty() || header.iter().all(str::is_empty) {
        return Err(CsvError::Empty { path: path.into() });
    }
    let column = |name: &'static str| {
        header.iter().position(|h| h.eq_ignore_ascii_case(name)).ok_or_else(|| {
            CsvError::MissingColumn {
                path: path.into(),
                column: name,
                header: header.iter().collect::<Vec<_>>().join(","),
            }
        })
    };
    let (user, item, rating) = (column("user_id")?, column("item_id")?, column("rating")?);
    let timestamp = column("timestamp").ok();
    let mut out = Vec::new();
    let mut record = csv::StringRecord::new();
    while rdr.read_record(&mut record).map_err(row_err)? {
        let line = record.position().map_or(0, csv::Position::line);
        let bad = |column: &'static str, message: String| CsvError::BadValue {
            path: path.into(),
            line,
            column,
            message,
        };
        let field = |i: usize| record.get(i).unwrap_or("");
        let user_id = field(user);
        if user_id.is_empty() {
            return Err(bad("user_id", "is empty".into()));
        }
        let item_id: u32 = field(item).parse().map_err(|_| {
            bad("item_id", format!("{:?} is not a non-negative integer", field(item)))
        })?;
        let value: f32 = field(rating)
            .parse()
            .map_err(|_| bad("rating", format!("{:?} is not a number", field(rating))))?;
        if !value.is_finite() {
            return Err(bad("rating", format!("{value} is not finite")));
        }
        let ts = match timestamp {
            Some(i) if !field(i).is_empty() => field(i)
                .parse()
                .map_err(|_| bad("timestamp", format!("{:?} is not an integer", field(i))))?,
            _ => 0,
        };
        out.push(CsvRating {
            user: user_id.to_string(),
            item: item_id,
            rating: value,
            timestamp: ts,
        });
    }
    if out.is_empty() {
        return Err(CsvError::Empty { path: path.into() });
    }
    Ok(out)
}

/// A CSV-level error (I/O, ragged row) as a [`CsvError`] naming `path` and the line.
/// One row of a table read by [`read_table`]: typed access to its fields, whose errors name the
/// file, the line and the column.
pub(crate) struct Fields<'a> {
    record: &'a csv::StringRecord,
    index: &'a [usize],
    columns: &'a [&'static str],
    path: &'a Path,
    line: u64,
}

impl Fields<'_> {
    fn raw(&self, k: usize) -> &str {
        self.record.get(self.index[k]).unwrap_or("")
    }

    /// An error about column `k` of this row.
    pub(crate) fn bad(&self, k: usize, message: String) -> CsvError {
        CsvError::BadValue {
            path: self.path.into(),
            line: self.line,
            column: self.columns[k],
            message,
        }
    }

    /// A non-empty text.
    pub(crate) fn text(&self, k: usize) -> Result<String, CsvError> {
        match self.raw(k) {
            "" => Err(self.bad(k, "is empty".into())),
            v => Ok(v.to_string()),
        }
    }

    /// A finite number ≥ 0.
    pub(crate) fn number(&self, k: usize) -> Result<f32, CsvError> {
        let v: f32 = self
            .raw(k)
            .parse()
            .map_err(|_| self.bad(k, format!("{:?} is not a number", self.raw(k))))?;
        if !v.is_finite() {
            return Err(self.bad(k, format!("{v} is not finite")));
        }
        if v < 0.0 {
            return Err(self.bad(k, format!("{v} is negative")));
        }
        Ok(v)
    }

    /// A fraction in `[0, 1)`.
    pub(crate) fn fraction(&self, k: usize) -> Result<f32, CsvError> {
        let v = self.number(k)?;
        if v >= 1.0 {
            return Err(self.bad(k, format!("{v} is not a fraction below 1")));
        }
        Ok(v)
    }

    /// A share in `[0, 1]`.
    pub(crate) fn share(&self, k: usize) -> Result<f32, CsvError> {
        let v = self.number(k)?;
        if v > 1.0 {
            return Err(self.bad(k, format!("{v} is not a share in [0, 1]")));
        }
        Ok(v)
    }

    /// A `YYYY-MM-DD` date, as days since 1970-01-01.
    pub(crate) fn day(&self, k: usize) -> Result<i64, CsvError> {
        let date: jiff::civil::Date = self.raw(k).parse().map_err(|e| {
            self.bad(k, format!("{:?} is not a date of the form YYYY-MM-DD ({e})", self.raw(k)))
        })?;
        super::sales::day_number(date).map_err(|e| self.bad(k, e.to_string()))
    }
}

/// Reads a table whose header has exactly `columns` (any order, any case; `expected` lists
/// them for the error), calling `each` on every row. A file without rows is an error.
///
/// # Errors
///
/// See [`CsvError`]; `each`'s errors pass through.
pub(crate) fn read_table(
    reader: impl std::io::Read,
    path: &Path,
    columns: &[&'static str],
    expected: &'static str,
    mut each: impl FnMut(&Fields<'_>) -> Result<(), CsvError>,
) -> Result<(), CsvError> {
    let mut rdr = csv::ReaderBuilder::new().trim(csv::Trim::All).from_reader(reader);
    let header = rdr.headers().map_err(|e| row_error(e, path))?.clone();
    if header.is_empty() || header.iter().all(str::is_empty) {
        return Err(CsvError::Empty { path: path.into() });
    }
    if let Some(unknown) =
        header.iter().find(|h| !columns.iter().any(|c| c.eq_ignore_ascii_case(h)))
    {
        return Err(CsvError::UnknownColumn {
            path: path.into(),
            column: unknown.into(),
            expected,
        });
    }
    let index = columns
        .iter()
        .map(|&name| {
            header.iter().position(|h| h.eq_ignore_ascii_case(name)).ok_or_else(|| {
                CsvError::MissingColumn {
                    path: path.into(),
                    column: name,
                    header: header.iter().collect::<Vec<_>>().join(","),
                }
            })
        })
        .collect::<Result<Vec<usize>, CsvError>>()?;
    let mut record = csv::StringRecord::new();
    let mut rows = 0usize;
    while rdr.read_record(&mut record).map_err(|e| row_error(e, path))? {
        let line = record.position().map_or(0, csv::Position::line);
        each(&Fields { record: &record, index: &index, columns, path, line })?;
        rows += 1;
    }
    if rows == 0 {
        return Err(CsvError::Empty { path: path.into() });
    }
    Ok(())
}

/// The error for a file without rows for `store`, listing (sorted, the first ten) the stores
/// it has.
pub(crate) fn no_rows_for<'a>(
    path: &Path,
    store: &str,
    names: impl IntoIterator<Item = &'a str>,
) -> CsvError {
    let mut names: Vec<&str> = names.into_iter().collect();
    names.sort_unstable();
    names.dedup();
    let more = names.len().saturating_sub(10);
    names.truncate(10);
    let mut has = names.join(", ");
    if more > 0 {
        has.push_str(&format!(" and {more} more"));
    }
    CsvError::NoRowsFor { path: path.into(), store: store.into(), has }
}

pub(crate) fn row_error(e: csv::Error, path: &Path) -> CsvError {
    match e.position() {
        Some(p) => CsvError::BadRow { path: path.into(), line: p.line(), message: e.to_string() },
        None => match e.into_kind() {
            csv::ErrorKind::Io(source) => CsvError::Io { path: path.into(), source },
            other => CsvError::BadRow { path: path.into(), line: 0, message: format!("{other:?}") },
        },
    }
}

/// Writes ratings in the format [`load_ratings`] reads.
///
/// # Errors
///
/// I/O errors.
pub fn write_ratings(path: &Path, ratings: &[CsvRating]) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(["user_id", "item_id", "rating", "timestamp"])?;
    for r in ratings {
        w.write_record([
            r.user.clone(),
            r.item.to_string(),
            r.rating.to_string(),
            r.timestamp.to_string(),
        ])?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<CsvRating>, CsvError> {
        read_ratings(text.as_bytes(), Path::new("store.csv"))
    }

    #[test]
    fn reads_columns_in_any_order_with_optional_timestamp() {
        let rows = read("rating,item_id,user_id\n4.5,7,alice\n3,2,bob\n").unwrap();
        assert_eq!(rows[0], CsvRating { user: "alice".into(), item: 7, rating: 4.5, timestamp: 0 });
        assert_eq!(rows.len(), 2);
        let rows = read("user_id,item_id,rating,timestamp\n1,2,3,99\n").unwrap();
        assert_eq!(rows[0].timestamp, 99);
    }

    #[test]
    fn missing_columns_name_file_line_and_column() {
        let err = read("user_id,rating\n1,3\n").unwrap_err().to_string();
        assert_eq!(err, "store.csv:1: missing column \"item_id\" (the header has: user_id,rating)");
    }

    #[test]
    fn bad_numbers_name_file_line_and_column() {
        let err = read("user_id,item_id,rating\n1,2,3\n1,x,3\n").unwrap_err().to_string();
        assert_eq!(err, "store.csv:3: column \"item_id\": \"x\" is not a non-negative integer");
        let err = read("user_id,item_id,rating\n1,2,3\n1,2,3\n1,2,abc\n").unwrap_err().to_string();
        assert_eq!(err, "store.csv:4: column \"rating\": \"abc\" is not a number");
        let err = read("user_id,item_id,rating\n1,-2,3\n").unwrap_err().to_string();
        assert_eq!(err, "store.csv:2: column \"item_id\": \"-2\" is not a non-negative integer");
        let err =
            read("user_id,item_id,rating,timestamp\n1,2,3,yesterday\n").unwrap_err().to_string();
        assert_eq!(err, "store.csv:2: column \"timestamp\": \"yesterday\" is not an integer");
    }

    #[test]
    fn empty_files_and_ragged_rows_are_explained() {
        assert_eq!(
            read("").unwrap_err().to_string(),
            "store.csv: no data rows (the file is empty or has only a header)"
        );
        assert_eq!(
            read("user_id,item_id,rating\n").unwrap_err().to_string(),
            "store.csv: no data rows (the file is empty or has only a header)"
        );
        let err = read("user_id,item_id,rating\n1,2\n").unwrap_err().to_string();
        assert!(err.starts_with("store.csv:2: "), "{err}");
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.csv");
        let rows = vec![CsvRating { user: "u,1".into(), item: 3, rating: 2.5, timestamp: 7 }];
        write_ratings(&path, &rows).unwrap();
        assert_eq!(load_ratings(&path).unwrap(), rows);
        let err = load_ratings(&dir.path().join("none.csv")).unwrap_err().to_string();
        assert!(err.contains("none.csv: No such file"), "{err}");
    }
}
