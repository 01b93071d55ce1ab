//! Per-store scatter plots (SVG) shared by the reports: one point per store and method.

use std::path::Path;

/// One method's value in every store, in plot order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Values, one per store.
    pub values: Vec<f64>,
}

/// Draws `series` against the stores (x: position in plot order) into an SVG at `path`, with
/// values capped at `ymax`.
///
/// # Errors
///
/// Drawing errors.
pub fn per_store(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    ymax: f64,
    series: &[Series],
) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let draw = |e: &dyn std::fmt::Debug| anyhow::anyhow!("drawing the plot: {e:?}");
    let root = SVGBackend::new(path, (900, 460)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| draw(&e))?;
    let n = series.first().map_or(0, |s| s.values.len()) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5..n - 0.5, 0.0..ymax * 1.05)
        .map_err(|e| draw(&e))?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw().map_err(|e| draw(&e))?;
    let colors = [RGBColor(150, 150, 150), RED, GREEN, BLUE, MAGENTA];
    for (s, color) in series.iter().zip(colors) {
        let pts: Vec<(f64, f64)> =
            s.values.iter().enumerate().map(|(x, &v)| (x as f64, v.min(ymax))).collect();
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| draw(&e))?
            .label(s.label.clone())
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| draw(&e))?;
    root.present().map_err(|e| draw(&e))?;
    Ok(())
}
