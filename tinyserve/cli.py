"""The `tinyserve` command: serve | make-model | bench <name>."""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main"]

# `tinyserve bench <name>` runs `main(argv)` of the module named here.
BENCHMARKS = {
    "allocator": "tinyserve.bench.allocator",
    "offload": "tinyserve.bench.offload",
    "selection": "tinyserve.bench.selection",
    "kernels": "tinyserve.bench.kernels",
    "router": "tinyserve.bench.router",
    "router-sim": "tinyserve.bench.router_sim",
    "faults": "tinyserve.bench.faults",
}


def _serve(args: argparse.Namespace) -> int:
    from tinyserve.deployments.config import ConfigError, load_config

    overrides: dict = {}
    if args.replicas is not None:
        overrides["deployment"] = {"num_replicas": args.replicas}
    if args.port is not None:
        overrides["http"] = {"port": args.port}
    try:
        config = load_config(args.config, overrides=overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    from tinyserve.serving import serve_forever

    serve_forever(config)
    return 0


def _make_model(args: argparse.Namespace) -> int:
    from tinyserve.models.make_model import default_model_dir, make_model

    out = make_model(args.out or default_model_dir(args.size), size=args.size, seed=args.seed)
    print(out)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tinyserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible endpoint on a local Ray cluster")
    serve.add_argument("--config", help="deployment YAML (default: the packaged default.yaml)")
    serve.add_argument("--replicas", type=int, help="override deployment.num_replicas")
    serve.add_argument("--port", type=int, help="override http.port")

    make = sub.add_parser("make-model", help="build the embedded default model offline")
    make.add_argument("--size", choices=["tiny", "small"], default="tiny")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--out", help="output directory (default: models/tinyserve-<size>)")

    bench = sub.add_parser("bench", help="run a benchmark; arguments after the name go to it")
    bench.add_argument("name", choices=sorted(BENCHMARKS))
    bench.add_argument("rest", nargs=argparse.REMAINDER)

    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "make-model":
        return _make_model(args)
    module = importlib.import_module(BENCHMARKS[args.name])
    return int(module.main(args.rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
