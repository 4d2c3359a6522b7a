//! Controller mode in standalone: a `NodeProvision` manifest dropped into the watched folder is
//! run by the controller itself (the same implementation as `sidenetctl provision`), against
//! real sshd hosts; its results show in `sidenetctl status`/`provisions`, survive a controller
//! restart without running the job again, and a changed manifest runs it again.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Agents, Auth, Controller, Sshd, wait_for};
use sidenet_controller::admin::{JobState, ProvisionRow};

fn copy_dir(from: &Path, to: &Path) {
    common::run(Command::new("cp").arg("-r").arg(from).arg(to));
}

fn manifest(
    gate: &Sshd,
    loft: &Sshd,
    down: &Sshd,
    dev: &dyn Fn(&str) -> String,
    broker: &str,
    pem: &str,
    retry: u32,
) -> String {
    let pem: String = pem.lines().map(|l| format!("    {l}\n")).collect();
    format!(
        r#"apiVersion: v1
kind: Secret
metadata:
  name: fleet-ssh
stringData:
  id_ed25519: |
{pem}---
apiVersion: sidenet.io/v1alpha1
kind: NodeProvision
metadata:
  name: street-1
  annotations:
    sidenet.io/retry: "{retry}"
spec:
  mesh: riverside
  broker: {broker}
  parallelism: 3
  hostKeyPolicy: trustOnFirstUse
  enrollmentTimeoutSeconds: 60
  defaults:
    credentials:
      privateKeySecretRef: {{ name: fleet-ssh, key: id_ed25519 }}
  targets:
    - {{ host: 127.0.0.1, port: {g}, name: gate, root: {gr} }}
    - {{ host: 127.0.0.1, port: {l}, name: loft, root: {lr} }}
    - {{ host: 127.0.0.1, port: {d}, name: shed, root: {dr} }}
"#,
        g = gate.port,
        gr = dev("gate"),
        l = loft.port,
        lr = dev("loft"),
        d = down.port,
        dr = dev("shed"),
    )
}

fn finished(ctl: &Controller, job: &str, not_before: &str) -> Option<ProvisionRow> {
    ctl.provisions().into_iter().find(|p| {
        p.name == job
            && p.state != JobState::Running
            && p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.last_transition_time.as_deref() >= Some(not_before))
            })
    })
}

fn host(row: &ProvisionRow, port: u16) -> &sidenet_crds::ProvisionHostStatus {
    row.status
        .as_ref()
        .unwrap()
        .hosts
        .iter()
        .find(|h| h.host == format!("root@127.0.0.1:{port}"))
        .unwrap()
}

/// Replaces a manifest in one rename: the controller polls the folder and must never read a
/// half-written file (an empty one is a valid set without this job, which forgets its results).
fn write_manifest(path: &std::path::Path, text: String) {
    let tmp = path.parent().unwrap().with_extension("tmp-manifest");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn the_controller_runs_node_provision_manifests_and_keeps_their_results() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let templates = t.join("templates");
    copy_dir(&common::repo().join("templates"), &templates);
    common::test_templates(&templates);
    common::dist(&t.join("dist"), &["x86_64", "mips_24kc"]);
    common::keygen(&t.join("fleet-key"));
    let key_pub = std::fs::read_to_string(t.join("fleet-key.pub")).unwrap();
    let pem = std::fs::read_to_string(t.join("fleet-key")).unwrap();
    let devices = t.join("devices");
    let dev = |n: &str| devices.join(n).display().to_string();
    common::fake_device(&devices.join("gate"), None, &["phy0"]);
    common::fake_device(
        &devices.join("loft"),
        Some("ubnt-unifi-ac-lite.json"),
        &["phy0", "phy1"],
    );
    common::fake_device(&devices.join("shed"), None, &["phy0"]);
    let _agents = Agents(vec![
        devices.join("gate"),
        devices.join("loft"),
        devices.join("shed"),
    ]);
    let gate = Sshd::start(&t.join("sshd"), "gate", Auth::Key, &key_pub);
    let loft = Sshd::start(&t.join("sshd"), "loft", Auth::Key, &key_pub);
    let mut shed = Sshd::start(&t.join("sshd"), "shed", Auth::Key, &key_pub);
    shed.stop();

    let mut ctl = Controller::start_with(&t.join("ctl"), "auto", &templates, &t.join("dist"));
    assert!(ctl.provisions().is_empty());
    let start = sidenet_controller::rfc3339(sidenet_controller::now());
    write_manifest(
        &ctl.manifests().join("provision.yaml"),
        manifest(&gate, &loft, &shed, &dev, &ctl.broker(), &pem, 1),
    );

    // The job runs on its own; while it does, `sidenetctl status` shows each host's step.
    let row = wait_for(
        "NodeProvision/street-1 to finish",
        Duration::from_secs(150),
        || finished(&ctl, "street-1", &start),
        || {
            format!(
                "{:#?}\n{}",
                ctl.provisions(),
                common::tail(&ctl.proc.log_text(), 40)
            )
        },
    );
    assert_eq!(row.state, JobState::Failed, "{row:#?}");
    let st = row.status.clone().unwrap();
    assert_eq!((st.succeeded, st.failed), (2, 1), "{st:#?}");
    for (h, profile) in [
        (&gate, "pcengines-apu2-wle600vx"),
        (&loft, "ubnt-unifi-ac-lite"),
    ] {
        let hs = host(&row, h.port);
        assert_eq!(hs.result, "Provisioned", "{hs:?}");
        assert_eq!(hs.profile.as_deref(), Some(profile));
        let id = hs.node_id.clone().unwrap();
        // Really enrolled: the controller has the node.
        assert!(
            ctl.nodes()
                .iter()
                .any(|n| n.node == id && n.mesh == "riverside"),
            "{id} not enrolled: {:#?}",
            ctl.nodes()
        );
    }
    let down = host(&row, shed.port);
    assert_eq!(down.result, "Failed");
    assert!(down.message.contains("refused"), "{down:?}");
    assert!(ctl.state().join("provisions/street-1.json").exists());

    // The table an admin sees.
    let out = common::run(
        Command::new(common::bin("sidenetctl"))
            .arg("status")
            .arg("--state")
            .arg(ctl.state()),
    );
    assert!(
        out.contains("NodeProvision/street-1  mesh riverside  failed (2 succeeded, 1 failed)"),
        "{out}"
    );

    // A restart keeps the results and does not run the unchanged job again.
    ctl.proc.kill();
    let mut ctl = Controller::start_with(&t.join("ctl"), "auto", &templates, &t.join("dist"));
    let rows = ctl.provisions();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].state, JobState::Failed, "{rows:#?}");
    assert_eq!(rows[0].status, row.status);

    // The shed's router is back; the admin bumps the retry annotation: the job runs again,
    // the provisioned hosts change nothing, the shed is provisioned.
    shed.change_host_key();
    let again = sidenet_controller::rfc3339(sidenet_controller::now());
    write_manifest(
        &ctl.manifests().join("provision.yaml"),
        manifest(&gate, &loft, &shed, &dev, &ctl.broker(), &pem, 2),
    );
    let row = wait_for(
        "NodeProvision/street-1 to finish again",
        Duration::from_secs(150),
        || finished(&ctl, "street-1", &again).filter(|r| r.status != row.status),
        || {
            format!(
                "{:#?}\n{}",
                ctl.provisions(),
                common::tail(&ctl.proc.log_text(), 40)
            )
        },
    );
    assert_eq!(row.state, JobState::Complete, "{row:#?}");
    assert_eq!(
        host(&row, gate.port).result,
        "AlreadyProvisioned",
        "{row:#?}"
    );
    assert_eq!(host(&row, loft.port).result, "AlreadyProvisioned");
    assert_eq!(host(&row, shed.port).result, "Provisioned");

    // A manifest with a broken reference is refused as a whole and the results stay.
    write_manifest(
        &ctl.manifests().join("provision.yaml"),
        manifest(&gate, &loft, &shed, &dev, &ctl.broker(), &pem, 2)
            .replace("key: id_ed25519 }", "key: id_rsa }"),
    );
    let errors = wait_for(
        "the manifest error",
        Duration::from_secs(10),
        || match sidenet_controller::admin::call(
            &ctl.state(),
            &sidenet_controller::admin::Request::Status,
        )
        .unwrap()
        {
            sidenet_controller::admin::Response::Status {
                manifest_errors, ..
            } if !manifest_errors.is_empty() => Some(manifest_errors),
            _ => None,
        },
        String::new,
    );
    assert!(
        errors[0].contains("(NodeProvision/street-1): spec.defaults.credentials.privateKeySecretRef.key: Secret \"fleet-ssh\" has no key \"id_rsa\""),
        "{errors:?}"
    );
    assert_eq!(ctl.provisions()[0].status, row.status);
    ctl.proc.kill();
}
