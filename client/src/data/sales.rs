//! A store's sales, for demand forecasting: the CSV a store exports, and its weekly series.
//!
//! Format: a header row, then one sale (or price record) per row. The columns are exactly
//! these, in any order; any other column is an error, so a misspelt one is not silently
//! dropped:
//!
//! | column | meaning |
//! | --- | --- |
//! | `date` | day of the sale, `YYYY-MM-DD` |
//! | `store` | the store's name (a file may hold several stores; the client keeps its own) |
//! | `product` | the product group (the task's `groups`, e.g. a sub-category) |
//! | `quantity` | units sold, a number ≥ 0 (0 records a price or discount without a sale) |
//! | `price` | unit list price, a number ≥ 0 (read and checked; the model does not use it yet) |
//! | `discount` | fraction off the list price, in `[0, 1)` |
//!
//! ```text
//! date,store,product,quantity,price,discount
//! 2017-01-02,Springfield,Binders,3,12.99,0.2
//! 2017-01-04,Springfield,Paper,1,5.50,0
//! ```
//!
//! Sales are summed per Monday-to-Sunday week ([`week_of_day`]) and product group. A week's
//! discount is the mean over its rows weighted by `max(quantity, 1)`; weeks without rows
//! have none (NaN).

use super::csv::{CsvError, no_rows_for, read_table};
use fedretail_core::model::demand::{DemandData, Series, week_of_day};
use std::collections::BTreeMap;
use std::path::Path;

/// The columns of the format, in the order [`write_sales`] writes them.
pub const COLUMNS: [&str; 6] = ["date", "store", "product", "quantity", "price", "discount"];

/// One row.
#[derive(Debug, Clone, PartialEq)]
pub struct SalesRow {
    /// Days since 1970-01-01.
    pub day: i64,
    /// Store name.
    pub store: String,
    /// Product group.
    pub product: String,
    /// Units sold.
    pub quantity: f32,
    /// Unit list price.
    pub price: f32,
    /// Fraction off the list price.
    pub discount: f32,
}

/// Reads every row of `path`.
///
/// # Errors
///
/// See [`CsvError`]: each names the file and, where it applies, the line.
pub fn load_sales(path: &Path) -> Result<Vec<SalesRow>, CsvError> {
    let file =
        std::fs::File::open(path).map_err(|source| CsvError::Io { path: path.into(), source })?;
    read_sales(file, path)
}

/// [`load_sales`] from any reader; `path` names it in errors.
///
/// # Errors
///
/// See [`CsvError`].
pub fn read_sales(reader: impl std::io::Read, path: &Path) -> Result<Vec<SalesRow>, CsvError> {
    let mut out = Vec::new();
    read_table(reader, path, &COLUMNS, "date,store,product,quantity,price,discount", |f| {
        out.push(SalesRow {
            day: f.day(0)?,
            store: f.text(1)?,
            product: f.text(2)?,
            quantity: f.number(3)?,
            price: f.number(4)?,
            discount: f.fraction(5)?,
        });
        Ok(())
    })?;
    Ok(out)
}

/// The rows of `store` in the file at `path`, by week and product group over the store's own
/// first to last week.
///
/// # Errors
///
/// [`load_sales`]'s errors, and a file without rows for `store` (the message lists the stores it
/// has).
pub fn load_store(path: &Path, store: &str) -> Result<StoreSales, CsvError> {
    let rows = load_sales(path)?;
    let mut stores = by_store(&rows);
    let Some(mine) = stores.remove(store) else {
        return Err(no_rows_for(path, store, stores.into_keys()));
    };
    Ok(StoreSales::from_rows(mine, None))
}

/// The rows of each store, by store name.
pub fn by_store(rows: &[SalesRow]) -> BTreeMap<&str, Vec<&SalesRow>> {
    let mut stores: BTreeMap<&str, Vec<&SalesRow>> = BTreeMap::new();
    for r in rows {
        stores.entry(r.store.as_str()).or_default().push(r);
    }
    stores
}

/// Days from 1970-01-01 to `date` (the `day` of a [`SalesRow`]).
///
/// # Errors
///
/// Dates outside jiff's range.
pub fn day_number(date: jiff::civil::Date) -> Result<i64, jiff::Error> {
    Ok(i64::from(date.since(jiff::civil::date(1970, 1, 1))?.get_days()))
}

/// The date `day` days after 1970-01-01 (the inverse of [`day_number`]).
///
/// # Errors
///
/// Days outside jiff's range.
pub fn date_of_day(day: i64) -> Result<jiff::civil::Date, jiff::Error> {
    jiff::civil::date(1970, 1, 1).checked_add(jiff::Span::new().try_days(day)?)
}

/// Writes rows in the format [`load_sales`] reads.
///
/// # Errors
///
/// I/O errors.
pub fn write_sales<'a>(
    path: &Path,
    rows: impl IntoIterator<Item = &'a SalesRow>,
) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(COLUMNS)?;
    for r in rows {
        let date = date_of_day(r.day).map_err(std::io::Error::other)?;
        w.write_record([
            date.to_string(),
            r.store.clone(),
            r.product.clone(),
            r.quantity.to_string(),
            r.price.to_string(),
            r.discount.to_string(),
        ])?;
    }
    w.flush()
}

/// The columns of a promotion calendar: per week (the date of any day in it, conventionally
/// its Monday), store and product group, the shares of the group's promoted products on
/// in-store display and in the mailer, each in `[0, 1]`. Weeks a calendar does not list have
/// no promotion.
///
/// ```text
/// week,store,group,display,mailer
/// 2017-01-02,store-367,PRODUCE,0.25,0.1
/// ```
pub const PROMOTION_COLUMNS: [&str; 5] = ["week", "store", "group", "display", "mailer"];

/// One row of a promotion calendar.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionRow {
    /// Week index ([`week_of_day`]).
    pub week: i64,
    /// Store name.
    pub store: String,
    /// Product group.
    pub group: String,
    /// Share on display.
    pub display: f32,
    /// Share in the mailer.
    pub mailer: f32,
}

/// Reads a promotion calendar.
///
/// # Errors
///
/// See [`CsvError`]: each names the file and, where it applies, the line and the column.
pub fn load_promotions(path: &Path) -> Result<Vec<PromotionRow>, CsvError> {
    let file =
        std::fs::File::open(path).map_err(|source| CsvError::Io { path: path.into(), source })?;
    read_promotions(file, path)
}

/// [`load_promotions`] from any reader.
///
/// # Errors
///
/// See [`load_promotions`].
pub fn read_promotions(
    reader: impl std::io::Read,
    path: &Path,
) -> Result<Vec<PromotionRow>, CsvError> {
    let mut out = Vec::new();
    read_table(reader, path, &PROMOTION_COLUMNS, "week,store,group,display,mailer", |f| {
        out.push(PromotionRow {
            week: week_of_day(f.day(0)?),
            store: f.text(1)?,
            group: f.text(2)?,
            display: f.share(3)?,
            mailer: f.share(4)?,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Writes a promotion calendar (each week as its Monday).
///
/// # Errors
///
/// I/O errors.
pub fn write_promotions<'a>(
    path: &Path,
    rows: impl IntoIterator<Item = &'a PromotionRow>,
) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(PROMOTION_COLUMNS)?;
    for r in rows {
        // Week 0 starts on Monday 1970-01-05 (day 4).
        let monday = date_of_day(4 + 7 * r.week).map_err(std::io::Error::other)?;
        w.write_record([
            monday.to_string(),
            r.store.clone(),
            r.group.clone(),
            r.display.to_string(),
            r.mailer.to_string(),
        ])?;
    }
    w.flush()
}

/// One store's weekly sales per product group. Group names stay strings until a task says
/// which groups it models ([`StoreSales::to_data`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoreSales {
    /// Week index of the first week.
    pub first_week: i64,
    /// Weeks covered.
    pub n_weeks: usize,
    /// Per product group: units per week and the week's discount (NaN without rows).
    pub groups: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
    /// Per product group with a promotion calendar: the weekly shares of its products on
    /// display and in the mailer (see [`Series::display`]).
    pub promotions: BTreeMap<String, (Vec<f32>, Vec<f32>)>,
}

impl StoreSales {
    /// Aggregates rows by week and product group over `weeks` (inclusive week indices), or
    /// over the rows' own first to last week. Rows outside `weeks` are dropped.
    pub fn from_rows<'a>(
        rows: impl IntoIterator<Item = &'a SalesRow>,
        weeks: Option<(i64, i64)>,
    ) -> StoreSales {
        let rows: Vec<&SalesRow> = rows.into_iter().collect();
        let (first, last) = weeks.unwrap_or_else(|| {
            let w = rows.iter().map(|r| week_of_day(r.day));
            (w.clone().min().unwrap_or(0), w.max().unwrap_or(-1))
        });
        let n_weeks = (last - first + 1).max(0) as usize;
        // Per group: units, Σ weight × discount and Σ weight, per week.
        type Sums = (Vec<f32>, Vec<f64>, Vec<f64>);
        let mut sums: BTreeMap<String, Sums> = BTreeMap::new();
        for r in rows {
            let week = week_of_day(r.day) - first;
            if !(0..n_weeks as i64).contains(&week) {
                continue;
            }
            let e = sums
                .entry(r.product.clone())
                .or_insert_with(|| (vec![0.0; n_weeks], vec![0.0; n_weeks], vec![0.0; n_weeks]));
            let (w, weight) = (week as usize, f64::from(r.quantity.max(1.0)));
            e.0[w] += r.quantity;
            e.1[w] += weight * f64::from(r.discount);
            e.2[w] += weight;
        }
        let groups = sums
            .into_iter()
            .map(|(name, (units, discount, weight))| {
                let mean = discount
                    .iter()
                    .zip(&weight)
                    .map(|(d, w)| if *w > 0.0 { (d / w) as f32 } else { f32::NAN })
                    .collect();
                (name, (units, mean))
            })
            .collect();
        StoreSales { first_week: first, n_weeks, groups, promotions: BTreeMap::new() }
    }

    /// Takes `store`'s rows of a promotion calendar as the groups' weekly display and mailer
    /// shares over the store's weeks (weeks outside them are ignored, weeks not listed have
    /// none). Returns how many rows were used.
    pub fn set_promotions(&mut self, rows: &[PromotionRow], store: &str) -> usize {
        let mut used = 0;
        for r in rows.iter().filter(|r| r.store == store) {
            let week = r.week - self.first_week;
            if !(0..self.n_weeks as i64).contains(&week) {
                continue;
            }
            let n = self.n_weeks;
            let (display, mailer) = self
                .promotions
                .entry(r.group.clone())
                .or_insert_with(|| (vec![0.0; n], vec![0.0; n]));
            display[week as usize] = r.display;
            mailer[week as usize] = r.mailer;
            used += 1;
        }
        used
    }

    /// The series of the task's `groups` that this store sells, as the model's data (one
    /// store), and the store's groups the task does not model (left out).
    pub fn to_data(&self, groups: &[String]) -> (DemandData, Vec<String>) {
        let index: BTreeMap<&str, u32> =
            groups.iter().enumerate().map(|(i, g)| (g.as_str(), i as u32)).collect();
        let mut series = Vec::new();
        let mut unknown = Vec::new();
        for (name, (units, discount)) in &self.groups {
            match index.get(name.as_str()) {
                Some(&group) => series.push(Series {
                    store: 0,
                    group,
                    start: 0,
                    units: units.clone(),
                    discount: discount.clone(),
                    display: self.promotions.get(name).map(|p| p.0.clone()).unwrap_or_default(),
                    mailer: self.promotions.get(name).map(|p| p.1.clone()).unwrap_or_default(),
                }),
                None => unknown.push(name.clone()),
            }
        }
        (DemandData { first_week: self.first_week, n_stores: 1, series }, unknown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &str) -> Result<Vec<SalesRow>, CsvError> {
        read_sales(text.as_bytes(), Path::new("sales.csv"))
    }

    const HEADER: &str = "date,store,product,quantity,price,discount\n";

    #[test]
    fn a_promotion_calendar_fills_the_stores_weeks() {
        let text = "week,store,group,display,mailer\n2017-01-02,S,A,0.5,0\n\
                    2017-01-11,S,A,1,0.25\n2017-01-02,T,A,0.9,0.9\n2018-01-01,S,A,1,1\n";
        let rows = read_promotions(text.as_bytes(), Path::new("promotions.csv")).unwrap();
        let first = week_of_day(day_number(jiff::civil::date(2017, 1, 2)).unwrap());
        let mut sales = StoreSales { first_week: first, n_weeks: 3, ..StoreSales::default() };
        // S's two rows in its weeks (2017-01-11 is a Wednesday of the second week); T's and
        // the week of 2018 are not used.
        assert_eq!(sales.set_promotions(&rows, "S"), 2);
        assert_eq!(sales.promotions["A"], (vec![0.5, 1.0, 0.0], vec![0.0, 0.25, 0.0]));
        let err = read_promotions(
            "week,store,group,display,mailer\n2017-01-02,S,A,1.5,0\n".as_bytes(),
            Path::new("promotions.csv"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "promotions.csv:2: column \"display\": 1.5 is not a share in [0, 1]");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        write_promotions(&path, &rows).unwrap();
        let back = load_promotions(&path).unwrap();
        assert_eq!(back, rows, "weeks written as their Monday read back as the same weeks");
    }

    #[test]
    fn reads_rows_in_any_column_order() {
        let rows =
            read("discount,price,quantity,product,store,date\n0.2,10,3,Paper,S1,1970-01-06\n")
                .unwrap();
        assert_eq!(
            rows[0],
            SalesRow {
                day: 5,
                store: "S1".into(),
                product: "Paper".into(),
                quantity: 3.0,
                price: 10.0,
                discount: 0.2
            }
        );
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err = read(&format!("{HEADER}2017-01-02,S,P,1,2,0\n2017-02-30,S,P,1,2,0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "sales.csv:3: column \"date\": \"2017-02-30\" is not a date of the form YYYY-MM-DD"
            ),
            "{err}"
        );
        let err = read(&format!("{HEADER}01/02/2017,S,P,1,2,0\n")).unwrap_err().to_string();
        assert!(err.starts_with("sales.csv:2: column \"date\": \"01/02/2017\""), "{err}");
        let err = read(&format!("{HEADER}2017-01-02,S,P,-1,2,0\n")).unwrap_err().to_string();
        assert_eq!(err, "sales.csv:2: column \"quantity\": -1 is negative");
        let err = read(&format!("{HEADER}2017-01-02,S,P,1,2,1.5\n")).unwrap_err().to_string();
        assert_eq!(err, "sales.csv:2: column \"discount\": 1.5 is not a fraction below 1");
        let err = read(&format!("{HEADER}2017-01-02,,P,1,2,0\n")).unwrap_err().to_string();
        assert_eq!(err, "sales.csv:2: column \"store\": is empty");
        let err =
            read("date,store,product,quantity,price,discount,colour\n2017-01-02,S,P,1,2,0,red\n")
                .unwrap_err()
                .to_string();
        assert_eq!(
            err,
            "sales.csv:1: unknown column \"colour\" (expected date,store,product,quantity,price,discount)"
        );
        let err = read("date,store,product,quantity,price\n2017-01-02,S,P,1,2\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("sales.csv:1: missing column \"discount\""), "{err}");
        assert!(read(HEADER).unwrap_err().to_string().contains("no data rows"));
    }

    #[test]
    fn weeks_sum_units_and_average_discounts() {
        // 1970-01-05 (day 4) is the Monday of week 0; day 11 starts week 1.
        let row = |day, product: &str, quantity, discount| SalesRow {
            day,
            store: "S".into(),
            product: product.into(),
            quantity,
            price: 1.0,
            discount,
        };
        let rows = [row(4, "A", 1.0, 0.0), row(10, "A", 3.0, 0.4), row(18, "B", 2.0, 0.1)];
        let sales = StoreSales::from_rows(&rows, None);
        assert_eq!((sales.first_week, sales.n_weeks), (0, 3));
        let (units, discount) = &sales.groups["A"];
        assert_eq!(units, &vec![4.0, 0.0, 0.0]);
        assert!((discount[0] - 0.3).abs() < 1e-6);
        assert!(discount[1].is_nan());
        let (data, unknown) = sales.to_data(&["B".into(), "C".into()]);
        assert_eq!(unknown, vec!["A".to_string()]);
        assert_eq!(data.series.len(), 1);
        assert_eq!(data.series[0].group, 0);
        assert_eq!(data.series[0].units, vec![0.0, 0.0, 2.0]);
    }

    #[test]
    fn written_files_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.csv");
        let rows = vec![SalesRow {
            day: 17_000,
            store: "Main, St".into(),
            product: "Paper".into(),
            quantity: 2.0,
            price: 3.5,
            discount: 0.25,
        }];
        write_sales(&path, &rows).unwrap();
        assert_eq!(load_sales(&path).unwrap(), rows);
        let sales = load_store(&path, "Main, St").unwrap();
        assert_eq!(sales.groups["Paper"].0, vec![2.0]);
        let err = load_store(&path, "Elm").unwrap_err().to_string();
        assert!(err.ends_with("no rows for store \"Elm\"; the file has Main, St"), "{err}");
    }
}
