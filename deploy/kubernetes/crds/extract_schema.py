"""Extract a CRD's openAPIV3Schema into the compressed JSON file that tests/test_kubernetes.py validates against.

    python deploy/kubernetes/crds/extract_schema.py CRD.yaml OUT.schema.json.gz

Takes the version that the API server stores (the one `kubectl apply` validates against) and writes it with sorted
keys and no timestamp, so that the same CRD always gives the same bytes.
"""

import gzip
import json
import sys

import yaml


def main(crd_path: str, out_path: str) -> None:
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = {"group": crd["spec"]["group"], "kind": crd["spec"]["names"]["kind"], "version": version["name"],
              "openAPIV3Schema": version["schema"]["openAPIV3Schema"]}
    text = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    with open(out_path, "wb") as f:
        f.write(gzip.compress(text, compresslevel=9, mtime=0))


if __name__ == "__main__":
    main(*sys.argv[1:])
