//! `/ports` on the wire: the body of `POST /ports`, the query of one map, and every
//! answer. The maps' answers were typed from the start: their fields come out in the
//! order declared here.

use std::net::Ipv4Addr;

use axum::body::Bytes;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

use super::names::ProtoName;
use crate::api::body;
use crate::api::doc;
use crate::api::error::ApiError;
use crate::model::{AllowList, PortMap, PortRule, Proto, VmName};
use crate::portmap::{Listed, Listing};
use crate::store::StoreError;

/// Why an input is refused: the message the client reads.
#[derive(Debug)]
pub struct Invalid(pub String);

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A port given as a JSON number or, as the original agent's `int()` accepted, a string
/// of digits. A number may be written with a zero fraction (`8080.0`): JSON Schema counts
/// it as an integer, and so did the original's `int()`.
pub fn port(field: &str, v: &serde_json::Value) -> Result<u16, Invalid> {
    let n = match v {
        serde_json::Value::Number(n) => n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && (0.0..=65535.0).contains(f))
                .map(|f| f as u64)
        }),
        serde_json::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u64>().ok()
        }
        _ => None,
    };
    match n {
        Some(n @ 1..=65535) => Ok(n as u16),
        _ => Err(Invalid(format!(
            "{field} must be a whole number from 1 to 65535, not {v}"
        ))),
    }
}

/// Body of `POST /ports`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(try_from = "RawCreate")]
pub struct CreatePortMap {
    /// Node port, 1..65535 (a string of digits is accepted too).
    #[schema(schema_with = doc::port)]
    pub listen_port: u16,
    /// VM address; must lie in VM_SUBNET (or ALLOWED_TARGETS). Give this or `target_vm`.
    #[schema(schema_with = doc::ipv4)]
    pub target_ip: Option<Ipv4Addr>,
    /// A VM of this agent by name, instead of `target_ip`: the map goes to the VM's
    /// pinned address (for a VM from before pinned addresses: its last seen one), follows
    /// it through a recreate, and is removed with it. Unknown VM: 404.
    #[schema(schema_with = doc::name_or_null)]
    pub target_vm: Option<VmName>,
    /// VM port, 1..65535.
    #[schema(schema_with = doc::port)]
    pub target_port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    #[schema(schema_with = doc::proto)]
    pub proto: Proto,
    /// Switch an existing map of this port to the new target or allow-list (atomically)
    /// instead of answering 409.
    #[serde(default)]
    #[schema(value_type = Option<bool>)]
    pub replace: bool,
    /// Sources allowed to connect: IPv4 networks (`"192.0.2.0/24"`) or addresses
    /// (`"192.0.2.7"`, a /32), at most 64. Connections from anywhere else are dropped
    /// before the DNAT and counted as `drops`. Host bits set (`"10.1.2.3/8"`) are a 400;
    /// duplicates and networks inside another entry are dropped. Absent or empty: open to
    /// every source.
    #[serde(default)]
    #[schema(schema_with = doc::allow_from)]
    pub allow_from: AllowList,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCreate {
    listen_port: serde_json::Value,
    #[serde(default)]
    target_ip: Option<serde_json::Value>,
    #[serde(default)]
    target_vm: Option<serde_json::Value>,
    target_port: serde_json::Value,
    #[serde(default)]
    proto: Option<serde_json::Value>,
    #[serde(default)]
    replace: Option<serde_json::Value>,
    #[serde(default)]
    allow_from: Option<serde_json::Value>,
}

/// `target_ip` or `target_vm`, exactly one of them (`null` counts as absent).
fn target(
    ip: Option<&serde_json::Value>,
    vm: Option<&serde_json::Value>,
) -> Result<(Option<Ipv4Addr>, Option<VmName>), Invalid> {
    let invalid = |m: String| Invalid(m);
    match (ip.filter(|v| !v.is_null()), vm.filter(|v| !v.is_null())) {
        (Some(_), Some(_)) => Err(invalid("give target_ip or target_vm, not both".into())),
        (None, None) => Err(invalid(
            "missing field `target_ip` (or `target_vm`, a VM's name)".into(),
        )),
        // As written: an address with whitespace around it (" 10.0.0.5\n") is refused,
        // not trimmed into a different string from the one that was sent.
        (Some(serde_json::Value::String(s)), None) => s
            .parse::<Ipv4Addr>()
            .map(|ip| (Some(ip), None))
            .map_err(|_| {
                invalid(format!(
                    "target_ip must be an IPv4 address like \"192.168.122.50\", not {s:?}"
                ))
            }),
        (Some(other), None) => Err(invalid(format!("target_ip must be a string, not {other}"))),
        (None, Some(serde_json::Value::String(s))) => s
            .parse::<VmName>()
            .map(|n| (None, Some(n)))
            .map_err(|e| invalid(format!("target_vm: {e}"))),
        (None, Some(other)) => Err(invalid(format!(
            "target_vm must be a VM's name, not {other}"
        ))),
    }
}

/// `allow_from` as sent: `null`, or an array of strings.
fn allow_from(v: Option<&serde_json::Value>) -> Result<AllowList, Invalid> {
    let items = match v {
        None | Some(serde_json::Value::Null) => return Ok(AllowList::default()),
        Some(serde_json::Value::Array(items)) => items,
        Some(other) => {
            return Err(Invalid(format!(
                "allow_from must be a list of IPv4 networks, not {other}"
            )));
        }
    };
    let strings = items
        .iter()
        .enumerate()
        .map(|(i, v)| match v {
            serde_json::Value::String(s) => Ok(s.as_str()),
            other => Err(Invalid(format!(
                "allow_from[{i}] must be a string, not {other}"
            ))),
        })
        .collect::<Result<Vec<&str>, Invalid>>()?;
    AllowList::parse(&strings).map_err(|e| Invalid(e.to_string()))
}

impl TryFrom<RawCreate> for CreatePortMap {
    type Error = Invalid;
    fn try_from(r: RawCreate) -> Result<Self, Invalid> {
        let (target_ip, target_vm) = target(r.target_ip.as_ref(), r.target_vm.as_ref())?;
        let proto = match &r.proto {
            None | Some(serde_json::Value::Null) => Proto::Tcp,
            // In any case, as the original took it.
            Some(serde_json::Value::String(s)) => s
                .to_ascii_lowercase()
                .parse()
                .map_err(|e: crate::model::portmap::ProtoError| Invalid(e.to_string()))?,
            Some(other) => {
                return Err(Invalid(format!(
                    "proto must be \"tcp\" or \"udp\", not {other}"
                )));
            }
        };
        let replace = match &r.replace {
            None | Some(serde_json::Value::Null) => false,
            Some(serde_json::Value::Bool(b)) => *b,
            Some(other) => {
                return Err(Invalid(format!(
                    "replace must be true or false, not {other}"
                )));
            }
        };
        Ok(Self {
            listen_port: port("listen_port", &r.listen_port)?,
            target_ip,
            target_vm,
            target_port: port("target_port", &r.target_port)?,
            proto,
            replace,
            allow_from: allow_from(r.allow_from.as_ref())?,
        })
    }
}

/// Query of `DELETE /ports/{listen_port}` and `GET /ports/{listen_port}`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// `tcp` (default) or `udp`, in any case.
    #[param(value_type = Option<String>)]
    pub proto: Option<String>,
}

/// `{}`: the only body `POST /ports/restore` takes.
#[derive(Debug, Default, ToSchema)]
#[schema(max_properties = 0)]
pub struct EmptyObject {}

impl EmptyObject {
    /// A body that carries nothing: absent (no byte at all), or exactly the JSON object
    /// `{}` (not `[]`, `null`, an object with fields, or blanks, which are no JSON).
    pub fn from_body(body: &Bytes) -> Result<Self, ApiError> {
        if body.is_empty() {
            return Ok(Self {});
        }
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(ApiError::bad_request(
                "request body must be absent or {}, not blank",
            ));
        }
        match body::json::<serde_json::Value>(body)? {
            serde_json::Value::Object(o) if o.is_empty() => Ok(Self {}),
            other => Err(ApiError::bad_request(format!(
                "request body must be absent or {{}}, not {}",
                match other {
                    serde_json::Value::Object(_) => "an object with fields",
                    serde_json::Value::Array(_) => "an array",
                    serde_json::Value::Null => "null",
                    _ => "a scalar",
                }
            ))),
        }
    }
}

/// A port map as `GET /ports` and `POST /ports` show it.
#[derive(Debug, Serialize, ToSchema)]
pub struct PortMapView {
    #[schema(minimum = 1, maximum = 65535)]
    pub listen_port: u16,
    #[schema(value_type = String, format = Ipv4)]
    pub target_ip: Ipv4Addr,
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: u16,
    pub proto: ProtoName,
    /// The map's allow-list; absent when the map is open to every source.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(value_type = Option<Vec<String>>)]
    pub allow_from: Vec<String>,
    /// The VM the map names (`target_ip` is its address); absent for a map to an address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_vm: Option<String>,
}

fn networks(a: &AllowList) -> Vec<String> {
    a.networks().iter().map(ToString::to_string).collect()
}

impl From<PortMap> for PortMapView {
    fn from(m: PortMap) -> Self {
        Self {
            listen_port: m.listen_port,
            target_ip: m.target_ip,
            target_port: m.target_port,
            proto: m.proto.into(),
            allow_from: Vec::new(),
            target_vm: None,
        }
    }
}

impl From<PortRule> for PortMapView {
    fn from(r: PortRule) -> Self {
        Self {
            allow_from: networks(&r.allow_from),
            ..r.map.into()
        }
    }
}

/// Answer of `POST /ports`.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedPortMap {
    pub ok: bool,
    /// The bare listen port for TCP (as the original agent), `<port>/udp` for UDP.
    pub rule_id: String,
    /// `created`, `unchanged` or `replaced`.
    pub result: &'static str,
    pub rule: PortMapView,
    /// The target before a replace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous: Option<PortMapView>,
}

/// Answer of `DELETE /ports/{listen_port}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeletedPortMap {
    pub ok: bool,
    pub deleted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<PortMapView>,
}

impl From<Option<PortMap>> for DeletedPortMap {
    fn from(deleted: Option<PortMap>) -> Self {
        Self {
            ok: true,
            deleted: deleted.is_some(),
            rule_id: deleted.map(|m| m.rule_id()),
            rule: deleted.map(PortMapView::from),
        }
    }
}

/// Answer of `POST /ports/restore`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Restored {
    pub ok: bool,
    /// Maps written to the kernel.
    pub restored: usize,
    /// Differences found before the rewrite (empty when the kernel was in sync).
    pub drift: Vec<String>,
    /// Changes made to the accept rule ahead of libvirt's reject rules.
    pub forward_accept: Vec<String>,
}

/// A map as `GET /ports` and `GET /ports/{listen_port}` show it: the row, its rule id
/// and its counters.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedPortMap {
    pub proto: ProtoName,
    #[schema(minimum = 1, maximum = 65535)]
    pub listen_port: u16,
    #[schema(value_type = String, format = Ipv4)]
    pub target_ip: Ipv4Addr,
    #[schema(minimum = 1, maximum = 65535)]
    pub target_port: u16,
    /// Sources allowed to connect; empty: every source.
    pub allow_from: Vec<String>,
    /// The VM the map names (`target_ip` is its address now); null for a map to an
    /// address.
    pub target_vm: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub created_by: String,
    pub updated_by: String,
    pub rule_id: String,
    /// Packets of the map's connections forwarded to or from the VM, both directions
    /// (traffic from the node itself to a mapped port is not forwarded, so not counted).
    pub packets: u64,
    /// Bytes of those packets (whole IP packets).
    pub bytes: u64,
    /// New connections DNAT'd to the target.
    pub connections: u64,
    /// Connections refused by `allow_from` (each refused first packet, retries included).
    pub drops: u64,
}

impl From<Listed<'_>> for ListedPortMap {
    fn from(l: Listed<'_>) -> Self {
        let (row, c) = (l.row, l.counters);
        Self {
            proto: row.map.proto.into(),
            listen_port: row.map.listen_port,
            target_ip: row.map.target_ip,
            target_port: row.map.target_port,
            allow_from: networks(&row.allow_from),
            target_vm: row.target_vm.clone(),
            created_at: row.created_at.clone(),
            updated_at: row.updated_at.clone(),
            created_by: row.created_by.clone(),
            updated_by: row.updated_by.clone(),
            rule_id: row.map.rule_id(),
            packets: c.packets,
            bytes: c.bytes,
            connections: c.connections,
            drops: c.drops,
        }
    }
}

/// Answer of `GET /ports`, written once per change of the maps (and at most a second
/// old: counters may be that old).
#[derive(Serialize, ToSchema)]
pub struct PortList<'a> {
    pub ok: bool,
    /// Every map by rule id (`8080`, `8080/udp`), with when and by whom it was made and
    /// its counters. Counters start at zero when the map is created or replaced.
    #[schema(value_type = BTreeMap<String, ListedPortMap>)]
    rules: Rules<'a>,
}

/// The maps of a listing by rule id, written one at a time as they are read.
struct Rules<'a>(&'a Listing<'a>);

impl Serialize for Rules<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        self.0
            .for_each(|listed| {
                let entry = ListedPortMap::from(listed);
                map.serialize_entry(&entry.rule_id, &entry)
                    .map_err(Stop::Writer)
            })
            .map_err(|e| match e {
                Stop::Writer(e) => e,
                Stop::Store(e) => serde::ser::Error::custom(e),
            })?;
        map.end()
    }
}

/// Why a walk of the listing stopped.
enum Stop<E> {
    Writer(E),
    Store(StoreError),
}

impl<E> From<StoreError> for Stop<E> {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

impl PortList<'_> {
    /// The listing as JSON, each map serialized straight into the buffer: with 10,000
    /// maps a value tree per map would cost megabytes of heap.
    pub fn write(listing: Listing<'_>) -> Result<Bytes, ApiError> {
        let mut out = Vec::with_capacity(32 + 320 * listing.len());
        let list = PortList {
            ok: true,
            rules: Rules(&listing),
        };
        serde_json::to_writer(&mut out, &list)
            .map_err(|e| ApiError::internal(format!("writing the port maps: {e}")))?;
        // The estimate above is generous; the cache keeps the listing for as long as
        // the maps do not change, so it should not keep the slack too.
        out.shrink_to_fit();
        Ok(Bytes::from(out))
    }
}

/// Answer of `GET /ports/{listen_port}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct OnePort {
    pub ok: bool,
    /// The same object as the map's entry in `GET /ports`, with counters read now.
    pub rule: ListedPortMap,
}

/// The map the port-map service makes: parsing left exactly one of `target_ip` and
/// `target_vm`.
impl From<CreatePortMap> for crate::portmap::NewMap {
    fn from(req: CreatePortMap) -> Self {
        use crate::portmap::Target;
        let target = match (req.target_ip, req.target_vm) {
            (_, Some(vm)) => Target::Vm(vm),
            (Some(ip), None) => Target::Ip(ip),
            (None, None) => Target::Ip(Ipv4Addr::UNSPECIFIED),
        };
        Self {
            proto: req.proto,
            listen_port: req.listen_port,
            target,
            target_port: req.target_port,
            allow_from: req.allow_from,
            replace: req.replace,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn a_port_is_a_whole_number_or_a_string_of_digits() {
        for (v, want) in [
            (json!(8080), Some(8080)),
            (json!(8080.0), Some(8080)),
            (json!("8080"), Some(8080)),
            (json!("08080"), Some(8080)),
            (json!(65535), Some(65535)),
            (json!(0), None),
            (json!(65536), None),
            (json!(65536.0), None),
            (json!(80.5), None),
            (json!(-1.0), None),
            (json!("8080.0"), None),
            (json!(" 80"), None),
            (json!(true), None),
        ] {
            assert_eq!(super::port("p", &v).ok(), want, "{v}");
        }
    }
}
