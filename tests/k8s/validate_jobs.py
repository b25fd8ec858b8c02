#!/usr/bin/env python3
"""Check Kubernetes manifests against the batch/v1 Job schema (the parts loracomp writes, by hand: required
fields, field types, unknown fields refused, Indexed-Job rules), without a cluster or a download.

Usage: validate_jobs.py FILE.yaml...   exit 0: valid; 1: invalid (each problem printed); 3: PyYAML missing.
"""
import sys

try:
    import yaml
except ImportError:
    print("PyYAML is not installed", file=sys.stderr)
    sys.exit(3)

# A schema node: ("object", {field: (schema, required)}) | ("array", item) | ("map", value) | "string" | "int" | "bool"
# | ("enum", [values]) | ("int", min). Unknown fields of an object are errors (as `kubectl apply --validate=strict`).
S, I, B = "string", ("int", None), "bool"


def obj(fields, required=()):
    return ("object", {k: (v, k in required) for k, v in fields.items()})


labels = ("map", S)
meta = obj({"name": S, "generateName": S, "namespace": S, "labels": labels, "annotations": labels})
env_var = obj({"name": S, "value": S}, required=("name",))
mount = obj({"name": S, "mountPath": S, "readOnly": B, "subPath": S}, required=("name", "mountPath"))
resources = obj({"limits": ("map", S), "requests": ("map", S)})
container = obj(
    {
        "name": S,
        "image": S,
        "command": ("array", S),
        "args": ("array", S),
        "workingDir": S,
        "env": ("array", env_var),
        "volumeMounts": ("array", mount),
        "resources": resources,
        "imagePullPolicy": ("enum", ["Always", "IfNotPresent", "Never"]),
    },
    required=("name",),
)
host_path = obj(
    {
        "path": S,
        "type": (
            "enum",
            ["", "DirectoryOrCreate", "Directory", "FileOrCreate", "File", "Socket", "CharDevice", "BlockDevice"],
        ),
    },
    required=("path",),
)
pvc = obj({"claimName": S, "readOnly": B}, required=("claimName",))
volume = obj({"name": S, "hostPath": host_path, "persistentVolumeClaim": pvc}, required=("name",))
pod_spec = obj(
    {
        "restartPolicy": ("enum", ["Always", "OnFailure", "Never"]),
        "containers": ("array", container),
        "volumes": ("array", volume),
        "nodeSelector": labels,
        "serviceAccountName": S,
    },
    required=("containers",),
)
template = obj({"metadata": meta, "spec": pod_spec}, required=("spec",))
job_spec = obj(
    {
        "completionMode": ("enum", ["NonIndexed", "Indexed"]),
        "completions": ("int", 0),
        "parallelism": ("int", 0),
        "backoffLimit": ("int", 0),
        "backoffLimitPerIndex": ("int", 0),
        "activeDeadlineSeconds": ("int", 1),
        "ttlSecondsAfterFinished": ("int", 0),
        "template": template,
    },
    required=("template",),
)
job = obj(
    {"apiVersion": ("enum", ["batch/v1"]), "kind": ("enum", ["Job"]), "metadata": meta, "spec": job_spec},
    required=("apiVersion", "kind", "metadata", "spec"),
)


def check(node, v, path, errs):
    if node == S:
        if not isinstance(v, str):
            errs.append(f"{path}: expected a string, found {type(v).__name__}")
    elif node == B:
        if not isinstance(v, bool):
            errs.append(f"{path}: expected a boolean")
    elif node[0] == "int":
        if not isinstance(v, int) or isinstance(v, bool):
            errs.append(f"{path}: expected an integer, found {v!r}")
        elif node[1] is not None and v < node[1]:
            errs.append(f"{path}: {v} is below {node[1]}")
    elif node[0] == "enum":
        if v not in node[1]:
            errs.append(f"{path}: {v!r} is not one of {node[1]}")
    elif node[0] == "array":
        if not isinstance(v, list):
            errs.append(f"{path}: expected a list")
        else:
            for i, x in enumerate(v):
                check(node[1], x, f"{path}[{i}]", errs)
    elif node[0] == "map":
        if not isinstance(v, dict):
            errs.append(f"{path}: expected a map")
        else:
            for k, x in v.items():
                check(node[1], x, f"{path}.{k}", errs)
    elif node[0] == "object":
        if not isinstance(v, dict):
            errs.append(f"{path}: expected an object")
            return
        for k, (sub, req) in node[1].items():
            if k in v:
                check(sub, v[k], f"{path}.{k}", errs)
            elif req:
                errs.append(f"{path}.{k}: required")
        for k in v:
            if k not in node[1]:
                errs.append(f"{path}.{k}: unknown field")


def rules(doc, errs):
    """Rules the API server enforces beyond types."""
    import re

    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errs.append(f"metadata.name: '{name}' is not a DNS-1123 label of at most 63 characters (Indexed Jobs)")
    spec = doc.get("spec", {})
    if spec.get("completionMode") == "Indexed" and not isinstance(spec.get("completions"), int):
        errs.append("spec.completions: required when completionMode is Indexed")
    pod = spec.get("template", {}).get("spec", {})
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        errs.append("spec.template.spec.restartPolicy: a Job's pods must be Never or OnFailure")
    vols = {v.get("name") for v in pod.get("volumes", [])}
    for v in pod.get("volumes", []):
        if ("hostPath" in v) == ("persistentVolumeClaim" in v):
            errs.append(f"volume {v.get('name')}: exactly one source (hostPath or persistentVolumeClaim)")
    for c in pod.get("containers", []):
        if not c.get("image"):
            errs.append(f"container {c.get('name')}: image required")
        for m in c.get("volumeMounts", []):
            if m.get("name") not in vols:
                errs.append(f"container {c.get('name')}: volumeMount {m.get('name')} names no volume")
            if not str(m.get("mountPath", "")).startswith("/"):
                errs.append(f"container {c.get('name')}: mountPath must be absolute")


def main():
    bad = 0
    for f in sys.argv[1:]:
        with open(f) as fh:
            docs = [d for d in yaml.safe_load_all(fh) if d is not None]
        if not docs:
            print(f"{f}: no document")
            bad += 1
        for d in docs:
            errs = []
            check(job, d, "", errs)
            rules(d, errs)
            for e in errs:
                print(f"{f}: {e}")
            bad += len(errs)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
