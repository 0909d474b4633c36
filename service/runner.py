"""Server-side commands: ``robustness serve | api | worker | migrate | keys create|list|revoke``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

from infra.settings import Settings

log = logging.getLogger("robustness")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        k: v
        for k, v in {
            "host": getattr(args, "host", None),
            "port": getattr(args, "port", None),
            "data_dir": getattr(args, "data_dir", None),
            "worker_concurrency": getattr(args, "workers", None) or getattr(args, "concurrency", None),
        }.items()
        if v is not None
    }
    settings = Settings(**overrides)
    settings.prepare()
    # worker subprocesses and lazily built singletons read the same values from the environment
    for name, value in overrides.items():
        os.environ[f"ROBUSTNESS_{name.upper()}"] = str(value)
    from infra import settings as settings_module

    settings_module.get_settings.cache_clear()
    return settings


DATA_DIR_HELP = (
    "folder for the database, broker and blobs (default: ROBUSTNESS_DATA_DIR, else ./robustness-data); "
    "every command that opens the store must name the server's"
)


def add_server_parsers(commands) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the gateway and a Celery worker on this machine "
        "(embedded broker, SQLite and blobs under --data-dir)",
    )
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--workers", type=int, help="worker processes (default: one per core)")
    api = commands.add_parser("api", help="run the HTTP gateway only (workers run elsewhere)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    worker = commands.add_parser("worker", help="run a Celery worker against the configured broker")
    worker.add_argument("--concurrency", type=int, help="worker processes (default: one per core; "
                        "with --gpus: per GPU, default 1)")
    worker.add_argument("--gpus", help="GPU ids, e.g. 0,1: one worker per GPU, each pinned to its device "
                        "(CUDA_VISIBLE_DEVICES) and restarted if it dies")
    migrate = commands.add_parser("migrate", help="create or upgrade the metadata database schema")
    migrate.add_argument("--verbose", action="store_true", help="print each migration step")
    keys = commands.add_parser("keys", help="API keys: create, list, revoke")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_commands.add_parser("create", help="print a new API key for a tenant")
    create.add_argument("--tenant", required=True, help="tenant name (created if new)")
    listing = keys_commands.add_parser("list", help="every key: id, tenant, prefix, dates (never the key)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    revoke = keys_commands.add_parser(
        "revoke", help="revoke a key (and the dashboard sessions it opened) by its id or prefix")
    revoke.add_argument("key", help="the key's id (key_...) or prefix (rk_..., as `keys list` shows)")
    for command in (serve, api, worker, migrate, create, listing, revoke):
        command.add_argument("--data-dir", help=DATA_DIR_HELP)
    for command in (serve, api, worker, migrate, keys):
        command.set_defaults(run=run_server_command)


def run_server_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Alembic announces its context on every start: quiet unless `migrate --verbose` asks
    verbose = getattr(args, "verbose", False)
    logging.getLogger("alembic").setLevel(logging.INFO if verbose else logging.WARNING)
    settings = _settings(args)
    handler = {
        "serve": serve,
        "api": api,
        "worker": worker,
        "migrate": migrate_command,
        "keys": keys_command,
    }[args.command]
    return handler(settings, args)


def migrate_command(settings: Settings, args) -> int:
    from infra.database import migrate

    migrate(settings.database_url)
    print(f"database is at the newest schema: {_safe_url(settings.database_url)}")
    return 0


def keys_command(settings: Settings, args) -> int:
    import json

    from infra.database import migrate, session_factory
    from service.auth import create_key, list_keys, revoke_key

    sqlite_file = settings.data_dir / "metadata.db"
    new_store = settings.database_url.startswith("sqlite") and not sqlite_file.exists()
    if new_store and args.keys_command != "create":
        print(f"error: no store at {settings.data_dir}; give the server's --data-dir (or set "
              "ROBUSTNESS_DATA_DIR / ROBUSTNESS_DATABASE_URL)", file=sys.stderr)
        return 2
    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        if args.keys_command == "list":
            keys = list_keys(db)
            if args.json:
                print(json.dumps(keys, indent=2))
            else:
                print(f"{'id':<38} {'tenant':<20} {'prefix':<11} {'created':<25} revoked")
                for k in keys:
                    print(f"{k['id']:<38} {k['tenant'][:20]:<20} {k['prefix']:<11} {k['created_at']:<25} "
                          f"{k['revoked_at'] or '-'}")
            return 0
        if args.keys_command == "revoke":
            try:
                revoked = revoke_key(db, args.key)
            except LookupError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(f"revoked {revoked['id']} ({revoked['prefix']}...) at {revoked['revoked_at']}; "
                  f"gateways stop accepting it within {settings.auth_cache_s:g} s", file=sys.stderr)
            return 0
        try:
            key = create_key(db, args.tenant)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(key)
    if new_store:
        print(f"note: created a new store at {settings.data_dir}; the server must run with this --data-dir "
              "to accept the key", file=sys.stderr)
    print(
        f"tenant {args.tenant!r}: send it as `Authorization: Bearer <key>`; it is not stored and "
        "cannot be shown again",
        file=sys.stderr,
    )
    return 0


# after Celery has shut the worker down, how long the interpreter's exit handlers may take
EXIT_GRACE_S = 10


def worker(settings: Settings, args) -> int:
    if getattr(args, "gpus", None):
        return _workers_per_gpu(settings, args)
    from infra.broker import QUEUE, celery_app
    from jobrunner import pool_watchdog

    if settings.gateway_url:
        problem = _check_gateway(settings)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            return 2
    app = celery_app()
    code: object = 0  # a SystemExit code
    try:
        app.worker_main(
            [
                "worker",
                "--loglevel=INFO",
                "--pool=prefork",
                f"--concurrency={settings.worker_concurrency}",
                "-Q",
                QUEUE,
                "-n",
                f"worker-{os.getpid()}@%h",
                "--without-mingle",
                "--without-gossip",
            ]
        )
    except SystemExit as exc:  # Celery ends its worker with sys.exit
        code = exc.code
    status = pool_watchdog.exit_status(code)
    pool_watchdog.exit_within(EXIT_GRACE_S, status)
    return status


def _workers_per_gpu(settings: Settings, args) -> int:
    """`worker --gpus 0,1`: a `robustness worker` per GPU, each seeing only its device, with
    the cores shared out among them; stops them all on SIGTERM or SIGINT."""
    gpus = [g.strip() for g in args.gpus.split(",")]
    if not all(g.isdigit() for g in gpus) or len(set(gpus)) != len(gpus):
        print(f"error: --gpus takes distinct GPU ids separated by commas (e.g. 0,1), not {args.gpus!r}",
              file=sys.stderr)
        return 2
    per_gpu = args.concurrency or 1
    threads = settings.ort_threads or max(1, (os.cpu_count() or 1) // (len(gpus) * per_gpu))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    supervisors = []
    for gpu in gpus:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "ROBUSTNESS_WORKER_CONCURRENCY": str(per_gpu),
               "ROBUSTNESS_ORT_THREADS": str(threads)}
        supervisor = _WorkerSupervisor(env, name=f"gpu {gpu}")
        supervisor.start()
        supervisors.append(supervisor)
    print(f"workers: {len(gpus)} (GPUs {','.join(gpus)}), {per_gpu} process(es) and {threads} "
          "ONNX Runtime thread(s) each", flush=True)
    stop.wait()
    for supervisor in supervisors:  # all asked at once, then waited for
        supervisor.stop_soon()
    for supervisor in supervisors:
        supervisor.stop()
    return 0


def _check_gateway(settings: Settings) -> str | None:
    """A worker on another machine: None when the gateway answers and takes its token."""
    if not settings.worker_token:
        return "ROBUSTNESS_GATEWAY_URL is set but ROBUSTNESS_WORKER_TOKEN is not: set the gateway's token"
    from infra.gateway_blobs import GatewayBlobStore

    return GatewayBlobStore(settings.gateway_url or "", settings.worker_token, settings.blob_dir,
                            settings.blob_cache_mb << 20).check_token()


def _check_exposure(settings: Settings) -> str | None:
    """None when the gateway may start; else why not. Open mode is for loopback only."""
    from infra.database import migrate, session_factory
    from service.auth import any_keys, is_loopback

    migrate(settings.database_url)
    with session_factory(settings.database_url)() as db:
        keys = any_keys(db)
    if not keys and not is_loopback(settings.host):
        return (
            f"no API keys exist and --host {settings.host} is not loopback: create one with "
            "`robustness keys create --tenant NAME`, or bind to 127.0.0.1"
        )
    if not keys and settings.api_keys_required:
        return "ROBUSTNESS_API_KEYS_REQUIRED is set but no key exists: `robustness keys create --tenant NAME`"
    return None if keys else "open"


def api(settings: Settings, args) -> int:
    import uvicorn

    from service.app import create_app

    problem = _check_exposure(settings)
    if problem not in (None, "open"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")
    return 0


class _WorkerSupervisor(threading.Thread):
    """Keeps a `robustness worker` child running (the embedded one, or one per GPU): one killed
    or out of memory is started again (its shards come back through the lease reaper)."""

    def __init__(self, env: dict[str, str] | None = None, name: str = "embedded"):
        super().__init__(daemon=True, name=f"worker-supervisor ({name})")
        self.env, self.label = env or dict(os.environ), name
        self.process = self._start()
        self._stopping = threading.Event()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "client.cli", "worker"], env=self.env,
                                preexec_fn=_terminate_with_parent)

    def run(self) -> None:
        while not self._stopping.wait(1.0):
            if self.process.poll() is not None and not self._stopping.is_set():
                log.warning("worker.exited worker=%s code=%s: starting a new one", self.label,
                            self.process.returncode)
                self.process = self._start()

    def stop_soon(self) -> None:
        """Ask the worker to stop (warm shutdown) without waiting."""
        self._stopping.set()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        self._stopping.set()
        _stop(self.process)


def serve(settings: Settings, args) -> int:
    import uvicorn

    from service.app import create_app

    problem = _check_exposure(settings)
    if problem not in (None, "open"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    workers = _WorkerSupervisor()
    workers.start()
    url = f"http://{settings.host}:{settings.port}"
    mode = (
        "OPEN: no API keys exist, every request is served as tenant 'default' (loopback only); "
        "`robustness keys create --tenant NAME` turns keys on"
        if problem == "open"
        else "API keys required"
    )
    print(
        f"robustness service at {url}  (docs {url}/docs)\n  data: {settings.data_dir}\n"
        f"  workers: {settings.worker_concurrency} process(es), "
        f"{settings.threads_per_worker} thread(s) each\n"
        f"  auth: {mode}",
        flush=True,
    )
    try:
        app = create_app(settings)
        _run_until_signalled(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"),
                             on_exit=app.state.waits.close_from_signal)
    finally:
        workers.stop()
    return 0


def _run_until_signalled(config, on_exit) -> None:
    """uvicorn re-raises SIGTERM/SIGINT once it has shut down, which would end the process
    before `serve` stops its worker; this server only asks itself to exit, and calls
    ``on_exit`` first (uvicorn waits for open requests such as long polls before it stops)."""
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            on_exit()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    Server(config).run()


def _terminate_with_parent() -> None:
    """In the worker child: SIGTERM when `serve` dies, even by SIGKILL (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)  # warm shutdown: the running shard finishes or is requeued
    deadline = time.monotonic() + 30
    while process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if process.poll() is None:
        process.kill()


def _safe_url(url: str) -> str:
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
