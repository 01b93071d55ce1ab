//! Small dense linear algebra on row-major `f64` matrices: the Cholesky solve of the ranking
//! recommender's ALS and of the demand LAD model, and the projection of a symmetric matrix onto
//! the positive semi-definite ones (cyclic Jacobi rotations), which the LAD server step needs
//! because Gaussian noise can make a summed Gram matrix indefinite. The matrices are at most a
//! few hundred wide; a LAPACK binding or nalgebra would add a heavy dependency for that.

/// Solves `a x = b` in place for a symmetric positive definite `a` (`d × d`, row-major; only
/// its upper triangle is read) by Cholesky, `a = UᵀU` with `U` upper triangular and stored
/// over `a`'s upper triangle; `b` becomes `x`. Returns false (and leaves `b` unusable) if `a`
/// is not positive definite. Row-oriented, so every inner loop runs over contiguous memory.
pub(crate) fn cholesky_solve(a: &mut [f64], b: &mut [f64], d: usize) -> bool {
    for j in 0..d {
        let diag = a[j * d + j];
        if diag <= 0.0 || !diag.is_finite() {
            return false;
        }
        let diag = diag.sqrt();
        let (done, rest) = a.split_at_mut((j + 1) * d);
        let uj = &mut done[j * d..];
        uj[j] = diag;
        uj[j + 1..].iter_mut().for_each(|v| *v /= diag);
        // The trailing rows lose row j's outer product: a[i][i..] −= U[j][i] · U[j][i..].
        for i in j + 1..d {
            let uji = uj[i];
            let row = &mut rest[(i - j - 1) * d..(i - j) * d];
            for (v, &u) in row[i..].iter_mut().zip(&uj[i..]) {
                *v -= uji * u;
            }
        }
    }
    // Uᵀ z = b, then U x = z.
    for k in 0..d {
        let z = b[k] / a[k * d + k];
        b[k] = z;
        for (v, &u) in b[k + 1..].iter_mut().zip(&a[k * d + k + 1..(k + 1) * d]) {
            *v -= z * u;
        }
    }
    for i in (0..d).rev() {
        let row = &a[i * d..(i + 1) * d];
        let s: f64 = row[i + 1..].iter().zip(&b[i + 1..]).map(|(u, x)| u * x).sum();
        b[i] = (b[i] - s) / row[i];
    }
    true
}

/// Replaces the symmetric `a` (`d × d`, row-major, both triangles) with its nearest positive
/// semi-definite matrix in the Frobenius norm: the same eigenvectors, negative eigenvalues set
/// to 0. The eigenvectors come from cyclic Jacobi rotations, which converge quadratically and
/// are accurate to rounding for the small matrices used here. Non-finite entries give a
/// non-finite result (the caller's Cholesky then refuses it).
pub(crate) fn project_psd(a: &mut [f64], d: usize) {
    assert_eq!(a.len(), d * d, "a is d × d");
    if a.iter().any(|v| !v.is_finite()) {
        return;
    }
    // v accumulates the rotations: a = v diag(λ) vᵀ at the end.
    let mut v = vec![0.0; d * d];
    (0..d).for_each(|i| v[i * d + i] = 1.0);
    let scale: f64 = a.iter().map(|x| x * x).sum::<f64>().max(f64::MIN_POSITIVE);
    for _sweep in 0..100 {
        let off: f64 = (0..d)
            .flat_map(|i| (0..d).map(move |j| (i, j)))
            .filter(|(i, j)| i != j)
            .map(|(i, j)| a[i * d + j].powi(2))
            .sum();
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..d {
            for q in p + 1..d {
                let apq = a[p * d + q];
                if apq == 0.0 {
                    continue;
                }
                // The rotation in the (p, q) plane that zeroes a[p][q] (Numerical Recipes §11.1).
                let theta = (a[q * d + q] - a[p * d + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..d {
                    let (akp, akq) = (a[k * d + p], a[k * d + q]);
                    a[k * d + p] = c * akp - s * akq;
                    a[k * d + q] = s * akp + c * akq;
                    let (vkp, vkq) = (v[k * d + p], v[k * d + q]);
                    v[k * d + p] = c * vkp - s * vkq;
                    v[k * d + q] = s * vkp + c * vkq;
                }
                for k in 0..d {
                    let (apk, aqk) = (a[p * d + k], a[q * d + k]);
                    a[p * d + k] = c * apk - s * aqk;
                    a[q * d + k] = s * apk + c * aqk;
                }
            }
        }
    }
    let values: Vec<f64> = (0..d).map(|i| a[i * d + i].max(0.0)).collect();
    for i in 0..d {
        for j in 0..d {
            a[i * d + j] = (0..d).map(|k| v[i * d + k] * values[k] * v[j * d + k]).sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_solves_a_known_system() {
        let mut a = vec![4.0, 2.0, 2.0, 3.0];
        let mut b = vec![2.0, 1.0];
        assert!(cholesky_solve(&mut a, &mut b, 2));
        assert!((b[0] - 0.5).abs() < 1e-12 && b[1].abs() < 1e-12, "{b:?}");
        let mut singular = vec![1.0, 1.0, 1.0, 1.0];
        assert!(!cholesky_solve(&mut singular, &mut [1.0, 1.0], 2));
        // A larger system, reading only the upper triangle: a = mᵀm + I, checked by residual.
        let d = 6;
        let m: Vec<f64> = (0..d * d).map(|k| ((k * 7919) % 13) as f64 / 13.0 - 0.5).collect();
        let full: Vec<f64> = (0..d * d)
            .map(|k| {
                let (i, j) = (k / d, k % d);
                (0..d).map(|r| m[r * d + i] * m[r * d + j]).sum::<f64>() + f64::from(i == j)
            })
            .collect();
        let mut upper: Vec<f64> = full
            .iter()
            .enumerate()
            .map(|(k, &v)| if k % d >= k / d { v } else { f64::NAN })
            .collect();
        let rhs: Vec<f64> = (0..d).map(|i| i as f64 - 2.0).collect();
        let mut x = rhs.clone();
        assert!(cholesky_solve(&mut upper, &mut x, d));
        for i in 0..d {
            let ax: f64 = (0..d).map(|j| full[i * d + j] * x[j]).sum();
            assert!((ax - rhs[i]).abs() < 1e-10, "row {i}: {ax} vs {}", rhs[i]);
        }
    }

    /// `q diag(λ) qᵀ` for an orthogonal `q` built from two rotations, and `λ`.
    fn with_eigenvalues(values: &[f64]) -> Vec<f64> {
        let d = values.len();
        let mut q = vec![0.0; d * d];
        (0..d).for_each(|i| q[i * d + i] = 1.0);
        for (p, r, angle) in [(0, 2, 0.7f64), (1, 2, -0.4), (0, 1, 1.1)] {
            let (c, s) = (angle.cos(), angle.sin());
            for k in 0..d {
                let (a, b) = (q[k * d + p], q[k * d + r]);
                q[k * d + p] = c * a - s * b;
                q[k * d + r] = s * a + c * b;
            }
        }
        (0..d * d)
            .map(|k| (0..d).map(|m| q[(k / d) * d + m] * values[m] * q[(k % d) * d + m]).sum())
            .collect()
    }

    #[test]
    fn projection_keeps_a_positive_matrix_and_drops_negative_eigenvalues() {
        let positive = with_eigenvalues(&[3.0, 1.0, 0.5]);
        let mut a = positive.clone();
        project_psd(&mut a, 3);
        assert!(a.iter().zip(&positive).all(|(x, y)| (x - y).abs() < 1e-12), "{a:?}");
        // Eigenvalues 3, -2, 0.5 project to 3, 0, 0.5.
        let mut a = with_eigenvalues(&[3.0, -2.0, 0.5]);
        project_psd(&mut a, 3);
        let expected = with_eigenvalues(&[3.0, 0.0, 0.5]);
        assert!(a.iter().zip(&expected).all(|(x, y)| (x - y).abs() < 1e-12), "{a:?}");
        // The indefinite matrix has no Cholesky factor; its projection plus a ridge has one.
        let mut indefinite = with_eigenvalues(&[3.0, -2.0, 0.5]);
        assert!(!cholesky_solve(&mut indefinite, &mut [1.0, 1.0, 1.0], 3));
        a.iter_mut().step_by(4).for_each(|v| *v += 1e-6);
        assert!(cholesky_solve(&mut a, &mut [1.0, 1.0, 1.0], 3));
    }

    #[test]
    fn projection_of_a_non_finite_matrix_stays_non_finite() {
        let mut a = vec![1.0, f64::NAN, f64::NAN, 1.0];
        project_psd(&mut a, 2);
        assert!(!cholesky_solve(&mut a, &mut [1.0, 1.0], 2));
    }
}
