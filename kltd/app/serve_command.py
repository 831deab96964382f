"""`kltd serve-teacher MODEL`: serve a teacher to training runs (kltd.train.teacher_server), which then load none.

    kltd serve-teacher toy/teacher --port 8765
    kltd train model.teacher_server=http://127.0.0.1:8765 model.teacher_top_k=17

MODEL is anything model.teacher takes (the shipped toy/teacher, a directory, a hub id, a run directory). The server
binds to 127.0.0.1 unless --host says otherwise; it has no authentication.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str]) -> None:
    from kltd.app.compose import fail
    from kltd.schema import choices as C
    from kltd.train.models import check_model_reference
    from kltd.train.teacher_server import load_service, make_server

    parser = argparse.ArgumentParser(prog="kltd serve-teacher", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="the teacher: toy/teacher, a directory, a hub id or a run directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: a free one, printed)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="float32", choices=C.DTYPES)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    problem = check_model_reference(args.model)  # before anything loads: a missing model is one line
    if problem:
        fail(f"serve-teacher: {problem}", 1)
    try:
        service = load_service(args.model, args.dtype, args.device, args.trust_remote_code)
        server = make_server(service, args.host, args.port)
    except (ValueError, OSError) as error:  # a model that does not load, a port in use
        fail(f"serve-teacher: {error}", 1)
    host, port = server.server_address[:2]
    print(f"kltd: serving teacher '{args.model}' at http://{host}:{port} (vocabulary {service.vocab}); "
          f"train with model.teacher_server=http://{host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("kltd: teacher server stopped", file=sys.stderr)
    finally:
        server.server_close()
