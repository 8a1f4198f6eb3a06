//! The broker's command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::quota::Overflow;

#[derive(Parser, Debug)]
#[command(
    name = "broker",
    about = "An MQTT 3.1.1 broker built as a supervision tree; SIGTERM drains it without losing \
             a message"
)]
pub struct Args {
    /// Where MQTT clients connect (port 0: any free port; the one chosen is logged). Loopback by
    /// default, like mosquitto 2.0 without a configuration.
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub bind: String,

    /// Where the persistent sessions and retained messages are kept (created if missing).
    #[arg(long, default_value = "./broker-data")]
    pub data_dir: PathBuf,

    /// Where `/readyz` and `/livez` are served.
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub health: String,

    /// The whole drain's budget after SIGTERM (`30s`, `500ms`, `2m`).
    #[arg(long, default_value = "30s")]
    pub shutdown_timeout: Budget,

    /// Connections open at once; one more is closed as soon as it is accepted.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// The largest packet taken from a client, in bytes; a bigger one closes its connection.
    #[arg(long, default_value_t = 1 << 20, value_parser = clap::value_parser!(u64).range(2..=268_435_460))]
    pub max_packet_size: u64,

    /// How long a packet may take to arrive, from its first byte to its last, whatever the
    /// client's keep-alive (`30s`, `2m`); a connection whose packet is not whole by then is
    /// closed (logged with the peer's address). The default lets a packet of the default
    /// --max-packet-size come over a link of 150 kbit/s. While the broker holds a client's
    /// requests back for a slow subscriber, the clock stops.
    #[arg(long, default_value = "60s")]
    pub packet_timeout: Budget,

    /// Bytes the broker holds for packets still arriving, all connections together, beyond the
    /// first 64 KiB of each (what one read takes: packets up to that size never wait). A bigger
    /// packet, once its first 64 KiB are in, takes room for all of its rest before more of it is
    /// read; when there is not enough, its connection is not read until other packets complete
    /// and give theirs back, or --packet-timeout closes it. At least --max-packet-size.
    /// [default: 64 MiB, or --max-packet-size if larger]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_incomplete_bytes: Option<u64>,

    /// QoS 1 and 2 messages sent to a client and not acknowledged yet, at most.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=65_535))]
    pub max_inflight: u64,

    /// Messages waiting for one session, at most: for a connected client that does not keep up
    /// (one that does paces its publishers instead), those not written to its socket yet; for an
    /// offline persistent session, its queue. A session past this (or past --max-queued-bytes)
    /// loses messages as --queue-overflow says (offline, QoS 0 ones first), counted and logged
    /// once per episode, naming it; no other client is refused or slowed for it.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued: u64,

    /// Bytes (topics and payloads) waiting for one session, at most; see --max-queued.
    #[arg(long, default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_bytes: u64,

    /// What a session over its quota loses: `drop-new` (the new message is not queued for it;
    /// what it has stays) or `drop-oldest` (its oldest waiting messages go; it gets the latest).
    #[arg(long, value_enum, default_value = "drop-new")]
    pub queue_overflow: Overflow,

    /// Persistent sessions (clean session false) that stay offline longer than this are dropped
    /// with their subscriptions and queue (`1h`, `7d`); by default they are kept forever. Counted
    /// from when the session went away, across restarts.
    #[arg(long, value_name = "DURATION")]
    pub persistent_client_expiration: Option<Expiration>,

    /// For tests: the store's fsync number N fails, as on a failing disk.
    #[arg(long, hide = true, value_name = "N")]
    pub fail_fsync: Option<u64>,

    /// For tests where no small filesystem can be mounted: while FILE exists, the store's writes
    /// fail as on a full disk.
    #[arg(long, hide = true, value_name = "FILE")]
    pub fail_writes_while: Option<PathBuf>,
}

/// A duration on the command line, parsed by humantime (`30s`, `1m 30s`, `500ms`); not zero.
#[derive(Clone, Copy, Debug)]
pub struct Budget(pub Duration);

impl std::str::FromStr for Budget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match positive_duration(s, "30s, 500ms or 2m")? {
            d if d > Duration::from_secs(24 * 3600) => {
                Err("must be at most a day (24h)".to_owned())
            }
            d => Ok(Budget(d)),
        }
    }
}

/// A humantime duration (`30s`, `1m 30s`, `7d`) that is not zero; `examples` for the error.
fn positive_duration(s: &str, examples: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero".to_owned()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write it like {examples})")),
    }
}

/// How long a persistent session may stay away (humantime: `90s`, `12h`, `7d`); not zero.
#[derive(Clone, Copy, Debug)]
pub struct Expiration(pub Duration);

impl std::str::FromStr for Expiration {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        positive_duration(s, "1h, 7d or 90s").map(Expiration)
    }
}
