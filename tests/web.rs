//! The actix-web server child and the health service, in-process, over loopback.
#![cfg(feature = "web")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use actix_supervisor::web::{health, HttpServerSpec, ServerAddrs};
use actix_supervisor::{ChildKind, Outcome, Phase, Tree, TreeHandle, TreeOutcome};
use actix_web::{web, App, HttpResponse};

/// An app with `/sleep?ms=N` (answers after N ms without blocking its thread) and the probes.
fn spec(name: &str, listener: TcpListener, phase: actix_supervisor::PhaseWatch) -> HttpServerSpec {
    HttpServerSpec::new(name, listener, move || {
        App::new().service(health(phase.clone())).route(
            "/sleep",
            web::get().to(
                |q: web::Query<std::collections::HashMap<String, u64>>| async move {
                    let ms = q.get("ms").copied().unwrap_or(0);
                    actix_rt::time::sleep(Duration::from_millis(ms)).await;
                    HttpResponse::Ok().body(format!("slept {ms}"))
                },
            ),
        )
    })
    .workers(2)
}

fn loopback() -> TcpListener {
    TcpListener::bind("127.0.0.1:0").expect("a free loopback port")
}

async fn start(grace: Duration, budget: Duration) -> (TreeHandle, SocketAddr, ServerAddrs) {
    let listener = loopback();
    let addr = listener.local_addr().unwrap();
    let builder = Tree::builder("web-test").readiness_grace(grace);
    let http = spec("http", listener, builder.phase_watch()).budget(budget);
    let addrs = http.addrs();
    let handle = builder
        .child(http)
        .build()
        .expect("valid tree")
        .start()
        .await
        .expect("started");
    (handle, addr, addrs)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let client = awc::Client::builder()
        .timeout(Duration::from_secs(30))
        .finish();
    let mut res = client
        .get(format!("http://{addr}{path}"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let body = res.body().await.expect("a body");
    (
        res.status().as_u16(),
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[actix_rt::test]
async fn in_flight_requests_complete_and_are_counted() {
    let (handle, addr, addrs) = start(Duration::ZERO, Duration::from_secs(10)).await;
    assert_eq!(addrs.get(), vec![addr]);
    assert_eq!(get(addr, "/readyz").await.0, 200);

    let requests: Vec<_> = (0..5)
        .map(|_| actix_rt::spawn(get(addr, "/sleep?ms=800")))
        .collect();
    // Every request is in the server before the shutdown starts.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if get(addr, "/livez").await.0 == 200 {
            break;
        }
    }
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let report = handle.shutdown("test").await;
    for r in requests {
        let (status, body) = r.await.expect("request task");
        assert_eq!((status, body.as_str()), (200, "slept 800"));
    }
    let server = report.find("http").expect("server in the report");
    assert_eq!(server.kind, ChildKind::Server);
    assert_eq!(server.outcome, Outcome::Drained, "{report}");
    assert_eq!(server.in_flight, Some(5), "{report}");
    assert_eq!(server.drained, 5, "{report}");
    assert_eq!(server.dropped, 0, "{report}");
    assert_eq!(report.outcome, TreeOutcome::Clean);
    // The listening socket is closed: a new connection is refused.
    assert!(
        TcpStream::connect(addr).is_err(),
        "still accepting after the stop"
    );
}

#[actix_rt::test]
async fn readiness_turns_503_during_the_grace_while_liveness_stays_200() {
    let (handle, addr, _) = start(Duration::from_millis(1500), Duration::from_secs(5)).await;
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(body, r#"{"phase":"running","ready":true,"live":true}"#);
    let report = handle.shutdown("test");
    assert_eq!(handle.phase(), Phase::Draining);
    let (status, body) = get(addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body, r#"{"phase":"draining","ready":false,"live":true}"#);
    assert_eq!(get(addr, "/livez").await.0, 200);
    let report = report.await;
    assert_eq!(report.outcome, TreeOutcome::Clean, "{report}");
}

#[actix_rt::test]
async fn a_request_longer_than_the_budget_times_the_server_out() {
    let (handle, addr, _) = start(Duration::ZERO, Duration::from_secs(1)).await;
    let slow = actix_rt::spawn(async move {
        let client = awc::Client::builder()
            .timeout(Duration::from_secs(30))
            .finish();
        client
            .get(format!("http://{addr}/sleep?ms=20000"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    });
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let report = handle.shutdown("test").await;
    let took = started.elapsed();
    let server = report.find("http").unwrap();
    assert_eq!(server.outcome, Outcome::TimedOut, "{report}");
    assert_eq!(server.in_flight, Some(1));
    assert_eq!(report.outcome, TreeOutcome::TimedOut);
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The cut request does not get a 200.
    let slow = slow.await.unwrap();
    assert!(!matches!(slow, Ok(200)), "{slow:?}");
}

#[actix_rt::test]
async fn a_bind_failure_fails_the_start_naming_the_address() {
    let taken = loopback();
    let addr = taken.local_addr().unwrap().to_string();
    let http = HttpServerSpec::new("http", addr.clone(), App::new);
    let err = Tree::builder("web-test")
        .child(http)
        .build()
        .unwrap()
        .start()
        .await
        .expect_err("the address is taken");
    assert_eq!(err.child, "http");
    assert!(err.cause.contains(&addr), "{err}");
}
