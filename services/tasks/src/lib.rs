//! The tasks service (SPEC T1-T6, A5 groundwork): tasks with reminders and escalation, a
//! calendar of meetings and calls, follow-ups logged as activity records, supervisors' comments on either, and the views a head
//! of sales watches the team's work with — all through the caller's data scope.
//!
//! - a task is visible to its assignee, its creator and whoever may see the assignee's records;
//!   a calendar event to who takes part and whoever may see its organizer's; an activity record
//!   to whoever may see its author's;
//! - a user's agenda (tasks due and events, in their time zone) is also a calendar feed any
//!   calendar app subscribes to ([`feed`]);
//! - reminders and escalations are leased jobs ([`jobs`]): each fires once, whatever the number
//!   of replicas and whichever dies;
//! - everything others react to is an event: assignments, reminders due and overdue tasks
//!   (notifications tells people), activity records (contacts moves its customer's last
//!   activity), comments (their author is told);
//! - it consumes auth's events: a deactivated user's open tasks are flagged for handover.

pub mod api;
pub mod domain;
pub mod feed;
pub mod intake;
pub mod jobs;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use crm_kit::auth::{AUTH_ROLE, Grant, Permission, RemoteDirectory};
use crm_kit::customers::RemoteCustomers;
use crm_kit::db::Migrations;
use crm_kit::jobs::{Runner, RunnerSettings};
use crm_kit::role::{self, Calls, Context, Opened, RoleSpec, SERVICE_SECRET_ENV};
use crm_proto::tasks::v1::tasks_service_server::{self, TasksServiceServer};

pub use api::TasksApi;
pub use store::Store;

/// The name tasks publishes its events under, and its consumer group.
pub const SOURCE: &str = "tasks";

/// The contacts service: customers a task or an activity record links to.
pub const CONTACTS_ROLE: &str = "contacts";

/// The permissions the tasks service's calls check.
pub mod permissions {
    use super::{Grant, Permission};

    pub const READ: Permission = Permission {
        name: "tasks.read",
        about: "read tasks, activity records and comments, and the supervision views",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const WRITE: Permission = Permission {
        name: "tasks.write",
        about: "create and change tasks, log activity records, comment",
        grant: Grant::Everyone,
        for_services: true,
    };
    pub const ALL: &[Permission] = &[READ, WRITE];
}

/// Settings of the tasks role.
#[derive(clap::Args, Debug, Clone)]
#[command(next_help_heading = "Tasks service")]
pub struct TasksArgs {
    /// How long after its due time an open task (or planned follow-up) notifies its assignee's
    /// supervisor, once. Applies to tasks scheduled after a change of it.
    #[arg(
        long = "tasks-escalation-grace",
        value_name = "DURATION",
        env = "CRM_TASKS_ESCALATION_GRACE",
        default_value = "24h",
        value_parser = crm_kit::config::parse_duration
    )]
    pub escalation_grace: Duration,
}

/// The tasks role.
pub struct Tasks;

impl role::Service for Tasks {
    type Args = TasksArgs;

    const SPEC: RoleSpec = RoleSpec {
        name: SOURCE,
        title: "the tasks service",
        packages: &["crm.tasks.v1"],
        services: &[tasks_service_server::SERVICE_NAME],
        // The calendar feed: its secret token is its only credential.
        public_methods: &["/crm.tasks.v1.TasksService/GetCalendarFeed"],
        permissions: permissions::ALL,
        default_port: 50055,
        calls: Calls::Roles(&[AUTH_ROLE, CONTACTS_ROLE]),
        consumes: intake::CONSUMES,
    };

    fn migrations() -> Option<Migrations> {
        Some(store::migrations())
    }

    async fn open(args: TasksArgs, ctx: Context) -> Result<Opened, role::Error> {
        let auth = ctx.peer(AUTH_ROLE)?;
        let contacts = ctx.peer(CONTACTS_ROLE)?;
        if ctx.service_credentials().is_none() {
            return Err(format!(
                "tasks checks assignees and names overdue ones with the auth service, as the suite's service \
                 account: set --service-client-id (CRM_SERVICE_CLIENT_ID) and {SERVICE_SECRET_ENV}"
            )
            .into());
        }
        let db = ctx.open_db(&store::migrations()).await?;
        let (outbox, relay) = ctx.outbox(&db);
        let (scopes, organisation) = ctx.scopes()?;
        let directory = Arc::new(RemoteDirectory::new(auth));
        let store = Store::new(db.clone()).with_outbox(outbox);
        let grace = i64::try_from(args.escalation_grace.as_micros()).unwrap_or(i64::MAX);
        let intake = Arc::new(intake::Intake::new(store.clone(), grace));
        let consumer = ctx.events().consumer(SOURCE, &db, intake::CONSUMES, intake);
        let runner = Runner::new(db.clone(), RunnerSettings::default())
            .handle(store::REMINDER_JOB, Arc::new(jobs::ReminderJob::new(store.clone())))
            .handle(store::ESCALATION_JOB, Arc::new(jobs::EscalationJob::new(store.clone(), Some(directory.clone()))));
        let customers = Arc::new(RemoteCustomers::new(contacts));
        let api = TasksApi::new(store, scopes, directory, customers, args.escalation_grace);
        let server = ctx.server().add_service(TasksServiceServer::new(api)).authenticate(ctx.authenticator()?);
        Ok(Opened::new(server)
            .with_db(db)
            .job("event relay", move |shutdown| relay.run(shutdown))
            .job("event intake", move |shutdown| consumer.run(shutdown))
            .job("organisation changes", move |shutdown| organisation.run(shutdown))
            .job("reminders and escalations", move |shutdown| runner.run(shutdown)))
    }
}
