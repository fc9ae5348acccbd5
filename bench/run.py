"""`make bench`: start a local node, run every benchmark against it, take it down."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def criu_shim(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "shim", *args], check=True, capture_output=True, text=True).stdout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/criu-shim-bench"))
    parser.add_argument("--quick", action="store_true", help="fewer rounds, for a smoke run")
    args = parser.parse_args()
    out = criu_shim("node", "up", "--dir", str(args.dir))
    endpoints = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    try:
        rounds = ["--rounds", "200", "--runs", "3"] if args.quick else []
        print("== CRI pass-through latency (containerd 1.7 direct vs through criu-shim)", flush=True)
        subprocess.run([sys.executable, str(HERE / "proxy_latency.py"), "--containerd",
                        endpoints["CONTAINERD_ENDPOINT"], "--proxy", endpoints["CRI_ENDPOINT"], *rounds], check=True)
    finally:
        criu_shim("node", "down", "--dir", str(args.dir), "--purge")
    print("\n== CheckpointContainer: criu-shim on containerd 1.7 vs the CRIU floor vs containerd 2.x native",
          flush=True)
    sizes = ["--sizes", "64,512", "--reps", "1"] if args.quick else []
    subprocess.run([sys.executable, str(HERE / "checkpoint.py"), *sizes], check=True)
    print("\n== zstd archives against uncompressed ones: size, checkpoint and restore, text and random memory",
          flush=True)
    subprocess.run([sys.executable, str(HERE / "compression.py"), *(["--sizes", "64", "--reps", "1"] if args.quick
                                                                   else [])], check=True)
    print("\n== Lazy restore of a sealed archive vs an unencrypted one: until running and until all in place",
          flush=True)
    subprocess.run([sys.executable, str(HERE / "sealed_restore.py"), *sizes], check=True)
    print("\n== Restore from a checkpoint image: its layer linked from containerd's content store vs streamed out of it",
          flush=True)
    subprocess.run([sys.executable, str(HERE / "image_restore.py"), *sizes], check=True)
    print("\n== Restore: criu-shim on containerd 1.7 vs containerd 2.x native vs CRIU's own restore vs cold start",
          flush=True)
    subprocess.run([sys.executable, str(HERE / "restore.py"), *sizes], check=True)
    print("\n== containerd 2.x: CheckpointContainer and restore through criu-shim on 2.4 vs containerd 2.3's own "
          "(its restore switch on)", flush=True)
    subprocess.run([sys.executable, str(HERE / "containerd2.py"), *sizes], check=True)
    print("\n== Live migration of a TCP server into a new pod (old IP kept): the client's gap and its split",
          flush=True)
    gap = ["--sizes", "64", "--reps", "1"] if args.quick else []
    subprocess.run([sys.executable, str(HERE / "tcp_gap.py"), *gap], check=True)
    print("\n== Live migration between two nodes (fabric hosts): the client's largest gap, direct eager and lazy, "
          "next to the CRIU floor", flush=True)
    hops = ["--sizes", "64", "--reps", "1"] if args.quick else ["--sizes", "64", "512", "2048", "--reps", "3"]
    subprocess.run([sys.executable, str(HERE / "migrate.py"), *hops], check=True)
    print("\n== A lazy migration's page path alone (page server, source relay, TLS, page daemon) vs one TLS stream: "
          "MB/s and CPU per GiB", flush=True)
    subprocess.run([sys.executable, str(HERE / "page_path.py"), *(["--mib", "256", "--reps", "1"] if args.quick
                                                                 else [])], check=True)
    print("\n== Real applications (Debian builds) moved into a new pod with a client connection open, vs the CRIU floor",
          flush=True)
    subprocess.run([sys.executable, str(HERE / "apps.py"), *(["--reps", "1"] if args.quick else [])], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
