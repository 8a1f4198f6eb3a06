//! An MQTT 3.1.1 broker built as a supervision tree, that loses nothing when it is stopped.
//!
//! ```text
//! broker                 rest-for-one: a child that fails restarts with every child after it
//! ├── health             actix-web: /readyz, /livez            (started first, stopped last)
//! ├── store              blocking worker: the append-only log  (depends on health)
//! ├── router             subscriptions, retained, routing      (depends on store)
//! ├── sessions           one task per connection               (depends on router)
//! └── listener           accepts TCP connections               (depends on sessions)
//! ```
//!
//! The dependencies give the shutdown order: listener, sessions, router, store, health. On
//! SIGTERM `/readyz` turns 503 at once; the listener closes its socket; every connection stops
//! taking PUBLISH, finishes routing what it took, delivers what it holds and closes; the router
//! finishes what it sent the store; the store syncs and closes its log; the report is printed
//! with one line of counts, and the process exits 0.
//!
//! ```text
//! cargo run --release --example broker                         # 127.0.0.1:1883, ./broker-data
//! cargo run --release --example broker -- --bind 127.0.0.1:0   # any free port (logged)
//! mosquitto_sub -t 'sensors/#' -q 1 -c -i me &                 # a persistent subscriber
//! mosquitto_pub -t sensors/1 -m 21.5 -q 1
//! ```
//!
//! Exit codes: 0 clean; 1 failed to start (e.g. another broker holds the data dir); 2 bad
//! command line or cannot listen; 3 something failed or panicked; 4 something timed out in the
//! drain; 5 forced by a second signal.

mod cli;
mod connection;
mod listener;
mod outbox;
mod quota;
mod router;
mod sessions;
// Both are complete models (their tests use all of them); the broker uses most.
#[allow(dead_code)]
mod store;
#[allow(dead_code)]
mod topic;
mod wire;

use std::sync::Arc;

use actix_supervisor::web::{health, HttpServerSpec};
use actix_supervisor::{ChildSpec, Strategy, Tree};
use actix_web::App;
use clap::Parser;
use parking_lot::Mutex;

use crate::cli::Args;
use crate::connection::{Incomplete, Limits, Shared, Stats};
use crate::listener::{Listener, Socket};
use crate::quota::Quota;
use crate::router::{Router, RouterConfig};
use crate::sessions::Sessions;
use crate::store::{StoreConfig, StoreStats};

const LOG: &str = "broker";

/// `GET /status`: what the broker is refusing or losing, as JSON — whether the store can write
/// (and since when it cannot), and what sessions over their quota lost. 200 while the store
/// writes, 503 while it does not (the broker still serves QoS 0 and clean sessions: `/readyz`
/// stays 200).
async fn status(stats: Arc<StoreStats>) -> actix_web::HttpResponse {
    let sessions_over_quota = stats.drops.sessions();
    let mut body = serde_json::json!({
        "store": { "writes": "ok" },
        "dropped_over_quota": stats.drops.total(),
        "sessions_over_quota": sessions_over_quota,
        "sessions_expired": StoreStats::get(&stats.expired),
    });
    let mut response = actix_web::HttpResponse::Ok();
    if let Some((why, for_how_long)) = stats.disk.failing() {
        body["store"] = serde_json::json!({
            "writes": "failing",
            "error": why,
            "failing_for_ms": u64::try_from(for_how_long.as_millis()).unwrap_or(u64::MAX),
        });
        response = actix_web::HttpResponse::ServiceUnavailable();
    }
    response.json(body)
}

fn main() {
    // actix-web's own start lines would say "listening on" for the health port too: the one
    // such line is the MQTT listener's (the health address has its own line).
    env_logger::Builder::from_env(
        env_logger::Env::default()
            .default_filter_or("info,actix_server=warn,actix_supervisor::web=warn"),
    )
    .init();
    let args = Args::parse();
    let code = actix_rt::System::new().block_on(run(args));
    std::process::exit(code);
}

/// The default of `--max-incomplete-bytes`, unless `--max-packet-size` is larger.
const MAX_INCOMPLETE_BYTES: u64 = 64 << 20;

async fn run(args: Args) -> i32 {
    let max_incomplete = match args.max_incomplete_bytes {
        Some(max) if max < args.max_packet_size => {
            eprintln!(
                "error: --max-incomplete-bytes {max} is less than --max-packet-size {}: such a \
                 packet could never arrive",
                args.max_packet_size
            );
            return 2;
        }
        Some(max) => max,
        None => MAX_INCOMPLETE_BYTES.max(args.max_packet_size),
    };
    // Bound here, before anything starts, so a bad or busy address is a plain error (exit 2).
    let bound = match std::net::TcpListener::bind(&args.bind) {
        Ok(bound) => bound,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.bind);
            return 2;
        }
    };
    let addr = match bound.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", args.bind);
            return 2;
        }
    };
    if let Err(e) = std::fs::create_dir_all(&args.data_dir) {
        eprintln!(
            "error: cannot use --data-dir {}: {e}",
            args.data_dir.display()
        );
        return 2;
    }

    let timeout = args.shutdown_timeout.0;
    let mut store_config = StoreConfig::new(&args.data_dir);
    let quota = Quota {
        messages: usize::try_from(args.max_queued).unwrap_or(usize::MAX),
        bytes: args.max_queued_bytes,
        overflow: args.queue_overflow,
    };
    store_config.quota = quota;
    store_config.fail_fsync = args.fail_fsync;
    store_config.fail_writes_while = args.fail_writes_while.clone();
    let (store_spec, store) = store::spec("store", store_config);
    let store_stats = store.stats_handle();
    let router_store = store.clone();
    let router_config = RouterConfig {
        quota,
        expiration: args.persistent_client_expiration.map(|e| e.0),
    };
    let router = ChildSpec::worker("router", move || {
        Router::new(router_store.clone(), router_config)
    })
    .depends_on("store")
    .budget(timeout / 8);
    let stats = Arc::new(Stats::default());
    let shared = Arc::new(Shared {
        router: router.addr(),
        store,
        limits: Limits {
            max_packet_size: args.max_packet_size as usize,
            max_inflight: args.max_inflight as usize,
            quota,
            packet_timeout: args.packet_timeout.0,
        },
        stats: stats.clone(),
        incomplete: Arc::new(Incomplete::new(max_incomplete as usize)),
    });
    let max_connections = args.max_connections as usize;
    let sessions = ChildSpec::worker("sessions", move || {
        Sessions::new(shared.clone(), max_connections)
    })
    .depends_on("router")
    .budget(timeout.mul_f64(0.7));
    let socket = Arc::new(Socket {
        addr,
        bound: Mutex::new(Some(bound)),
    });
    let sessions_addr = sessions.addr();
    let listener = ChildSpec::try_worker("listener", move || {
        Ok(Listener::new(&socket, sessions_addr.clone())?)
    })
    .depends_on("sessions");

    let builder = Tree::builder("broker")
        .deadline(timeout)
        .strategy(Strategy::RestForOne)
        .handle_signals(true);
    let phase = builder.phase_watch();
    let status_stats = store_stats.clone();
    let health_spec = HttpServerSpec::new("health", args.health.clone(), move || {
        let stats = status_stats.clone();
        App::new().service(health(phase.clone())).route(
            "/status",
            actix_web::web::get().to(move || status(stats.clone())),
        )
    })
    .workers(1);
    let health_addrs = health_spec.addrs();
    let tree = builder
        .child(health_spec)
        .child(store_spec.depends_on("health").budget(timeout / 8))
        .child(router)
        .child(sessions)
        .child(listener)
        .build();
    let tree = match tree {
        Ok(tree) => tree,
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    let handle = match tree.start().await {
        Ok(handle) => handle,
        Err(e) if e.child == "health" => {
            eprintln!("error: --health: {}", e.cause);
            return 2;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return 1;
        }
    };
    log::info!(target: LOG, "listening on {addr}");
    for health in health_addrs.get() {
        log::info!(target: LOG, "health on http://{health}");
    }

    let report = handle.wait().await;
    log::info!(target: LOG, "shutdown report:\n{report}");
    let drops = &store_stats.drops;
    let (sessions_over, worst) = drops.worst(5);
    if sessions_over > 0 {
        let worst: Vec<String> = worst.iter().map(|(c, n)| format!("`{c}` {n}")).collect();
        log::info!(
            target: LOG,
            "over their quota: {sessions_over} sessions lost {} messages (most: {})",
            drops.total(),
            worst.join(", ")
        );
    }
    log::info!(
        target: LOG,
        "closed {} connections, delivered {} messages during the drain, {} messages stored for \
         offline sessions, {} messages dropped for sessions over their quota, {} sessions expired",
        stats
            .closed_in_drain
            .load(std::sync::atomic::Ordering::Relaxed),
        stats
            .delivered_in_drain
            .load(std::sync::atomic::Ordering::Relaxed),
        StoreStats::get(&store_stats.owed_at_close),
        drops.total(),
        StoreStats::get(&store_stats.expired),
    );
    report.exit_code()
}
