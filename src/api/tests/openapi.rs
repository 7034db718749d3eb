//! The served document: exactly the routes of the router and the route table, the
//! statuses each can answer, and the input rules the code applies.

use super::*;

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_served_routes() {
    let h = harness();
    let (s, doc) = h.authed("GET", "/openapi.json", None).await;
    assert_eq!(s, StatusCode::OK);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let want = [
        ("DELETE", "/images/{name}"),
        ("DELETE", "/ports/{listen_port}"),
        ("DELETE", "/vms/{name}"),
        ("GET", "/events"),
        ("GET", "/health"),
        ("GET", "/images"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
        ("GET", "/ports"),
        ("GET", "/ports/{listen_port}"),
        ("GET", "/stats"),
        ("GET", "/vms"),
        ("GET", "/vms/{name}/console"),
        ("GET", "/vms/{name}/console/attach"),
        ("GET", "/vms/{name}/ip"),
        ("GET", "/vms/{name}/status"),
        ("POST", "/images"),
        ("POST", "/images/{name}"),
        ("POST", "/ports"),
        ("POST", "/ports/restore"),
        ("POST", "/vms"),
        ("POST", "/vms/{name}/reboot"),
        ("POST", "/vms/{name}/start"),
        ("POST", "/vms/{name}/stop"),
    ];
    let want: Vec<(String, String)> = want
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(documented, want);
    // Every documented route answers something other than 404/405.
    for (m, p) in &want {
        let uri = p
            .replace("{listen_port}", "8080")
            .replace("{name}", "no-such-vm")
            .replace("/ip", "/ip?timeout=0");
        if p == "/metrics" || p == "/events" {
            // Not JSON (and /events never ends): tests/observe.rs reads them.
            let (s, _) = h.head(m, &uri, &[]).await;
            assert_eq!(s, StatusCode::OK, "{m} {p}");
            continue;
        }
        let body = (m == "POST" && p == "/ports").then_some(GOOD);
        let (s, v) = h.authed(m, &uri, body).await;
        // A 404 about the VM or image itself is an answer; the router's is not.
        assert!(
            s != StatusCode::METHOD_NOT_ALLOWED && v["error"] != "no such route",
            "{m} {p}: {s} {v}"
        );
    }
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
}

/// Pinned addresses and a VM's port maps are in the document: `ip` on the create's
/// body and answers, `pinned_ip` and `port_maps` on the status.
#[tokio::test]
async fn the_document_describes_pinned_addresses_and_a_vms_port_maps() {
    let doc = served_document().await;
    let schemas = &doc["components"]["schemas"];
    let ipv4 = |v: &Value| v.to_string().contains("ipv4");
    assert!(
        ipv4(&schemas["CreateVm"]["properties"]["ip"]),
        "{}",
        schemas["CreateVm"]
    );
    assert!(
        ipv4(&schemas["Created"]["properties"]["ip"]),
        "{}",
        schemas["Created"]
    );
    assert!(ipv4(&schemas["VmCreating"]["properties"]["ip"]));
    assert!(ipv4(&schemas["VmStatus"]["properties"]["pinned_ip"]));
    let maps = &schemas["VmStatus"]["properties"]["port_maps"];
    assert!(maps.to_string().contains("VmPortMap"), "{maps}");
    let map = &schemas["VmPortMap"]["properties"];
    for field in [
        "proto",
        "listen_port",
        "target_ip",
        "target_port",
        "rule_id",
    ] {
        assert!(map[field].is_object(), "{field}: {map}");
    }
}

#[tokio::test]
async fn every_protected_operation_documents_401_and_every_error_has_the_error_schema() {
    let doc = served_document().await;
    let error_ref = "#/components/schemas/ErrorBody";
    assert_eq!(
        doc["components"]["schemas"]["ErrorBody"]["required"],
        json!(["ok", "error"])
    );
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            if path == "/openapi.json" {
                // The document itself: any JSON object.
                continue;
            }
            if path != "/health" {
                assert!(op.get("security").is_some(), "{method} {path}");
                assert!(responses.contains_key("401"), "{method} {path}: no 401");
            }
            for status in ["500", "503"] {
                assert!(
                    responses.contains_key(status),
                    "{method} {path}: no {status}"
                );
            }
            if method != "get" {
                for status in ["400", "408", "413", "507"] {
                    assert!(
                        responses.contains_key(status),
                        "{method} {path}: no {status}"
                    );
                }
            }
            if path.contains("{name}") {
                assert!(responses.contains_key("404"), "{method} {path}: no 404");
            }
            for (status, r) in responses {
                if status.starts_with('4') || status.starts_with('5') {
                    assert_eq!(
                        r["content"]["application/json"]["schema"]["$ref"], error_ref,
                        "{method} {path} {status}"
                    );
                } else if status == "101" {
                    // The WebSocket's upgrade: no body.
                    assert!(r.get("content").is_none(), "{method} {path} {status}");
                } else if path == "/metrics" || path == "/events" {
                    // Prometheus' text format and Server-Sent Events, not JSON.
                    let content = r["content"].as_object().unwrap();
                    assert!(
                        content.contains_key("text/plain")
                            || content.contains_key("text/event-stream"),
                        "{method} {path} {status}: {content:?}"
                    );
                } else {
                    // Typed answers, never a bare object.
                    let schema = &r["content"]["application/json"]["schema"];
                    assert!(
                        schema.get("$ref").is_some(),
                        "{method} {path} {status}: {schema}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn the_document_states_the_input_rules_the_code_applies() {
    let doc = served_document().await;
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreatePortMap"];
    assert_eq!(create["additionalProperties"], json!(false));
    for port in ["listen_port", "target_port"] {
        let alts = create["properties"][port]["anyOf"].as_array().unwrap();
        assert_eq!(alts[0]["type"], "integer");
        assert_eq!(
            (alts[0]["minimum"].as_u64(), alts[0]["maximum"].as_u64()),
            (Some(1), Some(65535))
        );
        assert_eq!(alts[1]["pattern"], super::doc::PORT_STRING_PATTERN);
    }
    assert_eq!(
        create["properties"]["proto"]["pattern"],
        super::doc::PROTO_PATTERN
    );
    let allow = &create["properties"]["allow_from"];
    assert_eq!(allow["type"], json!(["array", "null"]), "{allow}");
    assert_eq!(allow["maxItems"], 64);
    assert_eq!(allow["items"]["pattern"], super::doc::ALLOW_FROM_PATTERN);
    assert_eq!(
        create["properties"]["proto"]["type"],
        json!(["string", "null"])
    );
    assert_eq!(
        create["properties"]["target_ip"]["pattern"],
        super::doc::IPV4_PATTERN
    );
    let vm = &schemas["CreateVm"];
    assert_eq!(vm["additionalProperties"], json!(false));
    assert_eq!(
        vm["properties"]["name"]["pattern"],
        super::doc::NAME_PATTERN
    );
    // The harness's VM bounds (test_vm_api).
    assert_eq!(vm["properties"]["memory_mib"]["maximum"], json!(4096));
    assert_eq!(vm["properties"]["vcpus"]["maximum"], json!(4));
    let image = &schemas["AddImage"];
    assert_eq!(image["additionalProperties"], json!(false));
    assert_eq!(
        image["properties"]["url"]["pattern"],
        super::doc::URL_PATTERN
    );
    assert_eq!(
        image["properties"]["sha256"]["pattern"],
        super::doc::SHA256_PATTERN
    );
    // Path and query parameters.
    let delete = &doc["paths"]["/ports/{listen_port}"]["delete"]["parameters"];
    for p in delete.as_array().unwrap() {
        match p["name"].as_str().unwrap() {
            "listen_port" => assert_eq!(p["schema"]["anyOf"][0]["minimum"], json!(1)),
            "proto" => assert_eq!(p["schema"]["pattern"], super::doc::PROTO_PATTERN),
            other => panic!("unexpected parameter {other}"),
        }
    }
    let status = &doc["paths"]["/vms/{name}/status"]["get"]["parameters"][0];
    assert_eq!(status["schema"]["pattern"], super::doc::NAME_PATTERN);
    // Restore: no body, or exactly {}.
    let restore = &doc["paths"]["/ports/restore"]["post"]["requestBody"];
    assert_eq!(restore["required"], json!(false));
}

#[test]
fn the_documented_patterns_accept_exactly_what_the_code_accepts() {
    use super::doc;
    let re = |p: &str| regex::Regex::new(p).unwrap();
    let same = |pattern: &str, samples: &[&str], code: &dyn Fn(&str) -> bool| {
        let r = re(pattern);
        for s in samples {
            assert_eq!(r.is_match(s), code(s), "{pattern} vs the code on {s:?}");
        }
    };
    same(
        doc::NAME_PATTERN,
        &[
            "a",
            "web-1.a_b",
            "-a",
            "_a",
            "a/b",
            "",
            "é",
            &"a".repeat(63),
            &"a".repeat(64),
        ],
        &|s| crate::model::name::check_name(s).is_ok(),
    );
    same(
        doc::URL_PATTERN,
        &[
            "https://cloud-images.ubuntu.com/jammy/current/x.img",
            "HTTP://Mirror.Example/a/b.qcow2?sig=a%2Fb&x=1",
            "http://10.0.0.1:8080/a?b=c?d",
            "http://h",
            "http://h?q",
            "http://user@h/x",
            "http://h/x#f",
            "http://h/a b",
            "http://010.0.0.1/x",
            "http://1.2.3/x",
            "http://xn--bad/x",
            "http://a-b.c1/x",
            "http://a.1b/x",
            "http://h:0/x",
            "http://h:080/x",
            "http://h:65535/x",
            "http://h:65536/x",
            "http://[::1]/x",
            "ftp://h/x",
        ],
        &crate::vm::images::plain_url,
    );
    same(
        doc::PROTO_PATTERN,
        &[
            "tcp", "udp", "TCP", "Udp", "sctp", "", "tcp ", " udp", "tcpudp", "icmp",
        ],
        &|s| {
            s.to_ascii_lowercase()
                .parse::<crate::model::Proto>()
                .is_ok()
        },
    );
    same(
        doc::PORT_STRING_PATTERN,
        &[
            "1", "8080", "08080", "65535", "0065535", "65536", "0", "000", "", "1.0", " 80", "-1",
        ],
        &|s| crate::api::wire::ports::port("p", &json!(s)).is_ok(),
    );
    same(
        doc::IPV4_PATTERN,
        &[
            "192.168.122.50",
            "0.0.0.0",
            "255.255.255.255",
            "256.1.1.1",
            "01.2.3.4",
            "1.2.3",
            " 1.2.3.4",
        ],
        &|s| s.parse::<std::net::Ipv4Addr>().is_ok(),
    );
    same(
        doc::HOSTNAME_PATTERN,
        &[
            "web-1",
            "a.b.c",
            "a.",
            "a..",
            "-a",
            "a-",
            "a_b",
            "",
            &"a".repeat(63),
            &"a".repeat(64),
        ],
        &|s| crate::vm::spec::check_hostname(s).is_ok(),
    );
}

/// The route table and the router list the same routes, one for one: the document is
/// generated from the router's list, and every route of the table is served.
#[tokio::test]
async fn the_route_table_and_the_router_list_the_same_routes() {
    let doc = served_document().await;
    let mut documented: Vec<(String, String)> = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys() {
            documented.push((method.to_uppercase(), path.clone()));
        }
    }
    documented.sort();
    let mut table: Vec<(String, String)> = routes::ROUTES
        .iter()
        .map(|r| (r.verb.method().to_string(), r.path.to_string()))
        .collect();
    table.sort();
    assert_eq!(documented, table);
}

/// What the document says of each operation beyond its handler comes from its route:
/// the token, the body's statuses, libvirt's, a named VM or image's 404, the 504 of a
/// change that outlives its answer.
#[tokio::test]
async fn the_documents_statuses_follow_the_route_table() {
    let doc = served_document().await;
    for r in routes::ROUTES {
        let method = r.verb.method().as_str().to_lowercase();
        let op = &doc["paths"][r.path][&method];
        let has = |status: &str| op["responses"].get(status).is_some();
        let what = format!("{} {}", r.verb.method(), r.path);
        assert_eq!(op.get("security").is_some(), !r.public, "{what}");
        assert_eq!(has("401"), !r.public, "{what}");
        let changes = r.body != routes::BodyRule::None;
        for status in ["408", "413", "507"] {
            assert_eq!(has(status), changes, "{what} {status}");
        }
        assert_eq!(has("501"), r.libvirt, "{what}");
        assert_eq!(
            has("504"),
            r.may_outlive_its_answer || r.path.ends_with("/ip"),
            "{what}"
        );
        if r.named {
            assert!(has("404"), "{what}");
        }
        if let Some(body) = op.get("requestBody") {
            assert_eq!(body["required"] == false, r.body_optional, "{what}");
        }
        let busy = op["responses"]["503"]["description"].as_str().unwrap_or("");
        assert_eq!(busy.contains("libvirt"), r.libvirt, "{what}: {busy}");
    }
}
