//! The first start: the organisation a fresh database starts with, and the suite's own service
//! account, made sure of at every start. Both are safe when several replicas start at once.

use crm_kit::ApiError;
use crm_kit::db::Sql;
use crm_kit::time::now_micros;
use crm_proto::auth::v1::{DataScope, Role};
use sqlx::Row;

use super::departments::DEPARTMENT_COLUMNS;
use super::events::insert_event;
use super::identities::{permissions_json, permissions_of};
use super::roles::{ROLE_COLUMNS, role_key};
use super::users::USER_COLUMNS;
use super::{Event, FIRST_START, Store, set_role_links};
use crate::domain::events;

/// The organisation a fresh database starts with.
pub struct BootstrapPlan {
    pub roles: Vec<Role>,
    pub department_name: String,
    pub admin_email: String,
    pub admin_display_name: String,
    pub admin_password_hash: String,
    /// Name of the role the administrator holds (one of `roles`).
    pub admin_role: String,
}

/// The suite's own service account as it should be.
pub struct SuiteAccountPlan {
    pub role_name: String,
    /// What the role holds (every permission the services need of each other).
    pub permissions: Vec<String>,
    pub account_name: String,
    pub client_id: String,
    pub secret_hash: Vec<u8>,
}

/// What making sure of the suite's service account did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuiteAccount {
    Created,
    /// Its secret or its role's permissions were brought up to date.
    Updated,
    Unchanged,
}

impl Store {
    /// Whether any user exists.
    pub async fn has_users(&self) -> Result<bool, ApiError> {
        Ok(Sql::new("SELECT id FROM users LIMIT 1").query().fetch_optional(self.db().pool()).await?.is_some())
    }

    /// Creates the starting organisation of `plan` in one transaction if there are no users yet;
    /// answers whether it did. Safe when several replicas start at once: one creates it.
    pub async fn bootstrap(&self, plan: &BootstrapPlan) -> Result<bool, ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        self.db().one_writer_at_a_time(&mut tx, FIRST_START).await?;
        if Sql::new("SELECT id FROM users LIMIT 1").query().fetch_optional(&mut *tx).await?.is_some() {
            tx.rollback().await?;
            return Ok(false);
        }
        let mut admin_role = None;
        for role in &plan.roles {
            let mut sql = Sql::new("INSERT INTO roles (");
            sql.push(ROLE_COLUMNS)
                .push(", name_key) VALUES (")
                .bind(crm_kit::id::new())
                .push(", ")
                .bind(role.name.as_str());
            sql.push(", ").bind(permissions_json(&role.permissions)).push(", ").bind(i64::from(role.data_scope));
            sql.push(", ").bind(now).push(", ").bind(now).push(", 1, ").bind(role_key(&role.name));
            sql.push(") ON CONFLICT (name_key) DO NOTHING");
            sql.query().execute(&mut *tx).await?;
            if role.name == plan.admin_role {
                let mut sql = Sql::new("SELECT id FROM roles WHERE name_key = ");
                sql.bind(role_key(&role.name));
                admin_role = Some(sql.query().fetch_one(&mut *tx).await?.try_get::<String, _>("id")?);
            }
        }
        let admin_role =
            admin_role.ok_or_else(|| ApiError::Internal("the administrator's role is not in the plan".into()))?;
        let department = crm_kit::id::new();
        let mut sql = Sql::new("INSERT INTO departments (");
        sql.push(DEPARTMENT_COLUMNS).push(") VALUES (").bind(department.as_str()).push(", ");
        sql.bind(plan.department_name.as_str()).push(", '', '', ").bind(now).push(", ").bind(now).push(", 1)");
        sql.query().execute(&mut *tx).await?;
        let admin = crm_kit::id::new();
        let mut sql = Sql::new("INSERT INTO users (");
        sql.push(USER_COLUMNS).push(", password_hash) VALUES (").bind(admin.as_str()).push(", ");
        sql.bind(plan.admin_email.as_str()).push(", ").bind(plan.admin_display_name.as_str()).push(", '', ");
        sql.bind(department.as_str()).push(", '', 1, ").bind(now).push(", ").bind(now).push(", 1, ");
        sql.bind(plan.admin_password_hash.as_str()).push(")");
        sql.query().execute(&mut *tx).await?;
        let mut sql = Sql::new("INSERT INTO user_roles (user_id, role_id) VALUES (");
        sql.bind(admin.as_str()).push(", ").bind(admin_role).push(")");
        sql.query().execute(&mut *tx).await?;
        let event = Event {
            kind: events::ORGANISATION_BOOTSTRAPPED,
            user_id: admin,
            email: plan.admin_email.clone(),
            detail: format!(
                "created {} roles, the department {:?} and the administrator",
                plan.roles.len(),
                plan.department_name
            ),
            ..Event::default()
        };
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Makes sure the suite's service account exists as `plan` says: the role (created, or its
    /// permissions and scope ALL restored), the account with that client id (created, or its
    /// secret replaced) holding the role. Records what it changed.
    pub async fn ensure_suite_account(&self, plan: &SuiteAccountPlan) -> Result<SuiteAccount, ApiError> {
        let now = now_micros();
        let mut tx = self.db().begin_write().await?;
        self.db().one_writer_at_a_time(&mut tx, FIRST_START).await?;
        let mut outcome = SuiteAccount::Unchanged;
        let mut sql = Sql::new("SELECT id, permissions, data_scope, version FROM roles WHERE name_key = ");
        sql.bind(role_key(&plan.role_name));
        let role_id = match sql.query().fetch_optional(&mut *tx).await? {
            Some(row) => {
                let id: String = row.try_get("id")?;
                let held = permissions_of(&row.try_get::<String, _>("permissions")?)?;
                let scope: i64 = row.try_get("data_scope")?;
                if held != plan.permissions || scope != DataScope::All as i64 {
                    let version: i64 = row.try_get("version")?;
                    let mut sql = Sql::new("UPDATE roles SET permissions = ");
                    sql.bind(permissions_json(&plan.permissions)).push(", data_scope = ").bind(DataScope::All as i64);
                    sql.push(", updated_at = ").bind(now).push(", version = ").bind(version + 1);
                    sql.push(" WHERE id = ").bind(id.as_str());
                    sql.query().execute(&mut *tx).await?;
                    let detail = format!(
                        "role {id} {:?} of the suite's service account: permissions [{}] -> [{}], scope ALL",
                        plan.role_name,
                        held.join(", "),
                        plan.permissions.join(", ")
                    );
                    insert_event(&mut tx, &Event { kind: events::ROLE_CHANGED, detail, ..Event::default() }).await?;
                    outcome = SuiteAccount::Updated;
                }
                id
            }
            None => {
                let id = crm_kit::id::new();
                let mut sql = Sql::new("INSERT INTO roles (");
                sql.push(ROLE_COLUMNS).push(", name_key) VALUES ");
                sql.push_values([()], |v, ()| {
                    v.bind(id.as_str()).bind(plan.role_name.as_str()).bind(permissions_json(&plan.permissions));
                    v.bind(DataScope::All as i64).bind(now).bind(now).bind(1_i64).bind(role_key(&plan.role_name));
                });
                sql.query().execute(&mut *tx).await?;
                let detail = format!(
                    "role {id} {:?} of the suite's service account: permissions [{}], scope ALL",
                    plan.role_name,
                    plan.permissions.join(", ")
                );
                insert_event(&mut tx, &Event { kind: events::ROLE_CREATED, detail, ..Event::default() }).await?;
                outcome = SuiteAccount::Created;
                id
            }
        };
        let mut sql = Sql::new("SELECT id, secret_hash FROM service_accounts WHERE client_id = ");
        sql.bind(plan.client_id.as_str());
        let account = match sql.query().fetch_optional(&mut *tx).await? {
            Some(row) => {
                let id: String = row.try_get("id")?;
                let stored: Vec<u8> = row.try_get("secret_hash")?;
                if stored != plan.secret_hash {
                    let mut sql = Sql::new("UPDATE service_accounts SET secret_hash = ");
                    sql.bind(plan.secret_hash.clone()).push(" WHERE id = ").bind(id.as_str());
                    sql.query().execute(&mut *tx).await?;
                    let detail = format!(
                        "the secret of the suite's service account {id}, client id {}, was replaced",
                        plan.client_id
                    );
                    let event = Event { kind: events::SERVICE_ACCOUNT_SECRET_CHANGED, detail, ..Event::default() };
                    insert_event(&mut tx, &event).await?;
                    if outcome == SuiteAccount::Unchanged {
                        outcome = SuiteAccount::Updated;
                    }
                }
                id
            }
            None => {
                let id = crm_kit::id::new();
                let mut sql =
                    Sql::new("INSERT INTO service_accounts (id, name, client_id, secret_hash, created_at) VALUES ");
                sql.push_values([()], |v, ()| {
                    v.bind(id.as_str()).bind(plan.account_name.as_str()).bind(plan.client_id.as_str());
                    v.bind(plan.secret_hash.clone()).bind(now);
                });
                sql.query().execute(&mut *tx).await?;
                let detail = format!(
                    "service account {id} {:?}, client id {}, roles [{}]",
                    plan.account_name, plan.client_id, plan.role_name
                );
                insert_event(&mut tx, &Event { kind: events::SERVICE_ACCOUNT_CREATED, detail, ..Event::default() })
                    .await?;
                outcome = SuiteAccount::Created;
                id
            }
        };
        let mut sql = Sql::new("SELECT role_id FROM service_account_roles WHERE account_id = ");
        sql.bind(account.as_str()).push(" AND role_id = ").bind(role_id.as_str());
        if sql.query().fetch_optional(&mut *tx).await?.is_none() {
            let mut sql = Sql::new("SELECT role_id FROM service_account_roles WHERE account_id = ");
            sql.bind(account.as_str());
            let mut roles: Vec<String> = sql
                .query()
                .fetch_all(&mut *tx)
                .await?
                .iter()
                .map(|r| r.try_get("role_id"))
                .collect::<Result<_, _>>()?;
            roles.push(role_id);
            set_role_links(&mut tx, "service_account_roles", "account_id", &account, &roles).await?;
            if outcome == SuiteAccount::Unchanged {
                outcome = SuiteAccount::Updated;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }
}
