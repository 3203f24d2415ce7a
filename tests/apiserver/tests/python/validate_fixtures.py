"""Validates every YAML file in a directory against real schemas.

Built-in kinds go through `kubernetes-validate` (strict: unknown fields
fail) for the given Kubernetes version; objects of a CustomResourceDefinition
found among the files are checked against that CRD's openAPIV3Schema with
jsonschema. Anything without a schema fails. Prints one line per object and
exits non-zero on any failure.

  validate_fixtures.py KUBERNETES_VERSION DIR...
"""

import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml


def main(argv):
    version = argv[1]
    docs = []
    for directory in map(pathlib.Path, argv[2:]):
        for path in sorted(directory.glob("*.yaml")):
            with open(path) as f:
                docs += [(str(path), d) for d in yaml.safe_load_all(f) if d]
    crd_schemas = {}
    for _, d in docs:
        if d.get("kind") == "CustomResourceDefinition":
            spec = d["spec"]
            for v in spec["versions"]:
                key = (f"{spec['group']}/{v['name']}", spec["names"]["kind"])
                crd_schemas[key] = v["schema"]["openAPIV3Schema"]
    failed = 0
    for name, d in docs:
        what = f"{name}: {d.get('kind')}/{d.get('metadata', {}).get('name')}"
        key = (d.get("apiVersion"), d.get("kind"))
        try:
            if key in crd_schemas:
                jsonschema.validate(d, crd_schemas[key])
            else:
                kubernetes_validate.validate(d, version, strict=True)
            print(f"ok {what}")
        except Exception as e:  # every failure kind is reported alike
            failed += 1
            # jsonschema's str() dumps the whole schema; its message is enough.
            where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
            message = getattr(e, "message", str(e))
            print(f"FAILED {what}: {type(e).__name__} at {where or '.'}: {message}")
    if not docs:
        print(f"FAILED no YAML documents in {argv[2:]}")
        failed += 1
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv)
