//! `/readyz` and `/livez`: the tree's phase as HTTP probes, for a load balancer or Kubernetes.
//!
//! Readiness is false from the instant the tree starts draining — before anything is stopped,
//! during the readiness grace too — so traffic moves away while the service still serves it.
//! Liveness stays true until the tree has stopped: a service busy draining is alive, and must
//! not be killed for it.

use actix_web::dev::HttpServiceFactory;
use actix_web::http::header::{CacheControl, CacheDirective};
use actix_web::http::StatusCode;
use actix_web::{guard, web, HttpResponse, Resource};

use crate::tree::{Phase, PhaseWatch};

/// `/readyz` (200 while the tree is `Running`, 503 otherwise) and `/livez` (200 until the tree
/// has `Stopped`, then 503), to mount in an actix-web app with `App::service`. Both answer `GET`
/// and `HEAD` with a small JSON body naming the phase:
///
/// ```text
/// {"phase":"draining","ready":false,"live":true}
/// ```
///
/// `phase` comes from [`TreeBuilder::phase_watch`](crate::TreeBuilder::phase_watch) or
/// [`TreeHandle::phase_watch`](crate::TreeHandle::phase_watch).
pub fn health(phase: PhaseWatch) -> impl HttpServiceFactory {
    (
        probe("/readyz", phase.clone(), Phase::is_ready),
        probe("/livez", phase, Phase::is_live),
    )
}

fn probe(path: &str, phase: PhaseWatch, passes: fn(Phase) -> bool) -> Resource {
    web::resource(path).route(
        web::route()
            .guard(guard::Any(guard::Get()).or(guard::Head()))
            .to(move || {
                let now = phase.get();
                async move { answer(now, passes(now)) }
            }),
    )
}

fn answer(phase: Phase, passes: bool) -> HttpResponse {
    let status = if passes {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    HttpResponse::build(status)
        .content_type("application/json")
        .insert_header(CacheControl(vec![CacheDirective::NoStore]))
        .body(format!(
            r#"{{"phase":"{phase}","ready":{},"live":{}}}"#,
            phase.is_ready(),
            phase.is_live()
        ))
}
