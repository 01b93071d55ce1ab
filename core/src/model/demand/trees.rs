//! Federated gradient-boosted trees for demand ([`TreeSpec`]): histograms of gradients
//! summed over stores, splits chosen by the coordinator.
//!
//! The model forecasts `η = ℓ(4-week mean) + Σ_trees leaf(z)`, the same offset as
//! [`DemandSpec::relative_to_recent`](super::DemandSpec::relative_to_recent), so a model that
//! learns nothing forecasts the moving average. `z` are the network's inputs (the recent
//! level, each lag and longer window relative to it, discount, display and mailer shares) and
//! the product group, each cut into `bins` fixed bins ([`TreeSpec::bins`]); fixed, so no store
//! reveals its quantiles.
//!
//! Trees are grown level by level, one level per round. In the round that grows level `l` of
//! tree `t`, each store sends, for every node of that level, every feature and every bin, the
//! sum of its examples' gradients and their count (the absolute error on `ℓ(y)`: gradient
//! `sign(η − ℓ(y))`, Hessian 1): a histogram, [`DemandModel::tree_histograms`]. Only sums
//! leave the store, so the round is a plain federated sum: secure aggregation and the
//! Gaussian mechanism apply unchanged (a store's histogram is clipped like any update). The
//! coordinator then picks each node's split from the summed histogram, and at the last level
//! the leaves' values (`−shrinkage · clamp(G/H, −1, 1)`, a step towards the leaf's median
//! bounded whatever the noise), in a pure server step ([`DemandModel::tree_server_step`]).
//! Every rule is scale-free (ratios of sums), so the sum divided by any count works.
//!
//! The global vector holds the levels grown so far, then per tree, per inner node in level
//! order, `feature + 1` (0: no split) and a mask over bins (1: goes left), then its leaves.
//! Every value the server step writes is exact after `x += 1 · (new − x)` but leaf values,
//! which are written onto zeros.

use super::{DISCOUNT_AT, DISPLAY_AT, DemandModel, LAG_AT, MAILER_AT, MISSING_AT, WINDOW_AT};
use super::{DemandData, History, LAGS, WINDOWS};
use crate::plan::SpecError;
use serde::{Deserialize, Serialize};

/// Hyper-parameters of the boosted trees.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeSpec {
    /// Trees in the ensemble; a task grows `trees × depth` levels, one per round.
    pub trees: u32,
    /// Levels per tree (leaves `2^depth`).
    pub depth: u32,
    /// Fixed bins per feature (the product group takes one bin per group when there are more).
    pub bins: u32,
    /// Each leaf's step is `shrinkage` times its gradient ratio (in `[-1, 1]`).
    pub shrinkage: f32,
    /// A split must leave each child at least this share of its node's examples.
    pub min_child_share: f32,
}

impl Default for TreeSpec {
    /// 50 trees of depth 3, 32 bins, shrinkage 0.2 (BENCHMARKS.md, "Demand on Complete
    /// Journey": a prototype's grid).
    fn default() -> TreeSpec {
        TreeSpec { trees: 50, depth: 3, bins: 32, shrinkage: 0.2, min_child_share: 0.001 }
    }
}

/// Inputs per example besides the group: the level, each lag, the longer windows, discount,
/// display and mailer.
const ORDERED: usize = 1 + LAGS.len() + (WINDOWS.len() - 1) + 3;
/// Features of a tree: [`ORDERED`], then the group.
const FEATURES: usize = ORDERED + 1;
/// Range of the recent level `ℓ(4-week mean)` cut into bins (e^8 ≈ 3,000 units a week).
const LEVEL_RANGE: (f32, f32) = (0.0, 8.0);
/// Range of a lag or window relative to the level.
const RELATIVE_RANGE: (f32, f32) = (-2.0, 2.0);

impl TreeSpec {
    /// Checks ranges.
    ///
    /// # Errors
    ///
    /// [`SpecError`] naming the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        let err = |field, message: String| Err(SpecError { field, message });
        if !(1..=1000).contains(&self.trees) {
            return err("model.trees.trees", format!("must be in 1..=1000, got {}", self.trees));
        }
        if !(1..=6).contains(&self.depth) {
            return err("model.trees.depth", format!("must be in 1..=6, got {}", self.depth));
        }
        if !(2..=64).contains(&self.bins) {
            return err("model.trees.bins", format!("must be in 2..=64, got {}", self.bins));
        }
        if !(self.shrinkage > 0.0 && self.shrinkage <= 1.0) {
            return err(
                "model.trees.shrinkage",
                format!("must be in (0, 1], got {}", self.shrinkage),
            );
        }
        if !(0.0..0.5).contains(&self.min_child_share) {
            return err(
                "model.trees.min_child_share",
                format!("must be in [0, 0.5), got {}", self.min_child_share),
            );
        }
        Ok(())
    }
}

/// The layout of a tree ensemble over `groups` product groups.
#[derive(Debug, Clone, Copy)]
pub(super) struct Layout {
    trees: usize,
    depth: usize,
    bins: usize,
    /// Bins per feature in a histogram and a mask: `max(bins, groups)`.
    width: usize,
    /// Features: [`ORDERED`] and the group.
    features: usize,
}

impl Layout {
    pub(super) fn new(spec: &TreeSpec, groups: usize) -> Layout {
        let bins = spec.bins as usize;
        Layout {
            trees: spec.trees as usize,
            depth: spec.depth as usize,
            bins,
            width: bins.max(groups),
            features: FEATURES,
        }
    }

    fn inner(&self) -> usize {
        (1 << self.depth) - 1
    }

    fn node_len(&self) -> usize {
        1 + self.width
    }

    fn tree_len(&self) -> usize {
        self.inner() * self.node_len() + (1 << self.depth)
    }

    /// Length of the global vector: the level counter, then the trees.
    pub(super) fn n_global(&self) -> usize {
        1 + self.trees * self.tree_len()
    }

    /// Length of a histogram (an upload): gradients then counts, per node of the widest level,
    /// feature and bin.
    pub(super) fn histogram_len(&self) -> usize {
        2 * self.half()
    }

    fn half(&self) -> usize {
        (1 << (self.depth - 1)) * self.features * self.width
    }

    fn tree_at(&self, t: usize) -> usize {
        1 + t * self.tree_len()
    }

    /// Where inner node `n` of level `l` of tree `t` starts.
    fn node_at(&self, t: usize, l: usize, n: usize) -> usize {
        self.tree_at(t) + ((1 << l) - 1 + n) * self.node_len()
    }

    fn leaves_at(&self, t: usize) -> usize {
        self.tree_at(t) + self.inner() * self.node_len()
    }

    /// Levels grown so far, from the counter.
    fn grown(&self, global: &[f32]) -> usize {
        (global[0].max(0.0) as usize).min(self.trees * self.depth)
    }

    /// The node of level `l` (of tree `t`) that an example with bins `b` reaches. The model
    /// comes from the coordinator: a feature that is not one (0, out of range, negative, NaN)
    /// is no split, so no model can make a store panic here.
    fn route(&self, global: &[f32], t: usize, l: usize, b: &[usize]) -> usize {
        let mut n = 0;
        for level in 0..l {
            let at = self.node_at(t, level, n);
            let feature = global[at] as usize;
            let right =
                b.get(feature.wrapping_sub(1)).is_some_and(|&bin| global[at + 1 + bin] < 0.5);
            n = 2 * n + usize::from(right);
        }
        n
    }

    /// The ensemble's output for an example with bins `b`.
    fn predict(&self, global: &[f32], b: &[usize]) -> f32 {
        (0..self.trees)
            .map(|t| global[self.leaves_at(t) + self.route(global, t, self.depth, b)])
            .sum()
    }
}

fn bin(value: f32, (lo, hi): (f32, f32), bins: usize) -> usize {
    let x = ((value - lo) / (hi - lo) * bins as f32).floor();
    if x.is_nan() { 0 } else { (x.max(0.0) as usize).min(bins - 1) }
}

impl DemandModel {
    pub(super) fn layout(&self) -> Option<Layout> {
        self.spec.trees.as_ref().map(|t| Layout::new(t, self.spec.groups.len()))
    }

    /// The bins of an example with features `x` (see `features`) in `group`, into `b`.
    fn tree_bins(&self, layout: &Layout, x: &[f32], group: u32, b: &mut [usize]) {
        let level = x[WINDOW_AT];
        b[0] = bin(level, LEVEL_RANGE, layout.bins);
        for j in 0..LAGS.len() {
            let missing = x[MISSING_AT + j] > 0.0;
            let v = if missing { 0.0 } else { x[LAG_AT + j] - level };
            b[1 + j] = bin(v, RELATIVE_RANGE, layout.bins);
        }
        for j in 1..WINDOWS.len() {
            b[LAGS.len() + j] = bin(x[WINDOW_AT + j] - level, RELATIVE_RANGE, layout.bins);
        }
        let shares = [x[DISCOUNT_AT], x[DISPLAY_AT], x[MAILER_AT]];
        for (k, v) in shares.into_iter().enumerate() {
            b[LAGS.len() + WINDOWS.len() + k] = bin(v, (0.0, 1.0), layout.bins);
        }
        b[ORDERED] = group as usize;
    }

    /// The trees' output for features `x` of a series in `group` (added to the level).
    pub(super) fn tree_output(
        &self,
        layout: &Layout,
        global: &[f32],
        x: &[f32],
        group: u32,
    ) -> f32 {
        let mut b = [0; FEATURES];
        self.tree_bins(layout, x, group, &mut b);
        layout.predict(global, &b)
    }

    /// Every training example's bins and target relative to the level, `ℓ(y) − ℓ(4-week mean)`.
    fn tree_examples(&self, layout: &Layout, data: &DemandData) -> (Vec<usize>, Vec<f32>) {
        let start = self.test_start(data);
        let mut x = vec![0.0; self.spec.group_offset()];
        let (mut bins, mut targets) = (Vec::new(), Vec::new());
        let mut b = [0; FEATURES];
        for s in &data.series {
            for t in s.start + 1..start {
                let hist = History { series: s, origin: t - 1, forecasts: &[] };
                self.features(&hist, data.first_week, t, &mut x);
                self.tree_bins(layout, &x, s.group, &mut b);
                bins.extend_from_slice(&b);
                targets.push(s.units[t].max(0.0).ln_1p() - x[WINDOW_AT]);
            }
        }
        (bins, targets)
    }

    /// What a store sends in a round of a tree task: for the level the model grows next, per
    /// node, feature and bin, the sum of its training examples' gradients, then their count
    /// (length [`crate::plan::TaskSpec::upload_len`]), and the number of examples. All zeros
    /// once every tree is grown.
    ///
    /// # Panics
    ///
    /// If the model has no trees, or `global` has the wrong length.
    pub fn tree_histograms(&self, global: &[f32], data: &DemandData) -> (Vec<f32>, usize) {
        let layout = self.layout().expect("a tree model");
        assert_eq!(global.len(), layout.n_global(), "model has the wrong length");
        let (bins, targets) = self.tree_examples(&layout, data);
        (histograms(&layout, global, &bins, &targets), targets.len())
    }

    /// The pure server step of a tree task: from the model `global` and `sum`, the stores'
    /// summed histograms scaled by any positive factor, the change that grows the next level
    /// (its splits, and at a tree's last level its leaves). Zero once every tree is grown.
    ///
    /// # Panics
    ///
    /// If the model has no trees, or a length is wrong.
    pub fn tree_server_step(&self, global: &[f32], sum: &[f32]) -> Vec<f32> {
        let layout = self.layout().expect("a tree model");
        assert_eq!(global.len(), layout.n_global(), "model has the wrong length");
        assert_eq!(sum.len(), layout.histogram_len(), "upload has the wrong length");
        let spec = self.spec.trees.as_ref().expect("a tree model");
        let mut next = global.to_vec();
        grow(&layout, spec, &mut next, sum);
        next.iter().zip(global).map(|(n, g)| n - g).collect()
    }

    /// Grows every remaining level from `data` alone (the central and local-only references):
    /// the rounds of a federated task with one store. Returns the examples and their mean
    /// absolute error on `ℓ(y)` after the last tree.
    pub(super) fn train_trees(&self, global: &mut [f32], data: &DemandData) -> (usize, f64) {
        let layout = self.layout().expect("a tree model");
        let spec = self.spec.trees.as_ref().expect("a tree model");
        let (bins, targets) = self.tree_examples(&layout, data);
        while layout.grown(global) < layout.trees * layout.depth {
            let sum = histograms(&layout, global, &bins, &targets);
            grow(&layout, spec, global, &sum);
        }
        let f = layout.features;
        let error: f64 = targets
            .iter()
            .enumerate()
            .map(|(i, r)| f64::from((layout.predict(global, &bins[i * f..(i + 1) * f]) - r).abs()))
            .sum();
        (targets.len(), error / targets.len().max(1) as f64)
    }
}

/// The histograms of examples (`bins`, `f` per example, and `targets`) at the next level.
fn histograms(layout: &Layout, global: &[f32], bins: &[usize], targets: &[f32]) -> Vec<f32> {
    let mut out = vec![0.0; layout.histogram_len()];
    let k = layout.grown(global);
    if k == layout.trees * layout.depth {
        return out;
    }
    let (t, l) = (k / layout.depth, k % layout.depth);
    let (f, w, half) = (layout.features, layout.width, layout.half());
    for (b, &r) in bins.chunks_exact(f).zip(targets) {
        let p = layout.predict(global, b);
        let g = if p > r {
            1.0
        } else if p < r {
            -1.0
        } else {
            0.0
        };
        let n = layout.route(global, t, l, b);
        for (j, &bin) in b.iter().enumerate() {
            let at = (n * f + j) * w + bin;
            out[at] += g;
            out[half + at] += 1.0;
        }
    }
    out
}

/// The best split of one node from its histograms `g` and `h` (`features × width` each):
/// `(feature, left mask, (G, H) left, (G, H) right)`, or `None` when no split gains.
#[allow(clippy::type_complexity)] // reason: one split, read once
fn best_split(
    layout: &Layout,
    spec: &TreeSpec,
    g: &[f32],
    h: &[f32],
) -> Option<(usize, Vec<bool>, (f64, f64), (f64, f64))> {
    let w = layout.width;
    let score = |g: f64, h: f64| if h > 0.0 { g * g / h } else { 0.0 };
    let mut best: Option<(f64, usize, Vec<bool>, (f64, f64), (f64, f64))> = None;
    for j in 0..layout.features {
        let (gj, hj) = (&g[j * w..(j + 1) * w], &h[j * w..(j + 1) * w]);
        let mut order: Vec<usize> = (0..w).collect();
        if j == ORDERED {
            // Groups have no order: sort them by their gradient ratio (Fisher 1958), empty last.
            let ratio = |b: usize| {
                if hj[b] > 0.0 { f64::from(gj[b]) / f64::from(hj[b]) } else { f64::INFINITY }
            };
            order.sort_by(|&a, &b| ratio(a).total_cmp(&ratio(b)));
        }
        let gt: f64 = gj.iter().map(|&v| f64::from(v)).sum();
        let ht: f64 = hj.iter().map(|&v| f64::from(v)).sum();
        if ht <= 0.0 {
            continue;
        }
        let parent = score(gt, ht);
        let min = f64::from(spec.min_child_share) * ht;
        let (mut gl, mut hl) = (0.0, 0.0);
        for (k, &b) in order[..w - 1].iter().enumerate() {
            gl += f64::from(gj[b]);
            hl += f64::from(hj[b]);
            let (gr, hr) = (gt - gl, ht - hl);
            if hl <= min.max(0.0) || hr <= min.max(0.0) {
                continue;
            }
            let gain = score(gl, hl) + score(gr, hr) - parent;
            if gain > 0.0 && best.as_ref().is_none_or(|b| gain > b.0) {
                let mut left = vec![false; w];
                order[..=k].iter().for_each(|&b| left[b] = true);
                best = Some((gain, j, left, (gl, hl), (gr, hr)));
            }
        }
    }
    best.map(|(_, j, left, l, r)| (j, left, l, r))
}

/// Grows the next level of `global` from the summed histograms `sum`.
fn grow(layout: &Layout, spec: &TreeSpec, global: &mut [f32], sum: &[f32]) {
    let k = layout.grown(global);
    if k == layout.trees * layout.depth {
        return;
    }
    let (t, l) = (k / layout.depth, k % layout.depth);
    let (fw, half) = (layout.features * layout.width, layout.half());
    let leaf = |(g, h): (f64, f64)| {
        if h > 0.0 { (-f64::from(spec.shrinkage) * (g / h).clamp(-1.0, 1.0)) as f32 } else { 0.0 }
    };
    for n in 0..1 << l {
        let (g, h) = (&sum[n * fw..(n + 1) * fw], &sum[half + n * fw..half + (n + 1) * fw]);
        let at = layout.node_at(t, l, n);
        let children = match best_split(layout, spec, g, h) {
            Some((j, left, gl, gr)) => {
                global[at] = (j + 1) as f32;
                for (m, &goes_left) in global[at + 1..at + 1 + layout.width].iter_mut().zip(&left) {
                    *m = f32::from(u8::from(goes_left));
                }
                (gl, gr)
            }
            None => {
                // No split: every example goes left; both children carry the node's totals.
                let w = layout.width;
                let g: f64 = g[..w].iter().map(|&v| f64::from(v)).sum();
                let h: f64 = h[..w].iter().map(|&v| f64::from(v)).sum();
                ((g, h), (g, h))
            }
        };
        if l + 1 == layout.depth {
            let leaves = layout.leaves_at(t);
            global[leaves + 2 * n] = leaf(children.0);
            global[leaves + 2 * n + 1] = leaf(children.1);
        }
    }
    global[0] = (k + 1) as f32;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout() -> (Layout, TreeSpec) {
        let spec = TreeSpec { trees: 2, depth: 2, bins: 4, shrinkage: 0.5, min_child_share: 0.0 };
        (Layout::new(&spec, 3), spec)
    }

    /// Examples whose target depends on one feature's bin: the first split must find it.
    #[test]
    fn the_root_splits_on_the_feature_that_separates_the_targets() {
        let (layout, spec) = layout();
        let f = layout.features;
        let mut bins = Vec::new();
        let mut targets = Vec::new();
        for i in 0..40 {
            let mut b = vec![i % 4; f];
            // Feature 2's bin decides the target; the others are noise of the same bins.
            b[2] = i % 2 * 3;
            b[ORDERED] = i % 3;
            bins.extend_from_slice(&b);
            targets.push(if b[2] == 3 { 1.0 } else { -1.0 });
        }
        let mut global = vec![0.0; layout.n_global()];
        let sum = histograms(&layout, &global, &bins, &targets);
        grow(&layout, &spec, &mut global, &sum);
        assert_eq!(global[0], 1.0, "one level grown");
        let at = layout.node_at(0, 0, 0);
        assert_eq!(global[at], 3.0, "split on feature 2 (stored + 1)");
        let mask = &global[at + 1..at + 1 + layout.width];
        assert_eq!(mask[0], 1.0, "bin 0 (target -1) goes left");
        assert_eq!(mask[3], 0.0, "bin 3 (target +1) goes right");
        // The second level finishes the tree: the leaves step towards each side's target.
        let sum = histograms(&layout, &global, &bins, &targets);
        grow(&layout, &spec, &mut global, &sum);
        let left = layout.predict(&global, &bins[..f]);
        let right = layout.predict(&global, &bins[f..2 * f]);
        assert!(targets[0] < 0.0 && left < 0.0, "{left}");
        assert!(targets[1] > 0.0 && right > 0.0, "{right}");
        assert!((left.abs() - spec.shrinkage).abs() < 1e-6, "a full step of shrinkage: {left}");
    }

    /// The server step's rules are ratios: scaling the summed histograms changes nothing.
    #[test]
    fn growing_is_the_same_for_a_sum_and_a_mean() {
        let (layout, spec) = layout();
        let f = layout.features;
        let bins: Vec<usize> = (0..30 * f).map(|i| (i * 31 + (i / f) * (i / f)) % 4).collect();
        let targets: Vec<f32> = (0..30).map(|i| (i % 5) as f32 - 2.0).collect();
        let mut a = vec![0.0; layout.n_global()];
        let mut b = a.clone();
        for _ in 0..layout.trees * layout.depth {
            let sum = histograms(&layout, &a, &bins, &targets);
            grow(&layout, &spec, &mut a, &sum);
            let mean: Vec<f32> =
                histograms(&layout, &b, &bins, &targets).iter().map(|v| v / 7.0).collect();
            grow(&layout, &spec, &mut b, &mean);
        }
        assert_eq!(a, b);
        assert_eq!(layout.grown(&a), 4);
        assert!(a.iter().any(|&v| v != 0.0 && v.fract() != 0.0), "some leaf was set: {a:?}");
        // Once every tree is grown, stores send zeros and nothing changes.
        let sum = histograms(&layout, &a, &bins, &targets);
        assert!(sum.iter().all(|&v| v == 0.0));
        let before = a.clone();
        grow(&layout, &spec, &mut a, &sum);
        assert_eq!(a, before);
    }

    /// Histograms of several stores sum to the histogram of their pooled examples, so the
    /// federated model is the pooled one.
    #[test]
    fn store_histograms_sum_to_the_pooled_histogram() {
        let (layout, spec) = layout();
        let f = layout.features;
        let bins: Vec<usize> = (0..24 * f).map(|i| (i * 31 + (i / f) * (i / f)) % 4).collect();
        let mut bins = bins;
        bins.chunks_exact_mut(f).for_each(|b| b[ORDERED] %= 3);
        let targets: Vec<f32> = (0..24).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
        let mut global = vec![0.0; layout.n_global()];
        let sum = histograms(&layout, &global, &bins, &targets);
        grow(&layout, &spec, &mut global, &sum);
        let pooled = histograms(&layout, &global, &bins, &targets);
        let a = histograms(&layout, &global, &bins[..10 * f], &targets[..10]);
        let b = histograms(&layout, &global, &bins[10 * f..], &targets[10..]);
        let summed: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
        assert_eq!(summed, pooled);
    }

    /// A model crafted with features out of range, a huge level counter or negative ones is
    /// routed (as no split) and grown without a panic in the store.
    #[test]
    fn a_crafted_model_does_not_panic_a_store() {
        let (layout, spec) = layout();
        let f = layout.features;
        let bins: Vec<usize> = (0..8 * f).map(|i| i % 3).collect();
        let targets = vec![0.5f32; 8];
        for value in [1e9f32, -3.0, 1e30, f32::MAX, (f + 1) as f32] {
            let mut global = vec![value; layout.n_global()];
            global[0] = 1.0;
            let out = histograms(&layout, &global, &bins, &targets);
            assert_eq!(out.len(), layout.histogram_len());
            assert!(layout.predict(&global, &bins[..f]).is_finite() || value.abs() > 1e29);
            global[0] = value;
            histograms(&layout, &global, &bins, &targets);
            grow(&layout, &spec, &mut global, &out);
        }
    }

    #[test]
    fn bins_clamp_and_cover_the_range() {
        assert_eq!(bin(-5.0, (0.0, 1.0), 4), 0);
        assert_eq!(bin(0.3, (0.0, 1.0), 4), 1);
        assert_eq!(bin(1.0, (0.0, 1.0), 4), 3);
        assert_eq!(bin(f32::NAN, (0.0, 1.0), 4), 0);
    }
}
