use super::*;
use crate::Port;

fn addon() -> Descriptor {
    Descriptor {
        name: "energy-scheduler".into(),
        version: "1.0.0".into(),
        description: String::new(),
        services: vec![Service {
            service_name: "scheduler".into(),
            image: "registry.local/sched:1".into(),
            ports: vec![Port {
                container_port: 80,
                host_port: 10004,
                protocol: "tcp".into(),
            }],
            ..Service::default()
        }],
        volumes: Vec::new(),
        networks: Vec::new(),
    }
}

#[test]
fn control_characters_are_refused_and_scripts_keep_their_lines() {
    let mut spoof = addon();
    spoof.description = "fine\u{1b}[2K".into();
    spoof.services[0].mounts = vec![crate::Mount {
        source: MountSource::HostPath("/srv\rPrivileges none".into()),
        target: "/x".into(),
        read_only: false,
    }];
    spoof.services[0].labels = [("team".into(), "a\u{7}".into())].into();
    let found = fields(&spoof);
    for field in [
        "description",
        "services[0].mounts[0].source",
        "services[0].labels[\"team\"]",
    ] {
        assert!(found.iter().any(|f| f == field), "{field}: {found:?}");
    }
    let mut script = addon();
    script.services[0].command = vec!["sh".into(), "-c".into(), "a\n\tb".into()];
    script.services[0].environment = [("LINES".into(), "1\n2".into())].into();
    assert!(validate(&script).is_ok());
    script.services[0].command[2] = "a\u{1b}b".into();
    assert_eq!(fields(&script), ["services[0].command[2]"]);
    let mut dotted = addon();
    dotted.services[0].mounts = vec![crate::Mount::parse("/srv/./x:/x").unwrap()];
    assert_eq!(fields(&dotted), ["services[0].mounts[0].host_path"]);
}

#[test]
fn record_ids_are_lowercase_ulids() {
    assert!(validate_record_id("01jb8n1m3q9x6c2v4t7w0y5z8k").is_ok());
    for bad in [
        "",
        "../../..",
        "01JB8N1M3Q9X6C2V4T7W0Y5Z8K",
        "81jb8n1m3q9x6c2v4t7w0y5z8k",
        "01jb8n1m3q9x6c2v4t7w0y5z8",
        "01jb8n1m3q9x6c2v4t7w0y5z8i",
    ] {
        assert!(validate_record_id(bad).is_err(), "{bad}");
    }
    assert_eq!(quoted("a\u{1b}b"), "\"a\\u{1b}b\"");
}

fn fields(addon: &Descriptor) -> Vec<String> {
    validate(addon)
        .err()
        .unwrap_or_default()
        .into_iter()
        .map(|v| v.field)
        .collect()
}

#[test]
fn accepts_a_good_descriptor() {
    assert_eq!(validate(&addon()), Ok(()));
}

#[test]
fn names_every_bad_field() {
    let mut a = addon();
    a.name = "_energy".into();
    a.version = "1.2".into();
    a.services.push(a.services[0].clone());
    a.services[1].ports[0].protocol = "sctp".into();
    a.services[1].mounts = vec![
        crate::Mount::parse("data:/var/lib").unwrap(),
        crate::Mount::parse("/x/../y:relative").unwrap(),
    ];
    a.services[1].networks = vec!["nowhere".into()];
    a.services[1].environment.insert("1BAD".into(), "v".into());
    a.services[1].health_check = Some(crate::HealthCheck {
        probe: crate::Probe::Http {
            port: 8080,
            path: "health".into(),
        },
        interval_ms: 500,
        timeout_ms: 5000,
        retries: 3,
        start_period_ms: 0,
    });
    assert_eq!(
        fields(&a),
        [
            "name",
            "version",
            "services[1].service_name",
            "services[1].environment[1BAD]",
            "services[1].ports[0].protocol",
            "services[1].mounts[0].volume",
            "services[1].mounts[1].target",
            "services[1].mounts[1].host_path",
            "services[1].networks[0]",
            "services[1].health_check.http.path",
            "services[1].health_check.interval",
            "services[1].health_check.timeout",
        ]
    );
}

#[test]
fn takes_oakestra_names_and_refuses_aliases_that_collide() {
    let mut a = addon();
    a.name = "Energy_Scheduler".into();
    a.services[0].service_name = "service_manager".into();
    assert_eq!(validate(&a), Ok(()));
    a.services.push(a.services[0].clone());
    a.services[1].service_name = "Service.Manager".into();
    a.services[1].ports.clear();
    assert_eq!(fields(&a), ["services[1].service_name"]);
}

#[test]
fn requires_services() {
    let mut a = addon();
    a.services.clear();
    assert_eq!(fields(&a), ["services"]);
}
