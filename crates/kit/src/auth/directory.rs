//! Who the organisation's users are, as another service needs to know them: whether an id
//! names an active user (an owner a record may be given to). Asked of the auth service with
//! the suite's own service account, since the caller need not be allowed to read the
//! organisation.

use crm_proto::auth::v1::GetUserRequest;
use crm_proto::auth::v1::org_service_client::OrgServiceClient;
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
}

impl UserDirectory for RemoteDirectory {
    fn status<'a>(&'a self, user_id: &'a str) -> BoxFuture<'a, Result<UserStatus, ApiError>> {
        Box::pin(async move {
            let mut client = OrgServiceClient::new(self.auth.as_service().await?);
            match client.get_user(GetUserRequest { id: user_id.to_string() }).await {
                Ok(user) if user.get_ref().active => Ok(UserStatus::Active),
                Ok(_) => Ok(UserStatus::Deactivated),
                Err(status) => match status.code() {
                    tonic::Code::NotFound | tonic::Code::InvalidArgument => Ok(UserStatus::Unknown),
                    tonic::Code::PermissionDenied => Err(ApiError::Internal(format!(
                        "the suite's service account may not read users (it needs org.read): {}",
                        status.message()
                    ))),
                    code => {
                        Err(ApiError::Unavailable(format!("auth service GetUser: {} ({code:?})", status.message())))
                    }
                },
            }
        })
    }
}
