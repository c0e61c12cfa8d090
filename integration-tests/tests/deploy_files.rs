//! The deployment files under `deploy/` validate against their schemas
//! (Kubernetes' own, through `kubernetes-validate --strict`; the compose
//! specification's, through `check-jsonschema`), both validators refuse a
//! file with a misspelt field, and every flag the files pass to our
//! binaries is one they take, with a value they accept.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use std::{path::PathBuf, process::Command};

use integration_tests::{binary, workspace_root};

fn venv_tool(name: &str) -> PathBuf {
    let path = workspace_root().join("target/test-env/venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: run scripts/setup.sh",
        path.display()
    );
    path
}

fn compose_schema() -> PathBuf {
    let dir = workspace_root().join("target/test-env");
    std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| {
            e.path()
                .join("package/lib/compose-spec/schema/compose-spec.json")
        })
        .find(|p| p.is_file())
        .expect("the compose-spec schema is fetched by scripts/setup.sh")
}

fn files(dir: &str, extension: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(workspace_root().join(dir))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == extension))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no {extension} files in {dir}");
    files
}

/// Runs a validator on `files`; its success and output.
fn validate(tool: &str, args: &[String], files: &[PathBuf]) -> (bool, String) {
    let output = Command::new(venv_tool(tool))
        .args(args)
        .args(files)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn kubernetes_manifests_validate() {
    let manifests = files("deploy/kubernetes", "yaml");
    let (ok, output) = validate("kubernetes-validate", &["--strict".into()], &manifests);
    assert!(ok, "{output}");
    for kind in [
        "deployment/addons-marketplace",
        "deployment/addons-manager",
        "daemonset/addons-monitor",
    ] {
        assert!(
            output.contains(&format!("passed for resource {kind}")),
            "{output}"
        );
    }
    // The validator does fail: a misspelt field.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let text = std::fs::read_to_string(&manifests[0]).unwrap();
    std::fs::write(&bad, text.replace("replicas: 2", "replicaz: 2")).unwrap();
    let (ok, output) = validate("kubernetes-validate", &["--strict".into()], &[bad]);
    assert!(!ok && output.contains("replicaz"), "{output}");
}

#[test]
fn compose_files_validate() {
    let files = files("deploy/compose", "yml");
    let schema = vec![
        "--schemafile".into(),
        compose_schema().display().to_string(),
    ];
    let (ok, output) = validate("check-jsonschema", &schema, &files);
    assert!(ok, "{output}");
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yml");
    let text = std::fs::read_to_string(&files[0]).unwrap();
    std::fs::write(&bad, text.replace("read_only: true", "read_onlyy: true")).unwrap();
    let (ok, output) = validate("check-jsonschema", &schema, &[bad]);
    assert!(!ok && output.contains("read_onlyy"), "{output}");
}

/// The `--flag=value` arguments of each of our containers in a file: the
/// lines of its `args:` or `command:` lists that start with `- --`.
fn flags_by_image(text: &str) -> Vec<(String, Vec<String>)> {
    let mut found: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(image) = line.strip_prefix("image:") {
            let name = image
                .trim()
                .rsplit('/')
                .next()
                .unwrap()
                .split(':')
                .next()
                .unwrap()
                .to_owned();
            found.push((name, Vec::new()));
        } else if let Some(flag) = line.strip_prefix("- --")
            && let Some((_, flags)) = found.last_mut()
        {
            flags.push(format!("--{flag}"));
        }
    }
    found
        .into_iter()
        .filter(|(name, _)| name.starts_with("addons-"))
        .collect()
}

#[test]
fn deployment_files_pass_flags_the_binaries_take() {
    let mut checked = 0;
    for path in files("deploy/kubernetes", "yaml")
        .into_iter()
        .chain(files("deploy/compose", "yml"))
    {
        let text = std::fs::read_to_string(&path).unwrap();
        for (image, flags) in flags_by_image(&text) {
            // `--help` after the flags: clap refuses an unknown flag or a
            // bad value before it prints the help.
            let output = Command::new(binary(&image))
                .args(&flags)
                .arg("--help")
                .env_clear()
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "{}: {image} {flags:?}: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            checked += 1;
        }
    }
    assert!(checked >= 6, "only {checked} containers found");
}
