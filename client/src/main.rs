//! `fedretail-client`: join a task with a store's CSV ratings and train when asked.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use fedretail_client::data::StoreRatings;
use fedretail_client::participant::{LocalData, Participant, ParticipantConfig};
use fedretail_client::transport::GrpcTransport;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "fedretail-client",
    version,
    about = "Trains a fedretail task on one store's data; only clipped model updates leave",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: Option<RunArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Makes this store's private key and a certificate request for the coordinator's operator
    /// (`fedretail-coordinator pki sign --csr FILE`); the key never leaves the store.
    Keygen {
        /// The store's name (the certificate's name).
        #[arg(long)]
        store: String,
        /// Directory for STORE.key (mode 0600) and STORE.csr.
        #[arg(long)]
        out: PathBuf,
    },
    /// Prints the store's own privacy ledger: ε spent per task and over the last 365 days.
    Ledger {
        /// The store's state directory.
        #[arg(long)]
        state_dir: PathBuf,
        /// δ of the yearly total (the policy's max_delta by default).
        #[arg(long, default_value_t = 1e-5)]
        delta: f64,
        /// One JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Coordinator URL (https unless --insecure).
    #[arg(long, default_value = "https://127.0.0.1:50051")]
    coordinator: String,
    /// A PKI directory laid out by `fedretail-coordinator pki`: takes ca.crt and
    /// stores/STORE.crt, stores/STORE.key from it.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key", "insecure"])]
    pki: Option<PathBuf>,
    /// The deployment CA certificate: the only issuer trusted for the coordinator (pinned).
    #[arg(long, requires_all = ["cert", "key"])]
    ca: Option<PathBuf>,
    /// This store's certificate.
    #[arg(long, requires = "ca")]
    cert: Option<PathBuf>,
    /// This store's private key.
    #[arg(long, requires = "ca")]
    key: Option<PathBuf>,
    /// Plaintext with no authentication (an `insecure = true` coordinator): experiments only.
    #[arg(long, conflicts_with_all = ["ca", "cert", "key"])]
    insecure: bool,
    /// The store's privacy policy (TOML; see store-policy.toml in the client's source); without
    /// it the strict defaults apply.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Task to join.
    #[arg(long)]
    task: String,
    /// This store's name.
    #[arg(long)]
    store: String,
    /// The store's ratings, for recommender tasks (CSV with user_id,item_id,rating[,timestamp]).
    #[arg(long, conflicts_with_all = ["sales", "purchases"])]
    ratings: Option<PathBuf>,
    /// The store's sales, for demand tasks (CSV with date,store,product,quantity,price,discount;
    /// rows of other stores in the file are skipped).
    #[arg(long, conflicts_with = "purchases")]
    sales: Option<PathBuf>,
    /// The store's purchases, for either kind of task (CSV with
    /// date,store,customer,product,quantity,price,discount; rows of other stores are skipped);
    /// needs --catalogue.
    #[arg(long, requires = "catalogue")]
    purchases: Option<PathBuf>,
    /// The store's promotion calendar for demand tasks (CSV with week,store,group,display,mailer:
    /// the shares of each group's promoted products on display and in the mailer that week).
    #[arg(long)]
    promotions: Option<PathBuf>,
    /// The task's catalogue: product,item,group (see `fedretail-sim export-retail`).
    #[arg(long, requires = "purchases")]
    catalogue: Option<PathBuf>,
    /// Fraction of ratings held out for local evaluation.
    #[arg(long, default_value_t = 0.2)]
    holdout: f64,
    /// Seed of the held-out split.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Directory for personal parameters and the audit log of what was sent.
    #[arg(long)]
    state_dir: PathBuf,
    /// Longest wait between reconnection attempts, in seconds.
    #[arg(long, default_value_t = 30.0)]
    max_backoff_secs: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cli = match (cli.command, cli.run) {
        (Some(Command::Keygen { store, out }), _) => {
            return match fedretail_client::keygen::keygen(&store, &out) {
                Ok(made) => {
                    #[allow(clippy::print_stdout)] // reason: the command's output
                    {
                        println!(
                            "private key {} (mode 0600; never leaves the store)",
                            made.key.display()
                        );
                        println!(
                            "certificate request {} (send it to the coordinator's operator)",
                            made.csr.display()
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    #[allow(clippy::print_stderr)] // reason: the error must reach the user
                    {
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::from(2)
                }
            };
        }
        (Some(Command::Ledger { state_dir, delta, json }), _) => {
            return match print_ledger(&state_dir, delta, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    #[allow(clippy::print_stderr)] // reason: the error must reach the user
                    {
                        eprintln!("error: {e:#}");
                    }
                    ExitCode::from(2)
                }
            };
        }
        (None, Some(run)) => run,
        (None, None) => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            return ExitCode::from(2);
        }
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            #[allow(clippy::print_stderr)]
            // reason: the error must reach the user even with logging filtered
            {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(2)
        }
    }
}

fn print_ledger(dir: &std::path::Path, delta: f64, json: bool) -> anyhow::Result<()> {
    use std::io::Write;
    anyhow::ensure!(dir.is_dir(), "{} is not a directory", dir.display());
    let ledger = fedretail_client::ledger::Ledger::open(Some(dir))
        .with_context(|| format!("reading the ledger in {}", dir.display()))?;
    let now = fedretail_client::ledger::now_ms();
    let tasks = ledger.by_task();
    let year = ledger.year_epsilon(now, delta, None);
    let mut out = std::io::stdout();
    if json {
        let value = serde_json::json!({
            "tasks": tasks,
            "last_365_days": { "rounds": ledger.entries().len(), "epsilon": year, "delta": delta },
        });
        writeln!(out, "{value}")?;
        return Ok(());
    }
    writeln!(out, "| coordinator | task | domain | rounds | epsilon | delta |")?;
    writeln!(out, "| --- | --- | --- | --- | --- | --- |")?;
    for t in &tasks {
        writeln!(
            out,
            "| {} | {} | {} | {} | {:.4} | {} |",
            t.coordinator, t.task, t.domain, t.rounds, t.epsilon, t.delta
        )?;
    }
    writeln!(
        out,
        "\nlast 365 days, every task and coordinator: epsilon {year:.4} at delta {delta}"
    )?;
    Ok(())
}

/// Reads `--promotions` (if given) into the store's weekly sales.
fn add_promotions(
    cli: &RunArgs,
    sales: &mut fedretail_client::data::sales::StoreSales,
) -> anyhow::Result<()> {
    let Some(path) = &cli.promotions else { return Ok(()) };
    let rows = fedretail_client::data::sales::load_promotions(path)?;
    let used = sales.set_promotions(&rows, &cli.store);
    tracing::info!(path = %path.display(), weeks = used, "promotion calendar loaded");
    if used == 0 {
        tracing::warn!(path = %path.display(), store = %cli.store, "the promotion calendar has no rows for this store's weeks");
    }
    Ok(())
}

fn run(cli: RunArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..1.0).contains(&cli.holdout),
        "--holdout must be in [0, 1), got {}",
        cli.holdout
    );
    anyhow::ensure!(cli.max_backoff_secs > 0.0, "--max-backoff-secs must be positive");
    let data = match (&cli.ratings, &cli.sales) {
        _ if cli.purchases.is_some() => {
            let (path, catalogue) =
                (cli.purchases.as_ref().expect("checked"), cli.catalogue.as_ref());
            let catalogue = fedretail_client::data::purchases::load_catalogue(
                catalogue.context("--purchases needs --catalogue")?,
            )?;
            let (rows, mut sales) =
                fedretail_client::data::purchases::load_store(path, &cli.store, &catalogue)?;
            add_promotions(&cli, &mut sales)?;
            let ratings = StoreRatings::from_rows(&rows, cli.holdout, cli.seed);
            tracing::info!(
                path = %path.display(),
                customers = ratings.user_keys.len(),
                interactions = rows.len(),
                groups = sales.groups.len(),
                weeks = sales.n_weeks,
                "purchases loaded"
            );
            LocalData::Purchases { ratings, sales }
        }
        (Some(path), _) => {
            let rows =
                fedretail_client::data::csv::load_ratings(path).context("loading ratings")?;
            let ratings = StoreRatings::from_rows(&rows, cli.holdout, cli.seed);
            tracing::info!(
                path = %path.display(),
                users = ratings.user_keys.len(),
                train = ratings.data.train.len(),
                held_out = ratings.data.test.len(),
                "ratings loaded"
            );
            LocalData::Ratings(ratings)
        }
        (None, Some(path)) => {
            let mut sales = fedretail_client::data::sales::load_store(path, &cli.store)?;
            add_promotions(&cli, &mut sales)?;
            tracing::info!(path = %path.display(), groups = sales.groups.len(), weeks = sales.n_weeks, "sales loaded");
            LocalData::Sales(sales)
        }
        (None, None) => anyhow::bail!("give --ratings, --sales or --purchases"),
    };
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("creating {}", cli.state_dir.display()))?;
    let policy = match &cli.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            fedretail_client::policy::StorePolicy::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => fedretail_client::policy::StorePolicy::default(),
    };
    let config = ParticipantConfig {
        policy,
        seeded_privacy: false,
        dropout: 0.0,
        task: cli.task.clone(),
        store_name: cli.store.clone(),
        state_dir: Some(cli.state_dir),
        max_backoff: Duration::from_secs_f64(cli.max_backoff_secs),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async move {
        // The channel spawns its connection task, so it is built inside the runtime.
        let transport = if cli.insecure {
            tracing::warn!(
                "--insecure: plaintext with no authentication; anyone on the path reads every update"
            );
            GrpcTransport::new(&cli.coordinator)?
        } else {
            let (ca, cert, key) = match (&cli.pki, &cli.ca, &cli.cert, &cli.key) {
                (Some(dir), ..) => (
                    dir.join("ca.crt"),
                    dir.join("stores").join(format!("{}.crt", cli.store)),
                    dir.join("stores").join(format!("{}.key", cli.store)),
                ),
                (None, Some(ca), Some(cert), Some(key)) => (ca.clone(), cert.clone(), key.clone()),
                _ => anyhow::bail!(
                    "give the store's certificates (--pki DIR, or --ca, --cert and --key), or --insecure for a plaintext coordinator"
                ),
            };
            let tls = fedretail_client::transport::StoreTls::read(&ca, &cert, &key)?;
            GrpcTransport::with_tls(&cli.coordinator, &tls)?
        };
        let cancel = tokio_util::sync::CancellationToken::new();
        let stop = cancel.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            stop.cancel();
        });
        let outcome = Participant::new(transport, config, data).run(cancel).await?;
        tracing::info!(rounds = outcome.rounds_trained, evaluations = outcome.evaluations, state = %outcome.state, reason = %outcome.reason, "done");
        Ok(())
    })
}
