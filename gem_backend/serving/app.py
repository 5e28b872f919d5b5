"""Label Studio's ML-backend protocol on Flask 3: ``create_app(settings)``.

Routes (Label Studio 1.23): ``GET /health``, ``POST /setup``, ``POST /predict``,
``POST /webhook``, ``GET /versions``, plus ``GET /metrics`` (Prometheus text) and
``GET /agreement/<project>`` (annotations vs this backend's predictions, JSON).
``/health`` and ``/setup`` never wait for the model: Label Studio gives them 1 s and 3 s.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .agreement import Agreement
from .learner import Learner
from .redis_gate import check_eviction_policy
from .service import GEMService, ModelUnavailable, RequestError
from ..settings import Settings, SettingsError, parse_extra_params
from ..labelstudio.results import dumps

log = logging.getLogger(__name__)

MODEL_CLASS = "GEMBackend"


class ProjectParams:
    """``extra_params`` per project, from ``/setup``, for the ``/predict`` calls that follow.

    Label Studio sends ``extra_params`` only to ``/setup``, and with several workers
    ``/predict`` may land in another process: so they are kept in Redis when configured,
    else in small JSON files (shared by the workers of one machine).
    """

    def __init__(self, settings: Settings):
        self._redis = None
        if settings.redis_url:
            import redis

            self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=0.5, socket_connect_timeout=0.5)
            # once at start-up: the project parameters, queue and prototypes must not be evictable
            check_eviction_policy(self._redis, settings.redis_url, log,
                                  caches_elsewhere=bool(settings.cache_redis_url))
        self._dir = Path(settings.state_dir)
        self._memory: dict[str, Any] = {}

    @staticmethod
    def project_id(project: Any) -> str:
        # Label Studio sends "<id>.<timestamp>" in /setup and /predict
        return str(project).split(".", 1)[0] if project not in (None, "") else ""

    def set(self, project: Any, params: dict) -> None:
        pid = self.project_id(project)
        if not pid:
            return
        self._memory[pid] = params
        text = json.dumps(params)
        if self._redis is not None:
            try:
                self._redis.set(f"gem:project:{pid}:params", text)
            except Exception as err:  # never fail a request because of this store
                log.warning("could not store project %s params in Redis: %s", pid, type(err).__name__)
        # also on disk: the workers of this machine still agree while Redis is away
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            tmp = self._dir / f".{pid}.json.tmp"
            tmp.write_text(text)
            tmp.replace(self._dir / f"{pid}.json")
        except OSError as err:
            log.warning("could not store project %s params in %s: %s", pid, self._dir, err)

    def get(self, project: Any) -> dict:
        pid = self.project_id(project)
        if not pid:
            return {}
        if self._redis is not None:
            try:
                raw = self._redis.get(f"gem:project:{pid}:params")
                if raw is not None:
                    return json.loads(raw)
            except Exception:
                pass
        try:
            return json.loads((self._dir / f"{pid}.json").read_text())
        except (OSError, ValueError):
            return self._memory.get(pid, {})


def _parsed_json() -> Any:
    """The JSON body, None when it is not JSON; too deep a nesting is a 400, not a 500."""
    try:
        return request.get_json(silent=True)
    except RecursionError:
        raise RequestError("request body is JSON nested too deeply") from None


def _json_body() -> dict:
    body = _parsed_json()
    if body is None:
        raise RequestError("request body must be JSON (Content-Type: application/json)")
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def create_app(settings: Settings | None = None, service: GEMService | None = None,
               load_model: bool = True) -> Flask:
    """The WSGI app.

    Args:
        settings: default ``Settings.from_env()``.
        service: default a new :class:`GEMService` on ``settings``.
        load_model: start loading the model in the background now (so the first
            ``/predict`` does not pay for it); ``/health`` answers meanwhile.
    """
    settings = settings or Settings.from_env()
    service = service or GEMService(settings)
    params = ProjectParams(settings)
    learner = Learner(service, params.get)
    agreement = Agreement(service)
    app = Flask("gem_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.extensions["gem_service"] = service
    app.extensions["gem_learner"] = learner
    app.extensions["gem_agreement"] = agreement
    metrics = service.metrics

    def authorized() -> bool:
        if not settings.basic_auth_user:
            return True
        if request.endpoint == "webhook" and not settings.webhook_auth:
            return True
        auth = request.authorization
        if auth is None or auth.type != "basic":
            return False
        # constant time, and both compared so timing does not tell which one was wrong
        user_ok = hmac.compare_digest((auth.username or "").encode(), settings.basic_auth_user.encode())
        pass_ok = hmac.compare_digest((auth.password or "").encode(), (settings.basic_auth_pass or "").encode())
        return user_ok and pass_ok

    @app.before_request
    def _before():
        g.started = time.perf_counter()
        if not authorized():
            return Response(json.dumps({"error": "authentication required"}), 401,
                            {"WWW-Authenticate": 'Basic realm="gem-backend"', "Content-Type": "application/json"})
        return None

    @app.after_request
    def _after(response):
        route = request.url_rule.rule if request.url_rule else "other"
        metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        metrics.latency.labels(route=route).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    @app.errorhandler(RequestError)
    def _bad_request(err):
        log.warning("%s %s: 400: %s", request.method, request.path, err)
        return jsonify(error=str(err)), 400

    @app.errorhandler(ModelUnavailable)
    def _unavailable(err):
        return jsonify(error=str(err)), 503

    @app.errorhandler(HTTPException)
    def _http(err):
        return jsonify(error=err.description or err.name), err.code

    @app.errorhandler(Exception)
    def _unexpected(err):
        log.exception("%s %s failed", request.method, request.path)
        return jsonify(error=f"internal error: {type(err).__name__}"), 500

    @app.get("/")
    @app.get("/health")
    def health():
        state = service.model_state
        metrics.model_loaded.set(1 if state == "loaded" else 0)
        body = {"status": "UP", "model_class": MODEL_CLASS, "model": state,
                "model_version": settings.model_version()}
        if state == "error":
            body.update(status="ERROR", error=service.load_error)
            return jsonify(body), 503
        return jsonify(body)

    @app.post("/setup")
    def setup():
        body = _json_body()
        extra = body.get("extra_params")
        try:
            extra_dict = parse_extra_params(extra)
        except SettingsError as err:
            raise RequestError(str(err)) from None
        spec = service.project(body.get("schema") or body.get("label_config"), extra_dict, project=body.get("project"))
        params.set(body.get("project"), extra_dict)
        return jsonify(model_version=spec.model_version)

    @app.post("/predict")
    def predict():
        body = _json_body()
        if "tasks" not in body:
            raise RequestError("missing 'tasks': expected {\"tasks\": [...], \"label_config\": \"<View>...\"}")
        extra = body.get("extra_params")
        if extra is None:
            extra = params.get(body.get("project"))
        spec = service.project(body.get("label_config") or body.get("schema"), extra, project=body.get("project"))
        # smart tools (interactive pre-annotation) send what the annotator drew in params.context
        params_body = body.get("params")
        context = params_body.get("context") if isinstance(params_body, dict) else None
        results = service.predict_tasks(body["tasks"], label_config=None, spec=spec, context=context)
        metrics.predictions.inc(len(results))
        # the brush RLE lists are most of the reply: written by a vectorised encoder
        return Response(dumps({"results": results, "model_version": spec.model_version}) + "\n",
                        mimetype="application/json")

    @app.post("/webhook")
    def webhook():
        # Label Studio waits 1 s at most: annotation events are queued and handled after the answer
        body = _parsed_json() or {}
        action = body.get("action") if isinstance(body, dict) else None
        queued = learner.submit(body)
        compared = agreement.submit(body)
        log.debug("webhook %s: prototypes %s, agreement %s", action, queued, compared)
        return jsonify(status="ok", action=action, prototypes=queued, agreement=compared)

    @app.get("/agreement/<project>")
    def agreement_figures(project):
        try:
            last = int(request.args.get("last", 10))
            if not 0 <= last <= 100:
                raise ValueError
        except ValueError:
            raise RequestError("'last' must be an integer from 0 to 100") from None
        try:
            summary = agreement.store.summary(project, last=last)
        except ValueError as err:
            raise RequestError(str(err)) from None
        except Exception as err:  # noqa: BLE001 - Redis away: say so, do not 500
            return jsonify(error=f"agreement store unavailable: {type(err).__name__}"), 503
        summary["pending"] = len(agreement.pending)
        return jsonify(summary)

    @app.get("/versions")
    def versions():
        return jsonify(versions=[settings.model_version()], model_version=settings.model_version())

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4")

    if load_model:
        service.start_loading()
    return app
