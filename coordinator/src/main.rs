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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
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
        Command::Serve { config, listen } => {
            let mut config =
                fedretail_coordinator::config::load(&config).context("loading the config")?;
            if let Some(listen) = listen {
                config.listen = listen;
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
