"""FraiseQL's observer runtime on walstream's stream, end to end, as a FraiseQL user runs it.

PostgreSQL 18 and nats-server on free ports; the example schema; walstream with the order
choreography's config (its routes send tb_order's inserts and updates to events.order.*); a
JetStream stream FraiseQL reads, sourcing walstream's with subject transforms so the routed
order events arrive on FraiseQL's own subjects ({prefix}.Order.INSERT/UPDATE); fraiseql-server
with its NATS observers and two webhook observers on Order (INSERT, UPDATE). Orders are
inserted and updated while walstream is SIGKILLed and restarted; at the end every order must
have reached each webhook exactly once, and FraiseQL must have found every message decodable.

Run by integration/interop/run-fraiseql, which installs what this needs; prints what reached
the webhooks and exits non-zero when anything is missing, doubled or undecodable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nats
import psycopg
from nats.js.api import StreamConfig, StreamSource, SubjectTransform

REPO = Path(__file__).resolve().parents[2]
SOURCE_STREAM = "fraiseql_events"  # walstream's default stream
FEED_STREAM = "fraiseql_observer_feed"
PREFIX = "fraiseql.mutation"
# The choreography's routes for tb_order, mapped back to FraiseQL's subjects.
ROUTED = {
    "events.order.created": f"{PREFIX}.Order.INSERT",
    "events.order.status_updated": f"{PREFIX}.Order.UPDATE",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(message: str) -> None:
    print(f"[interop] {message}", flush=True)


class Webhooks:
    """Records every webhook call: which observer (path), the event id header, the body."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.lock = threading.Lock()
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = int(self.headers.get("Content-Length", "0"))
                body = json.loads(self.rfile.read(length) or b"{}")
                with hooks.lock:
                    hooks.calls.append(
                        (self.path, self.headers.get("X-FraiseQL-Event-Id", ""), body)
                    )
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def snapshot(self) -> list[tuple[str, str, dict]]:
        with self.lock:
            return list(self.calls)


class Processes:
    """Child processes, stopped (and their logs kept) at the end."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None, user: str | None = None):
        if user:
            argv = ["runuser", "-u", user, "--", *argv]
        out = open(self.work / f"{name}.log", "ab")
        self.children[name] = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        return self.children[name]

    def kill(self, name: str) -> None:
        child = self.children.pop(name)
        child.send_signal(signal.SIGKILL)
        child.wait()

    def check_alive(self, name: str) -> None:
        """Stops the scenario with the end of a child's log when the child has exited."""
        if self.children[name].poll() is not None:
            tail = (self.work / f"{name}.log").read_text(errors="replace")[-3000:]
            raise SystemExit(f"{name} exited:\n{tail}")

    def stop(self, name: str) -> None:
        child = self.children.pop(name)
        child.terminate()
        child.wait(timeout=30)

    def stop_all(self) -> None:
        for child in self.children.values():
            child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_for(what: str, check, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except SystemExit:
            raise
        except Exception as error:  # noqa: BLE001 (any failure means: not yet)
            last_error = error
        time.sleep(0.2)
    raise SystemExit(f"timed out waiting for {what} (last error: {last_error})")


def start_postgres(procs: Processes, pg_bin: Path, work: Path) -> str:
    data = work / "pgdata"
    data.mkdir()
    shutil.chown(work, "postgres")
    shutil.chown(data, "postgres")
    subprocess.run(
        ["runuser", "-u", "postgres", "--", str(pg_bin / "initdb"), "-D", str(data),
         "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True, stdout=subprocess.DEVNULL,
    )
    port = free_port()
    procs.start(
        "postgres",
        [str(pg_bin / "postgres"), "-D", str(data), "-p", str(port), "-k", str(work),
         "-c", "listen_addresses=127.0.0.1", "-c", "wal_level=logical",
         "-c", "max_connections=200"],
        user="postgres",
    )
    admin = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    wait_for("PostgreSQL", lambda: psycopg.connect(admin).close() is None)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute("CREATE DATABASE shop")
    url = f"postgresql://postgres@127.0.0.1:{port}/shop"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute((REPO / "sql/example/schema.sql").read_text())
    return url


def start_nats(procs: Processes, nats_server: str, work: Path) -> str:
    port = free_port()
    procs.start("nats", [nats_server, "-js", "-a", "127.0.0.1", "-p", str(port),
                         "-sd", str(work / "jetstream")])
    url = f"nats://127.0.0.1:{port}"
    wait_for("nats-server", lambda: socket.create_connection(("127.0.0.1", port)).close() is None)
    return url


def walstream_env(database: str, nats_url: str, work: Path) -> dict:
    return {
        "DATABASE_URL": database,
        "NATS_URL": nats_url,
        "WALSTREAM_DATA": str(work / "walstream-data"),
        "HTTP_LISTEN": f"127.0.0.1:{free_port()}",
        "GRAPHQL_LISTEN": f"127.0.0.1:{free_port()}",
        "JWT_SECRET": "interop-secret",
        "RUST_LOG": "info",
    }


async def create_feed(nats_url: str) -> None:
    """The stream FraiseQL reads: walstream's events in WAL order, the routed order events
    renamed to FraiseQL's subjects (JetStream sources with subject transforms, nats-server 2.10+)."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    transforms = [SubjectTransform(src=f"{PREFIX}.>", dest=f"{PREFIX}.>")]
    transforms += [SubjectTransform(src=src, dest=dest) for src, dest in ROUTED.items()]
    await js.add_stream(
        StreamConfig(
            name=FEED_STREAM,
            sources=[StreamSource(name=SOURCE_STREAM, subject_transforms=transforms)],
        )
    )
    await nc.close()


async def publish_foreign(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    await nc.jetstream().publish(f"{PREFIX}.Order.INSERT", b'{"order": "not an EntityEvent"}')
    await nc.close()
    log("published one message not in walstream's envelope")


def write_fraiseql_schema(fraiseql: Path, work: Path) -> Path:
    """A FraiseQL schema over the example's v_order, compiled by fraiseql-cli."""
    (work / "schema.py").write_text(
        "import fraiseql\n"
        "from fraiseql.scalars import ID\n\n"
        "@fraiseql.type\n"
        "class Order:\n"
        "    id: ID\n"
        "    identifier: str\n"
        "    status: str\n\n"
        "@fraiseql.query(sql_source='v_order')\n"
        "def orders(limit: int = 10) -> list[Order]:\n"
        "    pass\n\n"
        "fraiseql.export_schema('schema.json')\n"
    )
    subprocess.run([str(fraiseql / "sdk/bin/python"), "schema.py"], cwd=work, check=True)
    subprocess.run(
        [str(fraiseql / "bin/fraiseql-cli"), "compile", "schema.json", "-o",
         "schema.compiled.json"],
        cwd=work, check=True, stdout=subprocess.DEVNULL,
    )
    return work / "schema.compiled.json"


def start_fraiseql(procs: Processes, fraiseql: Path, database: str, nats_url: str,
                   hooks: Webhooks, work: Path) -> None:
    """fraiseql-server with its NATS observers and two webhook observers on Order. Its first
    boot creates its observer tables; the observers are stored, and it boots again to load them
    (rather than waiting for its reload interval)."""
    subprocess.run(
        [str(fraiseql / "bin/fraiseql-cli"), "setup", "--database", database],
        cwd=work, check=True, stdout=subprocess.DEVNULL,
    )
    (work / "fraiseql.toml").write_text(
        "[observers]\n"
        "enabled = true\n"
    )
    port = free_port()
    argv = [str(fraiseql / "bin/fraiseql-server"), "--config", str(work / "fraiseql.toml")]
    env = {
        "DATABASE_URL": database,
        "FRAISEQL_SCHEMA_PATH": str(write_fraiseql_schema(fraiseql, work)),
        "FRAISEQL_BIND_ADDR": f"127.0.0.1:{port}",
        # The transport and its NATS settings are the compiled schema's; the environment
        # overrides them (FraiseQL 2.19).
        "FRAISEQL_OBSERVER_TRANSPORT": "nats",
        "FRAISEQL_NATS_URL": nats_url,
        "FRAISEQL_NATS_SUBJECT_PREFIX": PREFIX,
        "FRAISEQL_NATS_STREAM_NAME": FEED_STREAM,
        "FRAISEQL_NATS_CONSUMER_NAME": "fraiseql_observer_worker",
        "FRAISEQL_ENV": "development",
        "FRAISEQL_NATS_ALLOW_PLAINTEXT": "true",
        "FRAISEQL_OBSERVERS_ALLOW_INSECURE": "true",
        "RUST_LOG": "info",
    }
    procs.start("fraiseql-server", argv, env=env)

    def observer_table_exists() -> bool:
        procs.check_alive("fraiseql-server")
        with psycopg.connect(database) as conn:
            return conn.execute("SELECT to_regclass('tb_observer') IS NOT NULL").fetchone()[0]

    wait_for("fraiseql-server's observer tables", observer_table_exists)
    procs.stop("fraiseql-server")
    with psycopg.connect(database, autocommit=True) as conn:
        for op in ("INSERT", "UPDATE"):
            actions = [{"type": "webhook", "url": f"http://127.0.0.1:{hooks.port}/{op.lower()}"}]
            conn.execute(
                "INSERT INTO tb_observer (name, entity_type, event_type, actions) "
                "VALUES (%s, 'Order', %s, %s)",
                (f"order-{op.lower()}", op, json.dumps(actions)),
            )
    procs.start("fraiseql-server", argv, env=env)

    def serving() -> bool:
        procs.check_alive("fraiseql-server")
        return socket.create_connection(("127.0.0.1", port)).close() is None

    wait_for("fraiseql-server", serving)

def load(database: str, orders: int, procs: Processes, restart_walstream) -> None:
    """Inserts `orders` orders and marks each paid, in small transactions; SIGKILLs walstream a
    third of the way in and restarts it."""
    with psycopg.connect(database, autocommit=True) as conn:
        user = conn.execute(
            "INSERT INTO tb_user (identifier, email, name) "
            "VALUES ('interop', 'interop@example.com', 'Interop') RETURNING pk_user"
        ).fetchone()[0]
        for n in range(orders):
            pk = conn.execute(
                "INSERT INTO tb_order (identifier, fk_user, total) VALUES (%s, %s, 10) "
                "RETURNING pk_order",
                (f"interop-{n}", user),
            ).fetchone()[0]
            conn.execute("UPDATE tb_order SET status = 'paid' WHERE pk_order = %s", (pk,))
            if n == orders // 3:
                log(f"SIGKILL walstream after order {n}")
                procs.kill("walstream")
                restart_walstream()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--walstream", required=True)
    parser.add_argument("--fraiseql", required=True, type=Path)
    parser.add_argument("--pg-bin", required=True, type=Path)
    parser.add_argument("--nats-server", required=True)
    parser.add_argument("--orders", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=120)
    parser.add_argument(
        "--foreign-message", action="store_true",
        help="also publish one message not in walstream's envelope, as another client would: "
        "the run must then fail, naming it undecodable (a check of the checks)",
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="walstream-interop-"))
    procs = Processes(work)
    hooks = Webhooks()
    try:
        database = start_postgres(procs, args.pg_bin, work)
        nats_url = start_nats(procs, args.nats_server, work)
        config = str(REPO / "integration/choreography/walstream.toml")
        env = walstream_env(database, nats_url, work)
        subprocess.run([args.walstream, "--config", config, "setup"], env={**os.environ, **env},
                       check=True, stdout=subprocess.DEVNULL)

        def start_walstream() -> None:
            procs.start("walstream", [args.walstream, "--config", config, "stream"], env=env)

        start_walstream()

        async def source_stream_exists() -> bool:
            nc = await nats.connect(nats_url)
            try:
                await nc.jetstream().stream_info(SOURCE_STREAM)
                return True
            finally:
                await nc.close()

        wait_for("walstream's stream", lambda: asyncio.run(source_stream_exists()))
        asyncio.run(create_feed(nats_url))
        start_fraiseql(procs, args.fraiseql, database, nats_url, hooks, work)
        log(f"loading {args.orders} orders (insert, then update to paid)")
        load(database, args.orders, procs, start_walstream)
        if args.foreign_message:
            asyncio.run(publish_foreign(nats_url))

        expected = 2 * args.orders
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline and len(hooks.snapshot()) < expected:
            time.sleep(0.5)
        time.sleep(3)  # what arrives late would be a duplicate
        return report(hooks.snapshot(), args.orders, work)
    finally:
        procs.stop_all()
        log(f"logs in {work}")


def report(calls: list[tuple[str, str, dict]], orders: int, work: Path) -> int:
    per_order = Counter((path, body.get("identifier")) for path, _, body in calls)
    event_ids = Counter(event_id for _, event_id, _ in calls)
    missing = [
        (path, f"interop-{n}")
        for n in range(orders)
        for path in ("/insert", "/update")
        if per_order[(path, f"interop-{n}")] == 0
    ]
    doubled = {key: count for key, count in per_order.items() if count > 1}
    server_log = (work / "fraiseql-server.log").read_text(errors="replace")
    # OB020 is FraiseQL's "Event deserialization failed"; each of its two consumers (dispatch,
    # subscription fan-out) logs one line per such message.
    undecodable = sum("OB020" in line for line in server_log.splitlines())
    by_path = Counter(path for path, _, _ in calls)
    log(
        f"webhook calls: {len(calls)} ({by_path['/insert']} INSERT, {by_path['/update']} "
        f"UPDATE) for {orders} orders; distinct event ids {len(event_ids)}"
    )
    log(f"missing: {len(missing)} {missing[:5]}")
    log(f"more than once: {len(doubled)} {list(doubled.items())[:5]}")
    log(f"fraiseql-server log lines on undecodable messages (OB020): {undecodable}")
    ok = not missing and not doubled and undecodable == 0 and len(calls) == 2 * orders
    log("PASS: every order's insert and update ran its observer exactly once" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
