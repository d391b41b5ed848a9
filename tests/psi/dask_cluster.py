"""A real Dask ``distributed`` cluster on loopback for tests: one ``dask scheduler`` process and N ``dask worker``
processes (no nanny: each worker is the process we started, so a test can kill it), on free ports, always stopped.

Workers import vfl from this checkout (PYTHONPATH), as a party's own hosts would import the installed vfl.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vfl.launch.prepare import free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 40.0  # a busy 2-core box: each process imports distributed (about 1-2 s) first


class _Proc:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=log.parent,
                                     start_new_session=True)

    @property
    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, deadline: float) -> None:
        while time.monotonic() < deadline:
            if text in self.output:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.proc.args} exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {text!r} from {self.proc.args} in time:\n{self.output}")

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown) and reap."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=5)
            except ProcessLookupError:
                pass
            except subprocess.TimeoutExpired:
                self.kill()
        self._log.close()


def write_tls_files(folder: Path) -> dict[str, Path]:
    """A fresh CA and one certificate for 127.0.0.1 signed by it (PEM files): what a party would issue to its
    scheduler, workers and node. Returns {"ca": ..., "cert": ..., "key": ...}."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vfl test party CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.pem", "cert": folder / "cert.pem", "key": folder / "key.pem"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    files["key"].chmod(0o600)
    return files


def tls_client_env(files: dict[str, Path]) -> dict[str, str]:
    """The environment that gives a node's Dask client the party's TLS files (Dask's own configuration keys)."""
    return {"DASK_DISTRIBUTED__COMM__TLS__CA_FILE": str(files["ca"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": str(files["cert"]),
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": str(files["key"])}


class DaskCluster:
    """``with DaskCluster(tmp, workers=2) as c:`` -- ``c.address`` is the scheduler's ``tcp://127.0.0.1:PORT``
    (``tls=True``: ``tls://``, every connection with the certificates in ``c.tls``)."""

    def __init__(self, tmp: Path, workers: int = 2, *, tls: bool = False) -> None:
        self.tmp = tmp
        self.n_workers = workers
        self.tls = write_tls_files(tmp / "tls") if tls else None
        self.address = f"{'tls' if tls else 'tcp'}://127.0.0.1:{free_port()}"
        self.scheduler: _Proc | None = None
        self.workers: list[_Proc] = []

    def __enter__(self) -> DaskCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        port = self.address.rsplit(":", 1)[1]
        self.tmp.mkdir(parents=True, exist_ok=True)
        tls = [] if self.tls is None else ["--tls-ca-file", str(self.tls["ca"]), "--tls-cert", str(self.tls["cert"]),
                                           "--tls-key", str(self.tls["key"])]
        self.scheduler = _Proc([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                                "--port", port, "--no-dashboard", *tls]
                               + ([] if self.tls is None else ["--protocol", "tls"]), self.tmp / "dask-scheduler.log")
        self.scheduler.wait_for("Scheduler at:", deadline)
        for i in range(self.n_workers):
            self.workers.append(_Proc(
                [sys.executable, "-m", "distributed.cli.dask_worker", self.address, "--host", "127.0.0.1",
                 "--nthreads", "1", "--no-nanny", "--no-dashboard", "--death-timeout", "30", "--name", f"w{i}",
                 "--local-directory", str(self.tmp / f"w{i}"), *tls],
                self.tmp / f"dask-worker-{i}.log"))
        for w in self.workers:
            w.wait_for("Registered to:", deadline)

    def stop(self) -> None:
        for p in self.workers:
            p.stop()
        if self.scheduler is not None:
            self.scheduler.stop()

    def logs(self) -> str:
        procs = ([self.scheduler] if self.scheduler else []) + self.workers
        return "\n".join(p.output for p in procs)
