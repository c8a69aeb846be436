//! `AuthService`: sign-in, refresh, sign-out, service tokens, the published keys, the caller
//! and their data scope, key rotation.

use std::time::Duration;

use crm_kit::auth::{self, Principal};
use crm_kit::time::now_micros;
use crm_kit::{ApiError, respond};
use crm_proto::auth::v1::auth_service_server::AuthService;
use crm_proto::auth::v1::*;
use tonic::{Request, Response, Status};

use super::{AuthApi, MAX_TOKEN_CHARS, caller, clip, micros};
use crate::domain::secrets::{self, MAX_PASSWORD_CHARS};
use crate::domain::{BAD_CLIENT_CREDENTIALS, BAD_CREDENTIALS, BAD_REFRESH_TOKEN, MAX_EMAIL_CHARS, events};
use crate::permissions::ORG_ADMIN;
use crate::store::{Actor, Event, Exchange, LockPolicy, Subject};

impl AuthApi {
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
        .await?;
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
                max_failures: i64::from(self.policy.max_failed_sign_ins.max(1)),
                lock_until: now.saturating_add(micros(self.policy.lockout)),
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
        let (refresh, mut stored) = self.new_refresh_token();
        stored.sealed = secrets::seal_successor(presented, &refresh).unwrap_or_default();
        let hash = secrets::token_hash(presented);
        let grace = self.policy.refresh_reuse_grace;
        match self.store.refresh(&hash, &stored, grace, &client_address).await? {
            Exchange::New(subject) => self.token_pair(&subject, Some((refresh, stored.expires_at))).await,
            Exchange::Again { subject, sealed, expires_at } => {
                let successor = secrets::unseal_successor(presented, &sealed)
                    .ok_or_else(|| ApiError::unauthenticated(BAD_REFRESH_TOKEN))?;
                self.token_pair(&subject, Some((successor, expires_at))).await
            }
        }
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
        principal.require(ORG_ADMIN.name)?;
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
        respond(self.password_sign_in(request.into_inner(), address).await)
    }

    async fn refresh(&self, request: Request<RefreshRequest>) -> Result<Response<TokenPair>, Status> {
        let address = auth::client_address(&request);
        respond(self.exchange_refresh(request.into_inner(), address).await)
    }

    async fn sign_out(&self, request: Request<SignOutRequest>) -> Result<Response<()>, Status> {
        let address = auth::client_address(&request);
        respond(self.revoke_refresh(request.into_inner(), address).await)
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<TokenPair>, Status> {
        let address = auth::client_address(&request);
        respond(self.client_credentials(request.into_inner(), address).await)
    }

    async fn get_jwks(&self, _request: Request<GetJwksRequest>) -> Result<Response<Jwks>, Status> {
        respond(self.published.jwks().await)
    }

    async fn get_me(&self, request: Request<GetMeRequest>) -> Result<Response<Me>, Status> {
        let result = async { self.me(auth::principal(&request)?).await };
        respond(result.await)
    }

    async fn resolve_visibility(
        &self,
        request: Request<ResolveVisibilityRequest>,
    ) -> Result<Response<Visibility>, Status> {
        let result = async { self.visibility(auth::principal(&request)?).await };
        respond(result.await)
    }

    async fn rotate_signing_key(&self, request: Request<RotateSigningKeyRequest>) -> Result<Response<Jwk>, Status> {
        let result = async {
            let (principal, actor) = caller(&request)?;
            self.rotate_key(principal, actor).await
        };
        respond(result.await)
    }
}
