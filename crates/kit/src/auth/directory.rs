//! Who the organisation's users are, as another service needs to know them: whether an id
//! names an active user (an owner a record may be given to). Asked of the auth service with
//! the suite's own service account, since the caller need not be allowed to read the
//! organisation.

use crm_proto::auth::v1::org_service_client::OrgServiceClient;
use crm_proto::auth::v1::{GetUserRequest, User};
use futures_util::future::BoxFuture;

use crate::error::ApiError;
use crate::peer::Peer;

/// What the organisation says about a user id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserStatus {
    Active,
    Deactivated,
    /// No user has this id.
    Unknown,
}

/// Where a service looks users up.
pub trait UserDirectory: Send + Sync + 'static {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>>;
}

/// The auth service's `GetUser`, called as the suite's service account.
pub struct RemoteDirectory {
    auth: Peer,
}

impl RemoteDirectory {
    pub fn new(auth: Peer) -> RemoteDirectory {
        RemoteDirectory { auth }
    }

    /// The user `user_id` as the organisation has them now (e-mail, phone, supervisor…);
    /// `None` when no user has this id.
    pub async fn user(&self, user_id: &str) -> Result<Option<User>, ApiError> {
        let mut client = OrgServiceClient::new(self.auth.as_service().await?);
        match client.get_user(GetUserRequest { id: user_id.to_string() }).await {
            Ok(user) => Ok(Some(user.into_inner())),
            Err(status) => match status.code() {
                tonic::Code::NotFound | tonic::Code::InvalidArgument => Ok(None),
                tonic::Code::PermissionDenied => Err(ApiError::Internal(format!(
                    "the suite's service account may not read users (it needs org.read): {}",
                    status.message()
                ))),
                code => Err(ApiError::Unavailable(format!("auth service GetUser: {} ({code:?})", status.message()))),
            },
        }
    }
}

impl UserDirectory for RemoteDirectory {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>> {
        Box::pin(async move {
            Ok(match self.user(user_id).await? {
                Some(user) if user.active => UserStatus::Active,
                Some(_) => UserStatus::Deactivated,
                None => UserStatus::Unknown,
            })
        })
    }
}
