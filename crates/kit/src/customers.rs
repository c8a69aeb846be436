//! Customers as other services refer to them: a task, an activity record or a deal names a
//! company or a person of the contacts service by id. [`Customers::find`] asks contacts for many
//! at once (`BatchGetCustomers`), as the caller, so that a customer outside the caller's data
//! scope is as absent as one that does not exist.

use crm_proto::contacts::v1::contacts_service_client::ContactsServiceClient;
use crm_proto::contacts::v1::{BatchGetCustomersRequest, CustomerKey, CustomerSummary};
use futures_util::future::BoxFuture;

use crate::auth::Principal;
use crate::error::ApiError;
use crate::peer::Peer;

/// Where a service looks customers up.
pub trait Customers: Send + Sync + 'static {
    /// The customers of `keys` that `caller` may see, in the order asked; the others are left
    /// out.
    fn find<'a>(
        &'a self,
        caller: &'a Principal,
        keys: Vec<CustomerKey>,
    ) -> BoxFuture<'a, Result<Vec<CustomerSummary>, ApiError>>;
}

/// The contacts service's `BatchGetCustomers`, called with the caller's token.
pub struct RemoteCustomers {
    contacts: Peer,
}

impl RemoteCustomers {
    pub fn new(contacts: Peer) -> RemoteCustomers {
        RemoteCustomers { contacts }
    }
}

impl Customers for RemoteCustomers {
    fn find<'a>(
        &'a self,
        caller: &'a Principal,
        keys: Vec<CustomerKey>,
    ) -> BoxFuture<'a, Result<Vec<CustomerSummary>, ApiError>> {
        Box::pin(async move {
            if keys.is_empty() {
                return Ok(Vec::new());
            }
            let found = ContactsServiceClient::new(self.contacts.as_caller(caller))
                .batch_get_customers(BatchGetCustomersRequest { customers: keys })
                .await
                .map_err(|status| match status.code() {
                    tonic::Code::PermissionDenied => ApiError::PermissionDenied(format!(
                        "linking a customer needs reading it in contacts: {}",
                        status.message()
                    )),
                    tonic::Code::Unauthenticated => ApiError::Unauthenticated(status.message().to_string()),
                    code => ApiError::Unavailable(format!(
                        "contacts service BatchGetCustomers: {} ({code:?})",
                        status.message()
                    )),
                })?;
            Ok(found.into_inner().customers)
        })
    }
}
