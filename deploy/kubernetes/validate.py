"""Validates Kubernetes manifests offline, strictly (an unknown field is an error):

- Kubernetes' own kinds against the schemas of Kubernetes KUBERNETES_VERSION that the
  kubernetes-validate package ships;
- KServe's ServingRuntime/ClusterServingRuntime and InferenceService, KEDA's ScaledObject and the
  Prometheus Operator's PodMonitor against schemas/: the fields sdserve's manifests may use, with
  containers, probes, volumes and selectors held to Kubernetes' own definitions.

A document of any other kind is an error. Usage:

    python validate.py [--dump] PATH...   (files, or folders searched for *.yaml)

Prints one line per document and exits 1 if any failed; with --dump, prints the documents as
JSON ({file: [documents]}) instead, after they all passed.
"""

import json
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from importlib_resources import files
from referencing import Registry, Resource

KUBERNETES_VERSION = "1.33.0"
HERE = Path(__file__).resolve().parent

# (apiVersion, kind) -> schema file under schemas/
CUSTOM = {
    ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"): "serving-runtime.json",
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): "serving-runtime.json",
    ("serving.kserve.io/v1beta1", "InferenceService"): "inference-service.json",
    ("keda.sh/v1alpha1", "ScaledObject"): "scaled-object.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "pod-monitor.json",
}


def kubernetes_definitions() -> Registry:
    """Kubernetes' definitions, under the URI kubernetes-validate's schemas refer to them by."""
    folder = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())
    return Resource.from_contents(definitions) @ Registry()


def most_relevant(e: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """Inside a oneOf, the error of the branch that came closest, not "valid under none"."""
    while e.context:
        e = jsonschema.exceptions.best_match(e.context)
    return e


def check_custom(doc: dict, schema_file: str, registry: Registry) -> list[str]:
    schema = json.loads((HERE / "schemas" / schema_file).read_text())
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [
        f"{'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
        for e in map(most_relevant, errors)
    ]


def check_builtin(doc: dict) -> list[str]:
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return []
    except kubernetes_validate.ValidationError as e:
        return [f"{'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]


def manifests(paths: list[str]) -> list[Path]:
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(p.rglob("*.yaml")))
        else:
            found.append(p)
    return found


def main(argv: list[str]) -> int:
    dump = "--dump" in argv
    paths = [a for a in argv if a != "--dump"]
    if not paths:
        print(__doc__, file=sys.stderr)
        return 2
    registry = kubernetes_definitions()
    failed = 0
    documents: dict[str, list[dict]] = {}
    for path in manifests(paths):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        if not docs:
            print(f"ERROR {path}: no document")
            failed += 1
        documents[str(path)] = docs
        for doc in docs:
            if not isinstance(doc, dict) or "apiVersion" not in doc or "kind" not in doc:
                print(f"ERROR {path}: a document without apiVersion and kind")
                failed += 1
                continue
            key = (doc["apiVersion"], doc["kind"])
            name = doc.get("metadata", {}).get("name", "?")
            errors = check_custom(doc, CUSTOM[key], registry) if key in CUSTOM else check_builtin(doc)
            if errors:
                failed += 1
                for e in errors:
                    print(f"ERROR {path}: {doc['kind']}/{name}: {e}")
            elif not dump:
                print(f"ok    {path}: {doc['kind']}/{name}")
    if failed:
        print(f"{failed} document(s) failed")
        return 1
    if dump:
        print(json.dumps(documents))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
