//! The patterns and ranges of the inputs as `/openapi.json` states them: the same rules
//! the validation code applies, stated once here, for the wire types' schemas
//! (`wire/`). `openapi.rs` completes the document; `scripts/contract.sh` holds the
//! agent to it with schemathesis.

use serde_json::{Value, json};
use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::{RefOr, schema::KnownFormat, schema::SchemaFormat};

/// A VM, image or network name (`model::name::check_name`): a letter or digit, then up to 62
/// letters, digits, `_`, `.` or `-`.
pub const NAME_PATTERN: &str = "^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$";

/// A port written as a string of digits (the original agent's `int()`), 1..65535 with
/// any number of leading zeros (`body::port`).
pub const PORT_STRING_PATTERN: &str =
    "^0*([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";

/// A dotted-quad IPv4 address without leading zeros (Rust's `Ipv4Addr` parser).
pub const IPV4_PATTERN: &str = "^(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}$";

/// `vm::images::plain_url`: `http(s)://host[:port][/path][?query]`, the host a DNS name
/// (labels of letters and digits with inner single hyphens, the last starting with a
/// letter) or an IPv4 address, the port 1..65535 without leading zero, the path and query
/// of RFC 3986 characters.
pub const URL_PATTERN: &str = concat!(
    "^[Hh][Tt][Tt][Pp]([Ss])?://",
    "(([A-Za-z0-9]+(-[A-Za-z0-9]+)*\\.)*[A-Za-z][A-Za-z0-9]*(-[A-Za-z0-9]+)*",
    "|(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3})",
    "(:([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5]))?",
    "(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?",
    "(\\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]*)?$",
);

/// A SHA-256 in hex, either case, nothing around it (`vm::images::check_sha256`).
/// `tcp` or `udp` in any case: the original agent lower-cased `proto`, and its clients
/// may send `"TCP"`. Answers always carry the lower-case name (an enum there).
pub const PROTO_PATTERN: &str = "^([Tt][Cc][Pp]|[Uu][Dd][Pp])$";
/// An `allow_from` entry (`model::AllowList::parse`): an IPv4 address, optionally with a
/// prefix length 0..32 without leading zero.
pub const ALLOW_FROM_PATTERN: &str = "^(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])(\\.(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])){3}(/(3[0-2]|[12][0-9]|[0-9]))?$";
pub const SHA256_PATTERN: &str = "^[0-9A-Fa-f]{64}$";

/// A hostname (`vm::spec::check_hostname`): dot-separated labels of letters, digits and
/// inner hyphens, 1..63 characters each, at most one trailing dot.
pub const HOSTNAME_PATTERN: &str = "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\\.?$";

/// An absolute path on the libvirt host without a `..` component or a control character
/// (`vm::spec::check_host_path`).
pub const HOST_PATH_PATTERN: &str = "^(/([^/\\u0000-\\u001f\\u007f-\\u009f.][^/\\u0000-\\u001f\\u007f-\\u009f]*|\\.|\\.[^/\\u0000-\\u001f\\u007f-\\u009f.][^/\\u0000-\\u001f\\u007f-\\u009f]*|\\.\\.[^/\\u0000-\\u001f\\u007f-\\u009f]+)?)+$";

/// One line without control characters (`cmdline`).
pub const ONE_LINE_PATTERN: &str = "^[^\\u0000-\\u001f\\u007f-\\u009f]*$";

fn string(pattern: &str, max_len: Option<usize>) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .pattern(Some(pattern))
        .max_length(max_len)
}

/// A string schema that also allows null.
fn nullable(b: ObjectBuilder) -> ObjectBuilder {
    b.schema_type(SchemaType::Array(vec![Type::String, Type::Null]))
}

/// A port: a whole number 1..65535, or a string of digits of one.
pub fn port() -> Schema {
    AnyOfBuilder::new()
        .item(
            ObjectBuilder::new()
                .schema_type(SchemaType::new(Type::Integer))
                .minimum(Some(1))
                .maximum(Some(65535)),
        )
        .item(string(PORT_STRING_PATTERN, None))
        .description(Some("1..65535: a whole number, or a string of its digits"))
        .build()
        .into()
}

/// `tcp` or `udp` in any case, or null for the default (`tcp`).
pub fn proto() -> Schema {
    nullable(string(PROTO_PATTERN, None))
        .description(Some("`tcp` (default) or `udp`, in any case"))
        .build()
        .into()
}

/// The `proto` query parameter: `tcp` or `udp` in any case.
pub fn proto_param() -> Schema {
    string(PROTO_PATTERN, None)
        .description(Some("`tcp` (default) or `udp`, in any case"))
        .build()
        .into()
}

/// `allow_from`: null, or at most 64 IPv4 networks or addresses.
pub fn allow_from() -> Schema {
    utoipa::openapi::schema::ArrayBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Array, Type::Null]))
        .items(
            string(ALLOW_FROM_PATTERN, None)
                .examples([json!("203.0.113.0/24"), json!("198.51.100.7")]),
        )
        .max_items(Some(crate::model::allow::MAX_ALLOW_FROM))
        .description(Some(
            "Sources allowed to connect (`a.b.c.d/len` without host bits, or an address); \
             absent, null or empty: every source",
        ))
        .build()
        .into()
}

pub fn ipv4() -> Schema {
    string(IPV4_PATTERN, None)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Ipv4)))
        .examples([json!("192.168.122.50")])
        .build()
        .into()
}

pub fn name() -> Schema {
    string(NAME_PATTERN, Some(63)).build().into()
}

pub fn name_or_null() -> Schema {
    nullable(string(NAME_PATTERN, Some(63))).build().into()
}

pub fn url() -> Schema {
    string(URL_PATTERN, Some(crate::vm::images::MAX_URL_LEN))
        .examples([json!(
            "https://cloud-images.ubuntu.com/jammy/current/jammy-server-cloudimg-amd64.img"
        )])
        .build()
        .into()
}

pub fn sha256() -> Schema {
    string(SHA256_PATTERN, None).build().into()
}

pub fn hostname_or_null() -> Schema {
    nullable(string(HOSTNAME_PATTERN, Some(253))).build().into()
}

pub fn host_path_or_null() -> Schema {
    nullable(string(HOST_PATH_PATTERN, Some(4096)))
        .build()
        .into()
}

pub fn cmdline_or_null() -> Schema {
    nullable(string(ONE_LINE_PATTERN, Some(4096)))
        .build()
        .into()
}

/// At most 64 keys; each names a key type the agent knows (`model::ssh_key::SSH_KEY_TYPES`)
/// followed by base64, in at most 16 KiB. The key data's content is checked beyond what
/// a pattern says (it must decode and carry the same type).
pub fn ssh_keys_or_null() -> Schema {
    let types: Vec<String> = crate::model::ssh_key::SSH_KEY_TYPES
        .iter()
        .map(|t| t.replace('.', "\\."))
        .collect();
    let item = ObjectBuilder::new()
        .schema_type(SchemaType::new(Type::String))
        .pattern(Some(format!("({}) +[A-Za-z0-9+/]", types.join("|"))))
        .max_length(Some(crate::model::ssh_key::MAX_SSH_KEY_BYTES));
    utoipa::openapi::schema::ArrayBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::Array, Type::Null]))
        .items(item)
        .max_items(Some(64))
        .build()
        .into()
}

/// Raw cloud-init text: at most 32 KiB (of UTF-8; the length counts characters).
pub fn cloud_init_or_null() -> Schema {
    nullable(
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .max_length(Some(crate::vm::spec::MAX_CLOUD_INIT_BYTES)),
    )
    .build()
    .into()
}

pub fn arch_or_null() -> Schema {
    let mut values: Vec<Value> = crate::vm::spec::ARCHES.iter().map(|a| json!(a)).collect();
    values.push(Value::Null);
    ObjectBuilder::new()
        .schema_type(SchemaType::Array(vec![Type::String, Type::Null]))
        .enum_values(Some(values))
        .build()
        .into()
}

/// The body of `POST /ports/restore` when there is one: exactly `{}`.
pub fn empty_object() -> RefOr<Schema> {
    RefOr::T(
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::Object))
            .additional_properties(Some(
                utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
            ))
            .build()
            .into(),
    )
}
