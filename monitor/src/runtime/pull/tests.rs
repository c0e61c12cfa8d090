use super::*;

#[test]
fn computes_chain_ids() {
    // The example of the OCI image spec's layer chain id section.
    let a = "sha256:a9561eb1b190625c9adb5a9513e72c4dedafc1cb2d4c5236c9a6957ec7dfd5a9".to_owned();
    let b = "sha256:3b7bc2e2e3e2b8a2e7c3f8e8fa0f3c6f5e3a7a6a9d4c2b8e4f1f0e6b9c8d7a6b".to_owned();
    let chain = chain_ids(&[a.clone(), b.clone()]);
    assert_eq!(chain[0], a);
    let expected = format!(
        "sha256:{}",
        hex(&Sha256::digest(format!("{a} {b}").as_bytes()))
    );
    assert_eq!(chain[1], expected);
}

#[test]
fn parses_references_as_the_reference_grammar_does() {
    let digest = format!("sha256:{}", "ab".repeat(32));
    for image in [
        format!("127.0.0.1:5000/team/app@{digest}"),
        format!("127.0.0.1:5000/team/app:1@{digest}"),
        format!("registry.example.com/a/b/c:v1.2-rc_3@{digest}"),
        format!("localhost/app@{digest}"),
        format!("busybox@{digest}"),
        format!("busybox:1.36@{digest}"),
        format!("someone/app@{digest}"),
        "127.0.0.1:5000/team/app:1".to_owned(),
        "busybox".to_owned(),
        "registry.example.com/a/b:v2".to_owned(),
    ] {
        let ours = image_reference(&image).unwrap_or_else(|e| panic!("{image}: {e}"));
        let theirs: Reference = image.parse().unwrap();
        assert_eq!(
            (
                ours.registry(),
                ours.repository(),
                ours.tag(),
                ours.digest()
            ),
            (
                theirs.registry(),
                theirs.repository(),
                theirs.tag(),
                theirs.digest()
            ),
            "{image}"
        );
    }
    for bad in [
        format!("app@sha256:{}", "AB".repeat(32)),
        "app@sha256:abc".to_owned(),
        format!("app@md5:{}", "ab".repeat(16)),
        format!("Team/App@{digest}"),
        format!("app:bad tag@{digest}"),
        format!("/app@{digest}"),
    ] {
        assert!(image_reference(&bad).is_err(), "{bad}");
    }
}
