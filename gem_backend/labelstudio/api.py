"""The Label Studio API client of the jobs: projects, ML backends, tasks, predictions.

Label Studio API calls used (1.23): ``GET /api/projects/{id}``, ``GET /api/ml?project={id}``,
``GET /api/tasks`` (Data Manager list, paginated, ``fields=task_only``),
``GET /api/predictions?task={id}``, ``GET /api/tasks/{id}/annotations/``,
``POST /api/projects/{id}/import/predictions``, ``POST /api/predictions``, ``PATCH /api/ml/{id}``.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Mapping, Sequence

import requests

from .images import ImageError, ImageFetcher

__all__ = ["LabelStudioAPI", "LabelStudioError", "DEFAULT_PAGE_SIZE"]

DEFAULT_PAGE_SIZE = 500


class LabelStudioError(RuntimeError):
    """A Label Studio API call failed, or the client cannot be set up (no URL, no key); ``status``
    is the HTTP status (None: no reply). The message says what to do and holds no secret."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class LabelStudioAPI:
    """The few Label Studio API calls of the jobs (pre-labeling, learning from annotations).

    ``api_key`` is a legacy token or a personal access token: authentication is the one of
    :class:`ImageFetcher` (``Token`` header, or the PAT exchanged for short-lived access tokens,
    refreshed on a 401), so the backend, the workers and this client accept the same keys.
    Idempotent GETs are retried on connection errors and 502/503/504; writes are not (a retry
    could store twice: the callers re-check instead).
    """

    def __init__(self, url: str | None, api_key: str | None, timeout: tuple[float, float] = (5.0, 60.0)):
        if not url:
            raise LabelStudioError("no Label Studio URL: set LABEL_STUDIO_URL or pass --ls-url")
        if not api_key:
            raise LabelStudioError("no Label Studio API key: set LABEL_STUDIO_API_KEY or pass --api-key "
                                "(Account & Settings > Personal Access Token, or a legacy token)")
        try:
            self._auth = ImageFetcher(url, api_key, timeout=timeout)
        except ValueError as err:
            raise LabelStudioError(str(err)) from None
        self.url = self._auth.label_studio_url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers["User-Agent"] = self._auth.session.headers["User-Agent"]
        retry = requests.adapters.Retry(total=3, backoff_factor=0.5, status_forcelist=(502, 503, 504),
                                        allowed_methods=frozenset({"GET"}), raise_on_status=False)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, requests.adapters.HTTPAdapter(max_retries=retry))

    def close(self) -> None:
        self.session.close()
        self._auth.close()

    def request(self, method: str, path: str, *, params: Mapping | None = None, body: Any = None,
                ok: Sequence[int] = (200, 201)) -> Any:
        """``method path`` -> decoded JSON reply (None if empty); raises :class:`LabelStudioError`."""
        url = self.url + path
        resp = None
        for attempt in (0, 1):
            try:
                headers = self._auth.auth_header(force_refresh=attempt == 1)
            except ImageError as err:  # the PAT exchange failed; the message has no secrets
                raise LabelStudioError(str(err)) from None
            try:
                resp = self.session.request(method, url, params=params, json=body, headers=headers,
                                            timeout=self.timeout)
            except requests.RequestException as err:
                raise LabelStudioError(f"{method} {path}: {type(err).__name__}: is Label Studio running "
                                       f"at {self.url}?") from None
            if resp.status_code == 401 and attempt == 0 and self._auth.auth_mode == "pat":
                continue  # the cached access token may have expired early: one fresh exchange
            break
        if resp.status_code not in ok:
            hint = ""
            if resp.status_code == 401:
                hint = " (is LABEL_STUDIO_API_KEY a valid key of this instance?)"
            elif resp.status_code == 404 and path.startswith("/api/projects/"):
                hint = " (no such project, or no access to it)"
            raise LabelStudioError(f"{method} {path} -> HTTP {resp.status_code}{hint}: "
                                   f"{self._auth.scrub(resp.text[:300])}", status=resp.status_code)
        if not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise LabelStudioError(f"{method} {path}: the reply is not JSON "
                                   f"(is {self.url} a Label Studio?)", status=resp.status_code) from None

    # -- reads --------------------------------------------------------------------------
    def project(self, project: int) -> dict:
        return self.request("GET", f"/api/projects/{project}")

    def ml_backends(self, project: int) -> list[dict]:
        body = self.request("GET", "/api/ml", params={"project": project})
        return body if isinstance(body, list) else (body or {}).get("results", [])

    def project_backend(self, project: int, info: Mapping | None = None, ml_backend: int | None = None) -> dict | None:
        """The project's connected ML backend, or None when none is: ``ml_backend`` picks one by
        id; with several, the one whose title is the project's ``model_version`` (``info``: the
        project, fetched when not given). Raises :class:`LabelStudioError` when that is ambiguous."""
        backends = self.ml_backends(project)
        if ml_backend is not None:
            found = next((b for b in backends if b.get("id") == ml_backend), None)
            if found is None:
                raise LabelStudioError(f"project {project} has no ML backend {ml_backend}; connected: "
                                       f"{[b.get('id') for b in backends] or 'none'}")
            return found
        if len(backends) <= 1:
            return backends[0] if backends else None
        version = (info if info is not None else self.project(project)).get("model_version")
        active = [b for b in backends if version and b.get("title") == version]
        if len(active) != 1:
            raise LabelStudioError(f"project {project} has {len(backends)} ML backends "
                                   f"({', '.join(str(b.get('id')) for b in backends)}): pick one with --ml-backend ID")
        return active[0]

    def iter_tasks(self, project: int, *, view: int | None = None, query: Mapping | None = None,
                   page_size: int = DEFAULT_PAGE_SIZE) -> Iterator[dict]:
        """Tasks of the project (or of a Data Manager view / query) in Data Manager order.

        Each task is ``{"id": int, "data": {...}, ...}`` without predictions or annotations
        (``fields=task_only``), with its data as stored (``resolve_uri=false``), as Label Studio
        sends tasks to ``/predict``.
        """
        page, seen = 1, 0
        while True:
            params: dict[str, Any] = {"project": project, "page": page, "page_size": page_size,
                                      "fields": "task_only", "resolve_uri": "false"}
            if view is not None:
                params["view"] = view
            if query is not None:
                params["query"] = json.dumps(query)
            try:
                body = self.request("GET", "/api/tasks", params=params)
            except LabelStudioError as err:
                if err.status == 404 and page > 1:  # past the last page ("Invalid page.")
                    return
                raise
            tasks = (body or {}).get("tasks") or []
            yield from tasks
            seen += len(tasks)
            total = (body or {}).get("total")
            # "total" counts the selection; an instance may cap page_size (TASK_API_PAGE_SIZE_MAX)
            if not tasks or (seen >= total if isinstance(total, int) else len(tasks) < page_size):
                return
            page += 1

    def task_ids_with_version(self, project: int, model_version: str) -> set[int]:
        """Ids of the tasks holding a prediction whose model_version contains ``model_version``.

        A Data Manager filter (substring match, so a prefilter: callers re-check exactly
        before storing).
        """
        query = {"filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:predictions_model_versions", "operator": "contains",
            "type": "List", "value": [model_version]}]}}
        return {int(t["id"]) for t in self.iter_tasks(project, query=query)}

    def iter_annotated_tasks(self, project: int) -> Iterator[dict]:
        """The project's tasks holding at least one annotation (``{"id", "data", ...}``)."""
        query = {"filters": {"conjunction": "and", "items": [{
            "filter": "filter:tasks:total_annotations", "operator": "greater", "type": "Number", "value": 0}]}}
        yield from self.iter_tasks(project, query=query)

    def task_annotations(self, task: int) -> list[dict]:
        body = self.request("GET", f"/api/tasks/{task}/annotations/")
        return body if isinstance(body, list) else (body or {}).get("results", [])

    def task_predictions(self, task: int) -> list[dict]:
        body = self.request("GET", "/api/predictions", params={"task": task})
        return body if isinstance(body, list) else (body or {}).get("results", [])

    def has_version(self, task: int, model_version: str) -> bool:
        """Exact check: does the task hold a prediction of ``model_version`` now?"""
        return any(p.get("model_version") == model_version for p in self.task_predictions(task))

    # -- writes -------------------------------------------------------------------------
    def import_predictions(self, project: int, predictions: list[dict]) -> int | None:
        """Bulk store ``[{"task": id, "result": [...], "score": s, "model_version": v}]``.

        Returns the number Label Studio created, or None when this instance has no bulk
        endpoint (then use :meth:`create_prediction`). A 400 (one item refused: all are)
        raises :class:`LabelStudioError`.
        """
        try:
            body = self.request("POST", f"/api/projects/{project}/import/predictions", body=predictions)
        except LabelStudioError as err:
            if err.status in (404, 405):
                return None
            raise
        return int((body or {}).get("created", 0))

    def create_prediction(self, prediction: dict) -> dict:
        return self.request("POST", "/api/predictions", body=prediction)

    @staticmethod
    def ml_backend_update(backend: Mapping, extra_params: Mapping) -> dict:
        """The body of :meth:`update_ml_backend`: Label Studio 1.23 answers a PATCH of
        ``extra_params`` alone with a 500, so ``url`` and ``project`` go with it."""
        return {"url": backend.get("url"), "project": backend.get("project"), "extra_params": dict(extra_params)}

    def update_ml_backend(self, backend: Mapping, extra_params: Mapping) -> dict:
        """Write ``extra_params`` into a connected ML backend (``backend``: an item of
        :meth:`ml_backends`); Label Studio then calls the backend's ``/setup`` with them."""
        return self.request("PATCH", f"/api/ml/{backend['id']}", body=self.ml_backend_update(backend, extra_params))
