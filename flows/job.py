"""``python -m flows.job MODULE:FUNCTION KWARGS``: the entrypoint of every Ray job the flow submits
(``flows.ray_jobs.run_stage``).

``KWARGS`` is the function's keyword arguments as base64 JSON (one shell-safe token). The function's JSON result
is printed last, on one line: ``ALEXNET_RESULT <base64 JSON>``; the flow reads it back by that marker. Anything
the function prints or logs before stays in the job's logs.
"""

from __future__ import annotations

import argparse
import sys

from flows.ray_jobs import call, decode, result_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.job", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("function", help="the library function, module:function (e.g. flows.stages:train)")
    parser.add_argument("kwargs", help="its keyword arguments, base64 JSON (flows.ray_jobs.encode)")
    args = parser.parse_args(argv)
    kwargs = decode(args.kwargs)
    if not isinstance(kwargs, dict):
        parser.error("kwargs must encode a JSON object")
    result = call(args.function, kwargs)
    sys.stdout.flush()
    sys.stderr.flush()
    print("\n" + result_line(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
