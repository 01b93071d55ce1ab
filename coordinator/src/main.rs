//! `fedretail-coordinator`: parse the CLI, load the config, serve until Ctrl-C or SIGTERM.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "fedretail-coordinator",
    version,
    about = "Runs federated training tasks for fedretail store clients"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serves the Training service (stores) and the Admin service (administrators).
    Serve {
        /// TOML config (see `example-config`).
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's Training address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Overrides the config's Admin address.
        #[arg(long)]
        admin_listen: Option<std::net::SocketAddr>,
    },
    /// Prints a commented example config that serves both services over mTLS.
    ExampleConfig {
        /// The PKI directory (`pki init --out DIR`); written into the config as given.
        #[arg(long, default_value = "pki")]
        pki: PathBuf,
    },
    /// Prints a commented example task for `admin create-task --spec FILE`.
    ExampleTask,
    /// The deployment's certificate authority: stores and administrators.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Calls the Admin service with an administrator's certificate (prints JSON).
    Admin(fedretail_coordinator::admin_cli::AdminArgs),
    /// Prints the audit log from the config's store (works while the coordinator runs).
    Audit {
        /// The coordinator's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Only entries after this sequence number.
        #[arg(long, default_value_t = 0)]
        after: u64,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Privacy accounting with the coordinator's own accountant; prints one JSON object.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
}

#[derive(Subcommand)]
enum PkiCommand {
    /// Makes a CA and the coordinator's certificate and key in DIR.
    Init {
        /// The directory (created).
        #[arg(long)]
        out: PathBuf,
        /// Host names or IP addresses stores use to reach the coordinator (repeatable).
        #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        hosts: Vec<String>,
    },
    /// Issues a store certificate and key (DIR/stores/NAME.crt, .key).
    IssueStore {
        /// The PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// The store's name: letters, digits, '-', '_', '.'.
        #[arg(long)]
        store: String,
    },
    /// Signs a store's certificate request (`fedretail-client keygen`); the key stays in the store.
    Sign {
        /// The PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// The request (PEM).
        #[arg(long)]
        csr: PathBuf,
    },
    /// Issues an administrator certificate carrying its role.
    IssueAdmin {
        /// The PKI directory.
        #[arg(long)]
        pki: PathBuf,
        /// The administrator's name.
        #[arg(long)]
        name: String,
        /// What the certificate may do.
        #[arg(long, value_parser = ["operator", "auditor", "exporter"])]
        role: String,
    },
}

#[derive(Subcommand)]
enum PrivacyCommand {
    /// ε after some rounds of the Poisson-subsampled Gaussian mechanism.
    Epsilon {
        /// Poisson sampling rate q per round.
        #[arg(long, required_unless_present = "schedule", conflicts_with = "schedule")]
        sampling_rate: Option<f64>,
        /// Noise multiplier z (noise standard deviation / clipping norm).
        #[arg(long, required_unless_present = "schedule", conflicts_with = "schedule")]
        noise_multiplier: Option<f64>,
        /// Rounds.
        #[arg(long, required_unless_present = "schedule", conflicts_with = "schedule")]
        rounds: Option<u64>,
        /// JSON list of phases: [{"sampling_rate": q, "noise_multiplier": z, "rounds": t}, ...].
        #[arg(long)]
        schedule: Option<PathBuf>,
        /// δ.
        #[arg(long)]
        delta: f64,
        /// `rdp` (orders as dp-accounting; prints the optimal order) or `pld` (privacy loss
        /// distributions: tighter; never looser than RDP; the order is null unless RDP was
        /// the tighter).
        #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
        accountant: String,
    },
    /// The smallest noise multiplier that keeps `rounds` rounds within ε at δ.
    Calibrate {
        /// Target ε.
        #[arg(long)]
        target_epsilon: f64,
        /// Poisson sampling rate q per round.
        #[arg(long)]
        sampling_rate: f64,
        /// Rounds.
        #[arg(long)]
        rounds: u64,
        /// δ.
        #[arg(long)]
        delta: f64,
        /// `rdp` or `pld`, as for `epsilon`.
        #[arg(long, default_value = "rdp", value_parser = ["rdp", "pld"])]
        accountant: String,
    },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Phase {
    sampling_rate: f64,
    noise_multiplier: f64,
    rounds: u64,
}

fn privacy(command: PrivacyCommand) -> anyhow::Result<serde_json::Value> {
    use fedretail_core::privacy::accountant::{
        Accountant, AccountantKind, Charge, calibrate_noise,
    };
    let kind = |name: &str| if name == "pld" { AccountantKind::Pld } else { AccountantKind::Rdp };
    Ok(match command {
        PrivacyCommand::Epsilon {
            sampling_rate,
            noise_multiplier,
            rounds,
            schedule,
            delta,
            accountant,
        } => {
            let charges = match schedule {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("reading {}", path.display()))?;
                    let phases: Vec<Phase> = serde_json::from_str(&text)
                        .with_context(|| format!("parsing {}", path.display()))?;
                    phases
                        .into_iter()
                        .map(|p| Charge {
                            sampling_rate: p.sampling_rate,
                            noise_multiplier: p.noise_multiplier,
                            rounds: p.rounds,
                        })
                        .collect()
                }
                None => vec![Charge {
                    sampling_rate: sampling_rate.context("--sampling-rate is required")?,
                    noise_multiplier: noise_multiplier.context("--noise-multiplier is required")?,
                    rounds: rounds.context("--rounds is required")?,
                }],
            };
            let e = kind(&accountant).epsilon(&charges, delta)?;
            // A PLD bound has no order: NaN becomes null.
            serde_json::json!({ "epsilon": e.epsilon, "order": e.order.is_finite().then_some(e.order) })
        }
        PrivacyCommand::Calibrate { target_epsilon, sampling_rate, rounds, delta, accountant } => {
            let accountant = kind(&accountant);
            let z = calibrate_noise(&accountant, sampling_rate, rounds, target_epsilon, delta)?;
            serde_json::json!({ "noise_multiplier": z })
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // A reader that stopped early (`| head`) is not an error.
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            ExitCode::SUCCESS
        }
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

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::ExampleConfig { pki } => {
            use std::io::Write;
            let text = fedretail_coordinator::config::example(&pki.display().to_string());
            std::io::stdout().write_all(text.as_bytes())?;
            Ok(())
        }
        Command::ExampleTask => {
            use std::io::Write;
            std::io::stdout().write_all(fedretail_coordinator::config::EXAMPLE_TASK.as_bytes())?;
            Ok(())
        }
        Command::Admin(args) => {
            use std::io::Write;
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            let value = runtime.block_on(fedretail_coordinator::admin_cli::run(args))?;
            writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&value)?)?;
            Ok(())
        }
        Command::Pki(command) => {
            use fedretail_coordinator::pki::{self, PkiDir, Role};
            use std::io::Write;
            let issued = match command {
                PkiCommand::Init { out, hosts } => pki::init(&PkiDir::new(out), &hosts)?,
                PkiCommand::IssueStore { pki: dir, store } => {
                    pki::issue_store(&PkiDir::new(dir), &store)?
                }
                PkiCommand::Sign { pki: dir, csr } => pki::sign_store_csr(&PkiDir::new(dir), &csr)?,
                PkiCommand::IssueAdmin { pki: dir, name, role } => {
                    let role = Role::parse(&role).context("unknown role")?;
                    pki::issue_admin(&PkiDir::new(dir), &name, role)?
                }
            };
            let mut out = std::io::stdout();
            writeln!(out, "certificate {} (serial {})", issued.cert.display(), issued.serial)?;
            if let Some(key) = issued.key {
                writeln!(out, "private key {} (mode 0600)", key.display())?;
            }
            Ok(())
        }
        Command::Audit { config, after, json } => {
            use std::io::Write;
            let config =
                fedretail_coordinator::config::load(&config).context("loading the config")?;
            let path = config.store.context("the config names no `store`: nothing is audited")?;
            let mut out = std::io::stdout();
            let mut after = after;
            loop {
                let records = fedretail_coordinator::store::read_audit_log(&path, after, 1000)?;
                let Some(last) = records.last() else { break };
                after = last.seq;
                for r in &records {
                    if json {
                        let line = serde_json::json!({
                            "seq": r.seq, "unix_ms": r.unix_ms, "actor": r.event.actor,
                            "role": r.event.role, "action": r.event.action,
                            "task_id": r.event.task.map(|t| t.0), "outcome": r.event.outcome,
                            "detail": r.event.detail,
                        });
                        writeln!(out, "{line}")?;
                    } else {
                        let when = jiff::Timestamp::from_millisecond(r.unix_ms as i64)
                            .map_or_else(|_| r.unix_ms.to_string(), |t| t.to_string());
                        let task = r.event.task.map_or("-".to_string(), |t| t.to_string());
                        writeln!(
                            out,
                            "{:>6}  {when}  {}/{}  {}  task {task}  {}  {}",
                            r.seq,
                            r.event.actor,
                            r.event.role,
                            r.event.action,
                            r.event.outcome,
                            r.event.detail
                        )?;
                    }
                }
            }
            Ok(())
        }
        Command::Privacy(command) => {
            use std::io::Write;
            let value = privacy(command)?;
            writeln!(std::io::stdout(), "{value}")?;
            Ok(())
        }
        Command::Serve { config, listen, admin_listen } => {
            let mut config =
                fedretail_coordinator::config::load(&config).context("loading the config")?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if let Some(admin_listen) = admin_listen {
                config.admin_listen = admin_listen;
            }
            if config.store.is_none() {
                tracing::warn!(
                    "no `store` in the config: tasks and models are kept in memory and lost on restart"
                );
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let listeners = fedretail_coordinator::Listeners::bind(&config).await?;
                fedretail_coordinator::run(config, listeners, shutdown_signal())
                    .await
                    .context("coordinator")
            })
        }
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
