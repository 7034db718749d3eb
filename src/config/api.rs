//! Settings of the REST API: where it listens, its token, and the connection budget
//! that keeps strangers' connections cheap (decisions §11).

use std::net::{IpAddr, SocketAddr};

use clap::Args;

/// The API's address, token and connection budget.
#[derive(Args, Clone, Debug)]
pub struct ApiSettings {
    /// TCP port of the REST API.
    ///
    /// 1..65535; never allowed as a port-map listen port.
    #[arg(
        long,
        env = "NODE_API_PORT",
        value_name = "NODE_API_PORT",
        default_value_t = 8000,
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    pub node_api_port: u16,

    /// Address the REST API listens on.
    #[arg(
        long,
        env = "API_LISTEN",
        value_name = "API_LISTEN",
        default_value = "0.0.0.0"
    )]
    pub api_listen: IpAddr,

    /// Bearer token required on every API call but /health.
    ///
    /// At least 16 characters, no whitespace. When neither this nor PORTMAP_TOKEN is
    /// set, the token is read from $DATA_DIR/api.token, or generated into it (mode 0600)
    /// on first start; the log names the file, never the token.
    #[arg(
        long,
        env = "API_TOKEN",
        value_name = "API_TOKEN",
        hide_env_values = true
    )]
    pub api_token: Option<String>,

    /// The original agent's name for API_TOKEN, accepted as an alias.
    ///
    /// When both are set they must be the same token.
    #[arg(
        long,
        env = "PORTMAP_TOKEN",
        value_name = "PORTMAP_TOKEN",
        hide_env_values = true
    )]
    pub portmap_token: Option<String>,

    /// Seconds a client has to send a request's headers.
    ///
    /// 1..300. Counted from the connection's accept for its first request, and from
    /// the first byte for a later one on a kept-alive connection; then the connection is
    /// closed (slowloris).
    #[arg(long, env = "HEADER_READ_TIMEOUT", value_name = "HEADER_READ_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub header_read_timeout: u64,

    /// Seconds a request body may take to arrive whole.
    ///
    /// 1..3600, counted from the end of its headers; then the request fails with 408
    /// and the connection is closed. Image uploads follow UPLOAD_MIN_BYTES and
    /// UPLOAD_WINDOW instead.
    #[arg(long, env = "BODY_READ_TIMEOUT", value_name = "BODY_READ_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_read_timeout: u64,

    /// Seconds a kept-alive connection may wait for its next request.
    ///
    /// 1..3600; then the connection is closed.
    #[arg(long, env = "KEEPALIVE_TIMEOUT", value_name = "KEEPALIVE_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub keepalive_timeout: u64,

    /// Most API connections open at once.
    ///
    /// 16..1000000. Lowered at startup (logged) when the descriptor limit would not leave
    /// 128 descriptors for the agent itself. At the cap a new connection makes the agent
    /// close the one idle longest; only when every connection has a request in progress
    /// is the new one refused (503).
    #[arg(long, env = "MAX_CONNECTIONS", value_name = "MAX_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub max_connections: u64,

    /// Bytes an image upload must deliver in every UPLOAD_WINDOW.
    ///
    /// 1..1073741824. An upload (`POST /images/{name}`, a stream of any size, with no
    /// deadline) that delivers less fails with 408 and leaves no partial image.
    #[arg(long, env = "UPLOAD_MIN_BYTES", value_name = "UPLOAD_MIN_BYTES", default_value_t = 65_536, value_parser = clap::value_parser!(u64).range(1..=1_073_741_824))]
    pub upload_min_bytes: u64,

    /// Seconds of the window UPLOAD_MIN_BYTES is counted over.
    ///
    /// 1..3600. Time the agent itself spends storing the upload does not count.
    #[arg(long, env = "UPLOAD_WINDOW", value_name = "UPLOAD_WINDOW", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub upload_window: u64,

    /// A second address that serves only `GET /metrics`, without a token.
    ///
    /// `IP:PORT`, for a Prometheus that scrapes over loopback or the tunnel
    /// (`127.0.0.1:9101`, `10.66.0.5:9101`); checked at startup like the API port. Unset:
    /// none. `/metrics` on the API port always needs the token.
    #[arg(long, env = "METRICS_LISTEN", value_name = "METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
}

impl ApiSettings {
    /// The configured API token, from API_TOKEN or its alias.
    pub fn configured_token(&self) -> Option<&str> {
        self.api_token.as_deref().or(self.portmap_token.as_deref())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.api_listen, self.node_api_port)
    }

    /// MAX_CONNECTIONS as configured; the agent may lower it to fit the descriptor limit.
    pub fn configured_max_connections(&self) -> usize {
        usize::try_from(self.max_connections).unwrap_or(usize::MAX)
    }
}
