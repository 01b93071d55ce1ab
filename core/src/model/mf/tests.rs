//! Tests of the matrix-factorisation recommender.

use super::*;
use ndarray::Array1;

fn spec(n_items: usize, dim: usize) -> MfSpec {
    MfSpec {
        n_items,
        dim,
        learning_rate: 0.01,
        regularization: 0.05,
        init_std: 0.1,
        rating_min: 1.0,
        rating_max: 5.0,
        init_mean: 0.0,
        local_item_offsets: None,
        objective: crate::model::mf::Objective::Rating,
        category_affinity: None,
    }
}

/// Every parameter's SGD move equals `-lr` times the central finite difference of the loss.
#[test]
fn sgd_step_follows_the_finite_difference_gradient() {
    let (mu, bu, bi, r, reg) = (3.1f32, 0.2f32, -0.3f32, 4.0f32, 0.05f32);
    let p0 = [0.3f32, -0.2, 0.5];
    let q0 = [0.1f32, 0.4, -0.6];
    let lr = 1e-3f32;
    let h = 1e-3f32;

    let (mut mu1, mut bu1, mut bi1) = (mu, bu, bi);
    let mut p1 = Array1::from(p0.to_vec());
    let mut q1 = Array1::from(q0.to_vec());
    sgd_step(&mut mu1, &mut bu1, &mut bi1, p1.view_mut(), q1.view_mut(), r, lr, reg);

    let loss =
        |mu: f32, bu: f32, bi: f32, p: &[f32], q: &[f32]| rating_loss(mu, bu, bi, p, q, r, reg);
    let fd = |f: &dyn Fn(f32) -> f64| (f(h) - f(-h)) / (2.0 * f64::from(h));
    let check = |name: &str, moved: f32, start: f32, grad: f64| {
        let step = f64::from(moved - start);
        assert!(
            (step + f64::from(lr) * grad).abs() < 2e-6,
            "{name}: step {step}, -lr*grad {}",
            -f64::from(lr) * grad
        );
    };
    check("mu", mu1, mu, fd(&|d| loss(mu + d, bu, bi, &p0, &q0)));
    check("b_u", bu1, bu, fd(&|d| loss(mu, bu + d, bi, &p0, &q0)));
    check("b_i", bi1, bi, fd(&|d| loss(mu, bu, bi + d, &p0, &q0)));
    for k in 0..3 {
        let dp = fd(&|d| {
            let mut p = p0;
            p[k] += d;
            loss(mu, bu, bi, &p, &q0)
        });
        check("p", p1[k], p0[k], dp);
        let dq = fd(&|d| {
            let mut q = q0;
            q[k] += d;
            loss(mu, bu, bi, &p0, &q)
        });
        check("q", q1[k], q0[k], dq);
    }
}

/// Low-rank synthetic ratings: `3 + u_k · v_k` rounded to the scale.
fn synthetic(n_users: usize, n_items: usize, per_user: usize, seed: u64) -> MfData {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let uf: Vec<[f32; 2]> =
        (0..n_users).map(|_| [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]).collect();
    let vf: Vec<[f32; 2]> =
        (0..n_items).map(|_| [rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)]).collect();
    let mut data = MfData {
        user_seeds: (0..n_users as u64).map(|u| user_seed(&u.to_string())).collect(),
        ..MfData::default()
    };
    for (u, uf_u) in uf.iter().enumerate() {
        for j in 0..per_user {
            let i = (u * 7 + j * 13) % n_items;
            let value = (3.0 + 1.5 * (uf_u[0] * vf[i][0] + uf_u[1] * vf[i][1])).clamp(1.0, 5.0);
            let r = Rating { user: u as u32, item: i as u32, value, timestamp: j as i64 };
            if j % 5 == 0 { data.test.push(r) } else { data.train.push(r) }
        }
    }
    data
}

#[test]
fn training_lowers_held_out_error() {
    let data = synthetic(60, 150, 40, 1);
    let model = MfModel::new(spec(150, 4));
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(2);
    let mut global = model.init_global(&mut rng);
    let mut local = model.init_local(&data, None);
    let before = model.evaluate(&global, &local, &data, 0).rmse();
    let stats = model.train(&mut global, &mut local, &data, 40, &mut rng);
    let after = model.evaluate(&global, &local, &data, 0).rmse();
    assert_eq!(stats.n_examples, data.train.len());
    assert!(after < 0.6 * before, "rmse {before} -> {after}");
    assert!(model.check_data(&data).is_ok());
}

#[test]
fn user_initialisation_depends_only_on_the_user() {
    let model = MfModel::new(spec(10, 3));
    let a = MfData { user_seeds: vec![user_seed("7"), user_seed("9")], ..MfData::default() };
    let b = MfData { user_seeds: vec![user_seed("9")], ..MfData::default() };
    let (la, lb) = (model.init_local(&a, None), model.init_local(&b, None));
    assert_eq!(la.user_factors.row(1), lb.user_factors.row(0));
    assert_ne!(la.user_factors.row(0), lb.user_factors.row(0));
}

#[test]
fn a_model_that_knows_the_target_ranks_it_first() {
    let model = MfModel::new(spec(200, 1));
    let data = MfData {
        user_seeds: vec![1],
        train: vec![Rating { user: 0, item: 3, value: 4.0, timestamp: 1 }],
        test: vec![
            Rating { user: 0, item: 5, value: 5.0, timestamp: 9 },
            Rating { user: 0, item: 6, value: 2.0, timestamp: 2 },
        ],
    };
    let mut global = vec![0.0; model.n_global()];
    global[1 + 5] = 10.0; // item 5, the newest held-out item, gets a huge bias
    let local = model.init_local(&data, None);
    let sums = model.evaluate(&global, &local, &data, 42);
    assert_eq!((sums.n_ranked, sums.hits_at_10, sums.ndcg_at_10), (1, 1.0, 1.0));
    assert_eq!(sums.n_ratings, 2);
    global[1 + 5] = -10.0;
    let sums = model.evaluate(&global, &local, &data, 42);
    assert_eq!(sums.hits_at_10, 0.0);
}

#[test]
fn out_of_range_items_are_reported() {
    let model = MfModel::new(spec(5, 2));
    let data = MfData {
        user_seeds: vec![1],
        train: vec![Rating { user: 0, item: 5, value: 4.0, timestamp: 0 }],
        test: vec![],
    };
    assert_eq!(model.check_data(&data).unwrap_err(), "item id 5 is not below the task's n_items 5");
}

/// Store-local item offsets are the shrunken mean residual of the store's own training ratings,
/// and only a spec that asks for them changes predictions.
#[test]
fn local_item_offsets_shrink_the_store_residual() {
    let rating = |user, item, value| Rating { user, item, value, timestamp: 0 };
    let data = MfData {
        user_seeds: vec![1, 2],
        // Item 0 is rated 4 by both users, item 1 never.
        train: vec![rating(0, 0, 4.0), rating(1, 0, 4.0)],
        test: vec![rating(0, 0, 4.0)],
    };
    let mut s = spec(2, 1);
    s.init_std = 0.0;
    let plain = MfModel::new(s.clone());
    let global = vec![3.0, 0.0, 0.0, 0.0, 0.0]; // μ = 3, no biases, zero factors
    let local = plain.init_local(&data, None);
    assert_eq!(plain.local_item_offsets(&global, &local, &data), None);
    s.local_item_offsets = Some(2.0);
    let model = MfModel::new(s);
    // Two residuals of 1 shrunk by λ = 2: 2 / (2 + 2).
    assert_eq!(model.local_item_offsets(&global, &local, &data), Some(vec![0.5, 0.0]));
    let (before, after) =
        (plain.evaluate(&global, &local, &data, 0), model.evaluate(&global, &local, &data, 0));
    assert!((before.rmse() - 1.0).abs() < 1e-9 && (after.rmse() - 0.5).abs() < 1e-9);
}

/// Issue 12: a customer-level round keeps each sampled customer's clipped contribution on its
/// own (what the distributed discrete Gaussian rounds one by one): one per sampled customer,
/// each within the clipping norm, adding up to the store's sum.
#[test]
fn customer_parts_are_clipped_and_add_up_to_the_sum() {
    let data = synthetic(40, 50, 20, 3);
    let model = MfModel::new(spec(50, 2));
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(4);
    let global = model.init_global(&mut rng);
    let mut local = model.init_local(&data, None);
    let by_user = RatingsByUser::new(&data);
    let clip = 0.05;
    let round = model.customer_round(&global, &mut local, &data, &by_user, 0.5, 2, clip, &mut rng);
    assert_eq!(round.parts().len(), round.n_sampled());
    assert!(round.n_sampled() > 5);
    let mut total = vec![0.0; round.sum().len()];
    for part in round.parts() {
        let norm = part.iter().map(|(_, v)| v * v).sum::<f64>().sqrt();
        assert!(norm <= f64::from(clip) + 1e-9, "{norm}");
        for &(i, v) in part {
            total[i as usize] += v;
        }
    }
    for (a, b) in total.iter().zip(round.sum()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}
