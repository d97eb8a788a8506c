//! OpenAI's fine-tuning jobs API (`/v1/fine_tuning/jobs`), over the job
//! manager (`train::jobs`), which owns the records and talks to the engine.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, RawQuery, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ErrorResponse};
use super::files::{blocking, store_error};
use super::{json, AppState};
use crate::store::{CheckpointRecord, EventRecord};
use crate::train::jobs::{Job, JobManager, JobRequest, JobsError};

#[derive(Serialize, ToSchema)]
pub struct JobList {
    pub object: &'static str,
    pub data: Vec<Job>,
    pub has_more: bool,
}

#[derive(Serialize, ToSchema)]
pub struct JobEvent {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    pub level: String,
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct JobEventList {
    pub object: &'static str,
    pub data: Vec<JobEvent>,
    pub has_more: bool,
}

#[derive(Serialize, ToSchema)]
pub struct JobCheckpoint {
    pub id: String,
    pub object: &'static str,
    pub created_at: u64,
    pub fine_tuned_model_checkpoint: String,
    pub fine_tuning_job_id: String,
    pub step_number: u64,
    #[schema(value_type = Object)]
    pub metrics: serde_json::Value,
}

#[derive(Serialize, ToSchema)]
pub struct JobCheckpointList {
    pub object: &'static str,
    pub data: Vec<JobCheckpoint>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

fn jobs_error(e: JobsError) -> ApiError {
    match e {
        JobsError::Invalid { param, message } => ApiError::invalid_param(param, message),
        JobsError::NotFound(m) => ApiError::not_found(m).with_param("fine_tuning_job_id"),
        JobsError::State(m) => ApiError::invalid(m),
        JobsError::EngineStopped => ApiError::unavailable("the engine has stopped"),
        JobsError::Store(e) => store_error(e),
    }
}

fn manager(st: &AppState) -> Result<Arc<JobManager>, ApiError> {
    // Configured but unusable: say why rather than "off".
    st.ready()?.jobs.clone().ok_or_else(|| {
        st.data_dir_error()
            .unwrap_or_else(|| ApiError::not_found("fine-tuning is off on this server: start it with --data-dir"))
    })
}

/// `after`, `limit` and `metadata[k]=v` from a raw query string.
struct ListQuery {
    after: Option<String>,
    limit: usize,
    metadata: BTreeMap<String, String>,
}

fn list_query(raw: Option<String>, default_limit: usize) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery { after: None, limit: default_limit, metadata: BTreeMap::new() };
    let pairs: Vec<(String, String)> = serde_urlencoded_pairs(raw.as_deref().unwrap_or(""))?;
    for (k, v) in pairs {
        match k.as_str() {
            "after" => q.after = Some(v),
            "limit" => {
                q.limit = v.parse::<usize>().ok().filter(|l| (1..=100).contains(l)).ok_or_else(|| {
                    ApiError::invalid_param("limit", format!("limit must be between 1 and 100, got '{v}'"))
                })?;
            }
            _ => {
                if let Some(key) = k.strip_prefix("metadata[").and_then(|r| r.strip_suffix(']')) {
                    q.metadata.insert(key.to_string(), v);
                }
            }
        }
    }
    Ok(q)
}

/// Decodes `a=b&c=d` (percent-decoding, `+` as space).
fn serde_urlencoded_pairs(s: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |t: &str| -> Result<String, ApiError> {
        let bytes = t.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' => {
                    let hex = t.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
                    match hex {
                        Some(b) => {
                            out.push(b);
                            i += 2;
                        }
                        None => return Err(ApiError::invalid(format!("bad percent-encoding in the query: '{t}'"))),
                    }
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8(out).map_err(|_| ApiError::invalid("the query string is not valid UTF-8"))
    };
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

#[utoipa::path(
    post,
    path = "/v1/fine_tuning/jobs",
    request_body = JobRequest,
    responses((status = 200, body = Job), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse), (status = 503, body = ErrorResponse),
        (status = 507, description = "The data directory is full or read-only", body = ErrorResponse))
)]
pub async fn create(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Result<Json<Job>, ApiError> {
    let body = body?;
    let m = manager(&st)?;
    let req: JobRequest = json::parse(&body)?;
    let job = blocking(move || m.create(req)).await?.map_err(jobs_error)?;
    Ok(Json(job))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs",
    params(("after" = Option<String>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, body = JobList), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse))
)]
pub async fn list(State(st): State<AppState>, RawQuery(raw): RawQuery) -> Result<Json<JobList>, ApiError> {
    let m = manager(&st)?;
    let q = list_query(raw, 20)?;
    let page = blocking(move || m.list(q.after.as_deref(), q.limit, &q.metadata)).await?.map_err(jobs_error)?;
    Ok(Json(JobList { object: "list", data: page.data, has_more: page.has_more }))
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
    params(("fine_tuning_job_id" = String, Path)),
    responses((status = 200, body = Job), (status = 404, body = ErrorResponse))
)]
pub async fn retrieve(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
    let m = manager(&st)?;
    Ok(Json(blocking(move || m.job(&id)).await?.map_err(jobs_error)?))
}

macro_rules! job_action {
    ($name:ident, $path:literal, $method:ident, $doc:literal) => {
        #[doc = $doc]
        #[utoipa::path(
            post,
            path = $path,
            params(("fine_tuning_job_id" = String, Path)),
            responses((status = 200, body = Job), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse))
        )]
        pub async fn $name(State(st): State<AppState>, Path(id): Path<String>) -> Result<Json<Job>, ApiError> {
            let m = manager(&st)?;
            Ok(Json(blocking(move || m.$method(&id)).await?.map_err(jobs_error)?))
        }
    };
}

job_action!(cancel, "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel", cancel, "Cancels a job that has not finished.");
job_action!(
    pause,
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause",
    pause,
    "Pauses a queued or running job (a checkpoint is written)."
);
job_action!(
    resume,
    "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume",
    resume,
    "Resumes a paused job from its newest checkpoint."
);

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
    params(("fine_tuning_job_id" = String, Path), ("after" = Option<String>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, body = JobEventList), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse))
)]
pub async fn events(
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<JobEventList>, ApiError> {
    let m = manager(&st)?;
    let q = list_query(raw, 20)?;
    let page = blocking(move || -> Result<_, JobsError> {
        m.job(&id)?;
        Ok(m.store().events(&id, q.after.as_deref(), q.limit)?)
    })
    .await?
    .map_err(jobs_error)?;
    let data = page.data.into_iter().map(event).collect();
    Ok(Json(JobEventList { object: "list", data, has_more: page.has_more }))
}

fn event(e: EventRecord) -> JobEvent {
    JobEvent {
        id: e.id,
        object: "fine_tuning.job.event",
        created_at: e.created_at,
        level: e.level,
        message: e.message,
        kind: e.kind,
        data: e.data,
    }
}

#[utoipa::path(
    get,
    path = "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
    params(("fine_tuning_job_id" = String, Path), ("after" = Option<String>, Query), ("limit" = Option<i64>, Query)),
    responses((status = 200, body = JobCheckpointList), (status = 400, body = ErrorResponse), (status = 404, body = ErrorResponse))
)]
pub async fn checkpoints(
    State(st): State<AppState>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Json<JobCheckpointList>, ApiError> {
    let m = manager(&st)?;
    let q = list_query(raw, 10)?;
    let page = blocking(move || -> Result<_, JobsError> {
        m.job(&id)?;
        Ok(m.store().checkpoints(&id, q.after.as_deref(), q.limit)?)
    })
    .await?
    .map_err(jobs_error)?;
    let data: Vec<JobCheckpoint> = page.data.into_iter().map(checkpoint).collect();
    Ok(Json(JobCheckpointList {
        object: "list",
        first_id: data.first().map(|c| c.id.clone()),
        last_id: data.last().map(|c| c.id.clone()),
        has_more: page.has_more,
        data,
    }))
}

fn checkpoint(c: CheckpointRecord) -> JobCheckpoint {
    JobCheckpoint {
        id: c.id,
        object: "fine_tuning.job.checkpoint",
        created_at: c.created_at,
        fine_tuned_model_checkpoint: c.model,
        fine_tuning_job_id: c.job_id,
        step_number: c.step,
        metrics: c.metrics,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_queries_decode_metadata_filters_and_check_limits() {
        let q = list_query(Some("after=ftjob-1&limit=5&metadata%5Bteam%5D=a+b&metadata[x]=%41".into()), 20).unwrap();
        assert_eq!(q.after.as_deref(), Some("ftjob-1"));
        assert_eq!(q.limit, 5);
        assert_eq!(q.metadata.get("team").map(String::as_str), Some("a b"));
        assert_eq!(q.metadata.get("x").map(String::as_str), Some("A"));
        assert_eq!(list_query(None, 20).unwrap().limit, 20);
        for bad in ["limit=0", "limit=x", "limit=101", "after=%zz", "after=%4"] {
            assert!(list_query(Some(bad.into()), 20).is_err(), "{bad}");
        }
    }
}
