"""An in-process fake Kubernetes API server speaking the real REST and watch protocol.

Enough of the API for the operator, served over HTTP on 127.0.0.1 so the real `kubernetes`
client talks to it unchanged: pods, services, events, leases and SpliceJobs (with status and
scale subresources); create/get/list/replace/patch (merge, strategic as merge, JSON patch)
/delete; resourceVersion with optimistic concurrency; finalizers and deletionTimestamp;
ownerReference garbage collection; label selectors; and `?watch=true` streams of JSON
events over chunked HTTP, including the ERROR event with code 410 Gone for a
resourceVersion that was compacted away (see `expire_watches`).

Optionally validates SpliceJobs against the CRD's openAPIV3Schema, as the real server does.
Pods are deleted at once (no kubelet grace period); tests move pods between phases with
`set_pod_phase`. Every write wakes `wait_for`, so tests wait on conditions, not sleeps.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import sys
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

RESOURCES = {  # plural -> (group/version path prefix, kind)
    "pods": ("api/v1", "Pod"),
    "services": ("api/v1", "Service"),
    "events": ("api/v1", "Event"),
    "leases": ("apis/coordination.k8s.io/v1", "Lease"),
    "splicejobs": ("apis/splice.dev/v1alpha1", "SpliceJob"),
}
WITH_STATUS_SUBRESOURCE = {"splicejobs"}
PATH = re.compile(r"^/(?P<gv>api/v1|apis/[^/]+/[^/]+)(?:/namespaces/(?P<ns>[^/]+))?"
                  r"/(?P<plural>[a-z]+)(?:/(?P<name>[^/]+))?(?:/(?P<sub>status|scale))?$")


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def json_patch(doc: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 add / replace / remove / test, enough for the client's list bodies."""
    doc = copy.deepcopy(doc)
    for op in ops:
        *parents, last = [p.replace("~1", "/").replace("~0", "~")
                          for p in op["path"].split("/")[1:]]
        node = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        key: Any = (len(node) if last == "-" else int(last)) if isinstance(node, list) else last
        if op["op"] == "test" and node[key] != op["value"]:
            raise ApiError(422, "Invalid", f"test failed at {op['path']}")
        if op["op"] == "remove":
            del node[key]
        elif op["op"] == "add" and isinstance(node, list):
            node.insert(key, op["value"])
        elif op["op"] in ("add", "replace"):
            node[key] = op["value"]
    return doc


def matches(labels: dict[str, str], selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k) == v:
                return False
        elif "=" in term:
            k, v = term.replace("==", "=").split("=", 1)
            if labels.get(k) != v:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeApiServer:
    def __init__(self, splicejob_schema: dict[str, Any] | None = None) -> None:
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._events: list[tuple[int, str, str, dict[str, Any]]] = []  # rv, plural, type, obj
        self._rv = 100
        self._compacted_rv = 0    # watches from before this get 410 Gone
        self._watch_epoch = 0     # bumped by expire_watches: open watches end with 410
        self._stopping = False
        self._schema = splicejob_schema
        # (method, path?query, user agent) in arrival order
        self.requests: list[tuple[str, str, str]] = []
        self.open_watches = 0
        server = self

        class Handler(_Handler):
            api = server
        self._http = _Server(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = True
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,),
                                        daemon=True, name="fake-apiserver")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.server_address[1]}"

    def start(self) -> FakeApiServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)

    # ---- test helpers -----------------------------------------------------------------
    def wait_for(self, predicate: Callable[[], Any], timeout_s: float = 10.0,
                 what: str = "condition") -> Any:
        with self._cond:
            ok = self._cond.wait_for(predicate, timeout_s)
        if not ok:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        return ok

    def list(self, plural: str, ns: str | None = None, selector: str = "") -> list[dict]:
        with self._cond:
            return [copy.deepcopy(o) for (p, n, _), o in sorted(self._objects.items())
                    if p == plural and (ns is None or n == ns)
                    and matches(o["metadata"].get("labels") or {}, selector)]

    def get(self, plural: str, ns: str, name: str) -> dict[str, Any] | None:
        with self._cond:
            o = self._objects.get((plural, ns, name))
            return copy.deepcopy(o) if o else None

    def create(self, plural: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        with self._cond:
            return self._create(plural, ns, body)

    def delete(self, plural: str, ns: str, name: str) -> None:
        with self._cond:
            self._delete(plural, ns, name)

    def patch(self, plural: str, ns: str, name: str, patch: dict[str, Any],
              sub: str | None = None) -> dict[str, Any]:
        with self._cond:
            return self._update(plural, ns, name, lambda o: merge_patch(o, patch), sub)

    def set_pod_phase(self, ns: str, name: str, phase: str, exit_code: int = 0) -> None:
        status: dict[str, Any] = {"phase": phase}
        if phase in ("Failed", "Succeeded"):
            status["containerStatuses"] = [{"name": "worker", "state": {"terminated": {
                "exitCode": exit_code, "reason": "Error" if exit_code else "Completed"}}}]
        self.patch("pods", ns, name, {"status": status}, sub="status")

    def expire_watches(self) -> None:
        """Compact the event history and end every open watch with 410 Gone, as an API
        server does when a watch's resourceVersion falls out of its window."""
        with self._cond:
            self._compacted_rv = self._rv
            self._watch_epoch += 1
            self._cond.notify_all()

    def count(self, method: str, path_prefix: str) -> int:
        with self._cond:
            return sum(1 for m, p, _ in self.requests
                       if m == method and p.startswith(path_prefix))

    # ---- storage (caller holds self._cond) ----------------------------------------------
    def _now(self) -> str:
        return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    def _record(self, plural: str, type_: str, obj: dict[str, Any]) -> None:
        self._events.append((int(obj["metadata"]["resourceVersion"]), plural, type_,
                             copy.deepcopy(obj)))
        self._cond.notify_all()

    def _bump(self, obj: dict[str, Any]) -> None:
        self._rv += 1
        obj["metadata"]["resourceVersion"] = str(self._rv)

    def _validate(self, plural: str, obj: dict[str, Any]) -> None:
        if plural == "splicejobs" and self._schema is not None:
            import jsonschema
            try:
                jsonschema.validate(obj, self._schema)
            except jsonschema.ValidationError as e:
                path = ".".join(str(p) for p in e.absolute_path)
                raise ApiError(422, "Invalid", f"SpliceJob is invalid: {path}: {e.message}") \
                    from None

    def _create(self, plural: str, ns: str, body: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            raise ApiError(422, "Invalid", "metadata.name: Required value")
        if (plural, ns, name) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{plural} "{name}" already exists')
        gv, kind = RESOURCES[plural]
        obj.setdefault("apiVersion", gv.removeprefix("apis/").removeprefix("api/"))
        obj.setdefault("kind", kind)
        self._validate(plural, obj)
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=self._now(),
                    generation=1)
        meta.pop("deletionTimestamp", None)
        if plural == "pods":
            obj["status"] = {"phase": "Pending"}
        elif plural in WITH_STATUS_SUBRESOURCE:
            obj.pop("status", None)
        self._bump(obj)
        self._objects[(plural, ns, name)] = obj
        self._record(plural, "ADDED", obj)
        return obj

    def _get(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = self._objects.get((plural, ns, name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{plural} "{name}" not found')
        return obj

    def _update(self, plural: str, ns: str, name: str,
                change: Callable[[dict[str, Any]], dict[str, Any]],
                sub: str | None) -> dict[str, Any]:
        old = self._get(plural, ns, name)
        new = change(copy.deepcopy(old))
        want_rv = (new.get("metadata") or {}).get("resourceVersion")
        if want_rv and want_rv != old["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on {plural} '
                           f'"{name}": the object has been modified; please apply your '
                           f'changes to the latest version and try again')
        if sub == "status":
            new = {**old, "status": new.get("status", old.get("status"))}
        elif plural in WITH_STATUS_SUBRESOURCE or plural == "pods":
            # the main resource ignores status; the status subresource ignores the rest
            new["status"] = copy.deepcopy(old.get("status"))
            if new.get("status") is None:
                new.pop("status", None)
        for fixed in ("uid", "creationTimestamp", "namespace", "name", "generation"):
            new["metadata"][fixed] = old["metadata"].get(fixed)
        if old["metadata"].get("deletionTimestamp"):
            new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"]
        else:
            new["metadata"].pop("deletionTimestamp", None)
        if new.get("spec") != old.get("spec"):
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
        self._validate(plural, new)
        if new == {**old}:
            return old
        self._bump(new)
        self._objects[(plural, ns, name)] = new
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            self._remove(plural, ns, name)
        else:
            self._record(plural, "MODIFIED", new)
        return new

    def _delete(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = self._get(plural, ns, name)
        if obj["metadata"].get("finalizers"):
            if not obj["metadata"].get("deletionTimestamp"):
                obj = copy.deepcopy(obj)
                obj["metadata"]["deletionTimestamp"] = self._now()
                self._bump(obj)
                self._objects[(plural, ns, name)] = obj
                self._record(plural, "MODIFIED", obj)
            return obj
        return self._remove(plural, ns, name)

    def _remove(self, plural: str, ns: str, name: str) -> dict[str, Any]:
        obj = self._objects.pop((plural, ns, name))
        self._bump(obj)
        self._record(plural, "DELETED", obj)
        uid = obj["metadata"]["uid"]
        # garbage collection: dependents whose owner is gone go too
        for (p, n, nm), dep in list(self._objects.items()):
            if any(r.get("uid") == uid for r in dep["metadata"].get("ownerReferences") or []):
                if (p, n, nm) in self._objects:
                    self._delete(p, n, nm)
        return obj

    def _scale(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": meta["name"], "namespace": meta["namespace"],
                             "uid": meta["uid"], "resourceVersion": meta["resourceVersion"]},
                "spec": {"replicas": obj["spec"]["nodes"]["desired"]},
                "status": {"replicas": (obj.get("status") or {}).get("nodes", 0),
                           "selector": (obj.get("status") or {}).get("selector", "")}}


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # clients dropping idle keep-alive connections is normal, not an error
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> Any:
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n)) if n else {}

    def _route(self) -> tuple[str, str, str | None, str | None, dict[str, str]]:
        url = urlparse(self.path)
        m = PATH.match(url.path)
        if not m or m["plural"] not in RESOURCES or RESOURCES[m["plural"]][0] != m["gv"]:
            raise ApiError(404, "NotFound", f"the server could not find {url.path}")
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        return m["plural"], m["ns"] or "", m["name"], m["sub"], query

    def _handle(self) -> None:
        api = self.api
        with api._cond:
            api.requests.append((self.command, self.path, self.headers.get("User-Agent", "")))
        try:
            plural, ns, name, sub, q = self._route()
            if self.command == "GET" and name is None and q.get("watch") in ("true", "1"):
                return self._watch(plural, ns, q)
            body = self._body() if self.command in ("POST", "PUT", "PATCH") else None
            with api._cond:
                code, out = 200, None
                if self.command == "GET" and name is None:
                    items = [o for (p, n, _), o in sorted(api._objects.items())
                             if p == plural and (not ns or n == ns)
                             and matches(o["metadata"].get("labels") or {},
                                         q.get("labelSelector", ""))]
                    out = {"apiVersion": RESOURCES[plural][0].split("/", 1)[1],
                           "kind": RESOURCES[plural][1] + "List",
                           "metadata": {"resourceVersion": str(api._rv)}, "items": items}
                elif self.command == "GET":
                    out = api._get(plural, ns, name)
                    out = api._scale(out) if sub == "scale" else out
                elif self.command == "POST" and name is None:
                    code, out = 201, api._create(plural, ns, body)
                elif self.command == "DELETE" and name is not None:
                    out = api._delete(plural, ns, name)
                elif self.command in ("PUT", "PATCH") and name is not None:
                    out = self._write(plural, ns, name, sub, body)
                else:
                    raise ApiError(405, "MethodNotAllowed", f"{self.command} {self.path}")
            self._send(code, out)
        except ApiError as e:
            self._send(e.code, e.status())

    def _write(self, plural: str, ns: str, name: str, sub: str | None,
               body: Any) -> dict[str, Any]:
        api = self.api
        ctype = self.headers.get("Content-Type", "")
        if self.command == "PUT":
            def change(o: dict[str, Any]) -> dict[str, Any]:
                return copy.deepcopy(body)
        elif "json-patch" in ctype:
            def change(o: dict[str, Any]) -> dict[str, Any]:
                return json_patch(o, body)
        else:   # merge-patch+json; strategic merge treated as a merge patch
            def change(o: dict[str, Any]) -> dict[str, Any]:
                return merge_patch(o, body)
        if sub == "scale":
            obj = api._get(plural, ns, name)
            scale = change(api._scale(obj))
            new = copy.deepcopy(obj)
            new["spec"]["nodes"]["desired"] = scale["spec"]["replicas"]
            return api._scale(api._update(plural, ns, name, lambda o: new, None))
        return api._update(plural, ns, name, change, sub)

    def _watch(self, plural: str, ns: str, q: dict[str, str]) -> None:
        api, selector = self.api, q.get("labelSelector", "")
        timeout_s = float(q.get("timeoutSeconds", 1800))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

        def chunk(event: dict[str, Any]) -> None:
            data = json.dumps(event).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def wanted(p: str, obj: dict[str, Any]) -> bool:
            return p == plural and (not ns or obj["metadata"].get("namespace") == ns) \
                and matches(obj["metadata"].get("labels") or {}, selector)

        gone = {"type": "ERROR", "object": ApiError(
            410, "Expired", "too old resource version").status()}
        with api._cond:
            api.open_watches += 1
            epoch, rv = api._watch_epoch, q.get("resourceVersion", "")
            pending: list[dict[str, Any]] = []
            if rv in ("", "0"):   # no version: the current state as ADDED, then changes
                pending = [{"type": "ADDED", "object": copy.deepcopy(o)}
                           for (p, _, _), o in sorted(api._objects.items()) if wanted(p, o)]
                since = api._rv
            elif int(rv) < api._compacted_rv:
                pending, since = [gone], -1
            else:
                since = int(rv)
        deadline = threading.Event()
        timer = threading.Timer(timeout_s, lambda: (deadline.set(), _notify(api)))
        timer.start()
        try:
            while since >= 0:
                for event in pending:
                    chunk(event)
                with api._cond:
                    api._cond.wait_for(lambda s=since: api._stopping or deadline.is_set()
                                       or api._watch_epoch != epoch or api._rv > s)
                    if api._stopping or deadline.is_set():
                        break
                    if api._watch_epoch != epoch:
                        pending, since = [gone], -1
                        continue
                    pending = [{"type": t, "object": o} for r, p, t, o in api._events
                               if r > since and wanted(p, o)]
                    since = api._rv
            else:
                for event in pending:
                    chunk(event)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass
        finally:
            timer.cancel()
            with api._cond:
                api.open_watches -= 1
                api._cond.notify_all()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


def _notify(api: FakeApiServer) -> None:
    with api._cond:
        api._cond.notify_all()


def json_schema_from_openapi(node: Any, strict: bool = False) -> Any:
    """A CRD's openAPIV3Schema as JSON Schema (for `jsonschema`): OpenAPI 3.0's boolean
    exclusiveMinimum/Maximum and `nullable` translated, x-kubernetes-* extensions dropped.
    `strict` refuses fields the schema does not declare (where the API server would prune
    them silently), so a typo in an example fails the test instead of vanishing."""
    if isinstance(node, list):
        return [json_schema_from_openapi(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k in ("nullable", "format", "default"):
            continue
        if k == "properties":
            out[k] = {name: json_schema_from_openapi(s, strict) for name, s in v.items()}
        else:
            out[k] = json_schema_from_openapi(v, strict)
    for bound in ("Minimum", "Maximum"):
        if node.get(f"exclusive{bound}") is True:
            out[f"exclusive{bound}"] = out.pop(bound.lower())
        elif node.get(f"exclusive{bound}") is False:
            out.pop(f"exclusive{bound}")
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if strict and node.get("type") == "object" and "properties" in node \
            and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out
