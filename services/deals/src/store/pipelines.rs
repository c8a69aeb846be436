//! Pipelines with their ordered stages. A change of a pipeline or any of its stages locks the
//! pipeline's row, applies the change to the whole pipeline in memory, checks it whole (every
//! kind of stage present, names unique) and writes it back with the pipeline's next version:
//! one rule set for adding, renaming, reordering and removing stages.

use crm_kit::ApiError;
use crm_kit::db::{Edit, Sql, Tx};
use crm_kit::time::{now_micros, to_timestamp};
use crm_proto::deals::v1::{Pipeline, Stage, StageKind};
use sqlx::Row;
use sqlx::any::AnyRow;

use super::Store;
use crate::domain;

const COLUMNS: &str = "id, name, department_id, created_at, updated_at, version";
/// A stage's columns, as [`stage_of`] reads them, with its pipeline's id.
pub(crate) const STAGE_COLUMNS: &str =
    "pipeline_id, id, name, position, probability, kind, rotting_days, required_fields, automations";
/// Serialises first starts of several replicas.
const STARTING_LOCK: i64 = 0x6465_616c_7301;

fn pipeline_of(row: &AnyRow) -> Result<Pipeline, ApiError> {
    Ok(Pipeline {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        department_id: row.try_get("department_id")?,
        stages: Vec::new(),
        create_time: to_timestamp(row.try_get("created_at")?),
        update_time: to_timestamp(row.try_get("updated_at")?),
        etag: row.try_get::<i64, _>("version")?.to_string(),
    })
}

pub(crate) fn stage_of(row: &AnyRow) -> Result<Stage, ApiError> {
    Ok(Stage {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        probability: row.try_get::<i64, _>("probability")? as i32,
        kind: row.try_get::<i64, _>("kind")? as i32,
        rotting_days: row.try_get::<i64, _>("rotting_days")? as i32,
        position: row.try_get::<i64, _>("position")? as i32,
        required_fields: row
            .try_get::<String, _>("required_fields")?
            .split(',')
            .filter(|f| !f.is_empty())
            .map(str::to_string)
            .collect(),
        automations: {
            let bytes: Vec<u8> = row.try_get("automations")?;
            <Stage as prost::Message>::decode(bytes.as_slice())
                .map_err(|e| ApiError::Internal(format!("stored automations do not decode: {e}")))?
                .automations
        },
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError::NotFound(format!("pipeline {id} not found"))
}

fn duplicate_name(name: &str) -> ApiError {
    ApiError::invalid("pipeline.name", format!("another pipeline is named {name:?}"))
}

/// Numbers the stages in their order and gives new ones ids.
fn number(stages: &mut [Stage]) {
    for (i, stage) in stages.iter_mut().enumerate() {
        stage.position = i as i32 + 1;
        if stage.id.is_empty() {
            stage.id = crm_kit::id::new();
        }
    }
}

impl Store {
    async fn stages_of(&self, tx: Option<&mut Tx>, ids: &[&str]) -> Result<Vec<(String, Stage)>, ApiError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut sql = Sql::new("SELECT ");
        sql.push(STAGE_COLUMNS).push(" FROM stages WHERE ");
        sql.push_in("pipeline_id", ids.iter().copied()).push(" ORDER BY pipeline_id, position");
        let rows = match tx {
            Some(tx) => sql.query().fetch_all(&mut **tx).await?,
            None => sql.query().fetch_all(self.db.pool()).await?,
        };
        rows.iter().map(|r| Ok((r.try_get("pipeline_id")?, stage_of(r)?))).collect()
    }

    /// Writes a pipeline's stages as they are now: removed ones go, the others are inserted or
    /// updated in place (their ids, and so the deals in them, stay).
    async fn write_stages(tx: &mut Tx, pipeline: &Pipeline) -> Result<(), ApiError> {
        let mut sql = Sql::new("DELETE FROM stages WHERE pipeline_id = ");
        sql.bind(pipeline.id.as_str());
        if !pipeline.stages.is_empty() {
            sql.push(" AND NOT ").push_in("id", pipeline.stages.iter().map(|s| s.id.as_str()));
        }
        sql.query().execute(&mut **tx).await?;
        let mut sql = Sql::new(
            "INSERT INTO stages (id, pipeline_id, name, position, probability, kind, rotting_days, required_fields, \
             automations) VALUES ",
        );
        sql.push_values(&pipeline.stages, |v, s| {
            v.bind(s.id.as_str())
                .bind(pipeline.id.as_str())
                .bind(s.name.as_str())
                .bind(i64::from(s.position))
                .bind(i64::from(s.probability))
                .bind(i64::from(s.kind))
                .bind(i64::from(s.rotting_days))
                .bind(s.required_fields.join(","))
                .bind(prost::Message::encode_to_vec(&Stage { automations: s.automations.clone(), ..Stage::default() }));
        });
        sql.push(
            " ON CONFLICT (id) DO UPDATE SET name = excluded.name, position = excluded.position, \
             probability = excluded.probability, kind = excluded.kind, rotting_days = excluded.rotting_days, \
             required_fields = excluded.required_fields, automations = excluded.automations",
        );
        sql.query().execute(&mut **tx).await?;
        Ok(())
    }

    /// Creates `pipeline` (normalised and checked) with its stages in the given order.
    pub async fn create_pipeline(&self, mut pipeline: Pipeline) -> Result<Pipeline, ApiError> {
        let mut tx = self.db.begin_write().await?;
        let created = self.insert_pipeline(&mut tx, &mut pipeline).await;
        match created {
            Ok(()) => {
                tx.commit().await?;
                Ok(pipeline)
            }
            Err(err) => {
                tx.rollback().await?;
                Err(err)
            }
        }
    }

    async fn insert_pipeline(&self, tx: &mut Tx, pipeline: &mut Pipeline) -> Result<(), ApiError> {
        let now = now_micros();
        pipeline.id = crm_kit::id::new();
        for stage in &mut pipeline.stages {
            stage.id.clear();
        }
        number(&mut pipeline.stages);
        let mut sql = Sql::new(
            "INSERT INTO pipelines (id, name, name_key, department_id, created_at, updated_at, version) VALUES ",
        );
        sql.push_values([&*pipeline], |v, p| {
            v.bind(p.id.as_str()).bind(p.name.as_str()).bind(domain::key(&p.name)).bind(p.department_id.as_str());
            v.bind(now).bind(now).bind(1_i64);
        });
        match sql.query().execute(&mut **tx).await {
            Err(err) if crm_kit::db::is_unique_violation(&err) => return Err(duplicate_name(&pipeline.name)),
            other => other?,
        };
        Self::write_stages(tx, pipeline).await?;
        pipeline.create_time = to_timestamp(now);
        pipeline.update_time = to_timestamp(now);
        pipeline.etag = "1".into();
        Ok(())
    }

    /// Creates the starting pipeline ("Sales", the funnel from a new lead to an order received)
    /// when there is no pipeline at all; once, however many replicas start together.
    pub async fn ensure_starting_pipeline(&self) -> Result<bool, ApiError> {
        let mut tx = self.db.begin_write().await?;
        self.db.one_writer_at_a_time(&mut tx, STARTING_LOCK).await?;
        let any = Sql::new("SELECT id FROM pipelines LIMIT 1").query().fetch_optional(&mut *tx).await?;
        if any.is_some() {
            tx.rollback().await?;
            return Ok(false);
        }
        let mut pipeline = Pipeline {
            name: domain::STARTING_PIPELINE.into(),
            stages: domain::STARTING_STAGES
                .iter()
                .map(|(name, probability, kind)| Stage {
                    name: (*name).into(),
                    probability: *probability,
                    kind: *kind as i32,
                    rotting_days: if *kind == StageKind::Open { 30 } else { 0 },
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.insert_pipeline(&mut tx, &mut pipeline).await?;
        tx.commit().await?;
        Ok(true)
    }

    pub async fn get_pipeline(&self, id: &str) -> Result<Pipeline, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM pipelines WHERE id = ").bind(id);
        let row = sql.query().fetch_optional(self.db.pool()).await?.ok_or_else(|| not_found(id))?;
        let mut pipeline = pipeline_of(&row)?;
        pipeline.stages = self.stages_of(None, &[id]).await?.into_iter().map(|(_, s)| s).collect();
        Ok(pipeline)
    }

    /// Every pipeline by name, with its stages (two statements); with `department_id`, that
    /// department's and the shared ones.
    pub async fn list_pipelines(&self, department_id: &str) -> Result<Vec<Pipeline>, ApiError> {
        let mut sql = Sql::new("SELECT ");
        sql.push(COLUMNS).push(" FROM pipelines");
        if !department_id.is_empty() {
            sql.push(" WHERE department_id = ").bind(department_id).push(" OR department_id = ''");
        }
        sql.push(" ORDER BY name_key, id");
        let rows = sql.query().fetch_all(self.db.pool()).await?;
        let mut pipelines = rows.iter().map(pipeline_of).collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<&str> = pipelines.iter().map(|p| p.id.as_str()).collect();
        let stages = self.stages_of(None, &ids).await?;
        for pipeline in &mut pipelines {
            pipeline.stages = stages.iter().filter(|(p, _)| *p == pipeline.id).map(|(_, s)| s.clone()).collect();
        }
        Ok(pipelines)
    }

    /// Changes the pipeline `id` under its row lock: `change` gets it whole (stages in order)
    /// and may change anything; the result is numbered, checked ([`domain::check_stages`]) and
    /// written with the next version. ABORTED when `etag` is set and stale.
    ///
    /// The deals follow: a removed stage's deals move to `move_deals_to` (a stage of the same
    /// kind; refused without one), a stage with deals keeps its kind, and a new default
    /// probability reaches the deals whose probability nobody set.
    pub async fn edit_pipeline(
        &self,
        id: &str,
        etag: &str,
        actor: &str,
        move_deals_to: Option<&str>,
        change: impl FnOnce(&mut Pipeline) -> Result<(), ApiError>,
    ) -> Result<Pipeline, ApiError> {
        let mut select = Sql::new("SELECT ");
        select.push(COLUMNS).push(" FROM pipelines WHERE id = ").bind(id);
        let tx = self.db.begin_write().await?;
        let (mut edit, row) = Edit::lock(&self.db, tx, "pipelines", "pipeline", id, select).await?;
        edit.require_etag(etag)?;
        let mut old = pipeline_of(&row)?;
        old.stages = self.stages_of(Some(edit.tx()), &[id]).await?.into_iter().map(|(_, s)| s).collect();
        let mut pipeline = old.clone();
        change(&mut pipeline)?;
        number(&mut pipeline.stages);
        let mut v = crm_kit::Violations::new();
        domain::check_stages(&pipeline.stages, "pipeline.stages", &mut v);
        v.check()?;
        if pipeline == old {
            edit.abandon().await?;
            return Ok(old);
        }
        let now = now_micros();
        let mut set = Sql::new("name = ");
        set.bind(pipeline.name.as_str()).push(", name_key = ").bind(domain::key(&pipeline.name));
        set.push(", department_id = ").bind(pipeline.department_id.as_str());
        let name = pipeline.name.clone();
        let version = edit.save_unique(set, now, |_| duplicate_name(&name)).await?;
        for before in &old.stages {
            let after = pipeline.stages.iter().find(|s| s.id == before.id);
            let touches_deals = after.is_none_or(|a| {
                a.kind != before.kind || a.probability != before.probability || a.rotting_days != before.rotting_days
            });
            if !touches_deals {
                // A rename or a new place changes nothing for its deals: no need to count them.
                continue;
            }
            let deals = Store::deals_in_stage(edit.tx(), &before.id).await?;
            match after {
                None if deals > 0 => {
                    let Some(to) = move_deals_to else {
                        return Err(ApiError::FailedPrecondition(format!(
                            "{deals} deal(s) are in stage {:?}; name move_deals_to_stage_id to move them",
                            before.name
                        )));
                    };
                    let target = pipeline.stages.iter().find(|s| s.id == to).ok_or_else(|| {
                        ApiError::invalid("move_deals_to_stage_id", "is not another stage of this pipeline")
                    })?;
                    if target.kind != before.kind {
                        return Err(ApiError::invalid(
                            "move_deals_to_stage_id",
                            "must be a stage of the same kind (open, won or lost) as the one removed",
                        ));
                    }
                    self.move_all(edit.tx(), &before.id, target, actor, now).await?;
                }
                Some(after) if after.kind != before.kind && deals > 0 => {
                    return Err(ApiError::FailedPrecondition(format!(
                        "{deals} deal(s) are in stage {:?}; its kind cannot change (add a stage of the new kind \
                         and move them)",
                        before.name
                    )));
                }
                Some(after) if deals > 0 => {
                    if after.probability != before.probability {
                        Store::follow_stage_probability(edit.tx(), self.db.backend(), &after.id, after.probability)
                            .await?;
                    }
                    if after.rotting_days != before.rotting_days {
                        Store::follow_stage_rotting(edit.tx(), after).await?;
                    }
                }
                _ => {}
            }
            if after.is_none() {
                // Deals that got as far as the removed stage (and on) got as far as the open
                // stage before it.
                let earlier = old.stages.iter().take_while(|s| s.id != before.id);
                let kept = earlier
                    .filter(|s| s.kind == StageKind::Open as i32 && pipeline.stages.iter().any(|p| p.id == s.id));
                let replacement = kept.last().map_or("", |s| s.id.as_str());
                Store::forget_stage(edit.tx(), &before.id, replacement).await?;
            }
        }
        Self::write_stages(edit.tx(), &pipeline).await?;
        edit.commit().await?;
        pipeline.etag = version.to_string();
        pipeline.update_time = to_timestamp(now);
        Ok(pipeline)
    }

    /// Deletes the pipeline `id` with its stages: the last pipeline, or one with deals, stays.
    pub async fn delete_pipeline(&self, id: &str, etag: &str) -> Result<(), ApiError> {
        let mut select = Sql::new("SELECT ");
        select.push(COLUMNS).push(" FROM pipelines WHERE id = ").bind(id);
        let tx = self.db.begin_write().await?;
        let (mut edit, _) = Edit::lock(&self.db, tx, "pipelines", "pipeline", id, select).await?;
        edit.require_etag(etag)?;
        let mut others = Sql::new("SELECT id FROM pipelines WHERE id <> ");
        others.bind(id);
        if others.push(" LIMIT 1").query().fetch_optional(&mut **edit.tx()).await?.is_none() {
            return Err(ApiError::FailedPrecondition(
                "the last pipeline cannot be deleted; create another first".into(),
            ));
        }
        let mut deals = Sql::new("SELECT id FROM deals WHERE pipeline_id = ");
        deals.bind(id);
        edit.refuse_if_referenced(deals, || format!("pipeline {id} has deals; move or delete them first")).await?;
        // Its board totals (zero rows left by deals that were in it) go with its stages.
        let mut sql =
            Sql::new("DELETE FROM stage_totals WHERE stage_id IN (SELECT id FROM stages WHERE pipeline_id = ");
        sql.bind(id).push(")");
        sql.query().execute(&mut **edit.tx()).await?;
        let mut sql = Sql::new("DELETE FROM stages WHERE pipeline_id = ");
        sql.bind(id);
        sql.query().execute(&mut **edit.tx()).await?;
        edit.delete().await?;
        edit.commit().await
    }
}
