//! The deals service (SPEC D1-D8), built in steps. Today:
//! - pipelines of ordered stages (D1), added, renamed, reordered and removed as data without
//!   breaking a deal (a removed stage's deals move, recorded), and a starting pipeline from a new
//!   lead to an order received created at first start;
//! - deals (D2) with money as an ISO currency and minor units throughout, line items priced on
//!   the server ([`domain`]), an owner in the caller's scope, a company and person checked with
//!   contacts in one call, a probability that is the stage's unless a user set one;
//! - every stage change recorded, won and lost closing the deal, reopening too (D3);
//! - the board: per stage the count, sum and weighted sum per currency over every matching deal,
//!   kept per stage, owner and currency in the transaction of each change;
//! - stage automations (D4) as data carried by the entry's event (tasks makes the task,
//!   notifications tells the people, messages the client, posts to a webhook), and required
//!   fields;
//! - the product catalogue (D6);
//! - reports (D8) computed by the database ([`store::reports`]) and laid out as tables or CSV
//!   ([`reports`]);
//! - activity records logged on a deal (the tasks service's events, [`intake`]) restart its
//!   rotting clock.
//!
//! - versioned quotes on a deal, priced on the server, whose acceptance can price the deal; contracts
//!   with a payment plan, payments received against it, balances, and reminders of instalments
//!   coming due (leased jobs, [`jobs`]) (D5).
//!
//! - targets per user or department, month or quarter, of won value or payments received, with
//!   their attainment (D7).

pub mod api;
pub mod domain;
pub mod intake;
pub mod jobs;
pub mod reports;
pub mod store;

use std::sync::Arc;

use crm_kit::auth::{AUTH_ROLE, Grant, Permission, RemoteDirectory};
use crm_kit::customers::RemoteCustomers;
use crm_kit::db::Migrations;
use crm_kit::jobs::{Runner, RunnerSettings};
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec, SERVICE_SECRET_ENV};
use crm_proto::deals::v1::deals_service_server::{self, DealsServiceServer};

pub use api::DealsApi;
pub use store::Store;

/// The name deals publishes its events under, and its consumer group.
pub const SOURCE: &str = "deals";

/// The contacts service: the companies and people deals are with.
pub const CONTACTS_ROLE: &str = "contacts";

/// The permissions the deals service's calls check.
pub mod permissions {
    use super::{Grant, Permission};

    pub const READ: Permission = Permission {
        name: "deals.read",
        about: "read pipelines, products and deals",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const WRITE: Permission = Permission {
        name: "deals.write",
        about: "create, change, move and delete deals",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const ADMIN: Permission = Permission {
        name: "deals.admin",
        about: "change pipelines and their stages, and the product catalogue",
        grant: Grant::Administrators,
        for_services: false,
    };
    pub const ALL: &[Permission] = &[READ, WRITE, ADMIN];
}

/// Settings of the deals role (none yet of its own).
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Deals service")]
pub struct DealsArgs {}

/// The deals role.
pub struct Deals;

impl role::Service for Deals {
    type Args = DealsArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: SOURCE,
        title: "the deals service",
        packages: &["crm.deals.v1"],
        services: &[deals_service_server::SERVICE_NAME],
        public_methods: &[],
        permissions: permissions::ALL,
        default_port: 50056,
        calls: Calls::Roles(&[AUTH_ROLE, CONTACTS_ROLE]),
        consumes: intake::CONSUMES,
    };

    fn migrations() -> Option<Migrations> {
        Some(store::migrations())
    }

    async fn open(_args: DealsArgs, ctx: Context) -> Result<Opened, role::Error> {
        let auth = ctx.peer(AUTH_ROLE)?;
        let contacts = ctx.peer(CONTACTS_ROLE)?;
        if ctx.service_credentials().is_none() {
            return Err(format!(
                "deals checks that a deal's owner is an active user with the auth service, as the suite's service \
                 account: set --service-client-id (CRM_SERVICE_CLIENT_ID) and {SERVICE_SECRET_ENV}"
            )
            .into());
        }
        let db = ctx.open_db(&store::migrations()).await?;
        let (outbox, relay) = ctx.outbox(&db);
        let store = Store::new(db.clone()).with_outbox(outbox);
        if store.ensure_starting_pipeline().await? {
            tracing::info!(role = SOURCE, "created the starting pipeline");
        }
        let consumer =
            ctx.events().consumer(SOURCE, &db, intake::CONSUMES, Arc::new(intake::Intake::new(store.clone())));
        let runner = Runner::new(db.clone(), RunnerSettings::default()).handle(
            store::contracts::INSTALMENT_REMINDER_JOB,
            Arc::new(jobs::InstalmentReminderJob::new(store.clone())),
        );
        let (scopes, organisation) = ctx.scopes()?;
        let api = DealsApi::new(
            store,
            scopes,
            Arc::new(RemoteDirectory::new(auth)),
            Arc::new(RemoteCustomers::new(contacts)),
        );
        let server = ctx.server().add_service(DealsServiceServer::new(api)).authenticate(ctx.authenticator()?);
        Ok(Opened::new(server)
            .with_db(db)
            .job("event relay", move |shutdown| relay.run(shutdown))
            .job("event intake", move |shutdown| consumer.run(shutdown))
            .job("instalment reminders", move |shutdown| runner.run(shutdown))
            .job("organisation changes", move |shutdown| organisation.run(shutdown)))
    }
}
