//! Tests of the demand model: gradients against finite differences, what training and
//! forecasts may see, the naive baselines and the learning-rate schedule.

use super::*;
use rand::{RngExt, SeedableRng};

fn spec(loss: DemandLoss) -> DemandSpec {
    DemandSpec {
        groups: vec!["a".into(), "b".into()],
        first_test_week: 2150,
        horizon: 4,
        harmonics: 2,
        learning_rate: 0.003,
        regularization: 0.05,
        loss,
        planned_discounts: false,
        personal_regularization: 30.0,
        whole_units: false,
        relative_to_recent: false,
        hidden_units: 0,
        trees: None,
        lad: None,
    }
}

/// Each store of `pooled` alone, as that store holds its data.
fn per_store(pooled: &DemandData) -> Vec<DemandData> {
    (0..pooled.n_stores)
        .map(|k| DemandData {
            n_stores: 1,
            series: pooled
                .series
                .iter()
                .filter(|s| s.store as usize == k)
                .map(|s| Series { store: 0, ..s.clone() })
                .collect(),
            ..pooled.clone()
        })
        .collect()
}

/// Two stores, two groups, 160 weeks of seasonal Poisson-ish counts.
fn data(seed: u64) -> DemandData {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let mut series = Vec::new();
    for store in 0..2u32 {
        for group in 0..2u32 {
            let level = 2.0 + 3.0 * store as f32 + group as f32;
            let units: Vec<f32> = (0..160)
                .map(|t| {
                    let season = 1.0 + 0.5 * (std::f32::consts::TAU * t as f32 / 52.18).sin();
                    (level * season * rng.random_range(0.5f32..1.5)).round()
                })
                .collect();
            let discount = units.iter().map(|&u| if u > 0.0 { 0.1 } else { f32::NAN }).collect();
            // Store 0 keeps a promotion calendar, store 1 none.
            let mut shares = || -> Vec<f32> {
                if store == 0 {
                    (0..160).map(|_| rng.random_range(0.0f32..1.0)).collect()
                } else {
                    Vec::new()
                }
            };
            let (display, mailer) = (shares(), shares());
            series.push(Series { store, group, start: 0, units, discount, display, mailer });
        }
    }
    DemandData { first_week: 2000, n_stores: 2, series }
}

#[test]
fn gradients_match_finite_differences() {
    for loss in [DemandLoss::Poisson, DemandLoss::Log1pSquared] {
        // With the network, and (for one loss) relative to the recent level.
        let model = DemandModel::new(DemandSpec {
            hidden_units: 3,
            trees: None,
            relative_to_recent: loss == DemandLoss::Log1pSquared,
            ..spec(loss)
        });
        let data = data(1);
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(2);
        let global: Vec<f32> =
            (0..model.n_global()).map(|_| rng.random_range(-0.1f32..0.1)).collect();
        let local = DemandLocal {
            store_level: vec![0.1, -0.2],
            series_level: vec![0.05, 0.0, -0.1, 0.2],
            series_season: (0..4 * 4).map(|_| rng.random_range(-0.1f32..0.1)).collect(),
            store_weights: (0..2 * model.n_weights())
                .map(|_| rng.random_range(-0.1f32..0.1))
                .collect(),
        };
        let mut checked = 0;
        for (si, t) in [(0, 60), (3, 3), (2, 100), (1, 40)] {
            let (g, l) = model.gradient(&global, &local, &data, si, t);
            // The Poisson step clips e^η - y to ±POISSON_GRADIENT_BOUND: the loss's gradient
            // only where that does not bite.
            if g[0].abs() >= POISSON_GRADIENT_BOUND - 1e-3 {
                continue;
            }
            checked += 1;
            let h = 1e-3f32;
            let fd = |perturb: &dyn Fn(&mut Vec<f32>, &mut DemandLocal, f32)| {
                let (mut gp, mut lp) = (global.clone(), local.clone());
                perturb(&mut gp, &mut lp, h);
                let plus = model.example_loss(&gp, &lp, &data, si, t);
                let (mut gm, mut lm) = (global.clone(), local.clone());
                perturb(&mut gm, &mut lm, -h);
                let minus = model.example_loss(&gm, &lm, &data, si, t);
                (plus - minus) / (2.0 * f64::from(h))
            };
            let check = |analytic: f32, numeric: f64, what: String| {
                let tol = 2e-2 * numeric.abs().max(1.0);
                assert!(
                    (f64::from(analytic) - numeric).abs() < tol,
                    "{loss:?} {what}: analytic {analytic}, finite difference {numeric}"
                );
            };
            for j in 0..model.n_global() {
                check(g[j], fd(&|g, _, d| g[j] += d), format!("global[{j}] at ({si}, {t})"));
            }
            for k in 0..2 {
                check(l.store_level[k], fd(&|_, l, d| l.store_level[k] += d), format!("store {k}"));
            }
            for k in 0..4 {
                check(
                    l.series_level[k],
                    fd(&|_, l, d| l.series_level[k] += d),
                    format!("series {k}"),
                );
            }
            for k in 0..l.series_season.len() {
                check(
                    l.series_season[k],
                    fd(&|_, l, d| l.series_season[k] += d),
                    format!("series season {k}"),
                );
            }
            for k in 0..l.store_weights.len() {
                check(
                    l.store_weights[k],
                    fd(&|_, l, d| l.store_weights[k] += d),
                    format!("store weight {k}"),
                );
            }
        }
        assert!(checked >= 2, "{loss:?}: only {checked} unclipped examples checked");
    }
}

#[test]
fn training_beats_naive_forecasts_and_never_sees_test_weeks() {
    for loss in [DemandLoss::Poisson, DemandLoss::Log1pSquared] {
        let model = DemandModel::new(spec(loss));
        let data = data(3);
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(4);
        let mut global = model.init_global(&mut rng);
        let mut local = model.init_local(&data, None);
        let stats = model.train(&mut global, &mut local, &data, 30, &mut rng);
        assert_eq!(stats.n_examples, 4 * 149, "weeks 1..150 of every series");
        let sums = model.evaluate(&global, &local, &data, 0);
        // 10 test weeks per series, each forecast from the 4 origins 1 to 4 weeks before it.
        assert_eq!(sums.n_ratings, 4 * 10 * 4);
        let seasonal = model.evaluate_naive(&data, Naive::Seasonal);
        assert_eq!(seasonal.n_ratings, sums.n_ratings);
        assert!(sums.wape() < seasonal.wape(), "{loss:?}: {} vs {}", sums.wape(), seasonal.wape());

        // Changing test weeks changes nothing that was trained.
        let mut altered = data.clone();
        for s in &mut altered.series {
            s.units[150..].iter_mut().for_each(|u| *u *= 10.0);
        }
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(4);
        let mut g2 = model.init_global(&mut rng);
        let mut l2 = model.init_local(&altered, None);
        model.train(&mut g2, &mut l2, &altered, 30, &mut rng);
        assert_eq!(global, g2);
        assert_eq!(local, l2);
    }
}

#[test]
fn forecasts_use_only_what_was_known_at_the_origin() {
    let model = DemandModel::new(spec(DemandLoss::Log1pSquared));
    let data = data(5);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(6);
    let mut global = model.init_global(&mut rng);
    let mut local = model.init_local(&data, None);
    model.train(&mut global, &mut local, &data, 5, &mut rng);
    let base = model.evaluate(&global, &local, &data, 0);
    // The last week is never an origin, so its value enters only as a target: raising it by
    // d changes the absolute error of each of its forecasts by at most d and nothing else.
    let mut altered = data.clone();
    for s in &mut altered.series {
        *s.units.last_mut().expect("weeks") += 100.0;
    }
    let moved = model.evaluate(&global, &local, &altered, 0);
    assert_eq!(moved.n_ratings, base.n_ratings);
    let forecasts_of_last_week = 4 * 4;
    assert!(
        (moved.absolute_error - base.absolute_error).abs()
            <= 100.0 * forecasts_of_last_week as f64 + 1e-3
    );
    assert!((moved.actual_sum - base.actual_sum - 100.0 * 16.0).abs() < 1e-6);
}

#[test]
fn seasonal_naive_repeats_last_year() {
    let model =
        DemandModel::new(DemandSpec { first_test_week: 2052 + 60, ..spec(DemandLoss::Poisson) });
    let units: Vec<f32> = (0..120).map(|t| (t % 52) as f32).collect();
    let series = Series {
        store: 0,
        group: 0,
        start: 0,
        discount: vec![f32::NAN; 120],
        units,
        display: Vec::new(),
        mailer: Vec::new(),
    };
    let data = DemandData { first_week: 2052, n_stores: 1, series: vec![series] };
    let sums = model.evaluate_naive(&data, Naive::Seasonal);
    assert!(sums.n_ratings > 0);
    assert_eq!(sums.absolute_error, 0.0);
    let ma = model.evaluate_naive(&data, Naive::MovingAverage(1));
    // A one-week moving average forecasts y_origin for every horizon: error h per forecast
    // (the series rises by one a week; no wrap-around in weeks 56..120 except at 104).
    assert!(ma.absolute_error > 0.0);
}

#[test]
fn hindsight_median_is_the_best_constant_and_zero_on_sparse_series() {
    let model =
        DemandModel::new(DemandSpec { first_test_week: 2052 + 60, ..spec(DemandLoss::Poisson) });
    let first = 60;
    // Sales in 10 of the 60 test weeks: the median of the test weeks is zero.
    let sparse: Vec<f32> = (0..120).map(|t| if t % 6 == 0 { 4.0 } else { 0.0 }).collect();
    // Sales every test week, 1 to 5 units: the median is 3.
    let dense: Vec<f32> = (0..120).map(|t| (t % 5 + 1) as f32).collect();
    let data = |units: Vec<f32>| DemandData {
        first_week: 2052,
        n_stores: 1,
        series: vec![Series {
            store: 0,
            group: 0,
            start: 0,
            discount: vec![f32::NAN; 120],
            units,
            display: Vec::new(),
            mailer: Vec::new(),
        }],
    };
    let sparse_sums = model.evaluate_naive(&data(sparse), Naive::HindsightMedian);
    assert!(sparse_sums.actual_sum > 0.0);
    assert_eq!(sparse_sums.wape(), 1.0, "zero forecasts on a zero-median series");
    let dense_data = data(dense.clone());
    let best = model.evaluate_naive(&dense_data, Naive::HindsightMedian);
    // Every test week is forecast `horizon` times; the constant 3 misses by |y - 3|.
    let per_pass: f32 = dense[first..].iter().map(|y| (y - 3.0).abs()).sum();
    assert!((best.absolute_error - 4.0 * f64::from(per_pass)).abs() < 1e-6, "{best:?}");
}

#[test]
fn validation_names_fields() {
    let mut s = spec(DemandLoss::Poisson);
    s.groups.push("a".into());
    assert_eq!(s.validate().unwrap_err().field, "model.groups");
    let mut s = spec(DemandLoss::Poisson);
    s.horizon = 0;
    assert_eq!(s.validate().unwrap_err().field, "model.horizon");
    assert!(spec(DemandLoss::Poisson).validate().is_ok());
    assert_eq!(week_of_day(4), 0, "1970-01-05 is a Monday");
    assert_eq!(week_of_day(10), 0);
    assert_eq!(week_of_day(11), 1);
    assert_eq!(week_of_day(3), -1);
}

#[test]
fn only_planned_discounts_of_the_target_week_enter_the_forecast() {
    let data = data(7);
    let mut altered = data.clone();
    // Raise the discount of every test week (weeks 150..160).
    for s in &mut altered.series {
        s.discount[150..].iter_mut().for_each(|d| *d = 0.5);
    }
    for planned in [false, true] {
        let model = DemandModel::new(DemandSpec {
            planned_discounts: planned,
            ..spec(DemandLoss::Log1pSquared)
        });
        let mut global = vec![0.0; model.n_global()];
        global[DISCOUNT_AT] = 1.0;
        global[0] = 1.0;
        let local = model.init_local(&data, None);
        let (a, b) = (
            model.evaluate(&global, &local, &data, 0),
            model.evaluate(&global, &local, &altered, 0),
        );
        // Lagged discounts: origins before week 150 cannot see test-week discounts, but later
        // origins see earlier test weeks' discounts; forecasts from origin 149 are unchanged.
        assert_eq!(a.n_ratings, b.n_ratings);
        if planned {
            assert!(b.absolute_error != a.absolute_error, "planned discounts are used");
        }
        let first = |d: &DemandData| {
            let mut one = d.clone();
            one.series.truncate(1);
            one.series[0].units.truncate(151);
            one.series[0].discount.truncate(151);
            one.series[0].display.truncate(151);
            one.series[0].mailer.truncate(151);
            model.evaluate(&global, &model.init_local(&one, None), &one, 0).absolute_error
        };
        // Week 150 alone as the target: its own discount matters only when planned.
        assert_eq!(first(&data) != first(&altered), planned);
    }
}

#[test]
fn the_target_weeks_promotions_enter_the_forecast_and_are_checked() {
    let data = data(8);
    let model = DemandModel::new(spec(DemandLoss::Log1pSquared));
    assert!(model.check_data(&data).is_ok());
    let (mut global, local) = (vec![0.0; model.n_global()], model.init_local(&data, None));
    global[0] = 1.0;
    for at in [DISPLAY_AT, MAILER_AT] {
        global[at] = 1.0;
    }
    // Only week 150 of store 0's first series changes: the promotion of the target week is
    // planned, so forecasts of week 150 move and no other.
    let mut altered = data.clone();
    altered.series[0].display[150] = 1.0 - data.series[0].display[150];
    let week_150 = |d: &DemandData| {
        let mut one = d.clone();
        one.series.truncate(1);
        let s = &mut one.series[0];
        for v in [&mut s.units, &mut s.discount, &mut s.display, &mut s.mailer] {
            v.truncate(151);
        }
        model.evaluate(&global, &local, &one, 0).absolute_error
    };
    assert_ne!(week_150(&data), week_150(&altered));
    let mut bad = data.clone();
    bad.series[0].mailer[3] = 1.5;
    assert!(model.check_data(&bad).unwrap_err().contains("mailer"));
    bad.series[0].mailer.truncate(10);
    assert!(model.check_data(&bad).unwrap_err().contains("length"));
}

#[test]
fn median_forecasts_of_whole_units_are_whole() {
    let model =
        DemandModel::new(DemandSpec { whole_units: true, ..spec(DemandLoss::Log1pAbsolute) });
    assert_eq!(model.forecast(0.03f32.ln_1p()), 0.0);
    assert_eq!(model.forecast(2.6f32.ln_1p()), 3.0);
    let fractional = DemandModel::new(spec(DemandLoss::Log1pAbsolute));
    assert!((fractional.forecast(0.03f32.ln_1p()) - 0.03).abs() < 1e-6);
}

#[test]
fn weeks_before_a_series_start_are_never_used() {
    let model = DemandModel::new(spec(DemandLoss::Log1pAbsolute));
    let mut data = data(9);
    for s in &mut data.series {
        s.start = 70;
    }
    let mut padded = data.clone();
    for s in &mut padded.series {
        s.units[..70].iter_mut().for_each(|u| *u = 1000.0);
        s.discount[..70].iter_mut().for_each(|d| *d = 0.9);
    }
    let fit = |d: &DemandData| {
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(10);
        let mut global = model.init_global(&mut rng);
        let mut local = model.init_local(d, None);
        let stats = model.train(&mut global, &mut local, d, 5, &mut rng);
        (global, local, stats.n_examples, model.evaluate_naive(d, Naive::Seasonal))
    };
    let (a, b) = (fit(&data), fit(&padded));
    assert_eq!(a.2, 4 * (150 - 71), "targets are weeks 71..150");
    assert_eq!(a, b);
    let sums = model.evaluate(&a.0, &a.1, &padded, 0);
    assert_eq!(sums, model.evaluate(&a.0, &a.1, &data, 0));
}

#[test]
fn later_epochs_take_smaller_steps() {
    let data = data(11);
    let fit = |model: &DemandModel, before: u64| {
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(12);
        let mut global = model.init_global(&mut rng);
        let mut local = model.init_local(&data, None);
        model.train_from(&mut global, &mut local, &data, 1, before, &mut rng);
        global
    };
    // Epoch 90 steps with a tenth of the rate of epoch 0 (1 + 90/10 = 10).
    let model = DemandModel::new(spec(DemandLoss::Log1pSquared));
    let slow =
        DemandModel::new(DemandSpec { learning_rate: 0.0003, ..spec(DemandLoss::Log1pSquared) });
    let (late, tenth, first) = (fit(&model, 90), fit(&slow, 0), fit(&model, 0));
    for (a, b) in late.iter().zip(&tenth) {
        assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{a} vs {b}");
    }
    assert_ne!(late, first);
}

/// Boosted trees federated as the coordinator runs them (each store's histogram, their mean,
/// `TaskSpec::model_delta`, `x += 1 · delta`) give the same model as growing them on the
/// pooled data, and that model forecasts better than the 4-week moving average it starts from.
#[test]
fn federated_trees_are_the_pooled_trees_and_beat_the_moving_average() {
    use crate::plan::{ModelSpec, TaskSpec, TrainingPlan};
    let spec = DemandSpec {
        harmonics: 0,
        relative_to_recent: true,
        loss: DemandLoss::Log1pAbsolute,
        whole_units: true,
        trees: Some(TreeSpec {
            trees: 5,
            depth: 2,
            bins: 16,
            shrinkage: 0.3,
            min_child_share: 0.0,
        }),
        ..spec(DemandLoss::Log1pAbsolute)
    };
    let model = DemandModel::new(spec.clone());
    let mut task = TaskSpec {
        name: "trees".into(),
        model: ModelSpec::Demand(spec),
        plan: TrainingPlan::new(10, 2, 2, 1e7),
        privacy: None,
    };
    assert!(task.validate().is_err(), "trees refuse example weights");
    task.plan.weight_by_examples = false;
    task.validate().unwrap();
    assert_eq!(task.upload_len(), 2 * 2 * 11 * 16, "gradients and counts per node, feature, bin");

    let pooled = data(7);
    let stores = per_store(&pooled);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(3);
    let mut federated = model.init_global(&mut rng);
    for _ in 0..task.plan.rounds {
        let mut mean = vec![0.0f32; task.upload_len()];
        for store in &stores {
            let (h, n) = model.tree_histograms(&federated, store);
            assert!(n > 0);
            mean.iter_mut().zip(&h).for_each(|(m, v)| *m += v / 2.0);
        }
        let delta = task.model_delta(&federated, mean);
        federated.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
    }
    let mut central = model.init_global(&mut rng);
    let mut local = model.init_local(&pooled, None);
    model.train(&mut central, &mut local, &pooled, 1, &mut rng);
    assert_eq!(federated[0], 10.0, "every level grown");
    let close = federated.iter().zip(&central).all(|(a, b)| (a - b).abs() < 1e-5);
    assert!(close, "federated trees differ from the pooled ones");

    let trees = model.evaluate(&federated, &local, &pooled, 0).wape();
    let average = model.evaluate_naive(&pooled, Naive::MovingAverage(4)).wape();
    assert!(trees < average, "trees {trees} against the moving average {average}");
}

/// A LAD task as the coordinator runs it (each store's statistics, their mean,
/// `TaskSpec::model_delta`, `x += 1 · delta`): with one store it is that store's own IRLS
/// fit, with two it learns the display effect and forecasts better than the 4-week moving
/// average.
#[test]
fn federated_lad_is_the_stores_own_fit_and_beats_the_moving_average() {
    use crate::plan::{ModelSpec, TaskSpec, TrainingPlan};
    let spec = DemandSpec {
        harmonics: 0,
        relative_to_recent: true,
        loss: DemandLoss::Log1pAbsolute,
        whole_units: true,
        lad: Some(LadSpec::default()),
        ..spec(DemandLoss::Log1pAbsolute)
    };
    let model = DemandModel::new(spec.clone());
    let mut task = TaskSpec {
        name: "lad".into(),
        model: ModelSpec::Demand(spec.clone()),
        plan: TrainingPlan::new(4, 2, 2, 1e7),
        privacy: None,
    };
    assert!(task.validate().is_err(), "LAD refuses example weights");
    task.plan.weight_by_examples = false;
    task.validate().unwrap();
    assert_eq!(task.upload_len(), 55 + 10, "a triangle of 10 features and their moments");
    let with_trees = DemandSpec { trees: Some(TreeSpec::default()), ..spec };
    assert!(with_trees.validate().is_err(), "LAD and trees exclude each other");

    let mut pooled = data(7);
    // Displays triple a week's sales at most.
    for s in &mut pooled.series {
        for (u, d) in s.units.iter_mut().zip(&s.display) {
            *u = (*u * (1.0 + 2.0 * d)).round();
        }
    }
    let stores = per_store(&pooled);
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(3);
    let federate = |stores: &[DemandData]| {
        let mut global = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(1));
        for _ in 0..task.plan.rounds {
            let mut mean = vec![0.0f32; task.upload_len()];
            for store in stores {
                let (s, n) = model.store_statistics(&global, store);
                assert!(n > 0);
                mean.iter_mut().zip(&s).for_each(|(m, v)| *m += v / stores.len() as f32);
            }
            let delta = task.model_delta(&global, mean);
            global.iter_mut().zip(&delta).for_each(|(x, d)| *x += d);
        }
        global
    };

    let alone = federate(&stores[..1]);
    let mut own = model.init_global(&mut rng);
    let mut local = model.init_local(&stores[0], None);
    model.train(&mut own, &mut local, &stores[0], 4, &mut rng);
    assert!(own.iter().any(|&v| v != 0.0), "the fit moved");
    let close = alone.iter().zip(&own).all(|(a, b)| (a - b).abs() < 1e-4);
    assert!(close, "one store's federated fit {alone:?} differs from its own {own:?}");

    let federated = federate(&stores);
    let local = model.init_local(&pooled, None);
    let lad = model.evaluate(&federated, &local, &pooled, 0).wape();
    let average = model.evaluate_naive(&pooled, Naive::MovingAverage(4)).wape();
    assert!(lad < average, "LAD {lad} against the moving average {average}");
}
