//! `sidenetctl validate` on the committed broken manifests: each gives exactly one clear error
//! naming the file, the document and the field (the `# expect:` line of the fixture), and exits
//! non-zero. The example mesh validates clean.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::{bin, repo};

#[test]
fn every_broken_fixture_gives_one_clear_error() {
    let dir = repo().join("controller/tests/fixtures/broken");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 60, "only {} broken fixtures", files.len());
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{} lacks an '# expect: ' first line", f.display()))
            .trim()
            .to_string();
        let out = Command::new(bin("sidenetctl"))
            .current_dir(repo())
            .args(["validate", "-f"])
            .arg(&f)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success(),
            "{} validated:\n{stdout}",
            f.display()
        );
        let errors: Vec<&str> = stdout
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        assert_eq!(
            errors.len(),
            1,
            "{}: expected one error, got:\n{stdout}",
            f.display()
        );
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            errors[0].contains(&name),
            "error does not name the file: {}",
            errors[0]
        );
        assert!(
            errors[0].contains(&expect),
            "error does not mention {expect:?}: {}",
            errors[0]
        );
        assert!(
            errors[0].contains(": document "),
            "error does not name the document: {}",
            errors[0]
        );
    }
}

#[test]
fn examples_validate_clean() {
    let out = Command::new(bin("sidenetctl"))
        .current_dir(repo())
        .args(["validate", "-f", "examples/riverside"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok: 1 mesh(es), 2 node(s)"));
}
