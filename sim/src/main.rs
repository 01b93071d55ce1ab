//! `fedretail-sim`: evaluate a federated training plan on real data before deploying it.

use anyhow::Context;
use clap::{Parser, Subcommand};
use fedretail_sim::scenario::{self, RunArgs};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "fedretail-sim",
    version,
    about = "Simulates fedretail federated training on real data"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a scenario: federated training over loopback gRPC against central and local-only
    /// references; writes report.json and report.md.
    Run(Box<RunArgs>),
    /// Runs the scenario at every ε of --epsilons (and without privacy for `inf`); writes
    /// sweep.json, sweep.md and sweep.svg (RMSE against ε with the references).
    Sweep(Box<fedretail_sim::sweep::SweepArgs>),
    /// Writes the ranking split (train.csv, test.csv) of a scenario, to compare other libraries
    /// on the same split (sim/scripts/implicit_reference.py).
    ExportSplit {
        /// The scenario's options (`--scenario`, ...).
        #[command(flatten)]
        args: Box<RunArgs>,
        /// Output directory.
        #[arg(long = "split-dir")]
        split_dir: std::path::PathBuf,
    },
    /// Writes each store's ratings as CSV files for `fedretail-client` (the README's tour).
    ExportStores(fedretail_sim::bench::ExportArgs),
    /// Writes each Superstore store's sales as CSV for `fedretail-client --sales`, and a
    /// coordinator config with a demand task for them.
    ExportSales(fedretail_sim::demand::ExportSalesArgs),
    /// Writes Complete Journey's largest stores as their own purchases CSV files for
    /// `fedretail-client --purchases`, the catalogue (`--catalogue`) and a coordinator config
    /// with the retail tasks (the README's tour).
    ExportRetail(fedretail_sim::retail::ExportRetailArgs),
    /// Benchmarks.
    #[command(subcommand)]
    Bench(fedretail_sim::bench::BenchCommand),
    /// Runs a coordinator until standard input closes, printing its address first (used by
    /// `bench round` to measure the coordinator's memory in its own process).
    #[command(hide = true)]
    ServeCoordinator {
        /// Serve over mTLS with the certificates in this PKI directory.
        #[arg(long)]
        pki: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,fedretail_sim=info"));
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

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let command = cli.command.unwrap_or_else(|| Command::Run(Box::new(RunArgs::parse_defaults())));
    match command {
        Command::Run(args) if args.scenario == scenario::ScenarioKind::Retail => {
            runtime.block_on(async {
                let summary = fedretail_sim::retail::run(&args).await?;
                let report = args.out_dir().join("report.md");
                println_out(&format!("{summary}\nreport: {}", report.display()));
                Ok(())
            })
        }
        Command::Run(args) if args.scenario.is_demand() => runtime.block_on(async {
            let report = fedretail_sim::demand::run(&args).await?;
            let dir = args.out_dir();
            fedretail_sim::demand::write_report(&dir, &report)?;
            let head = fedretail_sim::demand::summary(&report);
            println_out(&format!("{head}\n\nreport: {}", dir.join("report.md").display()));
            Ok(())
        }),
        Command::Run(args) => runtime.block_on(async {
            let report = scenario::run(&args).await?;
            let dir = args.out_dir();
            scenario::write_report(&dir, &report)?;
            let head = fedretail_sim::report::summary(&report);
            println_out(&format!("{head}\n\nreport: {}", dir.join("report.md").display()));
            Ok(())
        }),
        Command::Sweep(args) => runtime.block_on(async {
            let sweep = fedretail_sim::sweep::run(&args).await?;
            println_out(&fedretail_sim::sweep::markdown(&sweep));
            Ok(())
        }),
        Command::ExportSplit { args, split_dir } => scenario::export_split(&args, &split_dir),
        Command::ExportStores(args) => fedretail_sim::bench::export_stores(&args),
        Command::ExportSales(args) => fedretail_sim::demand::export_sales(&args),
        Command::ExportRetail(args) => fedretail_sim::retail::export_retail(&args),
        Command::Bench(cmd) => runtime.block_on(fedretail_sim::bench::run(cmd)),
        Command::ServeCoordinator { pki } => {
            runtime.block_on(fedretail_sim::bench::serve_coordinator(pki))
        }
    }
}

#[allow(clippy::print_stdout)] // reason: the command's result goes to stdout
fn println_out(s: &str) {
    println!("{s}");
}
