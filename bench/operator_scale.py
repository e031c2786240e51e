#!/usr/bin/env python3
"""The operator at fleet scale (see bench/README.md): PIPELINES CdcPipelines over two source
servers (and a third for the buffer), REPLICAS `philotes controller` processes against a real kube-apiserver (as the
deploy/ ServiceAccount, its API requests recorded by the API server's audit log), and what a
platform team would look at: time to all Ready, memory and database connections per pipeline,
API server requests per pipeline at steady state, takeover after a SIGKILL, shutdown time.

Usage: operator_scale.py PHILOTES_BIN ASSETS_DIR OUT_DIR (bench/operator-scale.sh runs it).
"""

import calendar
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

PIPELINES = int(os.environ.get("BENCH_PIPELINES", "200"))
REPLICAS = int(os.environ.get("BENCH_REPLICAS", "3"))
STEADY = int(os.environ.get("BENCH_STEADY_SECONDS", "60"))
NS = "scale"
SA_USER = "system:serviceaccount:philotes-system:philotes"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log(msg):
    print(f"operator-scale: {msg}", file=sys.stderr, flush=True)


class Pg:
    """A PostgreSQL server of its own (as the postgres user when run as root)."""

    def __init__(self, work, name, bindir):
        self.dir = os.path.join(work, name)
        self.port = free_port()
        self.bindir = bindir
        self.as_pg = ["runuser", "-u", "postgres", "--"] if os.getuid() == 0 else []
        subprocess.run(self.as_pg + [f"{bindir}/initdb", "-D", self.dir, "-U", "postgres",
                                     "--auth=trust", "-E", "UTF8", "--locale=C"],
                       check=True, stdout=subprocess.DEVNULL)
        with open(os.path.join(self.dir, "postgresql.conf"), "a") as f:
            f.write(f"""
port = {self.port}
listen_addresses = '127.0.0.1'
unix_socket_directories = '{work}'
wal_level = logical
max_replication_slots = {PIPELINES + 20}
max_wal_senders = {PIPELINES + 20}
max_connections = {4 * PIPELINES + 50}
shared_buffers = 128MB
""")
        subprocess.run(self.as_pg + [f"{bindir}/pg_ctl", "-D", self.dir, "-l", self.dir + ".log",
                                     "-w", "start"], check=True, stdout=subprocess.DEVNULL)

    def uri(self, db):
        return f"postgres://postgres@127.0.0.1:{self.port}/{db}"

    def sql(self, db, query):
        out = subprocess.run([f"{self.bindir}/psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                              "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
                              "-c", query], check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self):
        subprocess.run(self.as_pg + [f"{self.bindir}/pg_ctl", "-D", self.dir, "-m", "immediate",
                                     "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class ApiServer:
    """etcd and kube-apiserver on loopback, static tokens, RBAC, an audit log of the operator's
    ServiceAccount's requests."""

    def __init__(self, work, assets):
        d = os.path.join(work, "apiserver")
        os.makedirs(os.path.join(d, "certs"))
        client, peer = free_port(), free_port()
        self.port = free_port()
        self.audit = os.path.join(d, "audit.log")
        self.etcd = subprocess.Popen(
            [f"{assets}/etcd", "--data-dir", f"{d}/etcd",
             "--listen-client-urls", f"http://127.0.0.1:{client}",
             "--advertise-client-urls", f"http://127.0.0.1:{client}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"default=http://127.0.0.1:{peer}", "--unsafe-no-fsync"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/etcd.log", "w"))
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                        "-out", f"{d}/sa.key"], check=True)
        subprocess.run(["openssl", "ec", "-in", f"{d}/sa.key", "-pubout", "-out", f"{d}/sa.pub"],
                       check=True, stderr=subprocess.DEVNULL)
        with open(f"{d}/tokens.csv", "w") as f:
            f.write('admin-token,admin,1,"system:masters"\n')
            f.write(f'operator-token,{SA_USER},2,"system:serviceaccounts,system:serviceaccounts:philotes-system"\n')
        with open(f"{d}/audit.yaml", "w") as f:
            f.write(f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{SA_USER}"]
  - level: None
""")
        self.proc = subprocess.Popen(
            [f"{assets}/kube-apiserver", f"--etcd-servers=http://127.0.0.1:{client}",
             f"--secure-port={self.port}", "--bind-address=127.0.0.1",
             "--advertise-address=127.0.0.1", f"--cert-dir={d}/certs",
             f"--token-auth-file={d}/tokens.csv", "--authorization-mode=RBAC",
             f"--service-account-key-file={d}/sa.pub",
             f"--service-account-signing-key-file={d}/sa.key",
             "--service-account-issuer=https://kubernetes.default.svc",
             "--service-cluster-ip-range=10.0.0.0/24",
             "--disable-admission-plugins=ServiceAccount",
             f"--audit-policy-file={d}/audit.yaml", f"--audit-log-path={self.audit}",
             "--audit-log-mode=blocking"],
            stdout=subprocess.DEVNULL, stderr=open(f"{d}/apiserver.log", "w"))
        self.ctx = ssl.create_default_context()
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        deadline = time.time() + 120
        while True:
            try:
                self.call("GET", "/version")
                break
            except Exception:
                if time.time() > deadline:
                    raise
                time.sleep(0.3)

    def call(self, method, path, body=None, ok_conflict=False):
        req = urllib.request.Request(
            f"https://127.0.0.1:{self.port}{path}", method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": "Bearer admin-token", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            if ok_conflict and e.code == 409:
                return None
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:500]!r}") from e

    def requests_between(self, t0, t1):
        """The operator's requests received in [t0, t1) (unix seconds): (verb, resource) -> n."""
        counts, seen = {}, set()
        with open(self.audit) as f:
            for line in f:
                e = json.loads(line)
                if e["auditID"] in seen:
                    continue
                seen.add(e["auditID"])
                ts = e["requestReceivedTimestamp"]
                at = calendar.timegm(time.strptime(ts[:19], "%Y-%m-%dT%H:%M:%S"))
                at += float("0." + ts[20:-1]) if len(ts) > 20 else 0
                if not (t0 <= at < t1):
                    continue
                ref = e.get("objectRef", {})
                what = ref.get("resource", "?") + ("/" + ref["subresource"] if ref.get("subresource") else "")
                key = (e["verb"], what)
                counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self):
        for p in (self.proc, self.etcd):
            p.kill()


PATHS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
}


def install(api):
    """The CRD and deploy/ (but the Deployment and its Service), as a user would apply them."""
    files = [os.path.join(ROOT, "crds/cdcpipelines.philotes.io.yaml")] + sorted(
        os.path.join(ROOT, "deploy", f) for f in os.listdir(os.path.join(ROOT, "deploy")))
    for path in files:
        for doc in yaml.safe_load_all(open(path)):
            if not doc or doc["kind"] not in PATHS:
                continue
            ns = doc["metadata"].get("namespace", "default")
            api.call("POST", PATHS[doc["kind"]].format(ns=ns), doc, ok_conflict=True)
    deadline = time.time() + 60
    while True:
        crd = api.call("GET", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/cdcpipelines.philotes.io")
        if any(c["type"] == "Established" and c["status"] == "True"
               for c in crd.get("status", {}).get("conditions", [])):
            return
        if time.time() > deadline:
            raise RuntimeError("the CRD was not established")
        time.sleep(0.2)


class Replica:
    def __init__(self, work, api, philotes, name):
        self.name = name
        kubeconfig = os.path.join(work, f"{name}.kubeconfig")
        with open(kubeconfig, "w") as f:
            f.write(f"""apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster: {{server: "https://127.0.0.1:{api.port}", insecure-skip-tls-verify: true}}
users:
- name: operator
  user: {{token: operator-token}}
contexts:
- name: bench
  context: {{cluster: bench, user: operator}}
current-context: bench
""")
        env = dict(os.environ, KUBECONFIG=kubeconfig, POD_NAME=name,
                   PHILOTES_LOG="info,tokio_postgres=warn,pgwire_replication=warn")
        self.log = os.path.join(work, f"{name}.log")
        self.proc = subprocess.Popen(
            [philotes, "controller", "--namespace", NS, "--metrics-addr",
             f"127.0.0.1:{free_port()}", "--lease-namespace", "philotes-system"],
            env=env, stdin=subprocess.DEVNULL, stdout=open(self.log, "w"), stderr=subprocess.STDOUT)

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0


def pipelines(api):
    return api.call("GET", f"/apis/philotes.io/v1alpha1/namespaces/{NS}/cdcpipelines")["items"]


def ready(p, owners=None, since=None):
    """Running and Ready under one of `owners`; with `since` (epoch seconds), Ready became
    True at or after it: the status the previous owner left says Running until the new one
    writes, so a pipeline handed over counts only once its new owner has written Ready."""
    s = p.get("status") or {}
    cond = [c for c in s.get("conditions", []) if c["type"] == "Ready"]
    if not (cond and cond[0]["status"] == "True" and s.get("phase") == "Running"):
        return False
    if owners is not None and s.get("owner") not in owners:
        return False
    if since is not None:
        became = calendar.timegm(time.strptime(cond[0]["lastTransitionTime"], "%Y-%m-%dT%H:%M:%SZ"))
        return became >= int(since)  # the condition's time has whole seconds
    return True


def owned_by(api, owner):
    return {p["metadata"]["name"] for p in pipelines(api) if (p.get("status") or {}).get("owner") == owner}


def wait_all(api, what, owners=None, moved=(), since=None, timeout=600):
    """Every pipeline Ready (under one of `owners`); those in `moved` Ready again since
    `since` (they are being handed over). Returns the seconds since `since` (or this call)."""
    t0 = since if since is not None else time.time()
    while time.time() - t0 < timeout:
        items = pipelines(api)
        n = sum(1 for p in items
                if ready(p, owners, t0 if p["metadata"]["name"] in moved else None))
        if n == PIPELINES:
            return time.time() - t0
        time.sleep(0.5)
    raise RuntimeError(f"{what}: only {n} of {PIPELINES} ready after {timeout}s")


def main():
    philotes, assets, out = sys.argv[1], sys.argv[2], sys.argv[3]
    bindir = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                            check=True).stdout.strip()
    work = tempfile.mkdtemp(prefix="philotes-operator-scale-")
    if os.getuid() == 0:
        subprocess.run(["chown", "postgres:", work], check=True)
    servers, servers_all, api, replicas = [], [], None, []
    try:
        log(f"{PIPELINES} pipelines over 2 source servers, {REPLICAS} replicas; work dir {work}")
        for name in ("pg-a", "pg-b"):
            servers_all.append(Pg(work, name, bindir))
        servers = list(servers_all)
        for s in servers:
            s.sql("postgres", "CREATE DATABASE src")
        # The buffer on a server of its own: its writes would otherwise be WAL the sources'
        # slots have to follow, and the sources would never be idle.
        buffer = Pg(work, "pg-buf", bindir)
        servers_all.append(buffer)
        buffer.sql("postgres", "CREATE DATABASE buf")
        for i in range(PIPELINES):
            servers[i % 2].sql("src", f"CREATE TABLE t{i:03} (id int PRIMARY KEY)")
        api = ApiServer(work, assets)
        install(api)
        api.call("POST", "/api/v1/namespaces", {"metadata": {"name": NS}}, ok_conflict=True)
        for name, uri in [("src-a", servers[0].uri("src")), ("src-b", servers[1].uri("src")),
                          ("buf", buffer.uri("buf"))]:
            api.call("POST", f"/api/v1/namespaces/{NS}/secrets",
                     {"metadata": {"name": name}, "stringData": {"uri": uri}})
        replicas = [Replica(work, api, philotes, f"r{i + 1}") for i in range(REPLICAS)]
        time.sleep(5)
        baseline = sum(r.rss_kib() for r in replicas)

        t0 = time.time()
        for i in range(PIPELINES):
            api.call("POST", f"/apis/philotes.io/v1alpha1/namespaces/{NS}/cdcpipelines", {
                "apiVersion": "philotes.io/v1alpha1", "kind": "CdcPipeline",
                "metadata": {"name": f"p{i:03}"},
                "spec": {"source": {"connectionSecretRef": {"name": "src-a" if i % 2 == 0 else "src-b"},
                                    "tables": [f"t{i:03}"]},
                         "buffer": {"connectionSecretRef": {"name": "buf"}}}})
        created = time.time() - t0
        all_ready = wait_all(api, "all Ready") + created
        log(f"all Ready {all_ready:.1f}s after the first was created")

        # Steady state: nothing changes on the sources; statusInterval is the default (10s).
        # A minute to settle first: creating the slots wrote WAL, and the sources log a
        # standby snapshot every 15 s for as long as anything else was written.
        time.sleep(60)
        lsn = "SELECT pg_current_wal_lsn() - '0/0'"
        wal0 = [int(s.sql("postgres", lsn)) for s in servers]
        s0 = time.time()
        time.sleep(STEADY)
        s1 = time.time()
        wal = sum(int(s.sql("postgres", lsn)) - w for s, w in zip(servers, wal0))
        time.sleep(2)  # the audit log is written when a response completes
        requests = api.requests_between(s0, s1)
        total = sum(requests.values())
        status_writes = sum(n for (verb, what), n in requests.items()
                            if what == "cdcpipelines/status" and verb in ("patch", "update"))
        rss = sum(r.rss_kib() for r in replicas)
        conns_src = sum(int(s.sql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = 'src'"))
                        for s in servers)
        conns_buf = int(buffer.sql("postgres", "SELECT count(*) FROM pg_stat_activity WHERE datname = 'buf'"))
        owners = {}
        for p in pipelines(api):
            o = (p.get("status") or {}).get("owner")
            owners[o] = owners.get(o, 0) + 1

        # Takeover: SIGKILL one replica; its pipelines run elsewhere.
        victim = replicas[-1]
        moved = owned_by(api, victim.name)
        t0 = time.time()
        victim.proc.kill()
        victim.proc.wait()
        takeover = wait_all(api, "takeover", owners={r.name for r in replicas[:-1]}, moved=moved, since=t0)
        log(f"takeover after SIGKILL {takeover:.1f}s")

        # Shutdown: SIGTERM the replicas left, one at a time (the last one runs everything).
        shutdowns = []
        for r in replicas[:-1]:
            moved = owned_by(api, r.name)
            t0 = time.time()
            r.proc.send_signal(signal.SIGTERM)
            code = r.proc.wait(timeout=60)
            shutdowns.append((r.name, len(moved), time.time() - t0, code))
            if r is not replicas[-2]:
                left = {x.name for x in replicas[:-1] if x.proc.poll() is None}
                # From the SIGTERM.
                handover = wait_all(api, "handover on SIGTERM", owners=left, moved=moved, since=t0)
                shutdowns[-1] += (handover,)

        minutes = (s1 - s0) / 60
        rows = [
            ("pipelines / replicas / source servers", f"{PIPELINES} / {REPLICAS} / 2", ""),
            ("pipelines per replica", ", ".join(f"{k}: {v}" for k, v in sorted(owners.items(), key=str)), "even split, within one"),
            ("time from the first CdcPipeline created to all Ready", f"{all_ready:.1f} s", ""),
            ("RSS per pipeline (all replicas, minus their RSS with none)", f"{(rss - baseline) / PIPELINES:.0f} KiB", "under 1 MB"),
            ("replica RSS with no pipeline / with their share", f"{baseline // 1024 // REPLICAS} MB / {rss // 1024 // REPLICAS} MB each (mean)", ""),
            ("source connections per idle pipeline", f"{conns_src / PIPELINES:.2f}", "at most 2"),
            ("buffer connections per idle pipeline", f"{conns_buf / PIPELINES:.2f}", ""),
            ("API requests per pipeline per minute, steady state", f"{total / PIPELINES / minutes:.2f}", ""),
            ("WAL the two sources wrote during the steady state", f"{wal} bytes", "no user writes (their own autovacuum)"),
            ("status writes per pipeline per statusInterval (10 s)", f"{status_writes / PIPELINES / (minutes * 6):.2f}", "at most 1; none when nothing changed"),
            ("takeover after SIGKILL (all Ready elsewhere)", f"{takeover:.1f} s", "under 2 lease durations (30 s)"),
        ]
        for s in shutdowns:
            rows.append((f"SIGTERM of {s[0]} running {s[1]} pipelines: exit {s[3]}", f"{s[2]:.1f} s", "under 10 s"))
            if len(s) > 4:
                rows.append((f"... its pipelines Ready on the others (from the SIGTERM)", f"{s[4]:.1f} s", ""))
        table = ["| measure | result | target |", "|---|---:|---|"]
        table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
        detail = ["", f"Operator's API requests during the {STEADY} s of steady state, by verb and resource:", "",
                  "| verb | resource | requests |", "|---|---|---:|"]
        detail += [f"| {v} | {w} | {n} |" for (v, w), n in sorted(requests.items())]
        text = "\n".join(table + detail) + "\n"
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "operator-scale.md"), "w") as f:
            f.write(text)
        print(text)
    finally:
        for r in replicas:
            if r.proc.poll() is None:
                r.proc.kill()
        if api:
            api.stop()
        for s in servers_all:
            s.stop()


if __name__ == "__main__":
    main()
