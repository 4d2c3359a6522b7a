//! Policies (issue 19): the policy fixtures of `controller/tests/fixtures/policy` through
//! `sidenetctl validate` (each file's first line is `# expect: ok` or the exact error after the
//! file name), and `sidenetctl explain` against golden outputs
//! (`UPDATE_GOLDEN=1 cargo test -p sidenet-controller --test policy` rewrites them).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::{bin, repo};

const DIR: &str = "controller/tests/fixtures/policy";

#[test]
fn every_policy_fixture_gives_its_exact_message() {
    let mut files: Vec<_> = std::fs::read_dir(repo().join(DIR))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "only {} policy fixtures", files.len());
    let (mut passing, mut failing) = (0, 0);
    for f in files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let rel = format!("{DIR}/{name}");
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{rel} lacks an '# expect: ' first line"))
            .trim()
            .to_string();
        let out = Command::new(bin("sidenetctl"))
            .current_dir(repo())
            .args(["validate", "-f", &rel])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if expect == "ok" {
            passing += 1;
            assert!(out.status.success(), "{rel} should validate:\n{stdout}");
            continue;
        }
        failing += 1;
        assert!(!out.status.success(), "{rel} validated:\n{stdout}");
        let errors: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors,
            vec![format!("error: {rel}: {expect}")],
            "{rel}: the output was:\n{stdout}"
        );
    }
    assert!(
        passing >= 3 && failing >= 17,
        "{passing} passing, {failing} failing"
    );
}

fn explain(args: &[&str]) -> String {
    let out = Command::new(bin("sidenetctl"))
        .current_dir(repo())
        .args([
            "explain",
            "-f",
            &format!("{DIR}/01-pass-offpeak-tests.yaml"),
        ])
        .args(args)
        .output()
        .unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).to_string();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    format!(
        "$ sidenetctl explain {}\nexit: {}\n{s}",
        args.join(" "),
        out.status.code().unwrap_or(-1)
    )
}

#[test]
fn explain_matches_its_golden_output() {
    let cases: &[&[&str]] = &[
        &[
            "--from",
            "kitchen",
            "--to",
            "porch",
            "--port",
            "80",
            "--at",
            "tue 23:30",
        ],
        &[
            "--from",
            "kitchen",
            "--to",
            "porch",
            "--at",
            "2026-12-01T12:00:00Z",
        ],
        &[
            "--from",
            "kitchen",
            "--to",
            "attic-pi",
            "--port",
            "22",
            "--at",
            "sun 02:00",
        ],
        &[
            "--from",
            "attic-pi",
            "--to",
            "kitchen",
            "--port",
            "22",
            "--protocol",
            "udp",
            "--at",
            "wed 07:00",
        ],
        &["--from", "kitchen", "--to", "nobody", "--at", "wed 07:00"],
        &["--from", "kitchen", "--to", "porch", "--at", "someday"],
    ];
    let got: String = cases.iter().map(|c| explain(c) + "\n").collect();
    let golden = repo().join(DIR).join("explain.golden");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want = std::fs::read_to_string(Path::new(&golden)).unwrap_or_default();
    assert_eq!(
        got,
        want,
        "explain output differs from {}; review and regenerate with UPDATE_GOLDEN=1",
        golden.display()
    );
}
