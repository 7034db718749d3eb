//! What each route is, said once: whether it needs the token, what body it reads, and
//! what it can answer for reasons outside its handler. Authentication (`admit.rs`), the
//! audit layer and its body limits (`audit.rs`), the server's body time rule
//! (`server/`) and the OpenAPI document's statuses (`openapi.rs`) all read this table,
//! and a test holds it to the router's routes, one for one.

use axum::extract::{MatchedPath, Request};
use axum::http::Method;

/// Largest request body of any route but the streamed image upload (`POST /vms`, whose
/// user-data and network-config may each be 32 KiB, JSON-escaped up to twice that).
pub const MAX_BODY_BYTES: usize = 160 * 1024;

/// The body limit of a request that matched no route (or whose route reads none):
/// nothing, or `{}`.
pub const DEFAULT_BODY_LIMIT: usize = 1024;

/// A route's method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Get,
    Post,
    Delete,
}

impl Verb {
    pub fn method(self) -> Method {
        match self {
            Verb::Get => Method::GET,
            Verb::Post => Method::POST,
            Verb::Delete => Method::DELETE,
        }
    }

    /// The verb of `m`; a `HEAD` is served by its `GET` route.
    fn of(m: &Method) -> Option<Self> {
        match *m {
            Method::GET | Method::HEAD => Some(Verb::Get),
            Method::POST => Some(Verb::Post),
            Method::DELETE => Some(Verb::Delete),
            _ => None,
        }
    }
}

/// What a route reads of a request body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyRule {
    /// Nothing (a read).
    None,
    /// At most this many bytes, read whole before the handler runs and within
    /// BODY_READ_TIMEOUT.
    Limit(usize),
    /// A stream of any size handed to the handler as it comes, at UPLOAD_MIN_BYTES per
    /// UPLOAD_WINDOW at least; the audit row records its size, not its bytes.
    Streamed,
}

/// One route of the API.
#[derive(Clone, Copy, Debug)]
pub struct Route {
    pub verb: Verb,
    /// The path template, as the router has it.
    pub path: &'static str,
    /// Served without a token.
    pub public: bool,
    pub body: BodyRule,
    /// The body may be left out (`POST /ports/restore`: none, or `{}`).
    pub body_optional: bool,
    /// Works through libvirt: 503 while it is away, 501 where its driver cannot, and for
    /// a change 409 when the VM or image is busy.
    pub libvirt: bool,
    /// Names a VM or an image in its path: 404 when there is none.
    pub named: bool,
    /// A VM change that may outlive LIBVIRT_TIMEOUT: 504 while the work goes on.
    pub may_outlive_its_answer: bool,
}

const fn read(path: &'static str) -> Route {
    Route {
        verb: Verb::Get,
        path,
        public: false,
        body: BodyRule::None,
        body_optional: false,
        libvirt: false,
        named: false,
        may_outlive_its_answer: false,
    }
}

const fn change(verb: Verb, path: &'static str, limit: usize) -> Route {
    Route {
        verb,
        body: BodyRule::Limit(limit),
        ..read(path)
    }
}

const fn vm_read(path: &'static str, named: bool) -> Route {
    Route {
        libvirt: true,
        named,
        ..read(path)
    }
}

/// A VM change: through libvirt, named by its path unless it creates.
const fn vm_change(verb: Verb, path: &'static str, limit: usize, named: bool) -> Route {
    Route {
        libvirt: true,
        named,
        may_outlive_its_answer: true,
        ..change(verb, path, limit)
    }
}

const fn image_change(verb: Verb, path: &'static str, body: BodyRule, named: bool) -> Route {
    Route {
        verb,
        body,
        libvirt: true,
        named,
        ..read(path)
    }
}

/// Every route of the API.
pub const ROUTES: &[Route] = &[
    Route {
        public: true,
        ..read("/health")
    },
    read("/openapi.json"),
    read("/metrics"),
    read("/events"),
    read("/ports"),
    change(Verb::Post, "/ports", 4 * 1024),
    read("/ports/{listen_port}"),
    change(Verb::Delete, "/ports/{listen_port}", DEFAULT_BODY_LIMIT),
    Route {
        body_optional: true,
        ..change(Verb::Post, "/ports/restore", DEFAULT_BODY_LIMIT)
    },
    vm_read("/vms", false),
    vm_change(Verb::Post, "/vms", MAX_BODY_BYTES, false),
    vm_read("/vms/{name}/status", true),
    vm_change(Verb::Post, "/vms/{name}/start", DEFAULT_BODY_LIMIT, true),
    vm_change(Verb::Post, "/vms/{name}/stop", DEFAULT_BODY_LIMIT, true),
    vm_change(Verb::Post, "/vms/{name}/reboot", DEFAULT_BODY_LIMIT, true),
    vm_change(Verb::Delete, "/vms/{name}", DEFAULT_BODY_LIMIT, true),
    vm_read("/vms/{name}/ip", true),
    vm_read("/vms/{name}/console", true),
    vm_read("/vms/{name}/console/attach", true),
    vm_read("/stats", false),
    vm_read("/images", false),
    image_change(Verb::Post, "/images", BodyRule::Limit(8 * 1024), false),
    image_change(Verb::Post, "/images/{name}", BodyRule::Streamed, true),
    image_change(
        Verb::Delete,
        "/images/{name}",
        BodyRule::Limit(DEFAULT_BODY_LIMIT),
        true,
    ),
];

/// The route of `method` on the template `path`.
pub fn by_template(method: &Method, path: &str) -> Option<&'static Route> {
    let verb = Verb::of(method)?;
    ROUTES.iter().find(|r| r.verb == verb && r.path == path)
}

/// The route a request was routed to (its method and the router's matched template);
/// `None` when no route matched.
pub fn matched(req: &Request) -> Option<&'static Route> {
    let path = req.extensions().get::<MatchedPath>()?;
    by_template(req.method(), path.as_str())
}

/// Whether the router's matched template is served without a token (whatever the
/// method: a wrong method on a public path is the router's 405 to answer).
pub fn is_public(req: &Request) -> bool {
    req.extensions()
        .get::<MatchedPath>()
        .is_some_and(|p| ROUTES.iter().any(|r| r.public && r.path == p.as_str()))
}

/// The route a request will go to, judged before routing (the server picks the body's
/// time rule from it): each `{param}` of a template takes one non-empty path segment,
/// as the router matches it.
pub fn before_routing(method: &Method, path: &str) -> Option<&'static Route> {
    let verb = Verb::of(method)?;
    ROUTES
        .iter()
        .find(|r| r.verb == verb && template_matches(r.path, path))
}

fn template_matches(template: &str, path: &str) -> bool {
    let (mut t, mut p) = (template.split('/'), path.split('/'));
    loop {
        match (t.next(), p.next()) {
            (None, None) => return true,
            (Some(ts), Some(ps)) if ts.starts_with('{') => {
                if ps.is_empty() {
                    return false;
                }
            }
            (Some(ts), Some(ps)) if ts == ps => {}
            _ => return false,
        }
    }
}

/// The largest body the request's route reads whole.
pub fn body_limit(route: Option<&Route>) -> usize {
    match route.map(|r| r.body) {
        Some(BodyRule::Limit(n)) => n,
        _ => DEFAULT_BODY_LIMIT,
    }
}

/// `POST /ports`, `DELETE /ports/{listen_port}`: the method and the route's template
/// (the path itself only where no route matched).
pub fn action_of(req: &Request) -> String {
    format!(
        "{} {}",
        req.method(),
        req.extensions()
            .get::<MatchedPath>()
            .map_or_else(|| req.uri().path().to_string(), |p| p.as_str().to_string())
    )
}

/// The route of a refused request as counted: like [`action_of`], but from a small,
/// fixed set of names (a stranger chooses the path and the method, not the routes).
pub fn counted_name(req: &Request) -> String {
    let method = match *req.method() {
        Method::GET
        | Method::POST
        | Method::PUT
        | Method::DELETE
        | Method::PATCH
        | Method::HEAD
        | Method::OPTIONS => req.method().as_str(),
        _ => "(other method)",
    };
    match req.extensions().get::<MatchedPath>() {
        Some(p) => format!("{method} {}", p.as_str()),
        None => format!("{method} (no such route)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_told_apart_before_routing_as_the_router_does() {
        let streamed = |m: &Method, p: &str| {
            before_routing(m, p).is_some_and(|r| r.body == BodyRule::Streamed)
        };
        assert!(streamed(&Method::POST, "/images/jammy"));
        assert!(streamed(&Method::POST, "/images/..%2Fi"));
        assert!(!streamed(&Method::PUT, "/images/jammy"));
        assert!(!streamed(&Method::POST, "/images"));
        assert!(!streamed(&Method::POST, "/images/"));
        assert!(!streamed(&Method::POST, "/images/a/b"));
        assert!(!streamed(&Method::POST, "/ports"));
        assert!(!streamed(&Method::DELETE, "/images/jammy"));
    }

    #[test]
    fn each_route_is_listed_once() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert!(
                !ROUTES[..i]
                    .iter()
                    .any(|o| o.verb == r.verb && o.path == r.path),
                "{r:?} twice"
            );
            // A read takes no body; a change always has a rule for one.
            assert_eq!(r.verb == Verb::Get, r.body == BodyRule::None, "{r:?}");
        }
    }
}
