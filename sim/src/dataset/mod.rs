//! Real and generated datasets, and their split into stores.

pub mod completejourney;
pub mod movielens;
pub mod retail;
pub mod superstore;
pub mod synthetic;

use fedretail_core::model::mf::{MfData, Rating, user_seed};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::collections::BTreeMap;

/// One rating with global ids, as loaded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RawRating {
    /// Global user id.
    pub user: u32,
    /// Global item id, 0-based.
    pub item: u32,
    /// The rating.
    pub value: f32,
    /// Seconds since the epoch.
    pub timestamp: i64,
}

/// A ratings dataset with a store for every user.
#[derive(Debug, Clone)]
pub struct RatingsDataset {
    /// Human-readable name.
    pub name: String,
    /// All ratings.
    pub ratings: Vec<RawRating>,
    /// Item ids are `0..n_items`.
    pub n_items: usize,
    /// For every user id, the store it belongs to (in region mode).
    pub user_region: BTreeMap<u32, String>,
    /// Every item's groups in the catalogue, one label per level, the same levels for every
    /// item (Complete Journey: its category; its category and product type; its category and
    /// brand), when the data set has a catalogue: public structure, not customer data, and the
    /// category-affinity model's fixed factors under customer-level DP.
    pub item_catalogue: Option<Vec<Vec<String>>>,
}

/// How users are grouped into clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Partition {
    /// One store per region (MovieLens: first digit of the zip code; non-US codes form one store).
    Region,
    /// One client per user: federated learning on shoppers' devices.
    Device,
}

/// A store's share of the data, with ids as in the dataset.
#[derive(Debug, Clone)]
pub struct StoreData {
    /// Store name.
    pub name: String,
    /// Global user ids, in local-index order.
    pub users: Vec<u32>,
    /// The ratings with local user indices.
    pub data: MfData,
}

/// A seeded random split of the ratings: `test_fraction` of them held out.
pub fn split(
    ratings: &[RawRating],
    test_fraction: f64,
    seed: u64,
) -> (Vec<RawRating>, Vec<RawRating>) {
    let mut shuffled = ratings.to_vec();
    shuffled.shuffle(&mut rand::rngs::ChaCha8Rng::seed_from_u64(seed));
    let n_test = (ratings.len() as f64 * test_fraction).round() as usize;
    let test = shuffled.split_off(ratings.len() - n_test);
    (shuffled, test)
}

/// Strict leave-one-out: each user's newest rating is held out, every earlier one trains.
/// Ratings with the same newest timestamp (MovieLens users often rate several films in one
/// second) are tied: one of them is chosen at random, seeded by the user and the item, so the
/// split is deterministic and favours no kind of item. Users with a single rating only train.
pub fn leave_newest_out(ratings: &[RawRating]) -> (Vec<RawRating>, Vec<RawRating>) {
    let tiebreak = |r: &RawRating| user_seed(&format!("{}/{}", r.user, r.item));
    let mut newest: BTreeMap<u32, RawRating> = BTreeMap::new();
    let mut count: BTreeMap<u32, usize> = BTreeMap::new();
    for r in ratings {
        *count.entry(r.user).or_default() += 1;
        let slot = newest.entry(r.user).or_insert(*r);
        if (r.timestamp, tiebreak(r)) > (slot.timestamp, tiebreak(slot)) {
            *slot = *r;
        }
    }
    let test: Vec<RawRating> = newest.values().filter(|r| count[&r.user] > 1).copied().collect();
    let held: std::collections::BTreeSet<(u32, u32, i64)> =
        test.iter().map(|r| (r.user, r.item, r.timestamp)).collect();
    let train = ratings
        .iter()
        .filter(|r| !held.contains(&(r.user, r.item, r.timestamp)))
        .copied()
        .collect();
    (train, test)
}

/// Groups train and test ratings into stores; stores are sorted by name.
pub fn partition(
    dataset: &RatingsDataset,
    train: &[RawRating],
    test: &[RawRating],
    how: Partition,
) -> Vec<StoreData> {
    let store_of = |user: u32| -> String {
        match how {
            Partition::Region => {
                dataset.user_region.get(&user).cloned().unwrap_or_else(|| "unknown".into())
            }
            Partition::Device => format!("user-{user:05}"),
        }
    };
    let mut stores: BTreeMap<String, StoreData> = BTreeMap::new();
    let mut local_index: BTreeMap<u32, (String, u32)> = BTreeMap::new();
    let mut users: Vec<u32> = train.iter().chain(test).map(|r| r.user).collect();
    users.sort_unstable();
    users.dedup();
    for user in users {
        let name = store_of(user);
        let store = stores.entry(name.clone()).or_insert_with(|| StoreData {
            name: name.clone(),
            users: Vec::new(),
            data: MfData::default(),
        });
        local_index.insert(user, (name, store.users.len() as u32));
        store.users.push(user);
        store.data.user_seeds.push(user_seed(&user.to_string()));
    }
    for (ratings, is_test) in [(train, false), (test, true)] {
        for r in ratings {
            let (name, local) = &local_index[&r.user];
            let store = stores.get_mut(name).expect("every user has a store");
            let rating =
                Rating { user: *local, item: r.item, value: r.value, timestamp: r.timestamp };
            if is_test { store.data.test.push(rating) } else { store.data.train.push(rating) }
        }
    }
    stores.into_values().collect()
}

/// All ratings pooled into one "store": the central (non-federated) reference.
pub fn pooled(dataset: &RatingsDataset, train: &[RawRating], test: &[RawRating]) -> StoreData {
    let mut all = partition(dataset, train, test, Partition::Device);
    let mut pooled =
        StoreData { name: "central".into(), users: Vec::new(), data: MfData::default() };
    for store in all.drain(..) {
        let offset = pooled.users.len() as u32;
        pooled.users.extend(&store.users);
        pooled.data.user_seeds.extend(&store.data.user_seeds);
        let shift = |r: &Rating| Rating { user: r.user + offset, ..*r };
        pooled.data.train.extend(store.data.train.iter().map(shift));
        pooled.data.test.extend(store.data.test.iter().map(shift));
    }
    pooled
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RatingsDataset {
        let ratings = (0..40u32)
            .map(|k| RawRating {
                user: k % 4,
                item: k % 7,
                value: (k % 5 + 1) as f32,
                timestamp: i64::from(k),
            })
            .collect();
        let user_region = [(0, "zip-1"), (1, "zip-1"), (2, "zip-9"), (3, "non-us")]
            .into_iter()
            .map(|(u, s)| (u, s.to_string()))
            .collect();
        RatingsDataset {
            name: "tiny".into(),
            ratings,
            n_items: 7,
            user_region,
            item_catalogue: None,
        }
    }

    #[test]
    fn leave_newest_out_holds_out_each_users_newest_and_breaks_ties_evenly() {
        let r = |user, item, timestamp| RawRating { user, item, value: 1.0, timestamp };
        let mut ratings = vec![r(0, 1, 10), r(0, 2, 30), r(0, 3, 20), r(1, 4, 5)];
        // Users 2..: two items tied at the newest second.
        for user in 2..202 {
            ratings.extend([r(user, 1, 1), r(user, 5, 9), r(user, 6, 9)]);
        }
        let (train, test) = leave_newest_out(&ratings);
        assert_eq!(test[0], r(0, 2, 30), "the newest is held out");
        assert!(test.iter().all(|t| t.user != 1), "a single rating only trains");
        assert_eq!(train.len() + test.len(), ratings.len());
        assert!(!train.contains(&r(0, 2, 30)));
        let fives = test.iter().filter(|t| t.item == 5).count();
        assert!((70..=130).contains(&fives), "ties go either way: {fives} of 200 held out item 5");
        assert_eq!(leave_newest_out(&ratings), (train, test), "deterministic");
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let d = tiny();
        let (a_train, a_test) = split(&d.ratings, 0.2, 5);
        let (b_train, b_test) = split(&d.ratings, 0.2, 5);
        assert_eq!((a_train.len(), a_test.len()), (32, 8));
        assert_eq!((&a_train, &a_test), (&b_train, &b_test));
        assert_ne!(split(&d.ratings, 0.2, 6).1, a_test);
    }

    #[test]
    fn region_and_device_partitions_keep_every_rating() {
        let d = tiny();
        let (train, test) = split(&d.ratings, 0.25, 1);
        let regions = partition(&d, &train, &test, Partition::Region);
        let names: Vec<&str> = regions.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["non-us", "zip-1", "zip-9"]);
        assert_eq!(regions[1].users, vec![0, 1]);
        let n: usize = regions.iter().map(|s| s.data.train.len() + s.data.test.len()).sum();
        assert_eq!(n, 40);
        assert_eq!(partition(&d, &train, &test, Partition::Device).len(), 4);
        let central = pooled(&d, &train, &test);
        assert_eq!(
            (central.data.train.len(), central.data.test.len(), central.users.len()),
            (30, 10, 4)
        );
    }
}
