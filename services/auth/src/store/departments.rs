//! The department tree: `parent_id` '' is a top-level department; a move that would close a
//! cycle is refused, and moves run one at a time so that two of them cannot close one together.

use crm_kit::ApiError;
use crm_kit::db::{Edit, Sql, Tx};
use crm_kit::filter::{Field, FieldKind, Filter};
use crm_kit::page::{Order, Page};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::auth::v1::Department;
use crm_proto::auth::v1::{Change, DepartmentChanged};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::events::insert_event;
use super::{Actor, DEPARTMENT_TREE, Store, etag};
use crate::domain::events;

pub(super) const DEPARTMENT_COLUMNS: &str = "id, name, parent_id, head_id, created_at, updated_at, version";

/// What `ListDepartments` filters on.
pub const DEPARTMENT_FIELDS: &[Field] = &[Field { name: "parent_id", column: "parent_id", kind: FieldKind::Text }];

/// Departments are listed by name.
pub const DEPARTMENT_ORDER: Order = Order::text("name");

fn department_of(row: &AnyRow) -> Result<Department, ApiError> {
    Ok(Department {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        parent_id: row.try_get("parent_id")?,
        head_id: row.try_get("head_id")?,
        create_time: to_timestamp(row.try_get("created_at")?),
        update_time: to_timestamp(row.try_get("updated_at")?),
        etag: etag(row.try_get("version")?),
    })
}

fn select(id: &str) -> Sql {
    let mut sql = Sql::new("SELECT ");
    sql.push(DEPARTMENT_COLUMNS).push(" FROM departments WHERE id = ").bind(id);
    sql
}

fn department_changed(id: &str, change: Change, name: &str, parent_id: &str) -> DepartmentChanged {
    DepartmentChanged {
        department_id: id.to_string(),
        change: change as i32,
        name: name.to_string(),
        parent_id: parent_id.to_string(),
    }
}

impl Store {
    /// INVALID_ARGUMENT on `field` unless department `id` exists; it cannot go until `tx` ends.
    pub(super) async fn check_department(&self, tx: &mut Tx, field: &str, id: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM departments WHERE id = ");
        sql.bind(id).push(self.db().for_share());
        if sql.query().fetch_optional(&mut **tx).await?.is_none() {
            return Err(ApiError::invalid(field, "no department has this id"));
        }
        Ok(())
    }

    /// INVALID_ARGUMENT on `department.head_id` unless user `id` exists.
    async fn check_head(&self, tx: &mut Tx, id: &str) -> Result<(), ApiError> {
        let mut sql = Sql::new("SELECT id FROM users WHERE id = ");
        sql.bind(id).push(self.db().for_share());
        if sql.query().fetch_optional(&mut **tx).await?.is_none() {
            return Err(ApiError::invalid("department.head_id", "no user has this id"));
        }
        Ok(())
    }

    pub async fn create_department(&self, d: &Department, actor: &Actor) -> Result<Department, ApiError> {
        let now = now_micros();
        let id = crm_kit::id::new();
        let mut tx = self.db().begin_write().await?;
        if !d.parent_id.is_empty() {
            self.check_department(&mut tx, "department.parent_id", &d.parent_id).await?;
        }
        if !d.head_id.is_empty() {
            self.check_head(&mut tx, &d.head_id).await?;
        }
        let mut sql = Sql::new("INSERT INTO departments (");
        sql.push(DEPARTMENT_COLUMNS).push(") VALUES ");
        sql.push_values([d], |v, d| {
            v.bind(id.as_str()).bind(&d.name).bind(&d.parent_id).bind(&d.head_id).bind(now).bind(now).bind(1_i64);
        });
        sql.query().execute(&mut *tx).await?;
        let mut event = actor.event(events::DEPARTMENT_CREATED);
        event.detail = format!("department {id} {:?} under {:?}", d.name, d.parent_id);
        insert_event(&mut tx, &event).await?;
        self.publish(&mut tx, &id, actor, &department_changed(&id, Change::Created, &d.name, &d.parent_id)).await?;
        tx.commit().await?;
        Ok(Department {
            id,
            name: d.name.clone(),
            parent_id: d.parent_id.clone(),
            head_id: d.head_id.clone(),
            create_time: to_timestamp(now),
            update_time: to_timestamp(now),
            etag: etag(1),
        })
    }

    pub async fn get_department(&self, id: &str) -> Result<Department, ApiError> {
        let row = select(id)
            .query()
            .fetch_optional(self.db().pool())
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("department {id} not found")))?;
        department_of(&row)
    }

    /// One page of departments by name.
    pub async fn list_departments(
        &self,
        filter: Option<&Filter>,
        page: &Page,
    ) -> Result<(Vec<Department>, String), ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(DEPARTMENT_COLUMNS).push(" FROM departments WHERE 1=1");
        if let Some(filter) = filter {
            filter.push_onto(&mut sql);
        }
        page.push_keyset(&mut sql, &DEPARTMENT_ORDER);
        let rows = sql.query().fetch_all(self.db().pool()).await?;
        page.finish(&rows, &DEPARTMENT_ORDER, department_of)
    }

    /// Renames or moves a department; `change` applies the request to it. A move under the
    /// department itself or anything below it is refused.
    pub async fn update_department<F>(
        &self,
        id: &str,
        etag_sent: &str,
        actor: &Actor,
        change: F,
    ) -> Result<Department, ApiError>
    where
        F: FnOnce(&mut Department) -> Result<(), ApiError>,
    {
        let mut tx = self.db().begin_write().await?;
        self.db().one_writer_at_a_time(&mut tx, DEPARTMENT_TREE).await?;
        let (mut edit, row) = Edit::lock(self.db(), tx, "departments", "department", id, select(id)).await?;
        edit.require_etag(etag_sent)?;
        let old = department_of(&row)?;
        let mut new = old.clone();
        change(&mut new)?;
        if new == old {
            edit.abandon().await?;
            return Ok(old);
        }
        if !new.head_id.is_empty() && new.head_id != old.head_id {
            self.check_head(edit.tx(), &new.head_id).await?;
        }
        let moved = new.parent_id != old.parent_id;
        if moved && !new.parent_id.is_empty() {
            self.check_department(edit.tx(), "department.parent_id", &new.parent_id).await?;
            let mut sql =
                Sql::new("WITH RECURSIVE up (id, parent_id) AS (SELECT id, parent_id FROM departments WHERE id = ");
            sql.bind(new.parent_id.as_str()).push(
                " UNION SELECT d.id, d.parent_id FROM departments d JOIN up ON d.id = up.parent_id) \
                 SELECT id FROM up WHERE id = ",
            );
            sql.bind(id);
            if sql.query().fetch_optional(&mut **edit.tx()).await?.is_some() {
                return Err(ApiError::invalid(
                    "department.parent_id",
                    "would make a cycle: it is the department itself or one of its sub-departments",
                ));
            }
        }
        let now = now_micros();
        let mut assignments = Sql::new("name = ");
        assignments.bind(new.name.as_str()).push(", parent_id = ").bind(new.parent_id.as_str());
        assignments.push(", head_id = ").bind(new.head_id.as_str());
        let version = edit.save(assignments, now).await?;
        if moved {
            let mut event = actor.event(events::DEPARTMENT_MOVED);
            event.detail = format!("department {id} moved from {:?} to {:?}", old.parent_id, new.parent_id);
            insert_event(edit.tx(), &event).await?;
        }
        if new.name != old.name {
            let mut event = actor.event(events::DEPARTMENT_CHANGED);
            event.detail = format!("department {id} renamed from {:?} to {:?}", old.name, new.name);
            insert_event(edit.tx(), &event).await?;
        }
        if new.head_id != old.head_id {
            let mut event = actor.event(events::DEPARTMENT_CHANGED);
            event.detail = format!("department {id} head changed from {:?} to {:?}", old.head_id, new.head_id);
            insert_event(edit.tx(), &event).await?;
        }
        self.publish(edit.tx(), id, actor, &department_changed(id, Change::Updated, &new.name, &new.parent_id)).await?;
        edit.commit().await?;
        new.update_time = to_timestamp(now);
        new.etag = etag(version);
        Ok(new)
    }

    /// Deletes a department without users and sub-departments.
    pub async fn delete_department(&self, id: &str, etag_sent: &str, actor: &Actor) -> Result<(), ApiError> {
        let tx = self.db().begin_write().await?;
        let (mut edit, row) = Edit::lock(self.db(), tx, "departments", "department", id, select(id)).await?;
        edit.require_etag(etag_sent)?;
        let old = department_of(&row)?;
        for (statement, what) in [
            ("SELECT id FROM departments WHERE parent_id = ", "sub-departments"),
            ("SELECT id FROM users WHERE department_id = ", "users"),
        ] {
            let mut probe = Sql::new(statement);
            probe.bind(id);
            edit.refuse_if_referenced(probe, || format!("department {id} still has {what}; move them elsewhere first"))
                .await?;
        }
        edit.delete().await?;
        let mut event = actor.event(events::DEPARTMENT_DELETED);
        event.detail = format!("department {id} {:?}", old.name);
        insert_event(edit.tx(), &event).await?;
        self.publish(edit.tx(), id, actor, &department_changed(id, Change::Deleted, &old.name, &old.parent_id)).await?;
        edit.commit().await
    }
}
