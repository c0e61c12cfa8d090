use super::*;

/// The shape of Oakestra's own example descriptors.
const OAKESTRA: &str = r#"{
    "name": "monitoring",
    "description": "node metrics",
    "services": [{
        "service_name": "exporter",
        "image": "ghcr.io/acme/exporter:1.2",
        "command": "exporter --listen ':9100' --verbose",
        "ports": {"9100": "9100", "53/udp": 5353},
        "environment": {"LEVEL": "info", "WORKERS": 4},
        "volumes": ["data:/var/lib/exporter", "/etc/hosts:/etc/host-hosts"],
        "networks": ["metrics"],
        "labels": {"team": "ops"}
    }],
    "volumes": [{"name": "data", "driver": "local"}],
    "networks": [{"name": "metrics", "driver": "bridge", "enable_ipv6": false}]
}"#;

#[test]
fn writes_what_it_reads() {
    let addon = from_json(OAKESTRA.as_bytes()).unwrap();
    let json = serde_json::Value::Object(descriptor_json(&crate::Descriptor::from_proto(addon)));
    let service = &json["services"][0];
    assert_eq!(service["command"], "exporter --listen :9100 --verbose");
    assert_eq!(service["ports"]["53/udp"], "5353");
    assert_eq!(service["ports"]["9100"], "9100");
    assert_eq!(service["volumes"][1], "/etc/hosts:/etc/host-hosts");
    assert_eq!(json["networks"][0]["name"], "metrics");
    // And what it writes reads back the same.
    let mut again = json.clone();
    again.as_object_mut().unwrap().remove("version");
    let reread = from_json(serde_json::to_vec(&again).unwrap().as_slice()).unwrap();
    assert_eq!(reread, from_json(OAKESTRA.as_bytes()).unwrap());
}

#[test]
fn names_the_field_of_a_json_body() {
    let err = from_json(br#"{"name": "x", "services": [{"service_name": "a"}]}"#).unwrap_err();
    assert_eq!(err.field, "services[0]");
    assert!(err.reason.contains("missing field `image`"), "{err:?}");
    let err = from_json(b"42").unwrap_err();
    assert_eq!(err.field, "");
}

#[test]
fn converts_an_oakestra_descriptor() {
    let addon = parse_descriptor(OAKESTRA, "addon.json").unwrap();
    assert_eq!(addon.name, "monitoring");
    let service = &addon.services[0];
    assert_eq!(
        service.command,
        ["exporter", "--listen", ":9100", "--verbose"]
    );
    let mut ports: Vec<_> = service
        .ports
        .iter()
        .map(|p| (p.container_port, p.host_port, p.protocol()))
        .collect();
    ports.sort();
    assert_eq!(
        ports,
        [
            (53, 5353, pb::Protocol::Udp),
            (9100, 9100, pb::Protocol::Tcp)
        ]
    );
    assert_eq!(service.environment["WORKERS"], "4");
    assert_eq!(
        service.mounts[0],
        pb::Mount {
            source: Some(pb::mount::Source::Volume("data".into())),
            target: "/var/lib/exporter".into(),
            read_only: false,
        }
    );
    assert_eq!(addon.volumes[0].name, "data");
    assert_eq!(addon.networks[0].name, "metrics");
}

#[test]
fn reads_yaml_and_maps_by_name() {
    let addon = parse_descriptor(
        "name: x\nservices:\n- service_name: a\n  image: busybox\n  command: [sleep, '5']\n  resources: {memory_bytes: 67108864, pids: 64}\nvolumes:\n  data:\nnetworks:\n  back: {enable_ipv6: true}\n",
        "addon.yaml",
    )
    .unwrap();
    assert_eq!(addon.services[0].command, ["sleep", "5"]);
    assert_eq!(
        addon.services[0].resources,
        Some(pb::Resources {
            memory_bytes: 64 << 20,
            cpu_millis: 0,
            pids: 64,
        })
    );
    assert_eq!(addon.volumes[0].name, "data");
    assert!(addon.networks[0].enable_ipv6);
}

#[test]
fn names_unknown_and_bad_fields() {
    let err = parse_descriptor(
        r#"{"name": "x", "services": [{"service_name": "a", "image": "b", "replicas": 2}]}"#,
        "f.json",
    )
    .unwrap_err();
    assert!(err.starts_with("f.json: services[0]"), "{err}");
    assert!(err.contains("unknown field `replicas`"), "{err}");
    let err = parse_descriptor(
        r#"{"name": "x", "services": [{"service_name": "a", "image": "b", "health_check": {"tcp": {"port": 80}, "interval": "soon"}}]}"#,
        "f.json",
    )
    .unwrap_err();
    assert!(
        err.contains("services[0].health_check.interval: `soon` is not a duration"),
        "{err}"
    );
    let parsed = parse_descriptor(
        "name: x\nservices:\n- service_name: a\n  image: b\n  health_check: {http: {port: 8080, path: /health}, interval: 5s, retries: 2}\n",
        "f.yaml",
    )
    .unwrap();
    let check = parsed.services[0].health_check.clone().unwrap();
    assert_eq!(check.interval.unwrap().seconds, 5);
    assert_eq!(check.retries, 2);
    assert!(matches!(
        check.probe,
        Some(pb::health_check::Probe::Http(ref http)) if http.path == "/health"
    ));
    let err =
        parse_descriptor(r#"{"name": "x", "services": [], "owner": 2}"#, "f.json").unwrap_err();
    assert!(err.contains("unknown field `owner`"), "{err}");
    let err =
        parse_descriptor(r#"{"name": "x", "services": [], "version": 2}"#, "f.json").unwrap_err();
    assert!(err.contains("version: invalid type"), "{err}");
    let err = parse_descriptor(
        r#"{"name": "x", "services": [{"service_name": "a", "image": "b", "ports": {"http": "80"}}]}"#,
        "f.json",
    )
    .unwrap_err();
    assert!(err.contains("services[0].ports: `http`"), "{err}");
    let err = parse_descriptor("{\"name\": ", "f.json").unwrap_err();
    assert!(err.starts_with("f.json: "), "{err}");
}
