#!/usr/bin/env python3
"""What tests/helm/run checks in Python, without a cluster.

    check.py WORK CHART_CRDS VARIANTS_TSV PROFILES_DIR EXAMPLE_FILE...

1. JSON Schemas from the CRDs: for every CRD in CHART_CRDS, spec.versions[0].schema.openAPIV3Schema
   becomes WORK/schemas/<Kind>.json, turned into the JSON Schema the API server effectively
   applies (see `crd_json_schema`).
2. Every rendered variant (lines of VARIANTS_TSV: name, rendered YAML, expected kind counts):
   - kind counts (`Kind=N`, from the values file's `# expect:` line);
   - the contract with the controller (docs/helm.md): command, args, env vars, probes, the broker
     CA mount, the HTTP token mount;
   - references a cluster would resolve: Service and PodDisruptionBudget selectors match the pods,
     named ports exist, the ServiceMonitor selects the metrics Service, bindings name rendered
     roles and the ServiceAccount;
   - RBAC: the permissions granted to the controller's ServiceAccount are exactly the contract's,
     nothing more, nothing less;
   - namespaces and object names: namespaced objects carry one, cluster-scoped ones do not;
   - HardwareProfiles rendered by the chart are exactly the documents of PROFILES_DIR (labels
     aside).
   Built-in objects are written to WORK/builtin/<variant>.yaml for kubernetes-validate, each
   object once (in the file of the first variant that rendered it).
3. Custom resources (rendered ones and EXAMPLE_FILEs), de-duplicated, are written one per file
   to WORK/custom/<Kind>/, and WORK/custom.tsv lists `<schema> <files...>` per kind for
   check-jsonschema. A sidenet.io kind without a CRD is an error.

Prints one `FAIL ...` line per problem and exits 1 if there was any; WORK/counts holds
`variants customs` for the summary line.
"""

from __future__ import annotations

import copy
import glob
import json
import os
import re
import sys

import yaml

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS_LABEL_1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
CLUSTER_SCOPED_BUILTIN = {"ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition", "Namespace"}
# Kinds of other projects' CRDs the chart may render: checked for references only (no schema here).
FOREIGN_CUSTOM = {("monitoring.coreos.com/v1", "ServiceMonitor")}

# The contract (docs/helm.md).
COMMAND = ["sidenet-controller"]
ARGS = ["kubernetes"]
TEMPLATES_DIR = "/usr/share/sidenet/templates"
CONTRACT_ENV = {
    "SIDENET_NAMESPACE", "SIDENET_BROKER", "SIDENET_LISTEN", "SIDENET_BROKER_USERNAME",
    "SIDENET_BROKER_PASSWORD", "SIDENET_BROKER_CA", "SIDENET_METRICS_LISTEN",
    "SIDENET_LEADER_ELECTION", "SIDENET_LOG_JSON", "SIDENET_TEMPLATES", "POD_NAME", "POD_NAMESPACE",
    "SIDENET_TLS_LISTEN", "SIDENET_TLS_CERT", "SIDENET_TLS_KEY", "SIDENET_HTTP_TOKEN_FILE",
}
LEASE_NAME = "sidenet-controller"

failures: list[str] = []


def fail(where: str, msg: str) -> None:
    failures.append(f"{where}: {msg}")


# ---------------------------------------------------------------------------------------------
# CRD → JSON Schema
# ---------------------------------------------------------------------------------------------

def to_json_schema(node):
    """OpenAPI v3 (structural CRD schema) → draft-07 JSON Schema, recursively.

    - `nullable: true` → null is allowed (JSON Schema has no `nullable`);
    - `x-kubernetes-int-or-string` → integer or string;
    - objects with `properties` and neither `additionalProperties` nor
      `x-kubernetes-preserve-unknown-fields` refuse unknown fields, as the API server does under
      kubectl's default field validation (strict, Kubernetes >= 1.27).
    """
    if isinstance(node, list):
        return [to_json_schema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_json_schema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not") or key in ("allOf", "anyOf", "oneOf"):
            out[key] = to_json_schema(value)
        elif key in ("default", "enum", "example"):
            out[key] = copy.deepcopy(value)
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = out["enum"] + [None]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_json_schema(crd: dict) -> tuple[str, str, dict]:
    """(apiVersion, kind, schema) of a CRD's first version, for whole objects (apiVersion, kind
    and metadata included)."""
    spec = crd["spec"]
    version = spec["versions"][0]
    api_version = f"{spec['group']}/{version['name']}"
    kind = spec["names"]["kind"]
    schema = to_json_schema(version["schema"]["openAPIV3Schema"])
    metadata = {
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN.pattern},
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    }
    if spec["scope"] == "Cluster":
        metadata["not"] = {"required": ["namespace"]}
    props = schema.setdefault("properties", {})
    props["apiVersion"] = {"const": api_version}
    props["kind"] = {"const": kind}
    props["metadata"] = metadata
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
    schema["additionalProperties"] = False
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    schema["title"] = f"{kind} ({api_version}), from {crd['metadata']['name']}"
    return api_version, kind, schema


# ---------------------------------------------------------------------------------------------
# Rendered objects
# ---------------------------------------------------------------------------------------------

LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def load_docs(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=LOADER) if d]


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(container: dict, where: str) -> dict:
    env = {}
    for e in container.get("env", []):
        if e["name"] in env:
            fail(where, f"env {e['name']} is set twice")
        env[e["name"]] = e
    return env


def port_of(listen: str) -> int | None:
    m = re.fullmatch(r"(?:\[[0-9a-fA-F:.]+\]|[0-9.]+):([0-9]{1,5})", listen)
    return int(m.group(1)) if m else None


def check_contract(where: str, dep: dict) -> dict:
    """The Deployment against docs/helm.md; returns facts the RBAC check needs."""
    pod = dep["spec"]["template"]["spec"]
    containers = pod["containers"]
    if len(containers) != 1:
        fail(where, f"expected one container, found {len(containers)}")
    c = containers[0]
    if c.get("command") != COMMAND or c.get("args") != ARGS:
        fail(where, f"command/args are {c.get('command')} {c.get('args')}, expected {COMMAND} {ARGS}")
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    env = env_of(c, where)
    for name in sorted(n for n in env if n.startswith("SIDENET_") and n not in CONTRACT_ENV):
        fail(where, f"env {name} is not part of the contract (docs/helm.md)")

    def value(name: str) -> str | None:
        e = env.get(name)
        if e is None:
            return None
        if "value" not in e:
            fail(where, f"env {name} should be a plain value")
            return None
        return e["value"]

    for name, path in (("POD_NAME", "metadata.name"), ("POD_NAMESPACE", "metadata.namespace")):
        ref = env.get(name, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        if ref != path:
            fail(where, f"env {name} must come from the downward API ({path})")
    for name in ("SIDENET_LEADER_ELECTION", "SIDENET_LOG_JSON"):
        if value(name) not in ("true", "false"):
            fail(where, f"env {name} must be \"true\" or \"false\", is {value(name)!r}")
    if value("SIDENET_TEMPLATES") != TEMPLATES_DIR:
        fail(where, f"env SIDENET_TEMPLATES must be {TEMPLATES_DIR}")
    watch = value("SIDENET_NAMESPACE")
    if watch is None or (watch and (not DNS_LABEL_1123.match(watch) or len(watch) > 63)):
        fail(where, f"env SIDENET_NAMESPACE must be a namespace or empty, is {watch!r}")
    metrics = value("SIDENET_METRICS_LISTEN") or ""
    if "metrics" not in ports or port_of(metrics) != ports["metrics"]:
        fail(where, f"SIDENET_METRICS_LISTEN {metrics!r} does not match container port 'metrics' {ports.get('metrics')}")
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        if get.get("path") != path or get.get("port") != "metrics":
            fail(where, f"{probe} must GET {path} on port 'metrics', is {get}")

    embedded = "SIDENET_BROKER" not in env
    if embedded:
        listen = value("SIDENET_LISTEN") or ""
        if "mqtt" in ports:
            if port_of(listen) != ports["mqtt"] or not listen.startswith("0.0.0.0:"):
                fail(where, f"SIDENET_LISTEN {listen!r} does not match container port 'mqtt' {ports['mqtt']}")
        elif "mqtts" not in ports:
            fail(where, "embedded broker without a container port 'mqtt' or 'mqtts'")
        elif not listen.startswith("127.0.0.1:"):
            # TLS only: plain MQTT must stay inside the pod.
            fail(where, f"TLS only, but SIDENET_LISTEN {listen!r} is not on 127.0.0.1")
        for name in ("SIDENET_BROKER", "SIDENET_BROKER_USERNAME", "SIDENET_BROKER_PASSWORD", "SIDENET_BROKER_CA"):
            if name in env:
                fail(where, f"embedded broker, but {name} is set")
        tls = [n for n in ("SIDENET_TLS_LISTEN", "SIDENET_TLS_CERT", "SIDENET_TLS_KEY") if n in env]
        if tls and len(tls) != 3:
            fail(where, f"the TLS listener needs SIDENET_TLS_LISTEN, _CERT and _KEY together, has {tls}")
        elif tls:
            if port_of(value("SIDENET_TLS_LISTEN") or "") != ports.get("mqtts"):
                fail(where, f"SIDENET_TLS_LISTEN does not match container port 'mqtts' {ports.get('mqtts')}")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for name in ("SIDENET_TLS_CERT", "SIDENET_TLS_KEY"):
                path = value(name) or ""
                mounted = [
                    m for m in c.get("volumeMounts", [])
                    if path.startswith(m["mountPath"].rstrip("/") + "/")
                    and "secret" in volumes.get(m["name"], {})
                ]
                if not mounted:
                    fail(where, f"{name} {path} is not inside a mounted Secret")
    else:
        broker = value("SIDENET_BROKER") or ""
        if not re.fullmatch(r"mqtts?://[^\s/?#@]+/?", broker):
            fail(where, f"SIDENET_BROKER {broker!r} is not an mqtt:// or mqtts:// URL without credentials")
        for name in ("SIDENET_LISTEN", "SIDENET_TLS_LISTEN", "SIDENET_TLS_CERT", "SIDENET_TLS_KEY"):
            if name in env:
                fail(where, f"external broker, but {name} is set")
        creds = [n for n in ("SIDENET_BROKER_USERNAME", "SIDENET_BROKER_PASSWORD") if n in env]
        if len(creds) == 1:
            fail(where, f"only {creds[0]} is set")
        for n in creds:
            if "secretKeyRef" not in env[n].get("valueFrom", {}):
                fail(where, f"{n} must come from a Secret")
        ca = value("SIDENET_BROKER_CA")
        if ca is not None:
            if not broker.startswith("mqtts://"):
                fail(where, "SIDENET_BROKER_CA set for a plaintext broker")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounted = [
                m for m in c.get("volumeMounts", [])
                if ca.startswith(m["mountPath"].rstrip("/") + "/")
                and "secret" in volumes.get(m["name"], {})
            ]
            if not mounted:
                fail(where, f"SIDENET_BROKER_CA {ca} is not inside a mounted Secret")
            else:
                m = mounted[0]
                rel = ca[len(m["mountPath"].rstrip("/")) + 1:]
                items = volumes[m["name"]]["secret"].get("items")
                if items is not None and rel not in [i["path"] for i in items]:
                    fail(where, f"SIDENET_BROKER_CA {ca}: the Secret volume has no item {rel}")
    token = value("SIDENET_HTTP_TOKEN_FILE")
    if token is not None:
        # The map's bearer token: one item of a Secret volume, mounted read-only.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = [
            m for m in c.get("volumeMounts", [])
            if token.startswith(m["mountPath"].rstrip("/") + "/")
            and "secret" in volumes.get(m["name"], {})
        ]
        if not mounted:
            fail(where, f"SIDENET_HTTP_TOKEN_FILE {token} is not inside a mounted Secret")
        else:
            m = mounted[0]
            rel = token[len(m["mountPath"].rstrip("/")) + 1:]
            items = volumes[m["name"]]["secret"].get("items")
            if not m.get("readOnly"):
                fail(where, "the Secret of SIDENET_HTTP_TOKEN_FILE is not mounted read-only")
            if items is None or rel not in [i["path"] for i in items]:
                fail(where, f"SIDENET_HTTP_TOKEN_FILE {token}: the Secret volume has no item {rel}")
    sc = c.get("securityContext", {})
    psc = pod.get("securityContext", {})
    if not (sc.get("runAsNonRoot") or psc.get("runAsNonRoot")) or not sc.get("readOnlyRootFilesystem") \
            or sc.get("allowPrivilegeEscalation") is not False or "ALL" not in sc.get("capabilities", {}).get("drop", []):
        fail(where, "container is not restricted (runAsNonRoot, readOnlyRootFilesystem, no privilege escalation, drop ALL)")
    return {
        "embedded": embedded,
        "watch": watch or "",
        "leader": value("SIDENET_LEADER_ELECTION") == "true",
        "ports": ports,
        "tls_only": embedded and "mqtt" not in ports,
    }


RBAC_TABLE: list[dict] = []


def load_rbac_table(path: str) -> None:
    """The table between `<!-- rbac-table:begin -->` and `<!-- rbac-table:end -->` of
    docs/helm.md: one dict per row (where, group, resource, verbs, names)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    m = re.search(r"<!-- rbac-table:begin -->\n(.*?)<!-- rbac-table:end -->", text, re.S)
    if not m:
        fail(path, "no <!-- rbac-table:begin --> ... <!-- rbac-table:end --> table")
        return
    rows = [line for line in m.group(1).splitlines() if line.startswith("|")][2:]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != 6:
            fail(path, f"RBAC table row with {len(cells)} cells, expected 6: {line}")
            continue
        where, group, resource, verbs, names, _why = cells
        group = "" if group == "core" else group.strip("`")
        if where not in ("watched", "cluster", "default, elsewhere", "release, leader"):
            fail(path, f"RBAC table: unknown 'Where' {where!r}")
            continue
        RBAC_TABLE.append({
            "where": where,
            "group": group,
            "resource": resource.strip("`"),
            "verbs": [v.strip() for v in verbs.split(",")],
            "names": names,
        })
    if not RBAC_TABLE:
        fail(path, "the RBAC table has no rows")


def expected_permissions(release_ns: str, facts: dict, values: dict) -> set:
    """(scope, apiGroup, resource, verb, resourceName) the documented table grants this variant;
    scope "*" = cluster-wide, else a namespace."""
    watched = facts["watch"] or "*"
    perms = set()
    for row in RBAC_TABLE:
        where = row["where"]
        if where == "watched":
            scope = watched
        elif where == "cluster":
            scope = "*"
        elif where == "default, elsewhere":
            if watched in ("*", "default"):
                continue
            scope = "default"
        else:  # release, leader
            if not facts["leader"]:
                continue
            scope = release_ns
        names = row["names"]
        if names == "any":
            names_list = ["*"]
        elif names.startswith("`rbac.secretNames`"):
            names_list = values.get("rbac", {}).get("secretNames") or ["*"]
        else:
            names_list = [n.strip().strip("`") for n in names.split(",")]
        for v in row["verbs"]:
            for n in names_list:
                perms.add((scope, row["group"], row["resource"], v, n))
    return perms


def check_rbac(where: str, docs: list[dict], release_ns: str, sa: str, facts: dict, values: dict) -> None:
    roles = {}
    for d in docs:
        if d["kind"] == "Role":
            roles[("Role", d["metadata"].get("namespace"), d["metadata"]["name"])] = d
        elif d["kind"] == "ClusterRole":
            roles[("ClusterRole", None, d["metadata"]["name"])] = d
    granted = set()
    used_roles = set()
    for b in docs:
        if b["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        name = f"{b['kind']}/{b['metadata']['name']}"
        subjects = b.get("subjects", [])
        ours = any(
            s.get("kind") == "ServiceAccount" and s.get("name") == sa and s.get("namespace") == release_ns
            for s in subjects
        )
        if not ours:
            fail(where, f"{name} does not bind ServiceAccount {release_ns}/{sa}")
            continue
        ref = b["roleRef"]
        ns = b["metadata"].get("namespace") if b["kind"] == "RoleBinding" else None
        key = (ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])
        role = roles.get(key)
        if role is None:
            fail(where, f"{name} refers to {ref['kind']}/{ref['name']}, which is not rendered (namespace {ns})")
            continue
        used_roles.add(key)
        scope = ns or "*"
        for rule in role.get("rules", []):
            for g in rule.get("apiGroups", []):
                for r in rule.get("resources", []):
                    for v in rule.get("verbs", []):
                        for rn in rule.get("resourceNames") or ["*"]:
                            granted.add((scope, g, r, v, rn))
    for key in sorted(set(roles) - used_roles, key=str):
        fail(where, f"{key[0]}/{key[2]} is bound to nobody")
    # A cluster-wide grant covers every namespace: a namespaced copy of it is no extra right.
    granted = {p for p in granted if p[0] == "*" or ("*",) + p[1:] not in granted}
    want = expected_permissions(release_ns, facts, values)
    for p in sorted(granted - want):
        fail(where, f"RBAC grants more than the contract: {fmt_perm(p)}")
    for p in sorted(want - granted):
        fail(where, f"RBAC lacks a permission of the contract: {fmt_perm(p)}")


def check_hardening(where: str, docs: list[dict], dep: dict, facts: dict, pod_labels: dict, release_ns: str) -> None:
    """High availability, NetworkPolicy and the `helm test` Pod (docs/helm.md)."""
    pod = dep["spec"]["template"]["spec"]
    replicas = dep["spec"].get("replicas", 1)
    if replicas > 1:
        anti = pod.get("affinity", {}).get("podAntiAffinity", {})
        spread = pod.get("topologySpreadConstraints", [])
        terms = anti.get("requiredDuringSchedulingIgnoredDuringExecution", []) + [
            t.get("podAffinityTerm", {}) for t in anti.get("preferredDuringSchedulingIgnoredDuringExecution", [])
        ]
        if not any(matches(t.get("labelSelector", {}).get("matchLabels", {}), pod_labels) for t in terms) and not any(
            matches(c.get("labelSelector", {}).get("matchLabels", {}), pod_labels) for c in spread
        ):
            fail(where, f"{replicas} replicas, but no pod anti-affinity or topology spread selects the controller pods")
    ports = facts["ports"]
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        spec = np["spec"]
        if not matches(spec["podSelector"].get("matchLabels", {}), pod_labels):
            fail(where, "the NetworkPolicy selects no controller pod")
        if sorted(spec.get("policyTypes", [])) != ["Egress", "Ingress"]:
            fail(where, "the NetworkPolicy must restrict both Ingress and Egress")
        opened = {p.get("port") for r in spec.get("ingress", []) for p in r.get("ports", [])}
        if opened != set(ports):
            fail(where, f"the NetworkPolicy opens ports {sorted(map(str, opened))}, the container serves {sorted(ports)}")
        egress_ports = {p.get("port") for r in spec.get("egress", []) for p in r.get("ports", [])}
        if 53 not in egress_ports:
            fail(where, "the NetworkPolicy allows no DNS")
        for r in spec.get("egress", []):
            if not r.get("ports"):
                fail(where, f"a NetworkPolicy egress rule without ports allows everything: {r}")
    services = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"}
    tests = [d for d in docs if d["kind"] == "Pod"]
    for t in tests:
        tname = t["metadata"]["name"]
        if t["metadata"].get("annotations", {}).get("helm.sh/hook") != "test":
            fail(where, f"Pod {tname} is not a helm test hook")
        if matches(dep["spec"]["selector"]["matchLabels"], t["metadata"].get("labels", {})):
            fail(where, f"the test Pod {tname} carries the controller's selector labels: Services would route to it")
        args = t["spec"]["containers"][0].get("args", [])
        if args[:1] != ["check"] or len(args) < 3:
            fail(where, f"the test Pod {tname} runs {args}, expected `check` with at least one target")
        for flag, target in zip(args[1::2], args[2::2]):
            m = re.fullmatch(r"(?:http://)?([a-z0-9-]+)\.([a-z0-9-]+)\.svc:([0-9]+)(/readyz)?", target)
            if not m:
                fail(where, f"the test Pod checks {flag} {target}, not a Service of the release")
                continue
            svc = services.get(m.group(1))
            if svc is None or m.group(2) != release_ns:
                fail(where, f"the test Pod checks {target}, which is no rendered Service")
                continue
            targets = {p["port"]: p.get("targetPort") for p in svc["spec"]["ports"]}
            want = {"--http": "metrics", "--mqtt": "mqtt", "--tcp": "mqtts"}.get(flag)
            if targets.get(int(m.group(3))) != want:
                fail(where, f"the test Pod checks {flag} {target}, but that Service port targets {targets.get(int(m.group(3)))!r}, not {want!r}")


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def fmt_perm(p: tuple) -> str:
    scope, g, r, v, rn = p
    where = "cluster-wide" if scope == "*" else f"in namespace {scope}"
    name = "" if rn == "*" else f" (name {rn})"
    return f"{v} {r}.{g or 'core'}{name} {where}"


def first_difference(a, b, path: str = "") -> str | None:
    """Path of the first difference between two loaded YAML documents (types included)."""
    if type(a) is not type(b):
        return f"{path or '.'} ({a!r} vs {b!r})"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}.{k} (only on one side)"
            d = first_difference(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{path} (length {len(a)} vs {len(b)})"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{path} ({a!r} vs {b!r})"


def check_ssh_egress(where: str, docs: list[dict], values: dict) -> None:
    """The NetworkPolicy's SSH egress for NodeProvision (docs/helm.md): exactly one rule with
    the ports of networkPolicy.provisioning, to its CIDRs (any address when none), when it is
    enabled; none otherwise."""
    prov = values.get("networkPolicy", {}).get("provisioning", {})
    want_ports = sorted(prov.get("ports", [22]))
    for np in (d for d in docs if d["kind"] == "NetworkPolicy"):
        rules = [
            r for r in np["spec"].get("egress", [])
            if sorted(p.get("port") for p in r.get("ports", [])) == want_ports
        ]
        if not prov.get("enabled"):
            if rules:
                fail(where, f"SSH egress rendered with networkPolicy.provisioning.enabled false: {rules}")
            continue
        if len(rules) != 1:
            fail(where, f"expected one SSH egress rule on ports {want_ports}, rendered {len(rules)}")
            continue
        r = rules[0]
        if any(p.get("protocol") != "TCP" for p in r["ports"]):
            fail(where, f"the SSH egress rule is not TCP only: {r}")
        cidrs = [t.get("ipBlock", {}).get("cidr") for t in r.get("to", [])]
        if cidrs != list(prov.get("cidrs", [])):
            fail(where, f"the SSH egress rule goes to {cidrs}, networkPolicy.provisioning.cidrs says {prov.get('cidrs')}")


def check_variant(
    name: str, path: str, expect: str, custom_kinds: dict, profiles: dict, work: str, seen: set,
    values: dict,
) -> list[dict]:
    """Returns the variant's custom resources; writes its built-in objects for kubernetes-validate
    (those no earlier variant rendered identically: `seen`)."""
    where = f"variant {name}"
    try:
        docs = load_docs(path)
    except yaml.YAMLError as e:
        fail(where, f"rendered output is not YAML: {e}")
        return []
    counts: dict[str, int] = {}
    builtin, custom = [], []
    for d in docs:
        for key in ("apiVersion", "kind", "metadata"):
            if key not in d:
                fail(where, f"an object has no {key}: {str(d)[:80]}")
                break
        else:
            counts[d["kind"]] = counts.get(d["kind"], 0) + 1
            (custom if (d["apiVersion"], d["kind"]) in custom_kinds or (d["apiVersion"], d["kind"]) in FOREIGN_CUSTOM
             else builtin).append(d)
    docs = builtin + custom
    for item in expect.split():
        kind, _, n = item.partition("=")
        if counts.get(kind, 0) != int(n):
            fail(where, f"expected {n} {kind}, rendered {counts.get(kind, 0)}")

    deps = [d for d in docs if d["kind"] == "Deployment"]
    if len(deps) != 1:
        fail(where, f"expected one Deployment, rendered {len(deps)}")
        return custom
    dep = deps[0]
    release_ns = dep["metadata"].get("namespace")
    pod_labels = dep["spec"]["template"]["metadata"].get("labels", {})
    if not matches(dep["spec"]["selector"].get("matchLabels", {}), pod_labels):
        fail(where, "the Deployment's selector does not match its pods")
    facts = check_contract(where, dep)
    sa = dep["spec"]["template"]["spec"].get("serviceAccountName", "default")
    sas = [d for d in docs if d["kind"] == "ServiceAccount"]
    if sas and [s["metadata"]["name"] for s in sas] != [sa]:
        fail(where, f"ServiceAccount {[s['metadata']['name'] for s in sas]} is not the pods' {sa}")
    check_rbac(where, docs, release_ns, sa, facts, values)
    check_hardening(where, docs, dep, facts, pod_labels, release_ns)
    check_ssh_egress(where, docs, values)

    services = [d for d in docs if d["kind"] == "Service"]
    for s in services:
        sname = s["metadata"]["name"]
        if not DNS_LABEL_1035.match(sname) or len(sname) > 63:
            fail(where, f"Service name {sname!r} is not a DNS-1035 label")
        if not matches(s["spec"].get("selector", {}), pod_labels):
            fail(where, f"Service {sname} selects no controller pod")
        for p in s["spec"]["ports"]:
            if p.get("targetPort") not in facts["ports"]:
                fail(where, f"Service {sname} targets port {p.get('targetPort')!r}, which the container does not name")
    mqtt = [s for s in services if any(p.get("targetPort") in ("mqtt", "mqtts") for p in s["spec"]["ports"])]
    if facts["embedded"] != bool(mqtt):
        fail(where, f"embedded broker is {facts['embedded']}, but {len(mqtt)} MQTT Service(s) rendered")
    if facts["tls_only"]:
        for s in mqtt:
            for p in s["spec"]["ports"]:
                if p.get("targetPort") != "mqtts" or p.get("port") == 1883:
                    fail(where, f"TLS is on, but Service {s['metadata']['name']} exposes {p}: no plaintext MQTT")

    replicas = dep["spec"].get("replicas", 1)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    for p in pdbs:
        if not matches(p["spec"]["selector"].get("matchLabels", {}), pod_labels):
            fail(where, "the PodDisruptionBudget selects no controller pod")
    if pdbs and replicas < 2:
        fail(where, "a PodDisruptionBudget for a single pod blocks node drains")
    if replicas > 1 and not facts["leader"]:
        fail(where, "several replicas without leader election")
    strategy = dep["spec"].get("strategy", {}).get("type")
    if not facts["leader"] and strategy != "Recreate":
        fail(where, "without leader election the Deployment must use the Recreate strategy")

    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        sel = sm["spec"]["selector"].get("matchLabels", {})
        targets = [s for s in services if matches(sel, s["metadata"].get("labels", {}))]
        if len(targets) != 1:
            fail(where, f"the ServiceMonitor selects {len(targets)} Services, expected the metrics Service")
            continue
        names = {p.get("name") for p in targets[0]["spec"]["ports"]}
        for ep in sm["spec"].get("endpoints", []):
            if ep.get("port") not in names:
                fail(where, f"the ServiceMonitor scrapes port {ep.get('port')!r}, which Service {targets[0]['metadata']['name']} does not name")

    for d in docs:
        kind, meta = d["kind"], d["metadata"]
        obj = f"{kind}/{meta.get('name')}"
        if not DNS_SUBDOMAIN.match(str(meta.get("name", ""))) or len(meta.get("name", "")) > 253:
            fail(where, f"{obj}: invalid name")
        key = (d["apiVersion"], kind)
        cluster = kind in CLUSTER_SCOPED_BUILTIN or (key in custom_kinds and custom_kinds[key]["scope"] == "Cluster")
        if cluster and "namespace" in meta:
            fail(where, f"{obj} is cluster-scoped but has a namespace")
        if not cluster and not meta.get("namespace"):
            fail(where, f"{obj} has no namespace")

    rendered_profiles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "HardwareProfile"}
    if rendered_profiles and set(rendered_profiles) != set(profiles):
        fail(where, f"rendered HardwareProfiles {sorted(rendered_profiles)} differ from hardware-profiles/ {sorted(profiles)}")
    for pname, d in rendered_profiles.items():
        if pname not in profiles:
            continue
        d = copy.deepcopy(d)
        d["metadata"].pop("labels", None)
        diff = first_difference(profiles[pname], d)
        if diff is not None:
            fail(where, f"HardwareProfile {pname} as rendered differs from hardware-profiles/ at {diff}")

    new = []
    for d in builtin:
        key = json.dumps(d, sort_keys=True)
        if key not in seen:
            seen.add(key)
            new.append(d)
    if new:
        with open(os.path.join(work, "builtin", f"{name}.yaml"), "w", encoding="utf-8") as f:
            yaml.dump_all(new, f, Dumper=DUMPER, sort_keys=False)
    return custom


def main(argv: list[str]) -> int:
    if len(argv) < 5:
        print(__doc__, file=sys.stderr)
        return 2
    work, crd_dir, variants_tsv, profiles_dir, *examples = argv[1:]
    load_rbac_table(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "helm.md"))
    with open(os.path.join(crd_dir, "..", "values.yaml"), encoding="utf-8") as f:
        defaults = yaml.load(f, Loader=LOADER)
    for sub in ("schemas", "builtin", "custom"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)

    custom_kinds: dict[tuple, dict] = {}
    for path in sorted(glob.glob(os.path.join(crd_dir, "*.yaml"))):
        for crd in load_docs(path):
            api_version, kind, schema = crd_json_schema(crd)
            schema_path = os.path.join(work, "schemas", f"{kind}.json")
            with open(schema_path, "w", encoding="utf-8") as f:
                json.dump(schema, f, indent=1)
            custom_kinds[(api_version, kind)] = {"schema": schema_path, "scope": crd["spec"]["scope"]}

    profiles: dict[str, dict] = {}
    for path in glob.glob(os.path.join(profiles_dir, "*.yaml")):
        for d in load_docs(path):
            profiles[d["metadata"]["name"]] = d

    # Custom resources to validate, de-duplicated (every variant renders the same profiles).
    customs: dict[str, tuple[str, dict]] = {}

    def add_custom(label: str, doc: dict) -> None:
        key = json.dumps(doc, sort_keys=True)
        if key not in customs:
            customs[key] = (label, doc)

    variants = 0
    seen_builtin: set[str] = set()
    with open(variants_tsv, encoding="utf-8") as f:
        for line in f:
            name, path, expect, values_file = (line.rstrip("\n").split("\t") + ["", ""])[:4]
            variants += 1
            values = defaults
            if values_file:
                with open(values_file, encoding="utf-8") as vf:
                    values = deep_merge(defaults, yaml.load(vf, Loader=LOADER) or {})
            for i, d in enumerate(check_variant(name, path, expect, custom_kinds, profiles, work, seen_builtin, values)):
                add_custom(f"{name}#{i}-{d['metadata']['name']}", d)

    example_builtin = []
    for path in examples:
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            fail(path, f"not YAML: {e}")
            continue
        for i, d in enumerate(docs):
            key = (d.get("apiVersion"), d.get("kind"))
            if key in custom_kinds:
                add_custom(f"{path.replace('/', '_')}#{i}-{d.get('metadata', {}).get('name')}", d)
            elif str(d.get("apiVersion", "")).startswith("sidenet.io/"):
                fail(path, f"document {i}: no CRD defines {key[0]} {key[1]}")
            else:
                example_builtin.append(d)
    if example_builtin:
        with open(os.path.join(work, "builtin", "examples.yaml"), "w", encoding="utf-8") as f:
            yaml.dump_all(example_builtin, f, Dumper=DUMPER, sort_keys=False)

    by_kind: dict[tuple, list[str]] = {}
    checked = 0
    for label, doc in customs.values():
        key = (doc["apiVersion"], doc["kind"])
        if key in FOREIGN_CUSTOM:
            continue  # no schema here; references were checked above
        d = os.path.join(work, "custom", doc["kind"])
        os.makedirs(d, exist_ok=True)
        out = os.path.join(d, re.sub(r"[^A-Za-z0-9_.#-]", "_", label) + ".json")
        with open(out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        by_kind.setdefault(key, []).append(out)
        checked += 1
    with open(os.path.join(work, "custom.tsv"), "w", encoding="utf-8") as f:
        for key, files in sorted(by_kind.items()):
            f.write("\t".join([custom_kinds[key]["schema"], *files]) + "\n")
    with open(os.path.join(work, "counts"), "w", encoding="utf-8") as f:
        f.write(f"{variants} {checked}\n")

    for msg in failures:
        print(f"FAIL {msg}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
