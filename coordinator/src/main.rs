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
    /// Serves the Training and Admin gRPC services.
    Serve {
        /// TOML config (see `example-config`).
        #[arg(long)]
        config: PathBuf,
        /// Overrides the config's listen address.
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Prints a commented example config.
    ExampleConfig,
    /// Privacy accounting with the coordinator's own accountant; prints one JSON object.
    #[command(subcommand)]
    Privacy(PrivacyCommand),
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
        Command::ExampleConfig => {
            use std::io::Write;
            std::io::stdout().write_all(fedretail_coordinator::config::EXAMPLE.as_bytes())?;
            Ok(())
        }
        Command::Privacy(command) => {
            use std::io::Write;
            let value = privacy(command)?;
            writeln!(std::io::stdout(), "{value}")?;
            Ok(())
        }
        Command::Serve { config, listen } => {
            let mut config =
                fedretail_coordinator::config::load(&config).context("loading the config")?;
            if let Some(listen) = listen {
                config.listen = listen;
            }
            if config.store.is_none() {
                tracing::warn!(
                    "no `store` in the config: tasks and models are kept in memory and lost on restart"
                );
            }
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind(config.listen)
                    .await
                    .with_context(|| format!("binding {}", config.listen))?;
                fedretail_coordinator::run(config, listener, shutdown_signal())
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
