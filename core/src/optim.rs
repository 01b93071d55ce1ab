//! Server optimisers: how the averaged client delta becomes the next global model.
//!
//! Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2: the averaged delta is a
//! pseudo-gradient (pointing downhill), applied by FedAvg (plain step), FedAvgM (heavy-ball
//! momentum) or FedAdam.

use serde::{Deserialize, Serialize};

/// Which server optimiser a task uses, with its hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ServerOptimizer {
    /// `x += lr * delta`. With `lr = 1` this is McMahan et al. 2017.
    FedAvg {
        /// Server learning rate.
        learning_rate: f32,
    },
    /// `m = momentum * m + delta; x += lr * m`.
    FedAvgM {
        /// Server learning rate.
        learning_rate: f32,
        /// Momentum coefficient in [0, 1).
        momentum: f32,
    },
    /// Adam on the pseudo-gradient, with adaptivity `tau`.
    FedAdam {
        /// Server learning rate.
        learning_rate: f32,
        /// First-moment decay.
        beta1: f32,
        /// Second-moment decay.
        beta2: f32,
        /// Adaptivity (epsilon in Adam); Reddi et al. use 1e-3.
        tau: f32,
    },
}

impl ServerOptimizer {
    /// Checks the hyper-parameters, returning a message naming the bad one.
    ///
    /// # Errors
    ///
    /// A description of the first out-of-range value.
    pub fn validate(&self) -> Result<(), String> {
        let lr = match *self {
            ServerOptimizer::FedAvg { learning_rate } => learning_rate,
            ServerOptimizer::FedAvgM { learning_rate, momentum } => {
                if !(0.0..1.0).contains(&momentum) {
                    return Err(format!("momentum must be in [0, 1), got {momentum}"));
                }
                learning_rate
            }
            ServerOptimizer::FedAdam { learning_rate, beta1, beta2, tau } => {
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return Err(format!(
                        "beta1 and beta2 must be in [0, 1), got {beta1} and {beta2}"
                    ));
                }
                if !(tau > 0.0 && tau.is_finite()) {
                    return Err(format!("tau must be positive, got {tau}"));
                }
                learning_rate
            }
        };
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(format!("server learning_rate must be positive, got {lr}"));
        }
        Ok(())
    }
}

/// Optimiser state kept between rounds (momentum and moment buffers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OptimizerState {
    /// First moment / momentum buffer (empty until first used).
    pub m: Vec<f32>,
    /// Second moment (FedAdam only).
    pub v: Vec<f32>,
    /// Steps taken.
    pub t: u64,
}

/// Applies one server step to `model` in place.
///
/// # Panics
///
/// If `delta` and `model` differ in length (the aggregator guarantees they do not).
pub fn apply(opt: &ServerOptimizer, state: &mut OptimizerState, model: &mut [f32], delta: &[f32]) {
    assert_eq!(model.len(), delta.len(), "delta and model must have the same shape");
    state.t += 1;
    match *opt {
        ServerOptimizer::FedAvg { learning_rate } => {
            for (x, d) in model.iter_mut().zip(delta) {
                *x += learning_rate * d;
            }
        }
        ServerOptimizer::FedAvgM { learning_rate, momentum } => {
            state.m.resize(model.len(), 0.0);
            for ((x, d), m) in model.iter_mut().zip(delta).zip(&mut state.m) {
                *m = momentum * *m + d;
                *x += learning_rate * *m;
            }
        }
        ServerOptimizer::FedAdam { learning_rate, beta1, beta2, tau } => {
            state.m.resize(model.len(), 0.0);
            state.v.resize(model.len(), 0.0);
            for (((x, d), m), v) in model.iter_mut().zip(delta).zip(&mut state.m).zip(&mut state.v)
            {
                *m = beta1 * *m + (1.0 - beta1) * d;
                *v = beta2 * *v + (1.0 - beta2) * d * d;
                *x += learning_rate * *m / (v.sqrt() + tau);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fedavg_steps_by_the_learning_rate() {
        let mut x = vec![1.0, 2.0];
        apply(
            &ServerOptimizer::FedAvg { learning_rate: 0.5 },
            &mut OptimizerState::default(),
            &mut x,
            &[2.0, -2.0],
        );
        assert_eq!(x, vec![2.0, 1.0]);
    }

    #[test]
    fn fedavgm_accumulates_momentum() {
        let opt = ServerOptimizer::FedAvgM { learning_rate: 1.0, momentum: 0.5 };
        let mut st = OptimizerState::default();
        let mut x = vec![0.0];
        apply(&opt, &mut st, &mut x, &[1.0]);
        apply(&opt, &mut st, &mut x, &[1.0]);
        // m1 = 1, m2 = 1.5; x = 2.5
        assert_eq!(x, vec![2.5]);
    }

    #[test]
    fn fedadam_first_step_moves_by_about_the_learning_rate() {
        let opt =
            ServerOptimizer::FedAdam { learning_rate: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
        let mut st = OptimizerState::default();
        let mut x = vec![0.0, 0.0];
        apply(&opt, &mut st, &mut x, &[4.0, -4.0]);
        // m = 0.4, v = 0.16, step = 0.1 * 0.4 / (0.4 + 1e-3)
        assert!((x[0] - 0.1 * 0.4 / 0.401).abs() < 1e-6, "{x:?}");
        assert!((x[1] + 0.1 * 0.4 / 0.401).abs() < 1e-6, "{x:?}");
        assert!(opt.validate().is_ok());
        assert!(ServerOptimizer::FedAvgM { learning_rate: 1.0, momentum: 1.0 }.validate().is_err());
    }
}
