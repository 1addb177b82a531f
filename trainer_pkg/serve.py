"""A small JSON-over-HTTP endpoint for an exported model (standard library server, one model).

    python -m trainer_pkg.serve EXPORT [--host 127.0.0.1] [--port 8080] [--batch_size 64]

    POST /predict  {"texts": ["...", ...]}  ->  {"predictions": [{"label", "label_id", "score", "probabilities"}, ...]}
    GET  /health                           ->  {"status": "ok", "model": ..., "labels": [...]}

Predictions are the same objects `trainer_pkg.predict` writes, in request order. A request's
texts are run `--batch_size` at a time; concurrent requests are served by threads and take turns
on the model. Bad requests get status 400 and {"error": "..."} in one line.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from trainer_pkg.config import ArgParser
from trainer_pkg.data import truncation_length
from trainer_pkg.errors import UserError, cli
from trainer_pkg.evaluate import saved_run_config
from trainer_pkg.model import label_names, load_classifier
from trainer_pkg.predict import predictions


class BadRequest(Exception):
    """A request the client must fix: answered with 400 and the message."""


class Classifier:
    """The model and tokenizer behind the endpoint; one forward pass at a time."""

    def __init__(self, model_dir: str, batch_size: int, device: str):
        self.model, self.tokenizer = load_classifier(model_dir)
        self.model.to(device).eval()
        self.device = device
        self.labels = label_names(self.model)
        run_config = saved_run_config(Path(model_dir))
        # The same truncation as training, evaluate and predict, so all four agree on long texts.
        self.max_length = truncation_length(run_config, self.tokenizer)
        self.batch_size = batch_size
        # Threads share one model: forward passes in turn keep memory bounded and results exact.
        self.lock = threading.Lock()

    @torch.inference_mode()
    def predict(self, texts: list[str]) -> list[dict]:
        results = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[start:start + self.batch_size], truncation=True, max_length=self.max_length,
                                   padding=True, return_tensors="pt", return_token_type_ids=False).to(self.device)
            with self.lock:
                logits = self.model(**batch).logits
            results += predictions(logits.cpu(), self.labels)
        return results


def parse_texts(body: bytes, max_texts: int) -> list[str]:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadRequest(f"body is not valid JSON ({error})") from None
    texts = request.get("texts") if isinstance(request, dict) else None
    if not isinstance(texts, list):
        raise BadRequest('expected a JSON object {"texts": ["...", ...]}')
    if len(texts) > max_texts:
        raise BadRequest(f"{len(texts)} texts in one request; send at most {max_texts} (--max_texts)")
    bad = next((i for i, text in enumerate(texts) if not isinstance(text, str)), None)
    if bad is not None:
        raise BadRequest(f"texts[{bad}] is {type(texts[bad]).__name__}, expected a string")
    return texts


def make_handler(classifier: Classifier, model_dir: str, max_texts: int, max_body: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, status: HTTPStatus, payload: dict) -> None:
            body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path != "/health":
                self.reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: GET {self.path} (try /health)"})
                return
            self.reply(HTTPStatus.OK, {"status": "ok", "model": model_dir, "labels": classifier.labels})

        def do_POST(self) -> None:
            if self.path != "/predict":
                self.reply(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: POST {self.path} (try /predict)"})
                return
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0:
                self.close_connection = True
                self.reply(HTTPStatus.BAD_REQUEST, {"error": "missing or invalid Content-Length header"})
                return
            if length > max_body:
                # Unread, the body would be taken for the next request on this connection.
                self.close_connection = True
                self.reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"body of {length} bytes; at most {max_body}"})
                return
            try:
                texts = parse_texts(self.rfile.read(length), max_texts)
            except BadRequest as error:
                self.reply(HTTPStatus.BAD_REQUEST, {"error": str(error)})
                return
            self.reply(HTTPStatus.OK, {"predictions": classifier.predict(texts)})

        def log_message(self, format: str, *args) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    return Handler


def stop_like_ctrl_c(signum, frame) -> None:
    """SIGTERM (docker stop, systemd, kill) ends the server as Ctrl-C does: socket closed, exit 0."""
    raise KeyboardInterrupt


def build_parser() -> ArgParser:
    parser = ArgParser(prog="trainer_pkg.serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", metavar="EXPORT", help="an export (<output_dir>/model) or a checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8080, help="port (0 picks a free one; the address is printed)")
    parser.add_argument("--batch_size", type=int, default=64, help="texts per forward pass")
    parser.add_argument("--max_texts", type=int, default=1024, help="most texts accepted in one request")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--debug", action="store_true")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "max_texts"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    classifier = Classifier(args.model_dir, args.batch_size, args.device)
    # Room for max_texts reviews of a few KB each; anything larger is not a sentiment request.
    max_body = args.max_texts * 16_384
    try:
        server = ThreadingHTTPServer((args.host, args.port), make_handler(classifier, args.model_dir, args.max_texts,
                                                                           max_body))
    except OSError as error:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({error.strerror}); pass another --port") from None
    signal.signal(signal.SIGTERM, stop_like_ctrl_c)
    host, port = server.server_address[:2]
    print(f"serving {args.model_dir} on http://{host}:{port} (POST /predict, GET /health)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("server stopped", file=sys.stderr, flush=True)
    return 0


def cli_main() -> None:
    cli(main)


if __name__ == "__main__":
    cli_main()
