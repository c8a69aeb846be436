//! The product catalogue: a product's searchable columns beside its document.

use crm_kit::ApiError;
use crm_kit::db::{Edit, Sql, idempotency};
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::Product;
use prost::Message;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{CREATED_PRODUCT, Store};
use crate::domain;

const COLUMNS: &str = "id, name_key, active, created_at, updated_at, version, doc";

/// The filterable fields of ListProducts.
pub const FIELDS: &[Field] = &[
    Field { name: "active", column: "active", kind: FieldKind::Bool },
    Field { name: "sku", column: "sku_key", kind: FieldKind::Lowercase },
];

/// By name.
pub const ORDER: Order = Order::text("name_key");

/// A product listing, decoded.
#[derive(Debug, Clone)]
pub struct ProductQuery {
    pub filter: Option<Filter>,
    /// Lower-cased substring of the name or SKU.
    pub query: String,
    pub page: Page,
}

pub(crate) fn decode(row: &AnyRow) -> Result<Product, ApiError> {
    let id: String = row.try_get("id")?;
    let doc: Vec<u8> = row.try_get("doc")?;
    let mut p = Product::decode(doc.as_slice())
        .map_err(|e| ApiError::Internal(format!("stored product {id} does not decode: {e}")))?;
    p.active = row.try_get::<i64, _>("active")? != 0;
    p.create_time = to_timestamp(row.try_get("created_at")?);
    p.update_time = to_timestamp(row.try_get("updated_at")?);
    p.etag = row.try_get::<i64, _>("version")?.to_string();
    p.id = id;
    Ok(p)
}

fn doc(p: &Product) -> Vec<u8> {
    Product {
        name: p.name.clone(),
        sku: p.sku.clone(),
        description: p.description.clone(),
        prices: p.prices.clone(),
        ..Product::default()
    }
    .encode_to_vec()
}

fn duplicate_sku(sku: &str) -> ApiError {
    ApiError::invalid("product.sku", format!("another product has the SKU {sku:?}"))
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("product {id} not found"))
}

/// `%text%` for LIKE, with the wildcards in `text` escaped.
fn like(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_");
    format!("%{escaped}%")
}

impl Store {
    /// Adds `product` (normalised) to the catalogue, active. With a `request_id`, the caller's
    /// repeated call returns the product their first one added.
    pub async fn create_product(
        &self,
        mut product: Product,
        caller: &str,
        request_id: &str,
    ) -> Result<Product, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db.begin_write().await?;
        if let idempotency::Claim::Retry { record_id, .. } =
            idempotency::claim(&mut tx, caller, request_id, CREATED_PRODUCT, &id, now).await?
        {
            tx.rollback().await?;
            return self.get_product(&record_id).await;
        }
        product.id = id;
        product.active = true;
        let mut sql = Sql::new(
            "INSERT INTO products (id, name, name_key, sku_key, active, created_at, updated_at, version, doc) VALUES ",
        );
        sql.push_values([&product], |v, p| {
            v.bind(p.id.as_str()).bind(p.name.as_str()).bind(domain::key(&p.name)).bind(domain::key(&p.sku));
            v.bind(1_i64).bind(now).bind(now).bind(1_i64).bind(doc(p));
        });
        match sql.query().execute(&mut *tx).await {
            Err(err) if crm_kit::db::is_unique_violation(&err) => return Err(duplicate_sku(&product.sku)),
            other => other?,
        };
        tx.commit().await?;
        product.create_time = to_timestamp(now);
        product.update_time = to_timestamp(now);
        product.etag = "1".into();
        Ok(product)
    }

    pub async fn get_product(&self, id: &str) -> Result<Product, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM products WHERE id = ").bind(id);
        let row = sql.query().fetch_optional(self.db.pool()).await?.ok_or_else(|| not_found(id))?;
        decode(&row)
    }

    /// Changes the product `id` under its row lock; ABORTED when `etag` is set and stale.
    pub async fn edit_product(
        &self,
        id: &str,
        etag: &str,
        change: impl FnOnce(&mut Product) -> Result<(), ApiError>,
    ) -> Result<Product, ApiError> {
        let mut select = Sql::new("SELECT ");
        select.push(COLUMNS).push(" FROM products WHERE id = ").bind(id);
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "products", "product", id, select).await?;
        edit.require_etag(etag)?;
        let old = decode(&row)?;
        let mut product = old.clone();
        change(&mut product)?;
        if product == old {
            edit.abandon().await?;
            return Ok(old);
        }
        let now = now_micros();
        let mut set = Sql::new("name = ");
        set.bind(product.name.as_str()).push(", name_key = ").bind(domain::key(&product.name));
        set.push(", sku_key = ").bind(domain::key(&product.sku)).push(", active = ").bind(i64::from(product.active));
        set.push(", doc = ").bind(doc(&product));
        let sku = product.sku.clone();
        let version = edit.save_unique(set, now, |_| duplicate_sku(&sku)).await?;
        edit.commit().await?;
        product.etag = version.to_string();
        product.update_time = to_timestamp(now);
        Ok(product)
    }

    /// One page of the catalogue by name.
    pub async fn list_products(&self, query: &ProductQuery) -> Result<(Vec<Product>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM products WHERE 1=1");
        if let Some(filter) = &query.filter {
            filter.push_onto(&mut sql);
        }
        if !query.query.is_empty() {
            let pattern = like(&query.query);
            sql.push(" AND (name_key LIKE ").bind(pattern.as_str()).push(" ESCAPE '\\' OR sku_key LIKE ");
            sql.bind(pattern.as_str()).push(" ESCAPE '\\')");
        }
        query.page.push_keyset(&mut sql, &ORDER);
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        query.page.finish(&rows, &ORDER, decode)
    }
}
