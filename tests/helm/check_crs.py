#!/usr/bin/env python3
"""Custom resources against what the API server enforces from the chart's CRDs, without a cluster.

    check_crs.py SCHEMAS_DIR CRD_DIR INVALID_DIR VALID_FILE...

- SCHEMAS_DIR: the JSON Schemas tests/helm/check.py derived from the CRDs (<Kind>.json: the
  openAPIV3Schema with patterns, lengths and bounds, unknown fields refused);
- CRD_DIR: the CRDs themselves, for their CEL rules (`x-kubernetes-validations`), evaluated with
  cel-python on the object each rule is attached to (`self`), as the API server does;
- INVALID_DIR/*.yaml: one custom resource each, with a `# expect-error: TEXT` line and a
  `# rejected-by: schema|cel` line. Each must be refused by that layer, with TEXT in the message
  (the JSON Schema error's path and message, or the CEL rule's message);
- no integer field of a CRD has a `uint*` format;
- VALID_FILE...: custom resources (JSON, as check.py wrote them) that must pass every CEL rule
  (the JSON Schema check of these is check-jsonschema's, in tests/helm/run).

Not covered: CEL transition rules (`oldSelf`; the CRDs have none), cost limits, and CEL functions
cel-python does not have (the rules use only the standard ones). Prints `FAIL ...` lines and,
last, the number of invalid files refused.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import celpy
import jsonschema
import yaml

failures: list[str] = []


def fail(msg: str) -> None:
    failures.append(msg)


def load_crd_rules(crd_dir: str) -> dict:
    """(apiVersion, kind) -> the CRD's openAPIV3Schema (for walking to CEL rules)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml"))):
        with open(path, encoding="utf-8") as f:
            for crd in yaml.safe_load_all(f):
                if not crd:
                    continue
                spec = crd["spec"]
                v = spec["versions"][0]
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


ENV = celpy.Environment()
PROGRAMS: dict[str, object] = {}


def cel_errors(schema: dict, value, path: str = "") -> list[str]:
    """Messages of the CEL rules `value` breaks, walking the schema along the value."""
    errors = []
    if not isinstance(schema, dict):
        return errors
    for rule in schema.get("x-kubernetes-validations", []):
        prog = PROGRAMS.get(rule["rule"])
        if prog is None:
            prog = ENV.program(ENV.compile(rule["rule"]))
            PROGRAMS[rule["rule"]] = prog
        try:
            ok = prog.evaluate({"self": celpy.json_to_cel(value)})
        except Exception as e:  # an evaluation error is a refusal by the API server too
            ok = False
            rule = dict(rule, message=f"{rule.get('message', rule['rule'])} (evaluation error: {e})")
        if ok is not True and str(ok) != "True":
            errors.append(f"{path or '.'}: {rule.get('message', rule['rule'])}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for k, v in value.items():
            if k in props:
                errors += cel_errors(props[k], v, f"{path}.{k}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += cel_errors(schema["additionalProperties"], v, f"{path}.{k}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, v in enumerate(value):
            errors += cel_errors(schema["items"], v, f"{path}[{i}]")
    return errors


def header(path: str, key: str) -> str:
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith(f"# {key}:"):
                return line.split(":", 1)[1].strip()
    return ""


def main(argv: list[str]) -> int:
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    schemas_dir, crd_dir, invalid_dir, *valid = argv[1:]
    rules = load_crd_rules(crd_dir)
    # Kubernetes knows only the int32 and int64 integer formats: uint* warns on 1.34+ and is
    # not enforced.
    for key, schema in rules.items():
        for fmt in sorted(set(re.findall(r'"format": "(u?int[0-9]*)"', json.dumps(schema)))):
            if fmt.startswith("uint"):
                fail(f"{key[1]} CRD: format {fmt} (API servers do not know it; bound the field instead)")
    n_rules = sum(json.dumps(s).count('"x-kubernetes-validations"') for s in rules.values())
    if n_rules == 0:
        fail(f"{crd_dir}: no CRD has a CEL rule (x-kubernetes-validations)")

    for path in valid:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        schema = rules.get((doc.get("apiVersion"), doc.get("kind")))
        if schema is None:
            continue
        for e in cel_errors(schema, doc):
            fail(f"{os.path.basename(path)}: a valid custom resource breaks a CEL rule: {e}")

    refused = 0
    files = sorted(glob.glob(os.path.join(invalid_dir, "*.yaml")))
    if not files:
        fail(f"{invalid_dir}: no invalid custom resources to check")
    for path in files:
        name = os.path.basename(path)
        want, by = header(path, "expect-error"), header(path, "rejected-by")
        if not want or by not in ("schema", "cel"):
            fail(f"{name}: needs '# expect-error: MESSAGE' and '# rejected-by: schema|cel' lines")
            continue
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
        key = (doc.get("apiVersion"), doc.get("kind"))
        schema_file = os.path.join(schemas_dir, f"{doc.get('kind')}.json")
        if key not in rules or not os.path.exists(schema_file):
            fail(f"{name}: no CRD for {key}")
            continue
        with open(schema_file, encoding="utf-8") as f:
            json_schema = json.load(f)
        schema_errors = [
            f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in jsonschema.Draft7Validator(json_schema).iter_errors(doc)
        ]
        cel = cel_errors(rules[key], doc)
        got = schema_errors if by == "schema" else cel
        other = cel if by == "schema" else schema_errors
        if not got:
            fail(f"{name}: accepted by the CRD's {'schema' if by == 'schema' else 'CEL rules'} (expected: {want})"
                 + (f"; refused by the other layer instead: {other}" if other else ""))
            continue
        if not any(want in e for e in got):
            fail(f"{name}: refused, but not with '{want}': {got}")
            continue
        refused += 1

    for m in failures:
        print(f"FAIL {m}")
    print(refused)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
