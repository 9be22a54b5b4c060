"""Kubernetes I/O for the operator, through the official `kubernetes` client.

`KubeApi` reads and writes the few objects the operator touches, as plain dicts (responses
are read raw: the reconcile works on dicts, and raw reads skip model round trips).
`execute` carries out a reconcile Plan: creates that find the object present (409) and
deletes that find it gone (404) count as done, which makes executing a plan idempotent.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from splice.kube.reconcile import (
    AddFinalizer,
    CreatePod,
    CreateService,
    DeletePod,
    DeleteService,
    Plan,
    RemoveFinalizer,
)
from splice.kube.spec import FINALIZER, GROUP, KIND, LABEL_JOB, PLURAL, VERSION

log = logging.getLogger("splice.kube")
MERGE_PATCH = "application/merge-patch+json"
USER_AGENT = "splice-operator/0.1"


def _raw(resp: Any) -> Any:
    return json.loads(resp.data)


def api_client(kubeconfig: str | None = None, host: str | None = None) -> client.ApiClient:
    """An ApiClient from a kubeconfig file, the in-cluster service account, or a plain
    host URL (tests)."""
    from kubernetes import config

    if host:
        cfg = client.Configuration()
        cfg.host = host
        api = client.ApiClient(cfg)
    elif kubeconfig:
        api = config.new_client_from_config(config_file=kubeconfig)
    else:
        try:
            config.load_incluster_config()
            api = client.ApiClient()
        except config.ConfigException:
            api = config.new_client_from_config()
    api.user_agent = USER_AGENT   # names the operator in API server audit logs
    return api


class KubeApi:
    def __init__(self, api: client.ApiClient, request_timeout_s: float = 10.0) -> None:
        self.api_client = api
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.coordination = client.CoordinationV1Api(api)
        self._timeout = request_timeout_s

    # ---- SpliceJobs -------------------------------------------------------------------
    def list_jobs(self, namespace: str | None) -> tuple[list[dict[str, Any]], str]:
        """All SpliceJobs (in `namespace`, or everywhere) and the list's resourceVersion."""
        args = (GROUP, VERSION)
        if namespace:
            out = _raw(self.custom.list_namespaced_custom_object(
                *args, namespace, PLURAL, _preload_content=False,
                _request_timeout=self._timeout))
        else:
            out = _raw(self.custom.list_cluster_custom_object(
                *args, PLURAL, _preload_content=False, _request_timeout=self._timeout))
        return out.get("items", []), out["metadata"]["resourceVersion"]

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _raw(self.custom.get_namespaced_custom_object(
                GROUP, VERSION, namespace, PLURAL, name, _preload_content=False,
                _request_timeout=self._timeout))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def replace_job_status(self, job: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """Write the status, conditional on the job's resourceVersion (409 if it moved)."""
        meta = job["metadata"]
        body = {"apiVersion": job.get("apiVersion"), "kind": KIND, "metadata": {
            "name": meta["name"], "namespace": meta["namespace"],
            "resourceVersion": meta["resourceVersion"]}, "spec": job.get("spec"),
            "status": dict(status)}
        self.custom.replace_namespaced_custom_object_status(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], body,
            _preload_content=False, _request_timeout=self._timeout)

    def set_finalizers(self, job: Mapping[str, Any], finalizers: list[str]) -> None:
        meta = job["metadata"]
        patch = {"metadata": {"finalizers": finalizers or None,
                              "resourceVersion": meta["resourceVersion"]}}
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
            _content_type=MERGE_PATCH, _preload_content=False, _request_timeout=self._timeout)

    # ---- pods and services ------------------------------------------------------------
    def list_pods(self, namespace: str | None, job: str | None = None
                  ) -> tuple[list[dict[str, Any]], str]:
        sel = f"{LABEL_JOB}={job}" if job else LABEL_JOB
        if namespace:
            resp = self.core.list_namespaced_pod(namespace, label_selector=sel,
                                                 _preload_content=False,
                                                 _request_timeout=self._timeout)
        else:
            resp = self.core.list_pod_for_all_namespaces(label_selector=sel,
                                                         _preload_content=False,
                                                         _request_timeout=self._timeout)
        out = _raw(resp)
        return out.get("items", []), out["metadata"]["resourceVersion"]

    def list_service_names(self, namespace: str, job: str) -> list[str]:
        out = _raw(self.core.list_namespaced_service(
            namespace, label_selector=f"{LABEL_JOB}={job}", _preload_content=False,
            _request_timeout=self._timeout))
        return [s["metadata"]["name"] for s in out.get("items", [])]

    def create_event(self, job: Mapping[str, Any], reason: str, message: str,
                     type_: str = "Normal") -> None:
        meta = job["metadata"]
        body = {"metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}",
                             "namespace": meta["namespace"]},
                "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND,
                                   "name": meta["name"], "namespace": meta["namespace"],
                                   "uid": meta.get("uid")},
                "reason": reason, "message": message[:1000], "type": type_,
                "source": {"component": "splice-operator"}}
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False,
                                              _request_timeout=self._timeout)
        except ApiException as e:   # events are best effort: never block reconciling
            if e.status != 409:
                log.warning("could not record event %s: %s", reason, e.reason)

    # ---- executing a plan ---------------------------------------------------------------
    def execute(self, job: Mapping[str, Any], plan: Plan, *, events: bool = True) -> None:
        """Carry out `plan` for `job`; the status goes last, only after every action
        succeeded (an ApiException other than 404/409 propagates and the job is retried)."""
        ns = job["metadata"]["namespace"]
        for action in plan.actions:
            log.info("%s/%s: %s: %s", ns, job["metadata"]["name"], type(action).__name__,
                     action.reason)
            if isinstance(action, (CreatePod, CreateService)):
                create = (self.core.create_namespaced_pod if isinstance(action, CreatePod)
                          else self.core.create_namespaced_service)
                _tolerate(409, create, ns, dict(action.manifest), _preload_content=False,
                          _request_timeout=self._timeout)
            elif isinstance(action, (DeletePod, DeleteService)):
                delete = (self.core.delete_namespaced_pod if isinstance(action, DeletePod)
                          else self.core.delete_namespaced_service)
                _tolerate(404, delete, action.name, ns, _preload_content=False,
                          _request_timeout=self._timeout)
            elif isinstance(action, AddFinalizer):
                self.set_finalizers(job, [*job["metadata"].get("finalizers", []), FINALIZER])
                job = self.get_job(ns, job["metadata"]["name"]) or job
            elif isinstance(action, RemoveFinalizer):
                self.set_finalizers(job, [f for f in job["metadata"].get("finalizers", [])
                                          if f != FINALIZER])
            if events and isinstance(action, (CreatePod, DeletePod)):
                self.create_event(job, type(action).__name__, action.reason)
        if plan.status is not None and plan.status != job.get("status"):
            self.replace_job_status(job, plan.status)


def _tolerate(status: int, call: Any, *args: Any, **kwargs: Any) -> None:
    try:
        call(*args, **kwargs)
    except ApiException as e:
        if e.status != status:
            raise

