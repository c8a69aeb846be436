//! `OrgService`: the organisation (departments, users, roles, service accounts) and the
//! security audit. Reads need `org.read` or `org.admin`; changes and the audit need `org.admin`.

use crm_kit::auth::{self, Principal};
use crm_kit::filter;
use crm_kit::page::Page;
use crm_kit::time::now_micros;
use crm_kit::{ApiError, Violations, respond};
use crm_proto::auth::v1::org_service_server::OrgService;
use crm_proto::auth::v1::*;
use tonic::{Request, Response, Status};

use super::{AuthApi, caller, can_read, micros, paths, uuid};
use crate::domain::secrets::{self, MAX_PASSWORD_CHARS};
use crate::domain::{self, events};
use crate::permissions::ORG_ADMIN;
use crate::store::{
    Actor, DEPARTMENT_FIELDS, DEPARTMENT_ORDER, EVENT_FIELDS, EVENT_ORDER, Event, LockPolicy, NewServiceAccount,
    ROLE_ORDER, SERVICE_ACCOUNT_ORDER, USER_FIELDS, USER_ORDER,
};

impl AuthApi {
    async fn change_user(
        &self,
        principal: Principal,
        actor: Actor,
        patch: Option<User>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<User, ApiError> {
        principal.require(ORG_ADMIN.name)?;
        let patch = patch.ok_or_else(|| ApiError::invalid("user", "is required"))?;
        uuid("user.id", &patch.id)?;
        let paths = paths(mask);
        let id = patch.id.clone();
        let etag = patch.etag.clone();
        let myself = principal.subject == id && !principal.service_account;
        self.store
            .update_user(&id, &etag, &actor, move |user: &mut User| {
                let was_active = user.active;
                let mut v = Violations::new();
                domain::USER_MASK.apply(user, &patch, &paths, &mut v);
                v.check()?;
                let mut v = Violations::new();
                domain::normalize_user(user, &mut v);
                v.check()?;
                if myself && was_active && !user.active {
                    return Err(ApiError::FailedPrecondition(
                        "you cannot deactivate yourself; ask another administrator".into(),
                    ));
                }
                Ok(())
            })
            .await
    }

    async fn change_password(&self, principal: Principal, actor: Actor, r: SetPasswordRequest) -> Result<(), ApiError> {
        let admin = principal.has(ORG_ADMIN.name);
        if !admin && (principal.service_account || principal.subject != r.user_id) {
            return Err(ApiError::PermissionDenied(format!(
                "setting another user's password needs the permission {}",
                ORG_ADMIN.name
            )));
        }
        let mut v = Violations::new();
        v.uuid("user_id", &r.user_id);
        domain::check_new_password(&mut v, "new_password", &r.new_password);
        if !admin && r.current_password.is_empty() {
            v.add("current_password", "is required to change your own password");
        }
        v.check()?;
        let event = Event { user_id: r.user_id.clone(), ..actor.event(events::PASSWORD_CHANGED) };
        if !admin {
            let credentials = self
                .store
                .password_hash(&r.user_id)
                .await?
                .ok_or_else(|| ApiError::unauthenticated("the account no longer exists"))?;
            let plausible = r.current_password.chars().count() <= MAX_PASSWORD_CHARS;
            let correct = secrets::check_password(
                if plausible { &r.current_password } else { "" },
                Some(&credentials.password_hash),
            )
            .await?;
            let now = now_micros();
            let locked = credentials.locked_until > now;
            if !correct || locked || !credentials.active {
                // Guesses here count towards the same lock-out as sign-in.
                let policy = (!locked && credentials.active).then(|| LockPolicy {
                    max_failures: i64::from(self.policy.max_failed_sign_ins.max(1)),
                    lock_until: now.saturating_add(micros(self.policy.lockout)),
                });
                let detail = if locked { "the account is locked" } else { "wrong current password" };
                let failed = Event { kind: events::PASSWORD_CHANGE_FAILED, detail: detail.into(), ..event };
                self.store.password_failed(&r.user_id, policy, &failed).await?;
                return Err(ApiError::invalid("current_password", "is incorrect, or the account is locked"));
            }
        }
        let hash = secrets::hash_password_async(&r.new_password).await?;
        self.store.set_password(&r.user_id, &hash, &event).await
    }
}

/// Most users one BatchGetUsers call asks for.
pub const MAX_BATCH_USERS: usize = 500;

#[tonic::async_trait]
impl OrgService for AuthApi {
    async fn create_department(
        &self,
        request: Request<CreateDepartmentRequest>,
    ) -> Result<Response<Department>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let mut department =
                request.into_inner().department.ok_or_else(|| ApiError::invalid("department", "is required"))?;
            department.id.clear();
            let mut v = Violations::new();
            domain::normalize_department(&mut department, &mut v);
            v.check()?;
            self.store.create_department(&department, &actor).await
        };
        respond(result.await)
    }

    async fn get_department(&self, request: Request<GetDepartmentRequest>) -> Result<Response<Department>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_department(&id).await
        };
        respond(result.await)
    }

    async fn list_departments(
        &self,
        request: Request<ListDepartmentsRequest>,
    ) -> Result<Response<ListDepartmentsResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let page = Page::decode(&["departments", &r.filter], r.page_size, &r.page_token, &DEPARTMENT_ORDER)?;
            let filter = filter::parse(&r.filter, DEPARTMENT_FIELDS)?;
            let (departments, next_page_token) = self.store.list_departments(filter.as_ref(), &page).await?;
            Ok(ListDepartmentsResponse { departments, next_page_token })
        };
        respond(result.await)
    }

    async fn list_department_members(
        &self,
        request: Request<ListDepartmentMembersRequest>,
    ) -> Result<Response<ListDepartmentMembersResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().department_id;
            uuid("department_id", &id)?;
            // NOT_FOUND for no department, rather than an empty list that reads as "nobody".
            self.store.get_department(&id).await?;
            Ok(ListDepartmentMembersResponse { user_ids: self.store.department_members(&id, true).await? })
        };
        respond(result.await)
    }

    async fn update_department(
        &self,
        request: Request<UpdateDepartmentRequest>,
    ) -> Result<Response<Department>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            let patch = r.department.ok_or_else(|| ApiError::invalid("department", "is required"))?;
            uuid("department.id", &patch.id)?;
            let paths = paths(r.update_mask);
            let (id, etag) = (patch.id.clone(), patch.etag.clone());
            self.store
                .update_department(&id, &etag, &actor, move |department: &mut Department| {
                    let mut v = Violations::new();
                    domain::DEPARTMENT_MASK.apply(department, &patch, &paths, &mut v);
                    v.check()?;
                    let mut v = Violations::new();
                    domain::normalize_department(department, &mut v);
                    v.check()
                })
                .await
        };
        respond(result.await)
    }

    async fn delete_department(&self, request: Request<DeleteDepartmentRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            uuid("id", &r.id)?;
            self.store.delete_department(&r.id, &r.etag, &actor).await
        };
        respond(result.await)
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            let mut user = r.user.ok_or_else(|| ApiError::invalid("user", "is required"))?;
            user.id.clear();
            let mut v = Violations::new();
            domain::normalize_user(&mut user, &mut v);
            domain::check_new_password(&mut v, "password", &r.password);
            v.check()?;
            let hash = secrets::hash_password_async(&r.password).await?;
            self.store.create_user(&user, &hash, &actor).await
        };
        respond(result.await)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_user(&id).await
        };
        respond(result.await)
    }

    async fn batch_get_users(
        &self,
        request: Request<BatchGetUsersRequest>,
    ) -> Result<Response<BatchGetUsersResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let mut v = Violations::new();
            v.max_items("ids", &r.ids, MAX_BATCH_USERS);
            for (i, id) in r.ids.iter().enumerate().take(MAX_BATCH_USERS) {
                v.uuid(&format!("ids[{i}]"), id);
            }
            v.check()?;
            let mut ids: Vec<String> = Vec::with_capacity(r.ids.len());
            for id in r.ids {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            Ok(BatchGetUsersResponse { users: self.store.get_users(&ids).await? })
        };
        respond(result.await)
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let page = Page::decode(&["users", &r.filter], r.page_size, &r.page_token, &USER_ORDER)?;
            let filter = filter::parse(&r.filter, USER_FIELDS)?;
            let (users, next_page_token) = self.store.list_users(filter.as_ref(), &page).await?;
            Ok(ListUsersResponse { users, next_page_token })
        };
        respond(result.await)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            let r = request.into_inner();
            self.change_user(principal, actor, r.user, r.update_mask).await
        };
        respond(result.await)
    }

    async fn set_password(&self, request: Request<SetPasswordRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            self.change_password(principal, actor, request.into_inner()).await
        };
        respond(result.await)
    }

    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let mut role = request.into_inner().role.ok_or_else(|| ApiError::invalid("role", "is required"))?;
            role.id.clear();
            let mut v = Violations::new();
            domain::normalize_role(&mut role, &self.catalog, &mut v);
            v.check()?;
            self.store.create_role(&role, &actor).await
        };
        respond(result.await)
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_role(&id).await
        };
        respond(result.await)
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let page = Page::decode(&["roles"], r.page_size, &r.page_token, &ROLE_ORDER)?;
            let (roles, next_page_token) = self.store.list_roles(&page).await?;
            Ok(ListRolesResponse { roles, next_page_token })
        };
        respond(result.await)
    }

    async fn update_role(&self, request: Request<UpdateRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            let patch = r.role.ok_or_else(|| ApiError::invalid("role", "is required"))?;
            uuid("role.id", &patch.id)?;
            let paths = paths(r.update_mask);
            let (id, etag) = (patch.id.clone(), patch.etag.clone());
            let catalog = self.catalog.clone();
            self.store
                .update_role(&id, &etag, &actor, move |role: &mut Role| {
                    let mut v = Violations::new();
                    domain::ROLE_MASK.apply(role, &patch, &paths, &mut v);
                    v.check()?;
                    let mut v = Violations::new();
                    domain::normalize_role(role, &catalog, &mut v);
                    v.check()
                })
                .await
        };
        respond(result.await)
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            uuid("id", &r.id)?;
            self.store.delete_role(&r.id, &r.etag, &actor).await
        };
        respond(result.await)
    }

    async fn create_service_account(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<Response<CreateServiceAccountResponse>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let mut account = request
                .into_inner()
                .service_account
                .ok_or_else(|| ApiError::invalid("service_account", "is required"))?;
            let mut v = Violations::new();
            domain::normalize_service_account(&mut account, &mut v);
            v.check()?;
            let client_secret = secrets::random_token();
            let new = NewServiceAccount {
                name: account.name,
                client_id: secrets::client_id(),
                secret_hash: secrets::token_hash(&client_secret),
                role_ids: account.role_ids,
            };
            let service_account = self.store.create_service_account(&new, &actor).await?;
            Ok(CreateServiceAccountResponse { service_account: Some(service_account), client_secret })
        };
        respond(result.await)
    }

    async fn list_service_accounts(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> Result<Response<ListServiceAccountsResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let page = Page::decode(&["service_accounts"], r.page_size, &r.page_token, &SERVICE_ACCOUNT_ORDER)?;
            let (service_accounts, next_page_token) = self.store.list_service_accounts(&page).await?;
            Ok(ListServiceAccountsResponse { service_accounts, next_page_token })
        };
        respond(result.await)
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN.name)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.delete_service_account(&id, &actor).await
        };
        respond(result.await)
    }

    async fn list_security_events(
        &self,
        request: Request<ListSecurityEventsRequest>,
    ) -> Result<Response<ListSecurityEventsResponse>, Status> {
        let result = async {
            auth::principal(&request)?.require(ORG_ADMIN.name)?;
            let r = request.into_inner();
            let page = Page::decode(&["security_events", &r.filter], r.page_size, &r.page_token, &EVENT_ORDER)?;
            let filter = filter::parse(&r.filter, EVENT_FIELDS)?;
            let (events, next_page_token) = self.store.list_events(filter.as_ref(), &page).await?;
            Ok(ListSecurityEventsResponse { events, next_page_token })
        };
        respond(result.await)
    }
}
