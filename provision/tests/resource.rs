//! Controller mode through the library: a `NodeProvision` manifest (checked against the CRD's
//! schema) with its SSH key in a Secret runs against real sshd hosts and a running controller,
//! in-process, and its status says what happened to each host.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{Agents, Auth, Controller, Sshd};
use sidenet_controller::admin;
use sidenet_controller::provisioning::AdminControlPlane;
use sidenet_crds::{NodeProvision, SecretKeyRef};
use sidenet_provision::{Settings, Silent};

fn manifest(text: &str) -> NodeProvision {
    let yaml: serde_json::Value = sidenet_crds::yaml::from_str(text).unwrap();
    let json = serde_json::to_value(&yaml).unwrap();
    let schema = sidenet_crds::strict_schema("NodeProvision").unwrap();
    let v = jsonschema::validator_for(&schema).unwrap();
    let errors: Vec<String> = v.iter_errors(&json).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{errors:?}");
    serde_json::from_value(json).unwrap()
}

#[test]
fn a_node_provision_runs_with_secret_credentials_and_reports_in_its_status() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let ctl = Controller::start(&t.join("ctl"), "approval");
    common::test_templates(&t.join("templates"));
    common::dist(&t.join("dist"), &["x86_64", "mips_24kc"]);
    common::keygen(&t.join("fleet-key"));
    let key_pub = std::fs::read_to_string(t.join("fleet-key.pub")).unwrap();
    let dev = |n: &str| t.join("devices").join(n);
    common::fake_device(&dev("gate"), None, &["phy0"]);
    common::fake_device(
        &dev("loft"),
        Some("ubnt-unifi-ac-lite.json"),
        &["phy0", "phy1"],
    );
    let _agents = Agents(vec![dev("gate"), dev("loft")]);
    let gate = Sshd::start(&t.join("sshd"), "gate", Auth::Key, &key_pub);
    let loft = Sshd::start(&t.join("sshd"), "loft", Auth::Key, &key_pub);

    let text = format!(
        r#"apiVersion: sidenet.io/v1alpha1
kind: NodeProvision
metadata:
  name: riverside-batch-1
  generation: 3
spec:
  mesh: riverside
  broker: {broker}
  parallelism: 2
  hostKeyPolicy: trustOnFirstUse
  enrollmentTimeoutSeconds: 60
  defaults:
    credentials:
      privateKeySecretRef: {{ name: fleet-ssh, key: id_ed25519 }}
  targets:
    - host: 127.0.0.1
      port: {gate}
      name: gate
      root: {gate_root}
    - host: 127.0.0.1
      port: {loft}
      name: loft
      root: {loft_root}
      hostKey: {loft_key}
"#,
        broker = ctl.broker(),
        gate = gate.port,
        gate_root = dev("gate").display(),
        loft = loft.port,
        loft_root = dev("loft").display(),
        loft_key = loft.host_key_line(),
    );
    let np = manifest(&text);
    // Credentials are references only: an inline password is not part of the schema.
    let inline = text.replace(
        "      name: gate\n",
        "      name: gate\n      password: hunter2\n",
    );
    let yaml: serde_json::Value = sidenet_crds::yaml::from_str(&inline).unwrap();
    let schema = sidenet_crds::strict_schema("NodeProvision").unwrap();
    assert!(
        !jsonschema::validator_for(&schema)
            .unwrap()
            .is_valid(&serde_json::to_value(&yaml).unwrap())
    );

    let mesh_pub = sidenet_wire::keys::KeyPair::from_file_text(
        &std::fs::read_to_string(ctl.state().join("keys/riverside.key")).unwrap(),
    )
    .unwrap()
    .public()
    .to_base64();
    let base = Settings {
        mesh: String::new(),
        broker: String::new(),
        broker_ca: None,
        mesh_key: mesh_pub,
        agents: t.join("dist"),
        templates: t.join("templates"),
        known_hosts: t.join("known_hosts"),
        trust_on_first_use: false,
        parallelism: 1,
        ssh_timeout: Duration::from_secs(30),
        enrol_timeout: Duration::from_secs(1),
        wait_for_enrolment: false,
        shaping: false,
    };
    let profiles: Vec<_> =
        sidenet_controller::spec::manifest::load(&[common::repo().join("hardware-profiles")])
            .unwrap()
            .profiles
            .into_values()
            .collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let run = |secret: &(dyn Fn(&SecretKeyRef) -> Option<String> + Sync)| {
        rt.block_on(sidenet_provision::resource::run(
            &np,
            secret,
            base.clone(),
            profiles.clone(),
            {
                let state = ctl.state();
                Arc::new(AdminControlPlane::new(
                    move |req| admin::call(&state, &req),
                    false,
                    true,
                ))
            },
            Arc::new(Silent),
            "2026-01-01T00:00:00Z",
        ))
    };

    // The Secret is missing: nothing runs, the status says which one.
    let st = run(&|_| None);
    assert_eq!(st.conditions[0].reason, "InvalidSpec");
    assert!(
        st.conditions[0]
            .message
            .contains("Secret \"fleet-ssh\" has no key \"id_ed25519\""),
        "{st:?}"
    );
    assert!(st.hosts.is_empty());
    assert!(!dev("gate").join("usr").exists());

    let pem = std::fs::read_to_string(t.join("fleet-key")).unwrap();
    let secret = move |r: &SecretKeyRef| {
        (r.name == "fleet-ssh" && r.key == "id_ed25519").then(|| pem.clone())
    };
    let st = run(&secret);
    assert_eq!((st.succeeded, st.failed), (2, 0), "{st:#?}");
    assert_eq!(st.observed_generation, Some(3));
    assert_eq!(st.conditions[0].type_, "Complete");
    assert_eq!(st.conditions[0].status, "True");
    let by_host = |port: u16| {
        st.hosts
            .iter()
            .find(|h| h.host == format!("root@127.0.0.1:{port}"))
            .unwrap()
    };
    assert_eq!(
        by_host(gate.port).profile.as_deref(),
        Some("pcengines-apu2-wle600vx")
    );
    assert_eq!(
        by_host(loft.port).board.as_deref(),
        Some("ubnt,unifiac-lite")
    );
    assert_eq!(
        by_host(loft.port).profile.as_deref(),
        Some("ubnt-unifi-ac-lite")
    );
    for h in &st.hosts {
        assert_eq!(h.result, "Provisioned", "{h:?}");
        assert_eq!(
            h.message,
            "changed: agent binary, bootstrap config, service, started"
        );
    }
    // Approval mode: the nodes are seen, waiting for an admin.
    let nodes = ctl.nodes();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    for h in &st.hosts {
        let n = nodes
            .iter()
            .find(|n| Some(&n.node) == h.node_id.as_ref())
            .unwrap();
        assert_eq!(n.phase, "Pending");
    }
    // Only the host without a pinned key was trusted on first use.
    let kh = std::fs::read_to_string(t.join("known_hosts")).unwrap();
    assert!(kh.contains(&format!(
        "[127.0.0.1]:{} {}",
        gate.port,
        gate.host_key_line()
    )));
    assert!(!kh.contains(&format!("[127.0.0.1]:{}", loft.port)));

    // Reconciling again changes nothing.
    let st = run(&secret);
    assert_eq!((st.succeeded, st.failed), (2, 0), "{st:#?}");
    for h in &st.hosts {
        assert_eq!(h.result, "AlreadyProvisioned");
        assert_eq!(h.message, "no changes");
    }
}
