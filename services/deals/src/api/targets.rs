//! The calls of targets (D7): who may set and see a target, and its attainment.

use std::collections::HashMap;

use crm_kit::auth::OwnerScope;
use crm_kit::{ApiError, Violations};
use crm_proto::deals::v1::*;

use super::{Caller, DealsApi, check_id};
use crate::domain;
use crate::permissions::ADMIN;
use crate::store::targets::Window;

impl DealsApi {
    /// The members of each department of `targets`, asked once per department.
    async fn members_of(&self, targets: &[Target]) -> Result<HashMap<String, Vec<String>>, ApiError> {
        let mut members = HashMap::new();
        for t in targets.iter().filter(|t| !t.department_id.is_empty()) {
            if !members.contains_key(&t.department_id) {
                let found = self.users.department_members(&t.department_id).await?;
                members.insert(t.department_id.clone(), found);
            }
        }
        Ok(members)
    }

    /// Whether `caller` may see a department's target: they are one of its people, they see
    /// all of them (a department with nobody in it: only who sees everyone).
    fn sees_department(caller: &Caller, members: &[String]) -> bool {
        caller.scope == OwnerScope::All
            || members.contains(&caller.principal.subject)
            || (!members.is_empty() && members.iter().all(|m| caller.scope.allows(m)))
    }

    /// `target` with what was achieved against it so far.
    async fn with_attainment(
        &self,
        mut target: Target,
        members: &HashMap<String, Vec<String>>,
    ) -> Result<Target, ApiError> {
        let (start, end) = domain::target_period(&target.period).ok_or_else(|| {
            ApiError::Internal(format!("stored target {} has the period {:?}", target.id, target.period))
        })?;
        let tz = crm_kit::time::zone(&target.time_zone).unwrap_or(chrono_tz::Tz::UTC);
        let (from, to) = crm_kit::time::days_span(start, end, tz);
        let window = Window {
            from,
            to,
            start_date: start.format("%Y-%m-%d").to_string(),
            end_date: end.format("%Y-%m-%d").to_string(),
        };
        let owners = if target.user_id.is_empty() {
            OwnerScope::Owners(members.get(&target.department_id).cloned().unwrap_or_default().into())
        } else {
            OwnerScope::Owners(vec![target.user_id.clone()].into())
        };
        let metric = TargetMetric::try_from(target.metric).unwrap_or(TargetMetric::WonValue);
        let goal = target.amount.clone().unwrap_or_default();
        let achieved = self.store.achieved(metric, &goal.currency_code, &owners, &window).await?;
        target.attainment_bps = domain::attainment_bps(achieved, goal.minor_units);
        target.achieved = Some(Money { currency_code: goal.currency_code, minor_units: achieved });
        target.start_date = window.start_date;
        target.end_date = window.end_date;
        Ok(target)
    }

    /// May `caller` set or delete `target`: a user's, when their scope covers the user (an active
    /// one); a department's, with `deals.admin`.
    async fn may_change_target(&self, caller: &Caller, target: &Target) -> Result<(), ApiError> {
        if target.user_id.is_empty() {
            caller.principal.require(ADMIN.name)?;
            Ok(())
        } else {
            crm_kit::auth::check_owner(
                &*self.users,
                &caller.principal,
                &caller.scope,
                "target.user_id",
                &target.user_id,
                "targets",
            )
            .await
        }
    }

    pub(super) async fn set_target(&self, caller: Caller, r: SetTargetRequest) -> Result<Target, ApiError> {
        let mut target = r.target.ok_or_else(|| ApiError::invalid("target", "is required"))?;
        let mut v = Violations::new();
        domain::normalize_target(&mut target, &mut v);
        v.check()?;
        self.may_change_target(&caller, &target).await?;
        let members = self.members_of(std::slice::from_ref(&target)).await.map_err(|e| match e {
            ApiError::InvalidArgument(_) => ApiError::invalid("target.department_id", "no department has this id"),
            other => other,
        })?;
        let stored = self.store.set_target(&target).await?;
        self.with_attainment(stored, &members).await
    }

    pub(super) async fn list_targets(
        &self,
        caller: Caller,
        r: ListTargetsRequest,
    ) -> Result<ListTargetsResponse, ApiError> {
        let mut v = Violations::new();
        let (user, department, period) = (r.user_id.trim(), r.department_id.trim(), r.period.trim());
        v.optional_uuid("user_id", user);
        v.optional_uuid("department_id", department);
        if !period.is_empty() && domain::target_period(period).is_none() {
            v.add("period", "must be a month (2026-12) or a quarter (2026-Q4)");
        }
        v.check()?;
        let found = self.store.list_targets(user, department, period, &caller.scope).await?;
        let members = self.members_of(&found).await?;
        let mut targets = Vec::with_capacity(found.len());
        for target in found {
            let visible = target.user_id.is_empty()
                && Self::sees_department(&caller, members.get(&target.department_id).map_or(&[][..], |m| m));
            if !target.user_id.is_empty() || visible {
                targets.push(self.with_attainment(target, &members).await?);
            }
        }
        targets.sort_by(|a, b| {
            (&a.period, !a.department_id.is_empty(), &a.department_id, &a.user_id).cmp(&(
                &b.period,
                !b.department_id.is_empty(),
                &b.department_id,
                &b.user_id,
            ))
        });
        Ok(ListTargetsResponse { targets })
    }

    pub(super) async fn delete_target(&self, caller: Caller, r: DeleteTargetRequest) -> Result<(), ApiError> {
        check_id("id", &r.id)?;
        let target = self.store.get_target(&r.id).await?;
        let visible = if target.user_id.is_empty() {
            let members = self.members_of(std::slice::from_ref(&target)).await?;
            Self::sees_department(&caller, members.get(&target.department_id).map_or(&[][..], |m| m))
        } else {
            caller.scope.allows(&target.user_id)
        };
        if !visible {
            return Err(ApiError::NotFound(format!("target {} not found", r.id)));
        }
        self.may_change_target(&caller, &target).await?;
        self.store.delete_target(&r.id).await
    }
}
