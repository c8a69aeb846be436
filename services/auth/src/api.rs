//! The gRPC surface of both services: decode and validate each request, check the caller's
//! permission, apply the domain rules, call the store, map the result back to protobuf. Errors
//! become statuses in `crm_kit::error`.
//!
//! Sign-in, refresh and service-token failures are one uniform UNAUTHENTICATED each, so that an
//! answer never tells whether an e-mail, a token or a client id exists.

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{self, Claims, ISSUER, ORG_ADMIN, ORG_READ, Principal, Verifier};
use crm_kit::page::page_size;
use crm_kit::time::{now_micros, to_timestamp};
use crm_kit::validate::new_id;
use crm_kit::{ApiError, Violations};
use crm_proto::auth::v1::auth_service_server::AuthService;
use crm_proto::auth::v1::org_service_server::OrgService;
use crm_proto::auth::v1::*;
use tonic::{Request, Response, Status};

use crate::domain::secrets::{self, MAX_PASSWORD_CHARS};
use crate::domain::{self, BAD_CLIENT_CREDENTIALS, BAD_CREDENTIALS, BAD_REFRESH_TOKEN, MAX_EMAIL_CHARS, events};
use crate::keys::{KeyRing, StoreKeys};
use crate::store::{Actor, Event, LockPolicy, NewRefreshToken, NewServiceAccount, Store, Subject};

/// Longest refresh token, client id or client secret looked up (longer ones are refused unread).
const MAX_TOKEN_CHARS: usize = 256;

/// Token lifetimes and the lock-out rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub access_token_ttl: Duration,
    pub refresh_token_ttl: Duration,
    /// Consecutive wrong passwords that lock an account.
    pub max_failed_sign_ins: u32,
    /// How long a lock-out lasts.
    pub lockout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            access_token_ttl: Duration::from_secs(15 * 60),
            refresh_token_ttl: Duration::from_secs(30 * 86_400),
            max_failed_sign_ins: 5,
            lockout: Duration::from_secs(15 * 60),
        }
    }
}

fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Both services, `AuthService` and `OrgService`, over one store.
#[derive(Clone)]
pub struct AuthApi {
    store: Store,
    keys: KeyRing,
    published: Arc<StoreKeys>,
    verifier: Verifier,
    settings: Settings,
}

impl std::fmt::Debug for AuthApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthApi").field("keys", &self.keys).field("settings", &self.settings).finish_non_exhaustive()
    }
}

fn ok<T>(result: Result<T, ApiError>) -> Result<Response<T>, Status> {
    result.map(Response::new).map_err(Status::from)
}

/// The first `max` characters of untrusted text kept in the audit.
fn clip(text: &str, max: usize) -> String {
    text.chars().take(max).collect()
}

/// The caller of a call that needs a token, and who they are for the audit.
fn caller<T>(request: &Request<T>) -> Result<(Principal, Actor), ApiError> {
    let principal = auth::principal(request)?;
    let actor = Actor { id: principal.subject.clone(), client_address: auth::client_address(request) };
    Ok((principal, actor))
}

fn can_read(principal: &Principal) -> Result<(), ApiError> {
    principal.require_any(&[ORG_READ, ORG_ADMIN])
}

impl AuthApi {
    pub fn new(store: Store, keys: KeyRing, settings: Settings) -> AuthApi {
        let published = Arc::new(StoreKeys::new(store.clone(), settings.access_token_ttl));
        let verifier = Verifier::new(published.clone());
        AuthApi { store, keys, published, verifier, settings }
    }

    /// The verifier of this service's access tokens (one per API, shared by its clones),
    /// reading the published keys from the store.
    pub fn verifier(&self) -> Verifier {
        self.verifier.clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// A signed access token for `subject` and when it expires.
    async fn access_token(&self, subject: &Subject) -> Result<(String, i64), ApiError> {
        let key = self.keys.current().await?;
        let now = now_micros() / 1_000_000;
        let exp = now.saturating_add(i64::try_from(self.settings.access_token_ttl.as_secs()).unwrap_or(i64::MAX));
        let claims = Claims {
            iss: ISSUER.to_string(),
            sub: subject.id.clone(),
            iat: now,
            exp,
            jti: new_id(),
            svc: subject.service_account,
            name: subject.name.clone(),
            email: subject.email.clone(),
            dept: subject.department_id.clone(),
            perms: subject.permissions.clone(),
        };
        Ok((key.sign(&claims), exp.saturating_mul(1_000_000)))
    }

    async fn token_pair(&self, subject: &Subject, refresh: Option<(String, i64)>) -> Result<TokenPair, ApiError> {
        let (access_token, access_expires) = self.access_token(subject).await?;
        let (refresh_token, refresh_expires) = refresh.unwrap_or_default();
        Ok(TokenPair {
            access_token,
            access_token_expire_time: to_timestamp(access_expires),
            refresh_token,
            refresh_token_expire_time: to_timestamp(refresh_expires),
            token_type: "Bearer".into(),
        })
    }

    fn new_refresh_token(&self) -> (String, NewRefreshToken) {
        let token = secrets::random_token();
        let expires_at = now_micros().saturating_add(micros(self.settings.refresh_token_ttl));
        let hash = secrets::token_hash(&token);
        (token, NewRefreshToken { hash, expires_at })
    }

    async fn password_sign_in(&self, r: SignInRequest, client_address: String) -> Result<TokenPair, ApiError> {
        let email = crm_kit::validate::normalize_email(&r.email);
        let plausible = !email.is_empty()
            && email.chars().count() <= MAX_EMAIL_CHARS
            && r.password.chars().count() <= MAX_PASSWORD_CHARS;
        let credentials = if plausible { self.store.credentials(&email).await? } else { None };
        // Always one argon2 verification, against a dummy hash when there is no account.
        let correct = secrets::check_password(
            if plausible { &r.password } else { "" },
            credentials.as_ref().map(|c| c.password_hash.as_str()),
        )
        .await;
        let now = now_micros();
        let event = Event {
            kind: events::SIGN_IN_FAILED,
            user_id: credentials.as_ref().map(|c| c.user_id.clone()).unwrap_or_default(),
            email: clip(&email, MAX_EMAIL_CHARS),
            client_address,
            ..Event::default()
        };
        let Some(credentials) = credentials else {
            let event = Event { detail: "no account has this e-mail".into(), ..event };
            self.store.password_failed("", None, &event).await?;
            return Err(ApiError::unauthenticated(BAD_CREDENTIALS));
        };
        let refusal = if !credentials.active {
            Some(("the account is deactivated", None))
        } else if credentials.locked_until > now {
            Some(("the account is locked", None))
        } else if !correct {
            let policy = LockPolicy {
                max_failures: i64::from(self.settings.max_failed_sign_ins.max(1)),
                lock_until: now.saturating_add(micros(self.settings.lockout)),
            };
            Some(("wrong password", Some(policy)))
        } else {
            None
        };
        if let Some((detail, policy)) = refusal {
            let event = Event { detail: detail.into(), ..event };
            self.store.password_failed(&credentials.user_id, policy, &event).await?;
            return Err(ApiError::unauthenticated(BAD_CREDENTIALS));
        }
        let (refresh, stored) = self.new_refresh_token();
        let event = Event { kind: events::SIGN_IN, actor_id: credentials.user_id.clone(), ..event };
        let subject = self.store.start_session(&credentials.user_id, &stored, &event).await?;
        self.token_pair(&subject, Some((refresh, stored.expires_at))).await
    }

    async fn exchange_refresh(&self, r: RefreshRequest, client_address: String) -> Result<TokenPair, ApiError> {
        let presented = r.refresh_token.trim();
        if presented.is_empty() || presented.len() > MAX_TOKEN_CHARS {
            return Err(ApiError::unauthenticated(BAD_REFRESH_TOKEN));
        }
        let (refresh, stored) = self.new_refresh_token();
        let subject = self.store.refresh(&secrets::token_hash(presented), &stored, &client_address).await?;
        self.token_pair(&subject, Some((refresh, stored.expires_at))).await
    }

    async fn revoke_refresh(&self, r: SignOutRequest, client_address: String) -> Result<(), ApiError> {
        let presented = r.refresh_token.trim();
        if presented.is_empty() || presented.len() > MAX_TOKEN_CHARS {
            return Ok(());
        }
        let event = Event { kind: events::SIGN_OUT, client_address, detail: "signed out".into(), ..Event::default() };
        self.store.sign_out(&secrets::token_hash(presented), &event).await
    }

    async fn client_credentials(
        &self,
        r: IssueServiceTokenRequest,
        client_address: String,
    ) -> Result<TokenPair, ApiError> {
        let client_id = r.client_id.trim();
        let plausible =
            !client_id.is_empty() && client_id.len() <= MAX_TOKEN_CHARS && r.client_secret.len() <= MAX_TOKEN_CHARS;
        let account = if plausible { self.store.service_credentials(client_id).await? } else { None };
        let presented = secrets::token_hash(&r.client_secret);
        let matches = match &account {
            Some((_, stored)) => secrets::same_hash(&presented, stored),
            None => {
                // The same comparison without an account, so that timing does not tell.
                let _ = secrets::same_hash(&presented, &[0u8; 32]);
                false
            }
        };
        let event =
            Event { client_address, detail: format!("client id {:?}", clip(client_id, 64)), ..Event::default() };
        let subject = match (matches, &account) {
            (true, Some((id, _))) => self.store.subject(id, true).await?,
            _ => None,
        };
        let Some(subject) = subject else {
            let event = Event { kind: events::SERVICE_TOKEN_FAILED, ..event };
            self.store.record_event(&event).await?;
            return Err(ApiError::unauthenticated(BAD_CLIENT_CREDENTIALS));
        };
        let pair = self.token_pair(&subject, None).await?;
        let event = Event { kind: events::SERVICE_TOKEN_ISSUED, actor_id: subject.id.clone(), ..event };
        self.store.record_event(&event).await?;
        Ok(pair)
    }

    /// The caller as they are now; UNAUTHENTICATED if their account is gone or deactivated.
    async fn current_subject(&self, principal: &Principal) -> Result<Subject, ApiError> {
        match self.store.subject(&principal.subject, principal.service_account).await? {
            Some(subject) if subject.active => Ok(subject),
            _ => Err(ApiError::unauthenticated("the account of this access token no longer exists or is deactivated")),
        }
    }

    async fn me(&self, principal: Principal) -> Result<Me, ApiError> {
        let subject = self.current_subject(&principal).await?;
        Ok(Me {
            subject: subject.id,
            service_account: subject.service_account,
            display_name: subject.name,
            email: subject.email,
            department_id: subject.department_id,
            permissions: principal.permissions,
            data_scope: subject.data_scope as i32,
        })
    }

    async fn visibility(&self, principal: Principal) -> Result<Visibility, ApiError> {
        let subject = self.current_subject(&principal).await?;
        let scope = subject.data_scope;
        if scope == DataScope::All {
            return Ok(Visibility { all: true, owner_ids: Vec::new(), data_scope: scope as i32 });
        }
        let own = || Visibility { all: false, owner_ids: vec![subject.id.clone()], data_scope: DataScope::Own as i32 };
        if subject.service_account || subject.department_id.is_empty() {
            return Ok(own());
        }
        let with_subtree = match scope {
            DataScope::Department => false,
            DataScope::DepartmentTree => true,
            _ => return Ok(own()),
        };
        let mut owners = self.store.department_members(&subject.department_id, with_subtree).await?;
        owners.push(subject.id.clone());
        owners.sort();
        owners.dedup();
        Ok(Visibility { all: false, owner_ids: owners, data_scope: scope as i32 })
    }

    async fn rotate_key(&self, principal: Principal, actor: Actor) -> Result<Jwk, ApiError> {
        principal.require(ORG_ADMIN)?;
        let key = self.keys.rotate(&actor.event(events::KEY_ROTATED)).await?;
        // This replica's own verifier learns the new key at once.
        self.verifier.fetch(Duration::ZERO).await?;
        Ok(key.jwk())
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn sign_in(&self, request: Request<SignInRequest>) -> Result<Response<TokenPair>, Status> {
        let address = auth::client_address(&request);
        ok(self.password_sign_in(request.into_inner(), address).await)
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<TokenPair>, Status> {
        let address = auth::client_address(&request);
        ok(self.exchange_refresh(request.into_inner(), address).await)
    }

    async fn sign_out(&self, request: Request<SignOutRequest>) -> Result<Response<()>, Status> {
        let address = auth::client_address(&request);
        ok(self.revoke_refresh(request.into_inner(), address).await)
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<TokenPair>, Status> {
        let address = auth::client_address(&request);
        ok(self.client_credentials(request.into_inner(), address).await)
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        ok(self.published.jwks().await)
    }

    async fn get_me(&self, request: Request<GetMeRequest>) -> Result<Response<Me>, Status> {
        let result = async { self.me(auth::principal(&request)?).await };
        ok(result.await)
    }

    async fn resolve_visibility(
        &self,
        request: Request<ResolveVisibilityRequest>,
    ) -> Result<Response<Visibility>, Status> {
        let result = async { self.visibility(auth::principal(&request)?).await };
        ok(result.await)
    }

    async fn rotate_signing_key(&self, request: Request<RotateSigningKeyRequest>) -> Result<Response<Jwk>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            self.rotate_key(principal, actor).await
        };
        ok(result.await)
    }
}

fn uuid(field: &str, value: &str) -> Result<(), ApiError> {
    let mut v = Violations::new();
    v.uuid(field, value);
    v.check()
}

fn paths(mask: Option<prost_types::FieldMask>) -> Vec<String> {
    mask.map(|m| m.paths).unwrap_or_default()
}

impl AuthApi {
    async fn change_user(
        &self,
        principal: Principal,
        actor: Actor,
        patch: Option<User>,
        mask: Option<prost_types::FieldMask>,
    ) -> Result<User, ApiError> {
        principal.require(ORG_ADMIN)?;
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
                domain::apply_user_mask(user, &patch, &paths, &mut v);
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
        let admin = principal.has(ORG_ADMIN);
        if !admin && (principal.service_account || principal.subject != r.user_id) {
            return Err(ApiError::PermissionDenied(format!(
                "setting another user's password needs the permission {ORG_ADMIN}"
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
            .await;
            let now = now_micros();
            let locked = credentials.locked_until > now;
            if !correct || locked || !credentials.active {
                // Guesses here count towards the same lock-out as sign-in.
                let policy = (!locked && credentials.active).then(|| LockPolicy {
                    max_failures: i64::from(self.settings.max_failed_sign_ins.max(1)),
                    lock_until: now.saturating_add(micros(self.settings.lockout)),
                });
                let detail = if locked { "the account is locked" } else { "wrong current password" };
                let failed = Event { kind: events::PASSWORD_CHANGE_FAILED, detail: detail.into(), ..event };
                self.store.password_failed(&r.user_id, policy, &failed).await?;
                return Err(ApiError::invalid("current_password", "is incorrect, or the account is locked"));
            }
        }
        let hash = secrets::hash_password_async(&r.new_password).await;
        self.store.set_password(&r.user_id, &hash, &event).await
    }
}

#[tonic::async_trait]
impl OrgService for AuthApi {
    async fn create_department(
        &self,
        request: Request<CreateDepartmentRequest>,
    ) -> Result<Response<Department>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let mut department =
                request.into_inner().department.ok_or_else(|| ApiError::invalid("department", "is required"))?;
            department.id.clear();
            let mut v = Violations::new();
            domain::normalize_department(&mut department, &mut v);
            v.check()?;
            self.store.create_department(&department, &actor).await
        };
        ok(result.await)
    }

    async fn get_department(&self, request: Request<GetDepartmentRequest>) -> Result<Response<Department>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_department(&id).await
        };
        ok(result.await)
    }

    async fn list_departments(
        &self,
        request: Request<ListDepartmentsRequest>,
    ) -> Result<Response<ListDepartmentsResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let size = page_size(r.page_size, "page_size")?;
            let (departments, next_page_token) = self.store.list_departments(&r.filter, size, &r.page_token).await?;
            Ok(ListDepartmentsResponse { departments, next_page_token })
        };
        ok(result.await)
    }

    async fn update_department(
        &self,
        request: Request<UpdateDepartmentRequest>,
    ) -> Result<Response<Department>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let r = request.into_inner();
            let patch = r.department.ok_or_else(|| ApiError::invalid("department", "is required"))?;
            uuid("department.id", &patch.id)?;
            let paths = paths(r.update_mask);
            let (id, etag) = (patch.id.clone(), patch.etag.clone());
            self.store
                .update_department(&id, &etag, &actor, move |department: &mut Department| {
                    let mut v = Violations::new();
                    domain::apply_department_mask(department, &patch, &paths, &mut v);
                    v.check()?;
                    let mut v = Violations::new();
                    domain::normalize_department(department, &mut v);
                    v.check()
                })
                .await
        };
        ok(result.await)
    }

    async fn delete_department(&self, request: Request<DeleteDepartmentRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let r = request.into_inner();
            uuid("id", &r.id)?;
            self.store.delete_department(&r.id, &r.etag, &actor).await
        };
        ok(result.await)
    }

    async fn create_user(&self, request: Request<CreateUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let r = request.into_inner();
            let mut user = r.user.ok_or_else(|| ApiError::invalid("user", "is required"))?;
            user.id.clear();
            let mut v = Violations::new();
            domain::normalize_user(&mut user, &mut v);
            domain::check_new_password(&mut v, "password", &r.password);
            v.check()?;
            let hash = secrets::hash_password_async(&r.password).await;
            self.store.create_user(&user, &hash, &actor).await
        };
        ok(result.await)
    }

    async fn get_user(&self, request: Request<GetUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_user(&id).await
        };
        ok(result.await)
    }

    async fn list_users(&self, request: Request<ListUsersRequest>) -> Result<Response<ListUsersResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let size = page_size(r.page_size, "page_size")?;
            let (users, next_page_token) = self.store.list_users(&r.filter, size, &r.page_token).await?;
            Ok(ListUsersResponse { users, next_page_token })
        };
        ok(result.await)
    }

    async fn update_user(&self, request: Request<UpdateUserRequest>) -> Result<Response<User>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            let r = request.into_inner();
            self.change_user(principal, actor, r.user, r.update_mask).await
        };
        ok(result.await)
    }

    async fn set_password(&self, request: Request<SetPasswordRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            self.change_password(principal, actor, request.into_inner()).await
        };
        ok(result.await)
    }

    async fn create_role(&self, request: Request<CreateRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let mut role = request.into_inner().role.ok_or_else(|| ApiError::invalid("role", "is required"))?;
            role.id.clear();
            let mut v = Violations::new();
            domain::normalize_role(&mut role, &mut v);
            v.check()?;
            self.store.create_role(&role, &actor).await
        };
        ok(result.await)
    }

    async fn get_role(&self, request: Request<GetRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.get_role(&id).await
        };
        ok(result.await)
    }

    async fn list_roles(&self, request: Request<ListRolesRequest>) -> Result<Response<ListRolesResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let size = page_size(r.page_size, "page_size")?;
            let (roles, next_page_token) = self.store.list_roles(size, &r.page_token).await?;
            Ok(ListRolesResponse { roles, next_page_token })
        };
        ok(result.await)
    }

    async fn update_role(&self, request: Request<UpdateRoleRequest>) -> Result<Response<Role>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let r = request.into_inner();
            let patch = r.role.ok_or_else(|| ApiError::invalid("role", "is required"))?;
            uuid("role.id", &patch.id)?;
            let paths = paths(r.update_mask);
            let (id, etag) = (patch.id.clone(), patch.etag.clone());
            self.store
                .update_role(&id, &etag, &actor, move |role: &mut Role| {
                    let mut v = Violations::new();
                    domain::apply_role_mask(role, &patch, &paths, &mut v);
                    v.check()?;
                    let mut v = Violations::new();
                    domain::normalize_role(role, &mut v);
                    v.check()
                })
                .await
        };
        ok(result.await)
    }

    async fn delete_role(&self, request: Request<DeleteRoleRequest>) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let r = request.into_inner();
            uuid("id", &r.id)?;
            self.store.delete_role(&r.id, &r.etag, &actor).await
        };
        ok(result.await)
    }

    async fn create_service_account(
        &self,
        request: Request<CreateServiceAccountRequest>,
    ) -> Result<Response<CreateServiceAccountResponse>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
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
        ok(result.await)
    }

    async fn list_service_accounts(
        &self,
        request: Request<ListServiceAccountsRequest>,
    ) -> Result<Response<ListServiceAccountsResponse>, Status> {
        let result = async {
            can_read(&auth::principal(&request)?)?;
            let r = request.into_inner();
            let size = page_size(r.page_size, "page_size")?;
            let (service_accounts, next_page_token) = self.store.list_service_accounts(size, &r.page_token).await?;
            Ok(ListServiceAccountsResponse { service_accounts, next_page_token })
        };
        ok(result.await)
    }

    async fn delete_service_account(
        &self,
        request: Request<DeleteServiceAccountRequest>,
    ) -> Result<Response<()>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            principal.require(ORG_ADMIN)?;
            let id = request.into_inner().id;
            uuid("id", &id)?;
            self.store.delete_service_account(&id, &actor).await
        };
        ok(result.await)
    }

    async fn list_security_events(
        &self,
        request: Request<ListSecurityEventsRequest>,
    ) -> Result<Response<ListSecurityEventsResponse>, Status> {
        let result = async {
            auth::principal(&request)?.require(ORG_ADMIN)?;
            let r = request.into_inner();
            let size = page_size(r.page_size, "page_size")?;
            let (events, next_page_token) = self.store.list_events(&r.filter, size, &r.page_token).await?;
            Ok(ListSecurityEventsResponse { events, next_page_token })
        };
        ok(result.await)
    }
}
