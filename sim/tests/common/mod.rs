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
