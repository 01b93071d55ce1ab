//! `fedretail-coordinator privacy ...` prints one JSON object computed by the coordinator's own
//! accountant.

use std::process::Command;

fn run(args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fedretail-coordinator"))
        .arg("privacy")
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let value = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (out.status.success(), value, String::from_utf8(out.stderr).unwrap())
}

#[test]
fn epsilon_calibrate_and_schedules_print_json() {
    let (ok, v, _) = run(&[
        "epsilon",
        "--sampling-rate",
        "0.01",
        "--noise-multiplier",
        "1.1",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
    ]);
    assert!(ok);
    let eps = v["epsilon"].as_f64().unwrap();
    assert!(v["order"].as_f64().unwrap() > 1.0);

    // Calibrating for that ε gives back (about) the same noise multiplier.
    let target = eps.to_string();
    let (ok, v, _) = run(&[
        "calibrate",
        "--target-epsilon",
        &target,
        "--sampling-rate",
        "0.01",
        "--rounds",
        "1000",
        "--delta",
        "1e-5",
    ]);
    assert!(ok);
    let z = v["noise_multiplier"].as_f64().unwrap();
    assert!((z - 1.1).abs() < 1e-3, "calibrated z {z}");

    let dir = tempfile::tempdir().unwrap();
    let schedule = dir.path().join("schedule.json");
    std::fs::write(
        &schedule,
        r#"[{"sampling_rate": 0.01, "noise_multiplier": 1.1, "rounds": 600}, {"sampling_rate": 0.01, "noise_multiplier": 1.1, "rounds": 400}]"#,
    )
    .unwrap();
    let (ok, v, _) = run(&["epsilon", "--schedule", schedule.to_str().unwrap(), "--delta", "1e-5"]);
    assert!(ok);
    assert!(
        (v["epsilon"].as_f64().unwrap() - eps).abs() < 1e-9,
        "two phases of the same rounds compose to the whole"
    );

    let (ok, _, stderr) = run(&[
        "epsilon",
        "--sampling-rate",
        "2",
        "--noise-multiplier",
        "1",
        "--rounds",
        "1",
        "--delta",
        "1e-5",
    ]);
    assert!(!ok);
    assert!(stderr.contains("sampling rate must be in [0, 1], got 2"), "{stderr}");
}

#[test]
fn the_pld_accountant_is_tighter_and_calibrates_less_noise() {
    // q = 0.3, T = 50, δ = 1e-5 (the customer-level preset's charges) under `accountant`.
    let run_with = |command: &[&str], accountant: &str| {
        let mut args = command.to_vec();
        args.extend(["--sampling-rate", "0.3", "--rounds", "50", "--delta", "1e-5"]);
        args.extend(["--accountant", accountant]);
        let (ok, v, stderr) = run(&args);
        assert!(ok, "{stderr}");
        v
    };
    let epsilon =
        |accountant: &str| run_with(&["epsilon", "--noise-multiplier", "1.62"], accountant);
    let (rdp, pld) = (epsilon("rdp"), epsilon("pld"));
    let (rdp_eps, pld_eps) = (rdp["epsilon"].as_f64().unwrap(), pld["epsilon"].as_f64().unwrap());
    // dp-accounting 0.6.0 gives 7.9747 (RDP) and 7.2476 (PLD) here.
    assert!((rdp_eps - 7.9747).abs() < 1e-3, "{rdp}");
    assert!((7.2476..7.2476 + 50.0 * 1e-4).contains(&pld_eps), "{pld}");
    assert!(pld["order"].is_null(), "{pld}");

    let calibrate = |accountant: &str| {
        run_with(&["calibrate", "--target-epsilon", "8"], accountant)["noise_multiplier"]
            .as_f64()
            .unwrap()
    };
    let (rdp_z, pld_z) = (calibrate("rdp"), calibrate("pld"));
    assert!(pld_z < 0.95 * rdp_z, "pld z {pld_z} against rdp z {rdp_z}");
}
