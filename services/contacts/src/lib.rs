//! The contacts service (SPEC C1, C3, C5, C7, C8): companies and people, duplicate protection,
//! search and filters with keyset pagination, revision history, and each customer's last
//! activity and purchase history as the tasks and deals services' events report them
//! ([`intake`]).
//!
//! [`Contacts`] is the role: its database, and the auth service it asks for data scopes (with
//! the caller's token) and for owners' status (as the suite's service account). Other services
//! look customers up many at a time with `BatchGetCustomers` (`crm_kit::customers`).

pub mod api;
pub mod domain;
pub mod intake;
pub mod store;

use std::sync::Arc;

use crm_kit::auth::{AUTH_ROLE, Grant, Permission, RemoteDirectory};
use crm_kit::db::Migrations;
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec, SERVICE_SECRET_ENV};
use crm_proto::contacts::v1::contacts_service_server::{self, ContactsServiceServer};

pub use api::ContactsApi;
pub use store::Store;

/// The permissions the contacts service's calls check.
pub mod permissions {
    use super::{Grant, Permission};

    /// Read companies and people.
    pub const READ: Permission = Permission {
        name: "contacts.read",
        about: "read companies, people and their history",
        grant: Grant::Everyone,
        for_services: true,
    };
    /// Create, change and delete companies and people.
    pub const WRITE: Permission = Permission {
        name: "contacts.write",
        about: "create, change and delete companies and people",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const ALL: &[Permission] = &[READ, WRITE];
}

/// Settings of the contacts role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Contacts service")]
pub struct ContactsArgs {
    /// Country calling code applied to phone numbers entered without one, e.g. 7, 49, 63, 1;
    /// empty: such numbers are refused.
    #[arg(long = "default-calling-code", value_name = "CODE", env = "CRM_DEFAULT_CALLING_CODE", default_value = "")]
    pub default_calling_code: String,
}

impl ContactsArgs {
    /// The domain rules these settings make, checked.
    pub fn rules(&self) -> Result<domain::Rules, String> {
        let code = self.default_calling_code.trim().trim_start_matches('+');
        if !code.is_empty() && (code.len() > 3 || !code.chars().all(|c| c.is_ascii_digit())) {
            return Err(format!("--default-calling-code must be 1 to 3 digits, got {:?}", self.default_calling_code));
        }
        Ok(domain::Rules { default_calling_code: code.to_string() })
    }
}

/// The name contacts publishes its events under (its role's name).
pub const SOURCE: &str = "contacts";

/// The contacts role.
pub struct Contacts;

impl role::Service for Contacts {
    type Args = ContactsArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: SOURCE,
        title: "the contacts service",
        packages: &["crm.contacts.v1"],
        services: &[contacts_service_server::SERVICE_NAME],
        public_methods: &[],
        permissions: permissions::ALL,
        default_port: 50051,
        calls: Calls::Roles(&[AUTH_ROLE]),
        consumes: intake::CONSUMES,
    };

    fn migrations() -> Option<Migrations> {
        Some(store::migrations())
    }

    async fn open(args: ContactsArgs, ctx: Context) -> Result<Opened, role::Error> {
        let rules = args.rules()?;
        let auth = ctx.peer(AUTH_ROLE)?;
        if ctx.service_credentials().is_none() {
            return Err(format!(
                "contacts checks that a record's owner is an active user with the auth service, as the suite's \
                 service account: set --service-client-id (CRM_SERVICE_CLIENT_ID) and {SERVICE_SECRET_ENV}"
            )
            .into());
        }
        let db = ctx.open_db(&store::migrations()).await?;
        let (outbox, relay) = ctx.outbox(&db);
        // An organisation change in auth drops every cached data scope at once; the TTL only
        // bounds how stale one can be while events are delayed.
        let (scopes, organisation) = ctx.scopes()?;
        let store = Store::new(db.clone()).with_outbox(outbox);
        let consumer =
            ctx.events().consumer(SOURCE, &db, intake::CONSUMES, Arc::new(intake::Intake::new(store.clone())));
        let api = ContactsApi::new(store, rules, scopes, Arc::new(RemoteDirectory::new(auth)));
        let server = ctx.server().add_service(ContactsServiceServer::new(api)).authenticate(ctx.authenticator()?);
        Ok(Opened::new(server)
            .with_db(db)
            .job("event relay", move |shutdown| relay.run(shutdown))
            .job("organisation changes", move |shutdown| organisation.run(shutdown))
            .job("event intake", move |shutdown| consumer.run(shutdown)))
    }
}
