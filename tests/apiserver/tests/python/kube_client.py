"""Drives the stand-in API server with the Python `kubernetes` client.

Run by tests/python_client.rs with the venv's python; each command prints
one JSON document that the Rust test asserts on.

  kube_client.py watch URL NAMESPACE      watch pods until one is deleted
  kube_client.py gone URL NAMESPACE RV [--timeout]
                                          watch from a compacted version
  kube_client.py crud URL NAMESPACE       create, list, page, patch, delete
  kube_client.py crd URL NAMESPACE CRD_YAML OBJECT_YAML
                                          a CRD, then its objects
"""

import json
import sys

from kubernetes import client, watch
from kubernetes.client.rest import ApiException


def core_api(url):
    config = client.Configuration()
    config.host = url
    return client.CoreV1Api(client.ApiClient(config))


def cmd_watch(url, namespace):
    v1 = core_api(url)
    listed = v1.list_namespaced_pod(namespace)
    rv = listed.metadata.resource_version
    print("WATCHING", rv, flush=True)
    events = []
    w = watch.Watch()
    for event in w.stream(v1.list_namespaced_pod, namespace,
                          resource_version=rv, timeout_seconds=30,
                          allow_watch_bookmarks=True):
        pod = event["object"]
        # Typed decoding must work: the model class, not a dict.
        assert isinstance(pod, client.V1Pod), type(pod)
        events.append([event["type"], pod.metadata.name,
                       pod.metadata.labels or {}])
        if event["type"] == "DELETED":
            w.stop()
    print(json.dumps({"listed_rv": rv, "events": events}))


def cmd_gone(url, namespace, rv, timeout):
    v1 = core_api(url)
    kwargs = {"resource_version": rv}
    if timeout:
        # With timeout_seconds the client never retries after a 410.
        kwargs["timeout_seconds"] = 5
    try:
        for event in watch.Watch().stream(v1.list_namespaced_pod, namespace,
                                          **kwargs):
            print(json.dumps({"unexpected": event["type"]}))
            return
    except ApiException as e:
        print(json.dumps({"status": e.status, "reason": e.reason}))
        return
    print(json.dumps({"ended": True}))


def pod(name, labels, node):
    return client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(
            node_name=node,
            containers=[client.V1Container(name="c", image="i")]))


def cmd_crud(url, namespace):
    v1 = core_api(url)
    out = {}
    for i, (app, node) in enumerate([("web", "a"), ("web", "b"), ("db", "a")]):
        v1.create_namespaced_pod(namespace, pod(f"py{i}", {"app": app}, node))
    try:
        v1.create_namespaced_pod(namespace, pod("py0", {}, "a"))
    except ApiException as e:
        out["duplicate"] = [e.status, json.loads(e.body)["reason"]]
    names = lambda lst: [p.metadata.name for p in lst.items]
    out["web"] = names(v1.list_namespaced_pod(namespace,
                                              label_selector="app=web"))
    out["not_web"] = names(v1.list_namespaced_pod(
        namespace, label_selector="app notin (web)"))
    out["on_a"] = names(v1.list_pod_for_all_namespaces(
        field_selector="spec.nodeName=a"))
    pages, token = [], None
    while True:
        page = v1.list_namespaced_pod(namespace, limit=2, _continue=token)
        pages.append(names(page))
        token = page.metadata._continue
        if not token:
            break
    out["pages"] = pages
    patched = v1.patch_namespaced_pod("py1", namespace,
                                      {"metadata": {"labels": {"app": "db"}}})
    out["patched"] = patched.metadata.labels
    authz = client.AuthorizationV1Api(v1.api_client)
    out["may_watch"] = {}
    for resource in ["pods", "secrets"]:
        review = authz.create_self_subject_access_review(
            client.V1SelfSubjectAccessReview(
                spec=client.V1SelfSubjectAccessReviewSpec(
                    resource_attributes=client.V1ResourceAttributes(
                        verb="watch", resource=resource))))
        out["may_watch"][resource] = review.status.allowed
    v1.delete_namespaced_pod("py1", namespace)
    try:
        v1.read_namespaced_pod("py1", namespace)
    except ApiException as e:
        out["deleted"] = [e.status, json.loads(e.body)["message"]]
    v1.delete_collection_namespaced_pod(namespace, label_selector="app=db")
    out["after_delete_collection"] = names(v1.list_namespaced_pod(namespace))
    print(json.dumps(out))


def cmd_crd(url, namespace, crd_file, object_file):
    import yaml

    config = client.Configuration()
    config.host = url
    api_client = client.ApiClient(config)
    with open(crd_file) as f:
        crd = yaml.safe_load(f)
    with open(object_file) as f:
        obj = yaml.safe_load(f)
    client.ApiextensionsV1Api(api_client).create_custom_resource_definition(crd)
    custom = client.CustomObjectsApi(api_client)
    group, version = obj["apiVersion"].split("/")
    plural = crd["spec"]["names"]["plural"]
    created = custom.create_namespaced_custom_object(
        group, version, namespace, plural, obj)
    listed = custom.list_namespaced_custom_object(group, version, namespace,
                                                 plural)
    events = []
    w = watch.Watch()
    for event in w.stream(custom.list_namespaced_custom_object, group,
                          version, namespace, plural, resource_version="0",
                          timeout_seconds=10):
        events.append([event["type"], event["object"]["metadata"]["name"]])
        w.stop()
    print(json.dumps({
        "created_uid": bool(created["metadata"].get("uid")),
        "list_kind": listed["kind"],
        # Unstructured list items keep their apiVersion and kind.
        "items": [[i["apiVersion"], i["kind"], i["metadata"]["name"]]
                  for i in listed["items"]],
        "events": events,
    }))


def main(argv):
    cmd, url, namespace = argv[1], argv[2], argv[3]
    if cmd == "watch":
        cmd_watch(url, namespace)
    elif cmd == "gone":
        cmd_gone(url, namespace, argv[4], "--timeout" in argv)
    elif cmd == "crud":
        cmd_crud(url, namespace)
    elif cmd == "crd":
        cmd_crd(url, namespace, argv[4], argv[5])
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv)
