use super::*;

fn need(kind: PrivilegeKind, value: &str, read_only: bool) -> Privilege {
    let mut need = Privilege::new(kind, "svc", value);
    need.read_only = read_only;
    need
}

#[test]
fn the_default_allows_only_ordinary_ports() {
    let policy = Policy::default();
    let any = CoreRules::any();
    let check = |n: Privilege| policy.check(&n, &[8443], &any).map_err(|v| v.rule);
    assert_eq!(
        check(need(PrivilegeKind::Privileged, "", false)),
        Err("privileged")
    );
    assert_eq!(
        check(need(PrivilegeKind::HostPath, "/", true)),
        Err("host_paths")
    );
    assert_eq!(
        check(need(PrivilegeKind::HostPort, "22/tcp", false)),
        Err("host_ports")
    );
    assert_eq!(
        check(need(PrivilegeKind::HostPort, "11101/tcp", false)),
        Err("reserved_ports")
    );
    assert_eq!(
        check(need(PrivilegeKind::HostPort, "8443/tcp", false)),
        Err("reserved_ports")
    );
    assert_eq!(
        check(need(PrivilegeKind::HostPort, "8080/udp", false)),
        Ok(())
    );
    assert_eq!(
        check(need(PrivilegeKind::CoreComponent, "scheduler", false)),
        Ok(())
    );
    let none = CoreRules::default();
    assert_eq!(
        policy
            .check(
                &need(PrivilegeKind::CoreComponent, "scheduler", false),
                &[],
                &none
            )
            .map_err(|v| v.rule),
        Err("core_components.replace")
    );
}

#[test]
fn consent_covers_what_it_names_and_no_more() {
    let policy = Policy::from_yaml(
        "consent:\n  addons: [dash, other]\n  host_ports: [\"10000-20000/tcp\", 9000]\n  host_paths:\n    - prefix: /srv/addons\n  core_components: [scheduler]\n",
    )
    .unwrap();
    let consent = &policy.consent;
    let covers = |n: Privilege| consent.covers("dash", &n);
    assert!(covers(need(PrivilegeKind::HostPort, "10000/tcp", false)));
    assert!(covers(need(PrivilegeKind::HostPort, "20000/tcp", false)));
    assert!(!covers(need(PrivilegeKind::HostPort, "20001/tcp", false)));
    assert!(!covers(need(PrivilegeKind::HostPort, "15000/udp", false)));
    assert!(covers(need(PrivilegeKind::HostPort, "9000/udp", false)));
    assert!(covers(need(PrivilegeKind::HostPath, "/srv/addons/a", true)));
    assert!(!covers(need(
        PrivilegeKind::HostPath,
        "/srv/addons/a",
        false
    )));
    assert!(!covers(need(
        PrivilegeKind::HostPath,
        "/srv/addons/../../etc",
        true
    )));
    assert!(!covers(need(
        PrivilegeKind::HostPath,
        "/srv/addons-x",
        true
    )));
    assert!(covers(need(
        PrivilegeKind::CoreComponent,
        "scheduler",
        false
    )));
    assert!(!covers(need(
        PrivilegeKind::CoreComponent,
        "service_manager",
        false
    )));
    assert!(!covers(need(
        PrivilegeKind::KeepCoreStopped,
        "scheduler",
        false
    )));
    assert!(!covers(need(
        PrivilegeKind::CoreEnvironment,
        "scheduler",
        false
    )));
    assert!(!covers(need(PrivilegeKind::Privileged, "", false)));
    assert!(!consent.covers(
        "stranger",
        &need(PrivilegeKind::HostPort, "10000/tcp", false)
    ));
    let granted = consent.grants(
        "dash",
        &[
            need(PrivilegeKind::HostPort, "10000/tcp", false),
            need(PrivilegeKind::Privileged, "", false),
        ],
    );
    assert_eq!(granted.len(), 1);
    assert!(granted[0].by_policy);
    // Nothing by default.
    assert!(!Consent::default().covers("dash", &need(PrivilegeKind::HostPort, "10000/tcp", false)));
    assert!(Policy::from_yaml("consent:\n  host_ports: [\"1-2/sctp\"]\n").is_err());
    assert!(Policy::from_yaml("consent:\n  host_paths: [{prefix: etc}]\n").is_err());
}

#[test]
fn reads_a_policy_file() {
    let policy = Policy::from_yaml(
        "privileged: true\nhost_paths:\n  - prefix: /var/log\n  - prefix: /srv/\n    writable: true\nhost_ports: [80, \"8000-8099\"]\ncore_components:\n  replace: [scheduler]\nresources:\n  default: {memory: 64Mi}\n  max: {memory: 1Gi, pids: 100}\n",
    )
    .unwrap();
    let core = policy.core_rules(CoreRules::any());
    let ok = |n: Privilege| policy.check(&n, &[], &core).is_ok();
    assert!(ok(need(PrivilegeKind::Privileged, "", false)));
    assert!(ok(need(PrivilegeKind::HostPath, "/var/log/app", true)));
    assert!(!ok(need(PrivilegeKind::HostPath, "/var/log/app", false)));
    assert!(!ok(need(PrivilegeKind::HostPath, "/var/logs", true)));
    assert!(ok(need(PrivilegeKind::HostPath, "/srv", false)));
    assert!(ok(need(PrivilegeKind::HostPort, "80/tcp", false)));
    assert!(ok(need(PrivilegeKind::HostPort, "8099/tcp", false)));
    assert!(!ok(need(PrivilegeKind::HostPort, "8100/tcp", false)));
    assert!(ok(need(PrivilegeKind::CoreComponent, "scheduler", false)));
    assert!(!ok(need(PrivilegeKind::CoreComponent, "mongo", false)));
    assert!(!ok(need(
        PrivilegeKind::CoreEnvironment,
        "scheduler",
        false
    )));
    let mut service = Service::default();
    assert_eq!(
        policy.limits(&service).unwrap(),
        Resources {
            memory_bytes: Some(64 << 20),
            cpu_millis: None,
            pids: Some(100),
        }
    );
    service.resources.memory_bytes = Some(2 << 30);
    assert_eq!(policy.limits(&service).unwrap_err().rule, "resources.max");
    assert!(Policy::from_yaml("privileged: yes please").is_err());
    assert!(Policy::from_yaml("host_paths: [{prefix: relative}]").is_err());
    assert!(Policy::from_yaml("host_ports: [\"9-2\"]").is_err());
    assert!(Policy::from_yaml("unknown: 1").is_err());
}

#[test]
fn reads_sizes() {
    assert_eq!(parse_memory("512Mi"), Ok(512 << 20));
    assert_eq!(parse_memory("2Gi"), Ok(2 << 30));
    assert_eq!(parse_memory("4096"), Ok(4096));
    assert!(parse_memory("12MB").is_err());
    assert!(parse_memory("99999999999999Gi").is_err());
}
