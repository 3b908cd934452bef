"""Validates the Kubernetes manifests offline: renders each overlay with `kubectl kustomize`, then
checks every object against a schema and the objects against each other.

- Kubernetes' own kinds: `kubernetes-validate` (PyPI; the published OpenAPI schemas ship inside
  the package), strict (unknown fields are errors), for the oldest and newest versions supported.
- GIE's InferencePool (v1) and InferenceObjective (v1alpha2): the openAPIV3Schema vendored from
  GIE's CRDs in schemas/, with the CRDs' CEL rules checked here.
- Gateway API's Gateway and HTTPRoute: schemas/gateway-api-v1.yaml, written from the documented
  fields (not vendored: the search for Gateway API's CRDs found none to vendor).
- Across objects: the pool selects the model-server pods on their port, its endpointPickerRef is
  the EPP's Service and port, the EPP serves that pool, the route's backend is the pool, the
  grace period covers the drain, the probes and the security context are there.

Then a self-test: broken copies of the first render (a typo, a wrong port, a selector that
misses, ...) must each be reported.

Usage: python deploy/check/validate.py [OVERLAY_DIR ...]   (default: both overlays)
Exits non-zero when an overlay has errors (all are printed) or a broken render passes.
"""

import copy
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
OVERLAYS = ["deploy/kubernetes/overlays/cpu", "deploy/kubernetes/overlays/gpu"]
# 1.30: the first release whose preStop `sleep` action is on by default.
K8S_VERSIONS = ["1.30.0", "1.37.0"]
SCHEMAS = {
    ("inference.networking.k8s.io/v1", "InferencePool"): "inferencepool.inference.networking.k8s.io-v1.yaml",
    ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"): "inferenceobjective.inference.networking.x-k8s.io-v1alpha2.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-api-v1.yaml#Gateway",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway-api-v1.yaml#HTTPRoute",
}


def strict(schema):
    """A structural CRD schema prunes unknown fields, and the API server's strict field validation
    (kubectl's default) refuses them: so do we, by closing every object that lists properties."""
    s = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for k, v in node.items():
                if k != "metadata":
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(s)
    # metadata stays open at the top: Kubernetes validates it.
    return s


def load_schema(ref):
    name, _, kind = ref.partition("#")
    with open(os.path.join(HERE, "schemas", name)) as f:
        doc = yaml.safe_load(f)
    return strict(doc[kind] if kind else doc)


def cel_rules(obj):
    """The CEL rules (x-kubernetes-validations) of the vendored CRD schemas."""
    errors = []
    if obj["kind"] == "InferencePool":
        spec = obj["spec"]
        ref = spec["endpointPickerRef"]
        if ref.get("kind", "Service") == "Service" and "port" not in ref:
            errors.append("endpointPickerRef: port is required when kind is 'Service' or unspecified")
        numbers = [p["number"] for p in spec["targetPorts"]]
        if len(numbers) != len(set(numbers)):
            errors.append("targetPorts: port number must be unique")
    return errors


def render(overlay):
    out = subprocess.run(["kubectl", "kustomize", overlay], cwd=ROOT, check=True, capture_output=True, text=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(objs, kind, name=None):
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs, kind, name):
    found = by_kind(objs, kind, name)
    if len(found) != 1:
        raise AssertionError(f"expected one {kind} {name}, found {len(found)}")
    return found[0]


def seconds(v):
    m = re.fullmatch(r"(\d+(?:\.\d+)?)", str(v))
    if not m:
        raise AssertionError(f"not a number of seconds: {v!r}")
    return float(m.group(1))


def cross_checks(objs):
    """What no schema sees: the objects must name each other right."""
    errors = []

    def check(cond, msg):
        if not cond:
            errors.append(msg)

    pool = one(objs, "InferencePool", "quiver")
    server = one(objs, "Deployment", "quiver")
    epp = one(objs, "Deployment", "quiver-epp")
    pod = server["spec"]["template"]
    labels = pod["metadata"]["labels"]
    sel = pool["spec"]["selector"]["matchLabels"]
    check(all(labels.get(k) == v for k, v in sel.items()), f"InferencePool selector {sel} misses the pods {labels}")
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "quiver")
    ports = {p["containerPort"] for p in container.get("ports", [])}
    for p in pool["spec"]["targetPorts"]:
        check(p["number"] in ports, f"InferencePool targetPort {p['number']} is not a container port {ports}")

    ref = pool["spec"]["endpointPickerRef"]
    svc = one(objs, "Service", ref["name"])
    svc_ports = {p["port"] for p in svc["spec"]["ports"]}
    check(ref["port"]["number"] in svc_ports, f"endpointPickerRef port {ref['port']['number']} not on Service {ref['name']}")
    epp_labels = epp["spec"]["template"]["metadata"]["labels"]
    check(all(epp_labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "EPP Service does not select the EPP pods")
    epp_args = epp["spec"]["template"]["spec"]["containers"][0]["args"]
    check(f"--pool-name={pool['metadata']['name']}" in epp_args, "EPP --pool-name is not the InferencePool")
    sa = epp["spec"]["template"]["spec"]["serviceAccountName"]
    bound = [b for b in by_kind(objs, "RoleBinding") if any(s["name"] == sa for s in b["subjects"])]
    check(bound, f"no RoleBinding for the EPP's ServiceAccount {sa}")
    for b in bound:
        for s in b["subjects"]:
            check(s.get("namespace") == pool["metadata"]["namespace"], f"RoleBinding {b['metadata']['name']}: subject in another namespace")
    config_map = epp["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    cfg = yaml.safe_load(one(objs, "ConfigMap", config_map)["data"]["config.yaml"])
    check(cfg.get("kind") == "EndpointPickerConfig", "EPP config is not an EndpointPickerConfig")
    plugin_types = {p["type"] for p in cfg["plugins"]}
    for want in ["queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer"]:
        check(want in plugin_types, f"EPP config lacks {want}")

    route = one(objs, "HTTPRoute", "quiver")
    backends = [b for r in route["spec"]["rules"] for b in r["backendRefs"]]
    check(any(b.get("kind") == "InferencePool" and b["name"] == pool["metadata"]["name"] for b in backends), "HTTPRoute does not route to the InferencePool")
    gw = {p["name"] for p in route["spec"]["parentRefs"]}
    check(any(g["metadata"]["name"] in gw for g in by_kind(objs, "Gateway")), "HTTPRoute's parent Gateway is not rendered")
    for o in by_kind(objs, "InferenceObjective"):
        check(o["spec"]["poolRef"]["name"] == pool["metadata"]["name"], f"InferenceObjective {o['metadata']['name']} names another pool")

    # The drain: preStop sleep + --shutdown-timeout must fit in the grace period.
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    drain = seconds(env.get("QUIVER_SHUTDOWN_TIMEOUT", 30))
    pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(grace >= drain + pre_stop + 5, f"terminationGracePeriodSeconds {grace} < preStop {pre_stop} + --shutdown-timeout {drain} + 5")
    check(epp["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30) >= grace, "the EPP leaves before the pool drains")
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"]:
        check(container.get(probe, {}).get("httpGet", {}).get("path") == "/health", f"{probe} is not on /health")
    sc = container.get("securityContext", {})
    check(sc.get("readOnlyRootFilesystem") is True, "root file system is writable")
    check(sc.get("allowPrivilegeEscalation") is False, "privilege escalation allowed")
    check(sc.get("capabilities", {}).get("drop") == ["ALL"], "capabilities not dropped")
    check(pod["spec"]["securityContext"].get("runAsNonRoot") is True, "may run as root")
    mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
    root = next((a.split("=", 1)[1] for a in container.get("args", []) if a.startswith("--adapter-root=")), None)
    check(root is not None and any(m["mountPath"] == root and m.get("readOnly") for m in mounts.values()), "--adapter-root is not a read-only mount")
    keys = {e["name"]: e for e in container.get("env", [])}
    for k in ["QUIVER_API_KEY", "QUIVER_ADMIN_API_KEY"]:
        check("secretKeyRef" in keys.get(k, {}).get("valueFrom", {}), f"{k} does not come from a Secret")
    pdbs = [p for p in by_kind(objs, "PodDisruptionBudget") if all(labels.get(k) == v for k, v in p["spec"]["selector"]["matchLabels"].items())]
    check(pdbs, "no PodDisruptionBudget covers the model servers")
    return errors


def check(objs):
    """Every error in a rendered overlay: schemas, CEL rules, cross-checks."""
    errors = []
    for obj in objs:
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        key = (obj["apiVersion"], obj["kind"])
        if key in SCHEMAS:
            v = jsonschema.Draft7Validator(load_schema(SCHEMAS[key]))
            errors += [f"{what}: {'/'.join(map(str, e.path))}: {e.message}" for e in v.iter_errors(obj)]
            errors += [f"{what}: {e}" for e in cel_rules(obj)]
            continue
        for version in K8S_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                errors.append(f"{what} (Kubernetes {version}): {e.message} at {'/'.join(map(str, e.path))}")
            except kubernetes_validate.SchemaNotFoundError:
                errors.append(f"{what}: no schema for {key} in Kubernetes {version}")
    try:
        errors += cross_checks(objs)
    except (AssertionError, KeyError, IndexError, TypeError, StopIteration) as e:
        errors.append(f"cross-checks: {e!r}")
    return errors


def validate(overlay):
    objs = render(overlay)
    errors = check(objs)
    kinds = sorted({o["kind"] for o in objs})
    status = "ok" if not errors else f"{len(errors)} errors"
    print(f"{overlay}: {len(objs)} objects ({', '.join(kinds)}): {status}")
    for e in errors:
        print(f"  {e}")
    return not errors


def find(objs, kind, name):
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def server_container(objs):
    return find(objs, "Deployment", "quiver")["spec"]["template"]["spec"]["containers"][0]


# Each breaks one thing the checks must catch (a checker that passes everything proves nothing).
MUTATIONS = {
    "typo in a Deployment field": lambda o: find(o, "Deployment", "quiver")["spec"]["template"]["spec"].update(terminationGracePeriod=45),
    "wrong type in a Service": lambda o: find(o, "Service", "quiver")["spec"]["ports"][0].update(port="8000"),
    "InferencePool port out of range": lambda o: find(o, "InferencePool", "quiver")["spec"]["targetPorts"][0].update(number=0),
    "InferencePool unknown field": lambda o: find(o, "InferencePool", "quiver")["spec"].update(extensionRef={"name": "x"}),
    "InferencePool without picker port (CEL)": lambda o: find(o, "InferencePool", "quiver")["spec"]["endpointPickerRef"].pop("port"),
    "InferencePool duplicate ports (CEL)": lambda o: find(o, "InferencePool", "quiver")["spec"]["targetPorts"].append({"number": 8000}),
    "InferenceObjective without poolRef": lambda o: find(o, "InferenceObjective", "interactive")["spec"].pop("poolRef"),
    "HTTPRoute bad timeout": lambda o: find(o, "HTTPRoute", "quiver")["spec"]["rules"][0]["timeouts"].update(request="10 minutes"),
    "pool selects no pod": lambda o: find(o, "InferencePool", "quiver")["spec"]["selector"]["matchLabels"].update({"app.kubernetes.io/name": "vllm"}),
    "pool on a port the pods lack": lambda o: find(o, "InferencePool", "quiver")["spec"]["targetPorts"][0].update(number=8080),
    "EPP serves another pool": lambda o: find(o, "Deployment", "quiver-epp")["spec"]["template"]["spec"]["containers"][0]["args"].__setitem__(0, "--pool-name=other"),
    "grace period shorter than the drain": lambda o: find(o, "Deployment", "quiver")["spec"]["template"]["spec"].update(terminationGracePeriodSeconds=30),
    "writable root file system": lambda o: server_container(o)["securityContext"].update(readOnlyRootFilesystem=False),
    "adapters mounted read-write": lambda o: server_container(o)["volumeMounts"][0].pop("readOnly"),
    "API key in plain text": lambda o: [e.update(value="k") or e.pop("valueFrom") for e in server_container(o)["env"] if e["name"] == "QUIVER_API_KEY"],
}


def self_test(overlay):
    """Every mutation of a valid render must be reported."""
    base = render(overlay)
    missed = []
    for name, mutate in MUTATIONS.items():
        objs = copy.deepcopy(base)
        mutate(objs)
        if not check(objs):
            missed.append(name)
    print(f"self-test: {len(MUTATIONS) - len(missed)}/{len(MUTATIONS)} broken renders of {overlay} caught")
    for m in missed:
        print(f"  NOT caught: {m}")
    return not missed


def main():
    overlays = sys.argv[1:] or OVERLAYS
    ok = all([validate(o) for o in overlays]) and self_test(overlays[0])
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
