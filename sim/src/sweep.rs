//! `fedretail-sim sweep`: the privacy–utility curve. One run per ε (each its own task, with
//! its own calibrated noise), plus the run without privacy (ε = ∞), drawn against the central
//! and local-only references.

use crate::report::Report;
use crate::scenario::{self, RunArgs};
use anyhow::Context;
use plotters::prelude::*;
use std::path::{Path, PathBuf};

/// Options of `fedretail-sim sweep`.
#[derive(Debug, Clone, clap::Args)]
pub struct SweepArgs {
    /// Privacy budgets to run; `inf` is the run without privacy.
    #[arg(long, value_delimiter = ',', default_value = "0.5,1,2,4,8,inf")]
    pub epsilons: Vec<f64>,
    /// Directory for sweep.json, sweep.md, sweep.svg and one report per ε
    /// (default: `out/sweep`).
    #[arg(long = "sweep-out")]
    pub sweep_out: Option<PathBuf>,
    /// The run's options (use --privacy-unit to choose the unit; customer by default; the
    /// scenario is MovieLens-100K unless another rating scenario is named).
    #[command(flatten)]
    pub run: RunArgs,
}

/// One point of the curve.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Point {
    /// The target ε (`null` in JSON for ∞).
    pub target_epsilon: Option<f64>,
    /// ε the coordinator reports as spent.
    pub epsilon_spent: Option<f64>,
    /// z.
    pub noise_multiplier: Option<f64>,
    /// Test RMSE of the federated model.
    pub rmse: f64,
    /// Test MAE.
    pub mae: f64,
}

/// The sweep's result.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sweep {
    /// The privacy unit of the private runs.
    pub unit: String,
    /// One point per ε, in the order given.
    pub points: Vec<Point>,
    /// Central (pooled) reference RMSE.
    pub central_rmse: f64,
    /// Local-only reference RMSE.
    pub local_only_rmse: f64,
}

/// Runs every ε and writes the sweep's files.
///
/// # Errors
///
/// A failed run or I/O.
pub async fn run(args: &SweepArgs) -> anyhow::Result<Sweep> {
    let dir = args.sweep_out.clone().unwrap_or_else(|| PathBuf::from("out").join("sweep"));
    let mut base = args.run.clone();
    // The sweep plots RMSE: with no rating scenario named it sweeps MovieLens-100K.
    if base.scenario == scenario::ScenarioKind::Retail {
        base.scenario = scenario::ScenarioKind::Movielens;
    }
    if base.privacy_unit.is_none() {
        base.privacy_unit = Some(scenario::PrivacyUnitArg::Customer);
    }
    let unit = format!("{:?}", base.privacy_unit.expect("set above")).to_lowercase();
    let mut points = Vec::new();
    let mut references = None;
    for &epsilon in &args.epsilons {
        anyhow::ensure!(epsilon > 0.0, "--epsilons must be positive (or inf), got {epsilon}");
        let mut run = base.clone();
        let name = if epsilon.is_finite() {
            run.target_epsilon = Some(epsilon);
            format!("epsilon-{epsilon}")
        } else {
            // ε = ∞: the same scenario without privacy (the non-private defaults apply).
            run.privacy_unit = None;
            run.target_epsilon = None;
            "epsilon-inf".to_string()
        };
        run.out = Some(dir.join(&name));
        tracing::info!(epsilon, "sweep: running");
        let report =
            scenario::run(&run).await.with_context(|| format!("the run at ε = {epsilon}"))?;
        scenario::write_report(&run.out_dir(), &report)?;
        references.get_or_insert((report.central.rmse, report.local_only.rmse));
        points.push(point(epsilon, &report));
    }
    let (central_rmse, local_only_rmse) = references.context("--epsilons is empty")?;
    let sweep = Sweep { unit, points, central_rmse, local_only_rmse };
    write(&dir, &sweep)?;
    Ok(sweep)
}

fn point(epsilon: f64, report: &Report) -> Point {
    Point {
        target_epsilon: epsilon.is_finite().then_some(epsilon),
        epsilon_spent: report.privacy.as_ref().map(|p| p.epsilon),
        noise_multiplier: report.privacy.as_ref().map(|p| p.noise_multiplier),
        rmse: report.federated.rmse,
        mae: report.federated.mae,
    }
}

/// Writes sweep.json, sweep.md and sweep.svg into `dir`.
///
/// # Errors
///
/// I/O or drawing errors.
pub fn write(dir: &Path, sweep: &Sweep) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = serde_json::to_string_pretty(sweep).expect("plain data serialises");
    std::fs::write(dir.join("sweep.json"), json + "\n")?;
    std::fs::write(dir.join("sweep.md"), markdown(sweep))?;
    plot(&dir.join("sweep.svg"), sweep)?;
    Ok(())
}

/// The sweep as a Markdown table.
pub fn markdown(sweep: &Sweep) -> String {
    let mut md = format!(
        "| target ε | ε spent | z | RMSE ({}-level DP) | MAE |\n| --- | --- | --- | --- | --- |\n",
        sweep.unit
    );
    let opt =
        |v: Option<f64>, digits: usize| v.map_or("–".to_string(), |v| format!("{v:.digits$}"));
    for p in &sweep.points {
        md += &format!(
            "| {} | {} | {} | {:.4} | {:.4} |\n",
            p.target_epsilon.map_or("∞ (no DP)".to_string(), |e| e.to_string()),
            opt(p.epsilon_spent, 3),
            opt(p.noise_multiplier, 3),
            p.rmse,
            p.mae
        );
    }
    md += &format!(
        "| central reference | | | {:.4} | |\n| local-only reference | | | {:.4} | |\n",
        sweep.central_rmse, sweep.local_only_rmse
    );
    md
}

/// Draws RMSE against ε (one evenly spaced position per ε, in increasing order, ∞ last) with
/// the references as horizontal lines.
///
/// # Errors
///
/// Drawing errors.
pub fn plot(path: &Path, sweep: &Sweep) -> anyhow::Result<()> {
    let mut points: Vec<&Point> = sweep.points.iter().collect();
    points.sort_by(|a, b| {
        a.target_epsilon
            .unwrap_or(f64::INFINITY)
            .total_cmp(&b.target_epsilon.unwrap_or(f64::INFINITY))
    });
    let labels: Vec<String> = points
        .iter()
        .map(|p| p.target_epsilon.map_or("∞ (no DP)".to_string(), |e| format!("ε = {e}")))
        .collect();
    let n = points.len() as f64;
    let rmses = sweep
        .points
        .iter()
        .map(|p| p.rmse)
        .chain([sweep.central_rmse, sweep.local_only_rmse])
        .filter(|v| v.is_finite());
    let (ymin, ymax) =
        rmses.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    let pad = ((ymax - ymin) * 0.1).max(0.01);
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("Test RMSE against ε ({}-level DP, δ = 1e-5)", sweep.unit),
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, (ymin - pad)..(ymax + pad))
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("privacy budget")
        .y_desc("test RMSE")
        .x_labels(points.len())
        .x_label_formatter(&|x| {
            let k = x.round();
            if (x - k).abs() < 1e-6 && k >= 0.0 && (k as usize) < labels.len() {
                labels[k as usize].clone()
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(draw)?;
    let pts: Vec<(f64, f64)> = points
        .iter()
        .enumerate()
        .filter(|(_, p)| p.rmse.is_finite())
        .map(|(k, p)| (k as f64, p.rmse))
        .collect();
    chart
        .draw_series(LineSeries::new(pts.clone(), BLUE.stroke_width(2)))
        .map_err(draw)?
        .label("federated")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, BLUE.filled()))).map_err(draw)?;
    for (value, color, label) in [
        (sweep.central_rmse, GREEN, "central (pooled)"),
        (sweep.local_only_rmse, RED, "local-only"),
    ] {
        chart
            .draw_series(LineSeries::new([(-0.5, value), (n - 0.5, value)], color.stroke_width(2)))
            .map_err(draw)?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    root.present().map_err(draw)?;
    Ok(())
}

fn draw<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing the plot: {e:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sweep() -> Sweep {
        let p = |e: Option<f64>, rmse| Point {
            target_epsilon: e,
            epsilon_spent: e,
            noise_multiplier: e.map(|e| 4.0 / e),
            rmse,
            mae: rmse * 0.8,
        };
        Sweep {
            unit: "customer".into(),
            points: vec![p(Some(1.0), 0.99), p(Some(8.0), 0.95), p(None, 0.91)],
            central_rmse: 0.90,
            local_only_rmse: 0.97,
        }
    }

    #[test]
    fn the_table_and_plot_hold_every_point() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &sweep()).unwrap();
        let md = std::fs::read_to_string(dir.path().join("sweep.md")).unwrap();
        for needle in
            ["| 1 | 1.000 | 4.000 | 0.9900 |", "| ∞ (no DP) |", "local-only reference | | | 0.9700"]
        {
            assert!(md.contains(needle), "{needle:?} missing from\n{md}");
        }
        let svg = std::fs::read_to_string(dir.path().join("sweep.svg")).unwrap();
        assert!(svg.starts_with("<svg"), "an SVG document");
        for label in ["federated", "central (pooled)", "local-only", "∞"] {
            assert!(svg.contains(label), "{label} missing from the plot");
        }
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join("sweep.json")).unwrap())
                .unwrap();
        assert_eq!(json["points"].as_array().unwrap().len(), 3);
        assert!(json["points"][2]["target_epsilon"].is_null());
    }
}
