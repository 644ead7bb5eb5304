//! The operator API server.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::{Op, ProcessSpec, Reply};
use serde::Deserialize;

use gantry_api::records::{ExitRecord, encode_record};
use gantry_api::{
    AgentInfo, ApiErrorBody, AttachVm, ContainerView, ErrorCode, ExecRequest, GuestInfoReport,
    PingReport, RunOptions, RunUpdate, VmStatus,
};

use super::access::{AccessError, ApiAccess, CheckedListener};
use super::progress::UpdateQueue;
use crate::containers::ContainerTableError;
use crate::containers::run::{
    RunError, RunProgress, expect_done, generate_name, run_container, start_created,
};
use crate::containers::spec::merge_env;
use crate::images::ImageError;
use crate::metrics::endpoint;
use crate::state::Agent;
use crate::vm::{Vm, VmError};
use crate::vms::VmTableError;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket could not be set up.
    #[error(transparent)]
    Access(#[from] AccessError),
    /// Serving failed.
    #[error("API server failed: {0}")]
    Serve(std::io::Error),
}

/// What the handlers share.
pub type AgentState = Arc<Agent>;

/// How long container operations wait for a shim that is reconnecting.
const SHIM_WAIT: Duration = Duration::from_secs(10);
/// Largest stdin write accepted in one request.
const MAX_STDIN_BYTES: usize = 1 << 20;

/// Binds the API socket at `path` for the connections `access` permits.
pub fn bind(path: &Path, access: ApiAccess) -> Result<CheckedListener, ApiServerError> {
    Ok(CheckedListener::new(access.bind(path)?, access))
}

/// The API's routes.
pub fn router(agent: AgentState) -> Router {
    Router::new()
        .route("/v1/agent", get(agent_info))
        .route("/v1/vms", get(list_vms).post(attach_vm))
        .route("/v1/vms/{vm}", get(vm_status).delete(detach_vm))
        .route("/v1/vms/{vm}/guest-info", get(guest_info))
        .route("/v1/vms/{vm}/ping", post(ping))
        .route("/v1/vms/{vm}/restart", post(restart))
        .route("/v1/vms/{vm}/stop", post(stop_vm))
        .route("/v1/vms/{vm}/resources", get(resources))
        .route("/v1/vms/{vm}/probe", post(probe))
        .route("/v1/vms/{vm}/baseline", post(baseline))
        .route("/v1/vms/{vm}/containers", post(run).get(list_containers))
        .route(
            "/v1/vms/{vm}/containers/{id}",
            axum::routing::delete(remove),
        )
        .route("/v1/vms/{vm}/containers/{id}/logs", get(logs))
        .route("/v1/vms/{vm}/containers/{id}/start", post(start))
        .route("/v1/vms/{vm}/containers/{id}/exec", post(exec))
        .route("/v1/vms/{vm}/containers/{id}/kill", post(kill))
        .route("/v1/vms/{vm}/containers/{id}/wait", get(wait))
        .route("/v1/vms/{vm}/containers/{id}/stats", get(stats))
        .route("/v1/vms/{vm}/containers/{id}/stdin", post(stdin))
        .route("/v1/vms/{vm}/containers/{id}/resize", post(resize))
        .route("/v1/images", get(images))
        .route("/v1/images/prefetch", post(prefetch))
        .route("/v1/lazy", get(lazy_stats))
        .route("/v1/manifest", get(manifest_status).put(apply_manifest))
        .route("/metrics", get(metrics))
        .fallback(no_such_route)
        .method_not_allowed_fallback(wrong_method)
        .with_state(agent)
}

/// Serves the API until `shutdown` resolves.
pub async fn serve(
    listener: CheckedListener,
    agent: AgentState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ApiServerError> {
    axum::serve(listener, router(agent))
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(ApiServerError::Serve)
}

/// A container's route, `/v1/vms/{vm}/containers/{id}`, with the id checked: an id is used as a
/// file name by the agent and the shim, so a bad one is refused before anything else happens.
struct ContainerPath {
    vm: String,
    id: String,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for ContainerPath {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        let ApiPath((vm, id)) = ApiPath::<(String, String)>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        check_id("container id", &id).map_err(IntoResponse::into_response)?;
        Ok(ContainerPath { vm, id })
    }
}

/// Refuses an id that is not a valid container or exec name (400).
fn check_id(what: &'static str, id: &str) -> Result<(), ApiError> {
    gantry_proto::validate_id(what, id)
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))
}

/// Refuses an exec id given in a query that is not a valid name (400).
fn check_exec(exec: Option<&str>) -> Result<(), ApiError> {
    exec.map_or(Ok(()), |exec| check_id("exec id", exec))
}

/// An error answer: the status, and what happened (the JSON body's `error`; its `code` follows
/// from the status).
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = ErrorCode::for_status(self.0.as_u16());
        let body = ApiErrorBody {
            error: self.1,
            code,
        };
        (self.0, Json(body)).into_response()
    }
}

/// axum's extractors answer a malformed request in plain text; these three answer it like every
/// other error, in JSON with a code.
macro_rules! json_rejecting_extractor {
    ($name:ident, $inner:ident, $trait:ident, $method:ident, $input:ty) => {
        /// Like axum's extractor of the same shape, rejecting with an [`ApiError`].
        struct $name<T>(T);

        impl<S, T> axum::extract::$trait<S> for $name<T>
        where
            S: Send + Sync,
            $inner<T>: axum::extract::$trait<S>,
            <$inner<T> as axum::extract::$trait<S>>::Rejection: RejectionText,
        {
            type Rejection = ApiError;

            async fn $method(input: $input, state: &S) -> Result<Self, Self::Rejection> {
                match <$inner<T> as axum::extract::$trait<S>>::$method(input, state).await {
                    Ok($inner(value)) => Ok($name(value)),
                    Err(rejection) => Err(ApiError(rejection.status(), rejection.text())),
                }
            }
        }
    };
}

/// The status and text of an axum rejection.
trait RejectionText {
    fn status(&self) -> StatusCode;
    fn text(&self) -> String;
}

macro_rules! rejection_text {
    ($($rejection:ty),*) => {$(
        impl RejectionText for $rejection {
            fn status(&self) -> StatusCode {
                <$rejection>::status(self)
            }
            fn text(&self) -> String {
                self.body_text()
            }
        }
    )*};
}

rejection_text!(
    axum::extract::rejection::JsonRejection,
    axum::extract::rejection::QueryRejection,
    axum::extract::rejection::PathRejection
);

json_rejecting_extractor!(
    ApiJson,
    Json,
    FromRequest,
    from_request,
    axum::extract::Request
);
json_rejecting_extractor!(
    ApiQuery,
    Query,
    FromRequestParts,
    from_request_parts,
    &mut axum::http::request::Parts
);
json_rejecting_extractor!(
    ApiPath,
    UrlPath,
    FromRequestParts,
    from_request_parts,
    &mut axum::http::request::Parts
);

/// Unknown routes.
async fn no_such_route(uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        format!(
            "no such route {} (docs/openapi.yaml lists them)",
            uri.path()
        ),
    )
}

/// Known routes with another method.
async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

impl From<VmError> for ApiError {
    fn from(err: VmError) -> Self {
        Self::from_vm(&err)
    }
}

impl ApiError {
    fn from_vm(err: &VmError) -> Self {
        let status = match err {
            VmError::NotConnected(_) | VmError::QemuExited { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            VmError::Session { source, .. } => match source {
                crate::session::SessionError::Remote(reply) => match reply.kind {
                    gantry_proto::ErrorKind::NotFound => StatusCode::NOT_FOUND,
                    gantry_proto::ErrorKind::AlreadyExists
                    | gantry_proto::ErrorKind::InvalidState => StatusCode::CONFLICT,
                    gantry_proto::ErrorKind::InvalidArgument => StatusCode::BAD_REQUEST,
                    _ => StatusCode::BAD_GATEWAY,
                },
                _ => StatusCode::BAD_GATEWAY,
            },
            VmError::UnexpectedReply(_) | VmError::Probe { .. } => StatusCode::BAD_GATEWAY,
            VmError::NotLaunched(_) => StatusCode::CONFLICT,
            VmError::ShimTooOld { .. } => StatusCode::NOT_IMPLEMENTED,
            VmError::Keeper { .. }
            | VmError::State { .. }
            | VmError::Thread { .. }
            | VmError::LayerDevice { .. }
            | VmError::MapLayer { .. }
            | VmError::Qemu { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

impl From<VmTableError> for ApiError {
    fn from(err: VmTableError) -> Self {
        let status = match &err {
            VmTableError::Vm(err) => return ApiError::from_vm(err),
            VmTableError::Invalid(_) => StatusCode::BAD_REQUEST,
            VmTableError::Conflict(_) | VmTableError::Configured(_) => StatusCode::CONFLICT,
            VmTableError::NotFound(_) => StatusCode::NOT_FOUND,
            VmTableError::State { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, err.to_string())
    }
}

impl From<RunError> for ApiError {
    fn from(err: RunError) -> Self {
        match err {
            RunError::Vm(err) => err.into(),
            RunError::Spec(_)
            | RunError::Image(ImageError::BadImage { .. })
            | RunError::Table(ContainerTableError::BadId(_)) => {
                ApiError(StatusCode::BAD_REQUEST, err.to_string())
            }
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

fn find(agent: &Agent, name: &str) -> Result<Arc<Vm>, ApiError> {
    agent.vms.get(name).ok_or_else(|| {
        let known = agent.vms.names();
        ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no VM named {name:?}; this agent serves: {}",
                known.join(", ")
            ),
        )
    })
}

fn done() -> Json<serde_json::Value> {
    Json(serde_json::json!({}))
}

async fn agent_info(State(agent): State<AgentState>) -> Json<AgentInfo> {
    Json(AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        vm_template: agent.vms.has_template(),
        vms: agent.vms.names(),
    })
}

async fn list_vms(State(agent): State<AgentState>) -> Json<Vec<VmStatus>> {
    Json(
        agent
            .vms
            .all()
            .iter()
            .map(|vm| agent.vms.status(vm))
            .collect(),
    )
}

async fn vm_status(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<VmStatus>, ApiError> {
    let vm = find(&agent, &name)?;
    Ok(Json(agent.vms.status(&vm)))
}

/// `POST /v1/vms`: attaches a VM at run time.
async fn attach_vm(
    State(agent): State<AgentState>,
    ApiJson(request): ApiJson<AttachVm>,
) -> Result<Json<VmStatus>, ApiError> {
    let vm = agent
        .vms
        .attach(request, &agent.images, &agent.metrics)
        .await?;
    Ok(Json(agent.vms.status(&vm)))
}

/// `DELETE /v1/vms/{vm}`: detaches a VM attached at run time and removes its state.
async fn detach_vm(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    agent.vms.detach(&name, &agent.metrics).await?;
    Ok(done())
}

#[derive(Debug, Deserialize)]
struct WaitQuery {
    /// How long to wait for the shim to connect, e.g. while the guest boots.
    #[serde(default)]
    wait_ms: u64,
}

async fn guest_info(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<Json<GuestInfoReport>, ApiError> {
    let vm = find(&agent, &name)?;
    let (guest, round_trip) = vm.guest_info(Duration::from_millis(query.wait_ms)).await?;
    Ok(Json(GuestInfoReport {
        vm: name,
        guest,
        round_trip_us: round_trip.as_micros() as u64,
    }))
}

#[derive(Debug, Deserialize)]
struct PingQuery {
    #[serde(default = "one")]
    count: u32,
    #[serde(default)]
    size: usize,
}

fn one() -> u32 {
    1
}

/// Bounds that keep one API call from occupying a shim for long.
const MAX_PINGS: u32 = 10_000;
const MAX_PING_BYTES: usize = 1 << 20;

async fn ping(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<PingQuery>,
) -> Result<Json<PingReport>, ApiError> {
    if query.count == 0 || query.count > MAX_PINGS || query.size > MAX_PING_BYTES {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("count must be 1..={MAX_PINGS} and size at most {MAX_PING_BYTES} bytes"),
        ));
    }
    let vm = find(&agent, &name)?;
    let round_trips = vm.ping(query.count, query.size).await?;
    Ok(Json(PingReport {
        vm: name,
        round_trips_us: round_trips.iter().map(|d| d.as_micros() as u64).collect(),
    }))
}

async fn restart(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    find(&agent, &name)?.restart().await?;
    Ok(done())
}

async fn stop_vm(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    find(&agent, &name)?.stop().await?;
    Ok(done())
}

async fn resources(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<gantry_proto::GuestResources>, ApiError> {
    let vm = find(&agent, &name)?;
    match vm.request(Op::GuestResources, SHIM_WAIT).await? {
        Reply::GuestResources(resources) => Ok(Json(resources)),
        other => Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the shim answered {other:?} to GuestResources"),
        )),
    }
}

async fn probe(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let vm = find(&agent, &name)?;
    let reason = vm.probe_with_garbage().await?;
    Ok(Json(serde_json::json!({ "goodbye": reason })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BaselineRequest {
    args: Vec<String>,
}

/// Runs a command directly in the guest's shim, with no container: the floor of start latency.
async fn baseline(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(request): ApiJson<BaselineRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !agent.enable_baseline {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "baseline runs commands as guest root outside any container; it is for benchmarks \
             and off unless agent.toml sets enable_baseline = true"
                .into(),
        ));
    }
    let vm = find(&agent, &name)?;
    match vm
        .request(Op::SpawnBaseline { args: request.args }, SHIM_WAIT)
        .await?
    {
        Reply::Baseline { output, exit } => Ok(Json(serde_json::json!({
            "output": String::from_utf8_lossy(&output),
            "exit": exit,
        }))),
        other => Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the shim answered {other:?} to SpawnBaseline"),
        )),
    }
}

/// Creates and starts a container, streaming progress as NDJSON [`RunUpdate`] lines.
async fn run(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(options): ApiJson<RunOptions>,
) -> Result<Response, ApiError> {
    if let Some(name) = &options.name {
        check_id("container name", name)?;
    }
    // A name that cannot lead to an image is refused before anything streams.
    crate::images::parse_image(&options.image)
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?;
    find(&agent, &name)?;
    let queue = UpdateQueue::default();
    let updates = queue.clone();
    tokio::spawn(async move {
        let progress: RunProgress = {
            let queue = queue.clone();
            Arc::new(move |update| queue.push(update))
        };
        let Some(vm) = agent.vms.get(&name) else {
            queue.close();
            return;
        };
        let create_only = options.create_only;
        // The run goes on whether or not the client still reads.
        let outcome = match run_container(&agent.images, &vm, options, progress).await {
            Ok(id) if create_only => RunUpdate::Created(id),
            Ok(id) => RunUpdate::Started(id),
            Err(err) => RunUpdate::Failed(err.to_string()),
        };
        queue.push(outcome);
        queue.close();
    });
    Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(updates.body())
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))
}

async fn list_containers(
    State(agent): State<AgentState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<Vec<ContainerView>>, ApiError> {
    let vm = find(&agent, &name)?;
    let Reply::Containers(summaries) = vm.request(Op::ListContainers, SHIM_WAIT).await? else {
        return Err(ApiError(
            StatusCode::BAD_GATEWAY,
            "the shim answered ListContainers wrongly".into(),
        ));
    };
    let known: std::collections::HashSet<String> =
        summaries.iter().map(|s| s.container_id.clone()).collect();
    let mut views: Vec<ContainerView> = summaries
        .into_iter()
        .map(|summary| {
            let entry = vm.containers().get(&summary.container_id).ok();
            ContainerView {
                image: entry.as_ref().map(|e| e.image.clone()),
                oom_killed: entry.as_ref().is_some_and(|e| e.oom_killed()),
                created_unix: entry.as_ref().map(|e| e.created_unix),
                id: summary.container_id,
                state: summary.state.into(),
                lost: None,
                pid: summary.pid,
                exit: summary.exit,
                layers: summary.layers,
            }
        })
        .collect();
    // Containers the agent created that the guest no longer has: its guest restarted or
    // crashed. They stay listed (and their names taken, their logs kept) until `rm`.
    for entry in vm.containers().all() {
        if entry.created() && !known.contains(&entry.id) {
            views.push(ContainerView {
                id: entry.id.clone(),
                image: Some(entry.image.clone()),
                state: gantry_api::ContainerState::Lost,
                lost: Some(
                    "the guest no longer has it: the VM restarted or crashed after it was created"
                        .into(),
                ),
                pid: None,
                exit: None,
                oom_killed: entry.oom_killed(),
                layers: Vec::new(),
                created_unix: Some(entry.created_unix),
            });
        }
    }
    Ok(Json(views))
}

#[derive(Debug, Deserialize)]
struct ProcessQuery {
    exec: Option<String>,
    #[serde(default)]
    follow: bool,
}

/// Streams a process's log records (`gantry_api::records`), following until its end if asked.
async fn logs(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiQuery(query): ApiQuery<ProcessQuery>,
) -> Result<Response, ApiError> {
    check_exec(query.exec.as_deref())?;
    let vm = find(&agent, &name)?;
    let entry = vm
        .containers()
        .get(&id)
        .map_err(|err| ApiError(StatusCode::NOT_FOUND, err.to_string()))?;
    let log = entry.log(query.exec.as_deref()).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no exec {:?} in {id}", query.exec),
        )
    })?;
    let reader = log
        .reader(query.follow)
        .await
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    let stream = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_raw().await {
            Ok(Some((kind, data))) => {
                Some((Ok(Bytes::from(encode_record(kind, &data))), Some(reader)))
            }
            Ok(None) => None,
            Err(err) => Some((Err(err), None)),
        }
    });
    Response::builder()
        .header("content-type", "application/octet-stream")
        .body(Body::from_stream(stream))
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))
}

/// `POST …/start`: starts the main process of a container made with `create_only`.
async fn start(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
) -> Result<Json<serde_json::Value>, ApiError> {
    let vm = find(&agent, &name)?;
    let entry = vm
        .containers()
        .get(&id)
        .map_err(|err| ApiError(StatusCode::NOT_FOUND, err.to_string()))?;
    entry.await_first_output(
        std::time::Instant::now(),
        tracing::info_span!("start", vm = %name, container = %id),
    );
    start_created(&vm, &id).await?;
    Ok(done())
}

async fn exec(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiJson(request): ApiJson<ExecRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_exec(request.exec_id.as_deref())?;
    let vm = find(&agent, &name)?;
    let entry = vm
        .containers()
        .get(&id)
        .map_err(|err| ApiError(StatusCode::NOT_FOUND, err.to_string()))?;
    let exec_id = request.exec_id.unwrap_or_else(generate_name);
    let process = ProcessSpec {
        args: request.command,
        env: merge_env(&entry.process.env, &request.env)
            .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?,
        cwd: request.workdir.unwrap_or_else(|| entry.process.cwd.clone()),
        user: request.user.unwrap_or_else(|| entry.process.user.clone()),
        stdin: request.stdin,
    };
    entry
        .add_exec(&exec_id)
        .map_err(|err| ApiError(StatusCode::CONFLICT, err.to_string()))?;
    let op = exec_op(id, exec_id.clone(), process, request.tty, request.tty_size);
    expect_done(vm.request(op, SHIM_WAIT).await)?;
    Ok(Json(serde_json::json!({ "exec_id": exec_id })))
}

#[derive(Debug, Deserialize)]
struct KillQuery {
    exec: Option<String>,
    #[serde(default = "sigkill")]
    signal: i32,
}

fn sigkill() -> i32 {
    libc::SIGKILL
}

async fn kill(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiQuery(query): ApiQuery<KillQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_exec(query.exec.as_deref())?;
    let vm = find(&agent, &name)?;
    let op = Op::Signal {
        container_id: id,
        exec_id: query.exec,
        signal: query.signal,
    };
    expect_done(vm.request(op, SHIM_WAIT).await)?;
    Ok(done())
}

async fn wait(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiQuery(query): ApiQuery<ProcessQuery>,
) -> Result<Json<ExitRecord>, ApiError> {
    check_exec(query.exec.as_deref())?;
    let vm = find(&agent, &name)?;
    let is_main = query.exec.is_none();
    let op = Op::Wait {
        container_id: id.clone(),
        exec_id: query.exec,
    };
    let status = match vm.request(op, SHIM_WAIT).await? {
        Reply::Exited(status) => status,
        other => {
            return Err(ApiError(
                StatusCode::BAD_GATEWAY,
                format!("the shim answered {other:?} to Wait"),
            ));
        }
    };
    let oom_killed = is_main && vm.containers().get(&id).is_ok_and(|e| e.oom_killed());
    Ok(Json(ExitRecord { status, oom_killed }))
}

async fn stats(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
) -> Result<Json<gantry_proto::ContainerStats>, ApiError> {
    let vm = find(&agent, &name)?;
    match vm
        .request(Op::Stats { container_id: id }, SHIM_WAIT)
        .await?
    {
        Reply::Stats(stats) => Ok(Json(stats)),
        other => Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("the shim answered {other:?} to Stats"),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct StdinQuery {
    exec: Option<String>,
    #[serde(default)]
    close: bool,
}

async fn stdin(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiQuery(query): ApiQuery<StdinQuery>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(|rejection| ApiError(rejection.status(), rejection.body_text()))?;
    check_exec(query.exec.as_deref())?;
    let vm = find(&agent, &name)?;
    if body.len() > MAX_STDIN_BYTES {
        return Err(ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("at most {MAX_STDIN_BYTES} bytes per write"),
        ));
    }
    if !body.is_empty() {
        let op = Op::WriteStdin {
            container_id: id.clone(),
            exec_id: query.exec.clone(),
            data: body.to_vec(),
        };
        expect_done(vm.request(op, SHIM_WAIT).await)?;
    }
    if query.close {
        expect_done(
            vm.request(
                Op::CloseStdin {
                    container_id: id,
                    exec_id: query.exec,
                },
                SHIM_WAIT,
            )
            .await,
        )?;
    }
    Ok(done())
}

#[derive(Debug, Deserialize)]
struct RemoveQuery {
    #[serde(default)]
    force: bool,
}

async fn remove(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    ApiQuery(query): ApiQuery<RemoveQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let vm = find(&agent, &name)?;
    if query.force {
        let op = Op::Signal {
            container_id: id.clone(),
            exec_id: None,
            signal: libc::SIGKILL,
        };
        // Not running (or already gone) is fine for a forced removal.
        if vm.request(op, SHIM_WAIT).await.is_ok() {
            let _ = vm
                .request(
                    Op::Wait {
                        container_id: id.clone(),
                        exec_id: None,
                    },
                    SHIM_WAIT,
                )
                .await;
        }
    }
    match vm
        .request(
            Op::DeleteContainer {
                container_id: id.clone(),
            },
            SHIM_WAIT,
        )
        .await
    {
        Ok(_) => {}
        // The guest has no such container (a rebooted guest): forget the agent's record too.
        Err(VmError::Session {
            source: crate::session::SessionError::Remote(reply),
            ..
        }) if reply.kind == gantry_proto::ErrorKind::NotFound
            && vm.containers().get(&id).is_ok() => {}
        Err(err) => return Err(err.into()),
    }
    vm.containers().remove(&id);
    Ok(done())
}

async fn images(State(agent): State<AgentState>) -> Result<Json<serde_json::Value>, ApiError> {
    let images = agent
        .images
        .cache
        .images()
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    serde_json::to_value(images)
        .map(Json)
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))
}

/// Pulls an image into the cache without running it.
async fn prefetch(
    State(agent): State<AgentState>,
    ApiJson(request): ApiJson<gantry_api::PrefetchRequest>,
) -> Result<Json<gantry_api::PrefetchReport>, ApiError> {
    crate::images::parse_image(&request.image)
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?;
    let pulled = agent
        .images
        .pull(
            &request.image,
            request.pull_mode,
            &crate::images::pull::no_progress,
        )
        .await
        .map_err(|err| ApiError(StatusCode::BAD_GATEWAY, err.to_string()))?;
    Ok(Json(gantry_api::PrefetchReport {
        image: pulled.record.name.clone(),
        manifest_digest: pulled.record.manifest_digest.to_string(),
        layers: pulled.record.layers.len(),
        lazy_layers: pulled.lazy_layers.len(),
    }))
}

/// `PUT /v1/manifest`: the cluster manifest (its JSON form) put in force, checked whole first.
async fn apply_manifest(
    State(agent): State<AgentState>,
    body: Bytes,
) -> Result<Json<gantry_api::ManifestStatus>, ApiError> {
    let manifest = crate::manifest::ClusterManifest::from_json(&body)
        .map_err(|err| ApiError(StatusCode::BAD_REQUEST, err.to_string()))?;
    agent.apply_manifest(manifest).map_err(|reason| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("cluster manifest: {reason}"),
        )
    })?;
    manifest_status(State(agent)).await
}

/// `GET /v1/manifest`; a cache that cannot be read is a 500, as for `GET /v1/images` (empty
/// layer lists would read as "nothing fetched yet").
async fn manifest_status(
    State(agent): State<AgentState>,
) -> Result<Json<gantry_api::ManifestStatus>, ApiError> {
    let images = agent
        .images
        .cache
        .images()
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    Ok(Json(agent.manifest.status(|name| {
        images
            .iter()
            .find(|image| image.record.name == name)
            .map(|image| {
                image
                    .layer_presence
                    .iter()
                    .map(|layer| gantry_api::ManifestLayerStatus {
                        digest: layer.blob_digest.to_string(),
                        present_chunks: layer.present_chunks,
                        chunks: layer.chunks,
                    })
                    .collect()
            })
            .unwrap_or_default()
    })))
}

/// `GET /metrics`: the agent's metrics, as a Prometheus server scrapes them.
async fn metrics(State(agent): State<AgentState>) -> Result<Response, ApiError> {
    let text = endpoint::exposition(agent.metrics.clone())
        .await
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, err.to_string()))?;
    Ok(endpoint::response(text))
}

async fn lazy_stats(State(agent): State<AgentState>) -> Json<gantry_api::LazyStats> {
    let mut stats = agent.images.lazy.stats();
    stats.peers = agent.peers.stats();
    Json(stats)
}

/// `Op::Exec`, or `Op::ExecTty` when the exec asks for a terminal.
fn exec_op(
    container_id: String,
    exec_id: String,
    process: ProcessSpec,
    tty: bool,
    tty_size: Option<gantry_proto::TtySize>,
) -> Op {
    match tty {
        false => Op::Exec {
            container_id,
            exec_id,
            process,
        },
        true => Op::ExecTty {
            container_id,
            exec_id,
            process,
            size: tty_size.unwrap_or_default(),
        },
    }
}

#[derive(Debug, Deserialize)]
struct ResizeQuery {
    exec: Option<String>,
    rows: u16,
    cols: u16,
}

/// Sets the window size of a process's terminal (`run -t`, `exec -t`).
async fn resize(
    State(agent): State<AgentState>,
    ContainerPath { vm: name, id }: ContainerPath,
    Query(query): Query<ResizeQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    check_exec(query.exec.as_deref())?;
    let vm = find(&agent, &name)?;
    let op = Op::ResizeTty {
        container_id: id,
        exec_id: query.exec,
        size: gantry_proto::TtySize {
            rows: query.rows,
            cols: query.cols,
        },
    };
    expect_done(vm.request(op, SHIM_WAIT).await)?;
    Ok(done())
}
