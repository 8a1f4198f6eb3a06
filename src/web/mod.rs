//! actix-web integration (feature `web`): an [`HttpServerSpec`] runs an actix-web `HttpServer`
//! as a child of the tree, and [`health`] serves the tree's phase as `/readyz` and `/livez` in
//! any actix-web app.
//!
//! This is the edge of the crate: it builds on the tree (its children and its phase) and nothing
//! below reaches into it.
//!
//! ```no_run
//! use actix_supervisor::web::{health, HttpServerSpec};
//! use actix_supervisor::Tree;
//! use actix_web::{web, App, HttpResponse};
//!
//! #[actix_web::main]
//! async fn main() {
//!     let builder = Tree::builder("service").handle_signals(true);
//!     let phase = builder.phase_watch();
//!     let http = HttpServerSpec::new("http", "127.0.0.1:8080", move || {
//!         App::new()
//!             .service(health(phase.clone()))
//!             .route("/", web::get().to(|| async { HttpResponse::Ok().body("hello") }))
//!     });
//!     let handle = builder.child(http).build().unwrap().start().await.unwrap();
//!     let report = handle.wait().await; // SIGTERM: readiness 503, then a graceful stop
//!     eprintln!("{report}");
//!     std::process::exit(report.exit_code());
//! }
//! ```

mod health;
mod server;

pub use health::health;
pub use server::{HttpServerSpec, Listen, ServerAddrs};
