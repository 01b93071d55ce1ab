//! Helpers shared by the simulator's real-data tests.

use fedretail_sim::scenario::RunArgs;

/// A quiet `run` with `options`.
pub(crate) fn args(options: &[&str]) -> RunArgs {
    RunArgs::parse_options(["--quiet"].iter().chain(options)).expect("valid test options")
}

/// Whether the real-data checks run (`RUN_SLOW_TESTS=1`, as `.ci/run` sets); otherwise says
/// that the `checks` were skipped.
pub(crate) fn slow(checks: &str) -> bool {
    let run = std::env::var("RUN_SLOW_TESTS").is_ok_and(|v| v == "1");
    if !run {
        #[allow(clippy::print_stderr)] // reason: tell the developer why nothing ran
        {
            eprintln!("skipped: set RUN_SLOW_TESTS=1 to run the {checks} checks");
        }
    }
    run
}

/// The ranking report's customer-level DP runs (the default `--dp-epsilons` 1, 3 and 8): each
/// spends its budget and no more, at customer level, and a larger budget ranks better.
#[allow(dead_code)] // reason: only the ranking tests' binaries call it
pub(crate) fn check_dp_ranking_runs(r: &fedretail_sim::report::Report) {
    let targets = [1.0, 3.0, 8.0];
    assert_eq!(r.dp_runs.len(), targets.len());
    for ((_, p), target) in r.dp_runs.iter().zip(targets) {
        assert_eq!(p.unit, "customer");
        assert!(p.epsilon <= target && p.epsilon > 0.99 * target, "ε {} for {target}", p.epsilon);
    }
    // More budget is not worse, beyond one run's noise (the category-affinity model's runs
    // differ by about 0.01 from ε = 1 to 8).
    let hr: Vec<f64> = r.dp_runs.iter().map(|(m, _)| m.hr_at_10).collect();
    assert!(hr[0] < hr[2] + 0.005, "HR@10 at ε = 1, 3, 8: {hr:?}");
}
