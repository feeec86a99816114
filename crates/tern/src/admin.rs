//! The HTTP side of the operator interface: `/health` and the queue admin API under
//! `/api/queue/` that `tern queue …` talks to. The handlers only translate HTTP to the queue
//! actor's admin messages and back to JSON.
//!
//! The admin API answers only clients on loopback (403 otherwise), whatever `http.listen` is:
//! it can delete mail, and the health endpoint is the only thing a load balancer needs.

use actix::Addr;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, HttpResponse};
use serde::Deserialize;
use tern_message::QueueId;
use tern_queue::admin::{
    DeleteMessage, Flush, HoldMessage, HoldOutcome, ListMessages, ShowMessage, Summarize,
    SuspendDomain, STATE_NAMES,
};
use tern_queue::{GetStats, QueueActor};

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/health", web::get().to(health)).service(
        web::scope("/api")
            .wrap(from_fn(loopback_only))
            .service(
                web::scope("/suppression")
                    .route("", web::get().to(suppression_list))
                    .route("", web::post().to(suppression_add))
                    .route("/{address}", web::delete().to(suppression_remove)),
            )
            .service(
                web::scope("/queue")
                    .route("/messages", web::get().to(list))
                    .route("/messages/{id}", web::get().to(show))
                    .route("/messages/{id}", web::delete().to(delete))
                    .route("/messages/{id}/hold", web::post().to(hold))
                    .route("/messages/{id}/release", web::post().to(release))
                    .route("/flush", web::post().to(flush))
                    .route("/suspend/{domain}", web::post().to(suspend))
                    .route("/resume/{domain}", web::post().to(resume))
                    .route("/stats", web::get().to(stats)),
            ),
    );
}

type Queue = web::Data<Addr<QueueActor>>;

fn unavailable(e: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::ServiceUnavailable()
        .json(serde_json::json!({"status": "unavailable", "error": e.to_string()}))
}

fn error(status: actix_web::http::StatusCode, message: impl Into<String>) -> HttpResponse {
    HttpResponse::build(status).json(serde_json::json!({ "error": message.into() }))
}

/// Everything under `/api`: 403 unless the peer is on loopback.
async fn loopback_only(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    if req.peer_addr().is_some_and(|a| a.ip().is_loopback()) {
        return next
            .call(req)
            .await
            .map(ServiceResponse::map_into_left_body);
    }
    let denied = error(
        actix_web::http::StatusCode::FORBIDDEN,
        "the admin API answers loopback clients only",
    );
    Ok(req.into_response(denied).map_into_right_body())
}

async fn health(queue: Queue) -> HttpResponse {
    match queue.send(GetStats).await {
        Ok(stats) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ok",
            "queued": stats.messages,
            "bytes": stats.bytes,
            "recovered": stats.recovered,
            "scheduled": stats.scheduled,
            "in_flight": stats.in_flight,
            "corrupt": stats.corrupt,
            "committed": stats.committed,
            "syncs": stats.syncs,
            "failed": stats.failed,
            "delivered": stats.delivery.delivered,
            "deferred": stats.delivery.deferred,
            "bounced": stats.delivery.failed + stats.delivery.expired,
            "dsn_sent": stats.delivery.dsn_sent,
        })),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct ListQuery {
    domain: Option<String>,
    state: Option<String>,
    #[serde(default)]
    limit: usize,
}

async fn list(queue: Queue, q: web::Query<ListQuery>) -> HttpResponse {
    let q = q.into_inner();
    if let Some(state) = q.state.as_deref() {
        if !STATE_NAMES.iter().any(|s| s.eq_ignore_ascii_case(state)) {
            return error(
                actix_web::http::StatusCode::BAD_REQUEST,
                format!(
                    "unknown state {state:?} (one of {})",
                    STATE_NAMES.join(", ")
                ),
            );
        }
    }
    match queue
        .send(ListMessages {
            domain: q.domain,
            state: q.state,
            limit: q.limit,
        })
        .await
    {
        Ok(list) => HttpResponse::Ok().json(list),
        Err(e) => unavailable(e),
    }
}

fn parse_id(raw: &str) -> Result<QueueId, HttpResponse> {
    raw.parse().map_err(|e: tern_message::BadQueueId| {
        error(actix_web::http::StatusCode::BAD_REQUEST, e.to_string())
    })
}

async fn show(queue: Queue, id: web::Path<String>) -> HttpResponse {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match queue.send(ShowMessage(id)).await {
        Ok(Some(detail)) => HttpResponse::Ok().json(detail),
        Ok(None) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no message {id}"),
        ),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct DeleteQuery {
    #[serde(default)]
    bounce: bool,
}

async fn delete(queue: Queue, id: web::Path<String>, q: web::Query<DeleteQuery>) -> HttpResponse {
    let id = match parse_id(&id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    let bounce = q.bounce;
    match queue.send(DeleteMessage { id, bounce }).await {
        Ok(true) => HttpResponse::Ok()
            .json(serde_json::json!({"deleted": id.to_string(), "bounce": bounce})),
        Ok(false) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no message {id}"),
        ),
        Err(e) => unavailable(e),
    }
}

async fn hold(queue: Queue, id: web::Path<String>) -> HttpResponse {
    set_hold(queue, &id, true).await
}

async fn release(queue: Queue, id: web::Path<String>) -> HttpResponse {
    set_hold(queue, &id, false).await
}

async fn set_hold(queue: Queue, id: &str, hold: bool) -> HttpResponse {
    let id = match parse_id(id) {
        Ok(id) => id,
        Err(r) => return r,
    };
    match queue.send(HoldMessage { id, hold }).await {
        Ok(outcome @ (HoldOutcome::Changed | HoldOutcome::Unchanged)) => {
            HttpResponse::Ok().json(serde_json::json!({
                "id": id.to_string(),
                "held": hold,
                "changed": outcome == HoldOutcome::Changed,
            }))
        }
        Ok(HoldOutcome::NotFound) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("no message {id}"),
        ),
        Ok(HoldOutcome::Failed) => error(
            actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the new state of {id} (see the server log)"),
        ),
        Err(e) => unavailable(e),
    }
}

#[derive(Deserialize)]
struct FlushQuery {
    domain: Option<String>,
}

async fn flush(queue: Queue, q: web::Query<FlushQuery>) -> HttpResponse {
    match queue
        .send(Flush {
            domain: q.into_inner().domain,
        })
        .await
    {
        Ok(n) => HttpResponse::Ok().json(serde_json::json!({ "rescheduled": n })),
        Err(e) => unavailable(e),
    }
}

async fn suspend(queue: Queue, domain: web::Path<String>) -> HttpResponse {
    set_suspended(queue, domain.into_inner(), true).await
}

async fn resume(queue: Queue, domain: web::Path<String>) -> HttpResponse {
    set_suspended(queue, domain.into_inner(), false).await
}

async fn set_suspended(queue: Queue, domain: String, suspend: bool) -> HttpResponse {
    match queue.send(SuspendDomain { domain, suspend }).await {
        Ok(Ok(list)) => HttpResponse::Ok().json(serde_json::json!({ "suspended": list })),
        Ok(Err(message)) => error(actix_web::http::StatusCode::BAD_REQUEST, message),
        Err(e) => unavailable(e),
    }
}

async fn stats(queue: Queue) -> HttpResponse {
    match queue.send(Summarize).await {
        Ok(summary) => HttpResponse::Ok().json(summary),
        Err(e) => unavailable(e),
    }
}

type Policy = web::Data<Addr<tern_policy::PolicyActor>>;

#[derive(Deserialize)]
struct LimitQuery {
    #[serde(default)]
    limit: usize,
}

async fn suppression_list(policy: Policy, q: web::Query<LimitQuery>) -> HttpResponse {
    match policy
        .send(tern_policy::ListSuppressed { limit: q.limit })
        .await
    {
        Ok(Ok(list)) => HttpResponse::Ok().json(list),
        Ok(Err(message)) => error(actix_web::http::StatusCode::CONFLICT, message),
        Err(e) => unavailable(e),
    }
}

/// One address to add: `reason` and `source` default to the operator's.
#[derive(Deserialize)]
struct NewEntry {
    address: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    source: Option<String>,
}

async fn suppression_add(policy: Policy, entries: web::Json<Vec<NewEntry>>) -> HttpResponse {
    let now = tern_message::now_ms();
    let mut list = Vec::with_capacity(entries.len());
    for e in entries.into_inner() {
        if let Err(err) = tern_policy::suppression::normalize(&e.address) {
            return error(actix_web::http::StatusCode::BAD_REQUEST, err.to_string());
        }
        list.push(tern_policy::Suppressed {
            address: e.address,
            source: e.source.unwrap_or_else(|| "manual".into()),
            reason: e.reason,
            added_ms: now,
        });
    }
    match policy.send(tern_policy::Suppress(list)).await {
        Ok(Ok(n)) => HttpResponse::Ok().json(serde_json::json!({ "added": n })),
        Ok(Err(message)) => error(actix_web::http::StatusCode::CONFLICT, message),
        Err(e) => unavailable(e),
    }
}

async fn suppression_remove(policy: Policy, address: web::Path<String>) -> HttpResponse {
    let address = address.into_inner();
    match policy.send(tern_policy::Unsuppress(address.clone())).await {
        Ok(Ok(true)) => HttpResponse::Ok().json(serde_json::json!({ "removed": address })),
        Ok(Ok(false)) => error(
            actix_web::http::StatusCode::NOT_FOUND,
            format!("{address} is not on the suppression list"),
        ),
        Ok(Err(message)) => error(actix_web::http::StatusCode::BAD_REQUEST, message),
        Err(e) => unavailable(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::{test, App};

    /// The guard itself: no queue behind it, so a request that gets through fails later (500:
    /// no app data), one that does not is answered 403 before any handler runs.
    #[actix_rt::test]
    async fn the_api_answers_loopback_peers_only() {
        let app = test::init_service(App::new().configure(routes)).await;
        let id = tern_message::QueueId::new();
        let hold = format!("/api/queue/messages/{id}/hold");
        let release = format!("/api/queue/messages/{id}/release");
        for (method, path) in [
            ("GET", "/api/queue/stats"),
            ("GET", "/api/suppression"),
            ("POST", hold.as_str()),
            ("POST", release.as_str()),
        ] {
            let method: actix_web::http::Method = method.parse().unwrap();
            let remote = test::TestRequest::default()
                .method(method.clone())
                .uri(path)
                .peer_addr("192.0.2.7:40000".parse().unwrap())
                .to_request();
            let resp = test::call_service(&app, remote).await;
            assert_eq!(resp.status(), 403, "{path} from 192.0.2.7");
            let local = test::TestRequest::default()
                .method(method)
                .uri(path)
                .peer_addr("127.0.0.1:40000".parse().unwrap())
                .to_request();
            let resp = test::call_service(&app, local).await;
            assert_ne!(resp.status(), 403, "{path} from loopback");
        }
    }
}
