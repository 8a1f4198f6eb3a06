//! An actix-web `HttpServer` as a child of the tree.
//!
//! The server is built and bound when the child starts (so a bind failure fails the start, naming
//! the address), with its own signal handling disabled: the tree is the one authority on when it
//! stops. Every request goes through a counting middleware, so the child's acknowledgement says
//! how many requests were in flight when it was told `Stopping` and how many completed.
//!
//! On `Stopping` the server stops accepting (its listening sockets close, so a new connection is
//! refused) and finishes the requests in progress — actix-web's graceful stop, which also closes
//! idle keep-alive connections. Its `shutdown_timeout` is derived from the child's budget (see
//! [`HttpServerSpec`]), so the two agree on how long in-flight requests may take.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{Server, Service, ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::{App, HttpServer};
use parking_lot::Mutex;

use crate::adapter::{Adapter, AdapterSlot, Running, StopFn, WorkCounter};
use crate::report::ChildKind;
use crate::spec::{common_setters, ChildSpec, Common, SpecKind};

const LOG: &str = "actix_supervisor::web";

/// The spec of an actix-web server child: a name, where to listen, and the app factory (called
/// on each of the server's worker threads, as with `HttpServer::new`).
///
/// - **Budget and `shutdown_timeout`.** The child's [`budget`](Self::budget) (default: the
///   tree's worker budget) bounds the graceful stop. actix-web's own `shutdown_timeout` counts
///   whole seconds; it is set to the budget rounded up, so actix-web never cuts a request the
///   budget still allows. At the budget the tree reports the server `TimedOut` and asks it to
///   stop at once; actix-web closes what is still open when its timeout expires (it checks once
///   a second).
/// - **Counts.** In the report, `drained` is the requests completed after `Stopping` and
///   `in_flight` those in progress when it came; `dropped` is requests that got no response
///   (cut at an abort, or abandoned by their client).
/// - **Restarts.** If the server stops on its own, the restart policy applies; a restarted
///   server binds the same address again.
///
/// ```no_run
/// use std::time::Duration;
/// use actix_supervisor::web::HttpServerSpec;
/// use actix_web::{web, App, HttpResponse};
///
/// let http = HttpServerSpec::new("http", "127.0.0.1:8080", || {
///     App::new().route("/", web::get().to(|| async { HttpResponse::Ok().finish() }))
/// })
/// .workers(2)
/// .budget(Duration::from_secs(10))
/// .depends_on("backend"); // stops before the workers its handlers call
/// ```
pub struct HttpServerSpec {
    common: Common,
    server: HttpAdapter,
}

impl fmt::Debug for HttpServerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpServerSpec")
            .field("name", &self.common.name)
            .field("bind", &self.server.bind)
            .field("settings", &self.server.settings)
            .finish()
    }
}

impl HttpServerSpec {
    /// A server listening on `listen` — an address (anything `HttpServer::bind` takes:
    /// `"127.0.0.1:8080"`, `"localhost:0"`) or a [`TcpListener`] bound already (a socket handed
    /// over by systemd, or bound to port 0 by a test; each start serves a duplicate of it, so a
    /// restart reuses it) — serving the apps `factory` makes.
    pub fn new<F, T, B>(name: impl Into<String>, listen: impl Into<Listen>, factory: F) -> Self
    where
        F: Fn() -> App<T> + Send + Clone + 'static,
        T: ServiceFactory<
                ServiceRequest,
                Config = (),
                Response = ServiceResponse<B>,
                Error = actix_web::Error,
                InitError = (),
            > + 'static,
        B: MessageBody + 'static,
    {
        let bind = match listen.into() {
            Listen::Addr(addr) => Bind::Addr(addr),
            Listen::Listener(listener) => Bind::Listener(Mutex::new(Some(listener))),
        };
        let counter = Arc::new(WorkCounter::default());
        let requests = counter.clone();
        // `HttpServer::new` wants the factory by value on every start; the mutex makes the
        // spec `Sync` without asking the user's factory to be.
        let factory = Mutex::new(factory);
        let build: BuildFn = Box::new(move |bind, settings, shutdown_secs| {
            let factory = factory.lock().clone();
            let requests = requests.clone();
            let mut server = HttpServer::new(move || {
                let requests = requests.clone();
                factory().wrap_fn(move |req, srv| {
                    let work = requests.begin();
                    let response = srv.call(req);
                    async move {
                        let response = response.await;
                        work.complete();
                        response
                    }
                })
            })
            .disable_signals()
            .shutdown_timeout(shutdown_secs);
            if let Some(n) = settings.workers {
                server = server.workers(n);
            }
            if let Some(d) = settings.keep_alive {
                server = server.keep_alive(d);
            }
            if let Some(n) = settings.backlog {
                server = server.backlog(n);
            }
            if let Some(n) = settings.max_connections {
                server = server.max_connections(n);
            }
            if let Some(d) = settings.client_request_timeout {
                server = server.client_request_timeout(d);
            }
            let server = match bind {
                Bind::Addr(addr) => server.bind(addr.as_str()),
                Bind::Listener(listener) => match &*listener.lock() {
                    Some(listener) => listener.try_clone().and_then(|l| server.listen(l)),
                    None => Err(std::io::Error::other("the listener was released")),
                },
            }
            .map_err(|e| format!("cannot listen on {bind}: {e}"))?;
            let addrs = server.addrs();
            Ok((server.run(), addrs))
        });
        HttpServerSpec {
            common: Common {
                name: name.into(),
                ..Common::default()
            },
            server: HttpAdapter {
                bind,
                settings: Settings::default(),
                build,
                counter,
                addrs: ServerAddrs::default(),
            },
        }
    }

    common_setters!();

    /// Worker threads of the server (actix-web's default: one per physical core).
    pub fn workers(mut self, workers: usize) -> Self {
        self.server.settings.workers = Some(workers);
        self
    }

    /// How long an idle keep-alive connection stays open (actix-web's default: 5 s).
    pub fn keep_alive(mut self, keep_alive: Duration) -> Self {
        self.server.settings.keep_alive = Some(keep_alive);
        self
    }

    /// The listen backlog (actix-web's default: 1024).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.server.settings.backlog = Some(backlog);
        self
    }

    /// Concurrent connections per worker thread (actix-web's default: 25,000).
    pub fn max_connections(mut self, max: usize) -> Self {
        self.server.settings.max_connections = Some(max);
        self
    }

    /// How long a client may take to send a request's head (actix-web's default: 5 s).
    pub fn client_request_timeout(mut self, timeout: Duration) -> Self {
        self.server.settings.client_request_timeout = Some(timeout);
        self
    }

    /// Where the server listens once it has started: useful with port 0.
    pub fn addrs(&self) -> ServerAddrs {
        self.server.addrs.clone()
    }
}

impl From<HttpServerSpec> for ChildSpec {
    fn from(spec: HttpServerSpec) -> Self {
        ChildSpec {
            common: spec.common,
            kind: SpecKind::Worker(Arc::new(AdapterSlot::new(spec.server))),
        }
    }
}

/// The addresses a server child listens on, filled in when it starts (empty before). Cheap to
/// clone; see [`HttpServerSpec::addrs`].
#[derive(Clone, Debug, Default)]
pub struct ServerAddrs(Arc<Mutex<Vec<SocketAddr>>>);

impl ServerAddrs {
    /// The addresses of the latest start.
    pub fn get(&self) -> Vec<SocketAddr> {
        self.0.lock().clone()
    }
}

/// Where a server child listens; see [`HttpServerSpec::new`]. Made with `into()` from a
/// `&str`, a `String`, a `SocketAddr` or a `TcpListener`.
#[derive(Debug)]
pub enum Listen {
    /// An address to bind when the child starts.
    Addr(String),
    /// A listener bound already.
    Listener(TcpListener),
}

impl From<&str> for Listen {
    fn from(addr: &str) -> Self {
        Listen::Addr(addr.to_owned())
    }
}

impl From<String> for Listen {
    fn from(addr: String) -> Self {
        Listen::Addr(addr)
    }
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Listen::Addr(addr.to_string())
    }
}

impl From<TcpListener> for Listen {
    fn from(listener: TcpListener) -> Self {
        Listen::Listener(listener)
    }
}

enum Bind {
    Addr(String),
    /// Kept (each instance serves a duplicate) until the child is gone for good, then closed.
    Listener(Mutex<Option<TcpListener>>),
}

impl fmt::Display for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Bind::Addr(addr) => f.write_str(addr),
            Bind::Listener(l) => match l.lock().as_ref().map(TcpListener::local_addr) {
                Some(Ok(addr)) => write!(f, "{addr}"),
                _ => f.write_str("the given listener"),
            },
        }
    }
}

impl fmt::Debug for Bind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

#[derive(Clone, Debug, Default)]
struct Settings {
    workers: Option<usize>,
    keep_alive: Option<Duration>,
    backlog: Option<u32>,
    max_connections: Option<usize>,
    client_request_timeout: Option<Duration>,
}

/// Builds and binds a server: the bind target, the settings, actix-web's `shutdown_timeout`.
type BuildFn =
    Box<dyn Fn(&Bind, &Settings, u64) -> Result<(Server, Vec<SocketAddr>), String> + Send + Sync>;

struct HttpAdapter {
    bind: Bind,
    settings: Settings,
    build: BuildFn,
    counter: Arc<WorkCounter>,
    addrs: ServerAddrs,
}

impl Adapter for HttpAdapter {
    fn kind(&self) -> ChildKind {
        ChildKind::Server
    }

    fn start(&self, budget: Duration) -> Result<Running, String> {
        // actix-web counts whole seconds: round up, so it never cuts what the budget allows.
        let shutdown_secs = (budget.as_secs() + u64::from(budget.subsec_nanos() > 0)).max(1);
        let (server, addrs) = (self.build)(&self.bind, &self.settings, shutdown_secs)?;
        let shown: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        log::info!(target: LOG, "listening on {}", shown.join(", "));
        *self.addrs.0.lock() = addrs;
        let handle = server.handle();
        let stop: StopFn = Arc::new(move |graceful| {
            // The command is queued when called; the future only waits for its completion.
            drop(handle.stop(graceful));
        });
        Ok(Running {
            finished: Box::pin(async move { server.await.map_err(|e| e.to_string()) }),
            stop,
        })
    }

    fn counter(&self) -> &WorkCounter {
        &self.counter
    }

    fn release(&self) {
        if let Bind::Listener(listener) = &self.bind {
            drop(listener.lock().take());
        }
    }

    fn handle_any(&self) -> Box<dyn std::any::Any + Send> {
        Box::new(self.addrs.clone())
    }
}
