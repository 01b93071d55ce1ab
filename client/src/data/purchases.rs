//! A store's purchases: the file its point of sale exports, from which the client derives both
//! what the recommender learns from (who bought what) and what the demand model forecasts
//! (weekly units per product group). Nothing in it leaves the store.
//!
//! Format: a header row, then one purchase line per row. The columns are exactly these, in any
//! order; any other column is an error:
//!
//! | column | meaning |
//! | --- | --- |
//! | `date` | day of the purchase, `YYYY-MM-DD` |
//! | `store` | the store's name (a file may hold several stores; the client keeps its own) |
//! | `customer` | the customer (household, loyalty card); never sent anywhere |
//! | `product` | the product id, as in the catalogue |
//! | `quantity` | units bought, a number ≥ 0 |
//! | `price` | unit shelf price, a number ≥ 0 |
//! | `discount` | fraction off the shelf price, in `[0, 1)` |
//!
//! ```text
//! date,store,customer,product,quantity,price,discount
//! 2017-01-02,store-367,hh-1203,1082185,2,1.29,0.1
//! ```
//!
//! The catalogue (the same file for every store of a task) maps each product to its item
//! index in the recommender (empty when the recommender does not cover it) and its product
//! group in the demand model:
//!
//! ```text
//! product,item,group
//! 1082185,0,PRODUCE
//! 9999999,,GROCERY
//! ```

use super::csv::{CsvError, CsvRating, no_rows_for, read_table};
use super::sales::{SalesRow, StoreSales, date_of_day};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// The purchase columns, in the order [`write_purchases`] writes them.
pub const COLUMNS: [&str; 7] =
    ["date", "store", "customer", "product", "quantity", "price", "discount"];
const EXPECTED: &str = "date,store,customer,product,quantity,price,discount";
/// The catalogue columns.
pub const CATALOGUE_COLUMNS: [&str; 3] = ["product", "item", "group"];

/// One purchase line.
#[derive(Debug, Clone, PartialEq)]
pub struct PurchaseRow {
    /// Days since 1970-01-01.
    pub day: i64,
    /// Store name.
    pub store: String,
    /// Customer id.
    pub customer: String,
    /// Product id.
    pub product: String,
    /// Units.
    pub quantity: f32,
    /// Unit shelf price.
    pub price: f32,
    /// Fraction off the shelf price.
    pub discount: f32,
}

/// Reads every purchase line of `path`.
///
/// # Errors
///
/// See [`CsvError`]: each names the file and, where it applies, the line and the column.
pub fn load_purchases(path: &Path) -> Result<Vec<PurchaseRow>, CsvError> {
    let file =
        std::fs::File::open(path).map_err(|source| CsvError::Io { path: path.into(), source })?;
    read_purchases(file, path)
}

/// [`load_purchases`] from any reader; `path` names it in errors.
///
/// # Errors
///
/// See [`CsvError`].
pub fn read_purchases(
    reader: impl std::io::Read,
    path: &Path,
) -> Result<Vec<PurchaseRow>, CsvError> {
    let mut out = Vec::new();
    read_table(reader, path, &COLUMNS, EXPECTED, |f| {
        out.push(PurchaseRow {
            day: f.day(0)?,
            store: f.text(1)?,
            customer: f.text(2)?,
            product: f.text(3)?,
            quantity: f.number(4)?,
            price: f.number(5)?,
            discount: f.fraction(6)?,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Writes purchase lines in the format [`load_purchases`] reads.
///
/// # Errors
///
/// I/O errors.
pub fn write_purchases<'a>(
    path: &Path,
    rows: impl IntoIterator<Item = &'a PurchaseRow>,
) -> std::io::Result<()> {
    let mut w = csv::Writer::from_path(path)?;
    w.write_record(COLUMNS)?;
    for r in rows {
        let date = date_of_day(r.day).map_err(std::io::Error::other)?;
        w.write_record([
            date.to_string(),
            r.store.clone(),
            r.customer.clone(),
            r.product.clone(),
            r.quantity.to_string(),
            r.price.to_string(),
            r.discount.to_string(),
        ])?;
    }
    w.flush()
}

/// Where a product goes: its recommender item (if any) and its demand group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Item index in the recommender.
    pub item: Option<u32>,
    /// Product group in the demand model.
    pub group: String,
}

/// The task's catalogue: product id to [`Entry`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalogue {
    /// By product id.
    pub products: HashMap<String, Entry>,
}

/// Reads a catalogue (`product,item,group`).
///
/// # Errors
///
/// See [`CsvError`]; a product listed twice is an error naming its second line.
pub fn load_catalogue(path: &Path) -> Result<Catalogue, CsvError> {
    let file =
        std::fs::File::open(path).map_err(|source| CsvError::Io { path: path.into(), source })?;
    read_catalogue(file, path)
}

/// [`load_catalogue`] from any reader.
///
/// # Errors
///
/// See [`load_catalogue`].
pub fn read_catalogue(reader: impl std::io::Read, path: &Path) -> Result<Catalogue, CsvError> {
    let mut products = HashMap::new();
    read_table(reader, path, &CATALOGUE_COLUMNS, "product,item,group", |f| {
        let product = f.text(0)?;
        let item = match f.text(1) {
            Err(_) => None, // empty: not in the recommender
            Ok(v) => Some(v.parse::<u32>().map_err(|_| {
                f.bad(1, format!("{v:?} is not an item index (a whole number ≥ 0) or empty"))
            })?),
        };
        let group = f.text(2)?;
        if products.insert(product.clone(), Entry { item, group }).is_some() {
            return Err(f.bad(0, format!("product {product:?} is listed twice")));
        }
        Ok(())
    })?;
    Ok(Catalogue { products })
}

impl Catalogue {
    /// The purchases as sales rows of their product groups (products not in the catalogue are
    /// left out; the second value counts their lines).
    pub fn sales_rows(&self, rows: &[PurchaseRow]) -> (Vec<SalesRow>, usize) {
        let mut unknown = 0;
        let sales = rows
            .iter()
            .filter_map(|r| {
                let Some(entry) = self.products.get(&r.product) else {
                    unknown += 1;
                    return None;
                };
                Some(SalesRow {
                    day: r.day,
                    store: r.store.clone(),
                    product: entry.group.clone(),
                    quantity: r.quantity,
                    price: r.price,
                    discount: r.discount,
                })
            })
            .collect();
        (sales, unknown)
    }

    /// The purchases as implicit feedback for the recommender: one interaction per customer
    /// and item, its value the number of purchase lines, its time the latest purchase (midnight
    /// of its day). Products without an item are left out.
    pub fn interactions(&self, rows: &[PurchaseRow]) -> Vec<CsvRating> {
        let mut pairs: BTreeMap<(&str, u32), (f32, i64)> = BTreeMap::new();
        for r in rows.iter().filter(|r| r.quantity > 0.0) {
            let Some(item) = self.products.get(&r.product).and_then(|e| e.item) else {
                continue;
            };
            let pair = pairs.entry((r.customer.as_str(), item)).or_insert((0.0, i64::MIN));
            pair.0 += 1.0;
            pair.1 = pair.1.max(r.day * 86_400);
        }
        pairs
            .into_iter()
            .map(|((user, item), (rating, timestamp))| CsvRating {
                user: user.to_string(),
                item,
                rating,
                timestamp,
            })
            .collect()
    }
}

/// One store's purchases from a file that may hold several: its interactions and its weekly
/// sales (over its own first to last week).
///
/// # Errors
///
/// Reading errors, or no rows for `store` (naming the stores the file has).
pub fn load_store(
    path: &Path,
    store: &str,
    catalogue: &Catalogue,
) -> Result<(Vec<CsvRating>, StoreSales), CsvError> {
    let rows = load_purchases(path)?;
    let mine: Vec<PurchaseRow> = rows.iter().filter(|r| r.store == store).cloned().collect();
    if mine.is_empty() {
        return Err(no_rows_for(path, store, rows.iter().map(|r| r.store.as_str())));
    }
    let (sales, unknown) = catalogue.sales_rows(&mine);
    if unknown > 0 {
        tracing::warn!(
            lines = unknown,
            "purchase lines of products not in the catalogue are left out"
        );
    }
    Ok((catalogue.interactions(&mine), StoreSales::from_rows(&sales, None)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "date,store,customer,product,quantity,price,discount\n";

    fn read(text: &str) -> Result<Vec<PurchaseRow>, CsvError> {
        read_purchases(text.as_bytes(), Path::new("purchases.csv"))
    }

    fn catalogue() -> Catalogue {
        read_catalogue(
            "product,item,group\np1,0,PRODUCE\np2,1,DELI\np3,,PRODUCE\n".as_bytes(),
            Path::new("catalogue.csv"),
        )
        .unwrap()
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let err = read(&format!("{HEADER}2017-01-02,S,c1,p1,1,2,0\n2017-01-03,S,c1,p1,x,2,0\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(err, "purchases.csv:3: column \"quantity\": \"x\" is not a number");
        let err = read(&format!("{HEADER}2017-01-02,S,,p1,1,2,0\n")).unwrap_err().to_string();
        assert_eq!(err, "purchases.csv:2: column \"customer\": is empty");
        let err = read(&format!("{HEADER}2017-13-02,S,c,p1,1,2,0\n")).unwrap_err().to_string();
        assert!(err.starts_with("purchases.csv:2: column \"date\": \"2017-13-02\""), "{err}");
        let err = read("date,store,product,quantity,price,discount\n2017-01-02,S,p,1,2,0\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("purchases.csv:1: missing column \"customer\""), "{err}");
        let err = read_catalogue(
            "product,item,group\np1,0,A\np1,1,B\n".as_bytes(),
            Path::new("catalogue.csv"),
        )
        .unwrap_err()
        .to_string();
        assert_eq!(err, "catalogue.csv:3: column \"product\": product \"p1\" is listed twice");
        let err = read_catalogue("product,item,group\np1,-3,A\n".as_bytes(), Path::new("c.csv"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("c.csv:2: column \"item\": \"-3\" is not an item index"), "{err}");
    }

    #[test]
    fn one_file_gives_both_interactions_and_weekly_sales() {
        let rows = read(&format!(
            "{HEADER}2017-01-02,S,c1,p1,2,1.0,0.5\n2017-01-09,S,c1,p1,1,1.0,0\n\
             2017-01-03,S,c2,p3,4,2.0,0\n2017-01-04,S,c2,p9,1,2.0,0\n"
        ))
        .unwrap();
        let cat = catalogue();
        // c1 bought p1 (item 0) twice, the latest on 2017-01-09; p3 has no item; p9 is unknown.
        let interactions = cat.interactions(&rows);
        assert_eq!(interactions.len(), 1);
        assert_eq!(interactions[0].user, "c1");
        assert_eq!((interactions[0].item, interactions[0].rating), (0, 2.0));
        assert_eq!(interactions[0].timestamp, 17_175 * 86_400, "2017-01-09");
        let (sales, unknown) = cat.sales_rows(&rows);
        assert_eq!(unknown, 1);
        let weekly = StoreSales::from_rows(&sales, None);
        assert_eq!(weekly.n_weeks, 2);
        // Produce: 2 + 4 units in the first week (p1 and p3), 1 in the second.
        assert_eq!(weekly.groups["PRODUCE"].0, vec![6.0, 1.0]);
    }

    #[test]
    fn written_purchases_read_back() {
        let rows = read(&format!("{HEADER}2017-01-02,S,c1,p1,2,1.5,0.25\n")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.csv");
        write_purchases(&path, &rows).unwrap();
        assert_eq!(load_purchases(&path).unwrap(), rows);
        let (interactions, sales) = load_store(&path, "S", &catalogue()).unwrap();
        assert_eq!(interactions.len(), 1);
        assert_eq!(sales.groups["PRODUCE"].0, vec![2.0]);
        let err = load_store(&path, "T", &catalogue()).unwrap_err().to_string();
        assert!(err.contains("no rows for store \"T\"; the file has S"), "{err}");
    }
}
